"""rankcut's version, written into every saved manifest."""

__version__ = "0.1.0"
