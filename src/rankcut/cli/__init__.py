"""The `rankcut` command: one module per command, the parser, and `main`."""

from .main import main
from .parser import build_parser

__all__ = ["build_parser", "main"]
