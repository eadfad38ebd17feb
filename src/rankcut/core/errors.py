"""One exception type for every mistake a user can make.

The command line prints these as a single line (no traceback), so each message must say what
was wrong and what to do instead.
"""

from __future__ import annotations


class RankcutError(Exception):
    """A user-facing error: bad input, a missing file, a corrupt saved model."""


def installed(module: str) -> bool:
    """Whether an optional dependency can be imported, without importing it (matplotlib takes seconds)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def require(module: str, extra: str, purpose: str) -> None:
    """Refuse, before any work, a command whose optional dependency is not installed: the extras
    (`tucker`, `plot`, `ray`) are not in a plain `pip install rankcut`."""
    if not installed(module):
        raise RankcutError(f"{purpose} needs {module}: pip install 'rankcut[{extra}]'")
