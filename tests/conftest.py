"""Shared fixtures: tiny random models (no download) and helpers that compare outputs."""

from __future__ import annotations

import pytest
import torch

import rankcut
import rankcut.compress.apply as compress_module
from rankcut.core.model_facts import model_output
from rankcut.core.targets import select_targets

TINY = ["tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-mamba"]
SAMPLE = "Low-rank factors make a model smaller. The quick brown fox jumps over the lazy dog."


def sample_ids(model: torch.nn.Module) -> torch.Tensor:
    return rankcut.get_tokenizer(model)(SAMPLE, return_tensors="pt").input_ids


@torch.no_grad()
def output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model_output(model, ids)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def full_rank_overrides(model: torch.nn.Module, cls: type, **kw) -> dict:
    """Per-module configs at each matrix's full rank (past break-even, so growth is allowed)."""
    return {f"^{t.name}$": cls(rank=t.max_rank, allow_growth=True, **kw) for t in select_targets(model)}


def full_rank_error(name: str, cls: type, **kw) -> float:
    """How far the model cut by `cls` at every matrix's full rank is from the dense model (relative)."""
    model = rankcut.load_model(name)
    ids = sample_ids(model)
    dense = output(model, ids)
    overrides = full_rank_overrides(model, cls, **kw)
    rankcut.compress_(model, cls(rank=1, allow_growth=True, **kw), overrides=overrides, progress=False)
    return rel_err(output(model, ids), dense)


@pytest.fixture(params=TINY)
def tiny_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def data_dir():
    """The benchmark data folder; tests that read it are skipped where it is missing."""
    from rankcut.core.errors import RankcutError
    from rankcut.data.benchmarks import find_data_dir

    try:
        return find_data_dir(None)
    except RankcutError:
        pytest.skip("no benchmark data folder")


@pytest.fixture
def small_sst2(tmp_path, monkeypatch) -> None:
    """SST-2 from the real data folder with 64 training examples, and a cache of its own, so a
    GLUE fine-tune in a test takes seconds; skipped where the data folder is missing."""
    from rankcut.core.errors import RankcutError
    from rankcut.data.benchmarks import find_data_dir
    from rankcut.evaluate import glue

    try:
        find_data_dir(None)
    except RankcutError:
        pytest.skip("no benchmark data folder")
    monkeypatch.setenv("RANKCUT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(glue.GLUE, "sst2", glue.GLUE["sst2"].__class__("SST-2", 2, 1, (0,), 1, train_examples=64))


class Killed(Exception):
    """What `kill_at` raises: a compression stopped midway, as a killed job would be."""


def kill_at(monkeypatch: pytest.MonkeyPatch, calls: int | None) -> dict[str, int]:
    """The `calls`-th factorization (or worth measurement) dies, as a killed job would; counts them."""
    real = compress_module.handler_for
    seen = {"n": 0}

    def dying(cfg):  # noqa: ANN001, ANN202
        handler = real(cfg)

        def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            seen["n"] += 1
            if seen["n"] == calls:
                raise Killed
            return handler(*args, **kwargs)
        return run
    monkeypatch.setattr(compress_module, "handler_for", dying)
    return seen
