"""`python -m rankcut.cli`, the same as the `rankcut` command."""

import sys

from .main import main

sys.exit(main())
