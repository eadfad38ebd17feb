"""One exception type for every mistake a user can make.

The command line prints these as a single line (no traceback), so each message must say what
was wrong and what to do instead.
"""


class RankcutError(Exception):
    """A user-facing error: bad input, a missing file, a corrupt saved model."""
