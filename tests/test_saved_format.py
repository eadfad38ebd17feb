"""Folders saved before the package moved to its folder layout load today: the same factors bit for
bit, and the same outputs up to the rounding of this machine's kernels.

`tests/fixtures/saved_v1` holds one folder per stored form (plain, pivoted with a token and
factor layout, budget-dense, dense fallback, Tucker three-factor) across the four tiny
architectures, written by rankcut 0.1.0 with `tests/fixtures/make_saved_v1.py`, and each
reloaded model's output on a fixed input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rankcut
from rankcut.core.model_facts import model_output

from .conftest import rel_err

FIXTURES = Path(__file__).parent / "fixtures" / "saved_v1"
CASES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def test_every_form_is_kept():
    forms = {rec["form"] for case in CASES
             for rec in json.loads((FIXTURES / case / "rankcut.json").read_text())["modules"].values()}
    assert forms == {"two-factor", "pivot", "tucker3", "dense", "dense-fallback"}


@pytest.mark.parametrize("case", CASES)
def test_a_folder_saved_before_the_move_loads_the_same_factors(case):
    expected = load_file(str(FIXTURES / "expected_outputs.safetensors"))[case]
    model = rankcut.load(FIXTURES / case)
    with torch.no_grad():
        got = model_output(model, torch.arange(3, 40)[None])
    # the factors are bit for bit (below); the outputs to float rounding, which differs between CPUs
    # (the expected outputs were computed on another machine's kernels)
    assert rel_err(got, expected) <= 1e-5
    stored = load_file(str(FIXTURES / case / "model.safetensors"))
    params = model.state_dict()
    for key, tensor in stored.items():
        assert torch.equal(params[key], tensor), key
