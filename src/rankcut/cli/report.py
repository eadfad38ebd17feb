"""`rankcut report`: the table, Pareto plot and sensitivity plot of a sweep's results."""

from __future__ import annotations

import argparse

from ..core.errors import require
from ..study.report import write_report


def cmd_report(args: argparse.Namespace) -> None:
    require("matplotlib", "plot", "rankcut report")
    out = write_report(args.results, args.out)
    print(f"wrote {out}/table.md, {out}/pareto.png" + (", sensitivity.png" if (out / "sensitivity.png").exists() else ""))
