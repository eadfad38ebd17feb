"""GLUE's TSV files: which columns hold the texts and the label, and a reader that names the
file and line of a malformed row."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import RankcutError
from .benchmarks import require_file


@dataclass(frozen=True)
class GlueTask:
    folder: str
    num_labels: int  # 1 = regression
    epochs: int
    columns: tuple[int, ...]  # text columns
    label_column: int
    header: bool = True
    train_examples: int | None = None  # a fixed seeded sample of the train split


GLUE: dict[str, GlueTask] = {
    "sst2": GlueTask("SST-2", 2, 1, (0,), 1, train_examples=20_000),
    "mrpc": GlueTask("MRPC", 2, 2, (3, 4), 0),
    "rte": GlueTask("RTE", 2, 2, (0, 1), 2),
    "stsb": GlueTask("STS-B", 1, 2, (7, 8), 9),
}


Example = tuple[tuple[str, ...], float]


def read_glue(data_dir: Path, task: str, split: str) -> list[Example]:
    spec = GLUE[task]
    path = require_file(data_dir / "glue" / spec.folder / f"{split}.tsv", task)
    out: list[Example] = []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        for i, row in enumerate(reader):
            if i == 0 and spec.header:
                continue
            try:
                texts = tuple(row[c] for c in spec.columns)
                label = float(row[spec.label_column])
            except (IndexError, ValueError):
                raise RankcutError(f"{task}: {path} line {i + 1} does not have the expected columns") from None
            out.append((texts, label))
    if not out:
        raise RankcutError(f"{task}: {path} has no examples")
    return out
