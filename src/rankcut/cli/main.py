"""`main`: parse the command line, run the command, and turn every RankcutError into one line
on stderr and exit status 2."""

from __future__ import annotations

import logging
import os
import sys

from ..core.errors import RankcutError
from .parser import build_parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retry warnings, a line each
    try:
        args.func(args)
    except RankcutError as exc:
        print(f"rankcut: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("rankcut: interrupted", file=sys.stderr)
        return 130
    return 0
