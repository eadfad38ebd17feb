"""Compression with the blocks streamed from disk (`--offload disk`) or moved to a compute device
one at a time gives what the in-memory compression gives: the same ranks and the same factors,
for every method; bad input (a missing or cut shard, a full disk, a device that is not there, a
precision the CPU cannot compute in) is one line and writes nothing."""

from __future__ import annotations

import copy
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rankcut
from rankcut import SVD, Calibration, Fisher, Whiten
from rankcut.calibration.sources import calibration_ids
from rankcut.cli import main
from rankcut.core.errors import RankcutError
from rankcut.core.record import record_of
from rankcut.core.targets import find_blocks, select_targets
from rankcut.io.residency import Residency, StoredPrecisionLinear, StreamedResidency
from rankcut.methods import ASVD, Tucker

from .conftest import Killed, kill_at

CAL = Calibration(text="gensim-news", samples=8, seqlen=32, batch_size=4)


def _folder(alias: str, tmp_path, dtype: torch.dtype | None = None, shard: str | None = None):
    """A tiny model written as a Hugging Face checkpoint folder (the thing streaming reads)."""
    model = rankcut.load_model(alias)
    if dtype is not None:
        model.to(dtype)
    out = tmp_path / f"{alias}-dense"
    model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    record_of(model).tokenizer.save_pretrained(out)
    return out


def _compare(a_dir, b_dir) -> float:
    a, b = rankcut.load(a_dir), rankcut.load(b_dir)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    ranks = {n: r.get("rank") for n, r in record_of(a).modules.items()}
    assert ranks == {n: r.get("rank") for n, r in record_of(b).modules.items()}
    return max(float((sa[k].double() - sb[k].double()).norm() / sa[k].double().norm().clamp_min(1e-30)) for k in sa)


METHODS = {
    "svd": ("tiny-llama", SVD(keep=0.5)),
    "tucker": ("tiny-llama", Tucker(keep=0.5, three_factor=True)),
    "whiten": ("tiny-llama", Whiten(keep=0.5, calibration=CAL)),
    "asvd-gpt2": ("tiny-gpt2", ASVD(keep=0.5, calibration=CAL)),
    "fisher": ("tiny-llama", Fisher(keep=0.5, calibration=CAL)),
    "budget": ("tiny-llama", Whiten(budget=0.6, calibration=CAL)),
    "two-pass": ("tiny-llama", Fisher(budget=0.6, calibration=Calibration(**{**CAL.__dict__, "two_pass": True}))),
    "pivot": ("tiny-llama", Whiten(keep=0.5, pivot=True, calibration=CAL)),
    "fisher-gpt2": ("tiny-gpt2", Fisher(keep=0.5, calibration=CAL)),
    "whiten-bert": ("tiny-bert", Whiten(keep=0.5, calibration=CAL)),
    "svd-mamba": ("tiny-mamba", SVD(keep=0.5)),
}


@pytest.mark.parametrize("case", list(METHODS))
def test_streamed_compression_gives_the_in_memory_factors(case, tmp_path):
    if case == "tucker":
        pytest.importorskip("tensorly")
    alias, config = METHODS[case]
    dense = _folder(alias, tmp_path)
    rankcut.oneshot(str(dense), config, out=tmp_path / "memory", offload="none", progress=False, plot=False)
    done = rankcut.oneshot(str(dense), config, out=tmp_path / "streamed", offload="disk", progress=False, plot=False)
    assert _compare(tmp_path / "memory", tmp_path / "streamed") <= 1e-5
    blocks = find_blocks(done.model)[1]
    assert all(p.is_meta for p in blocks.parameters())  # nothing of the blocks stayed in memory
    assert not list(tmp_path.glob(".streamed.blocks-*"))  # the scratch folder is gone
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(blocks) + 1  # one shard per block, one for the rest


def test_streaming_holds_one_block_at_a_time(tmp_path, monkeypatch):
    dense = _folder("tiny-llama", tmp_path)
    most = {"n": 0}
    real = StreamedResidency.load

    def counting(self, index):
        block = real(self, index)
        resident = sum(any(not p.is_meta for p in b.parameters()) for b in self.blocks)
        most["n"] = max(most["n"], resident)
        return block
    monkeypatch.setattr(StreamedResidency, "load", counting)
    rankcut.oneshot(str(dense), Fisher(budget=0.6, calibration=CAL), out=tmp_path / "o", offload="disk",
                    progress=False, plot=False)
    assert most["n"] == 1


def test_a_sharded_bf16_checkpoint_streams_in_its_own_precision(tmp_path):
    dense = _folder("tiny-llama", tmp_path, dtype=torch.bfloat16, shard="60KB")
    assert len(list(dense.glob("model-*.safetensors"))) > 2
    fisher = Fisher(budget=0.6, calibration=CAL)  # its loss runs the half-precision head in float32
    rankcut.oneshot(str(dense), fisher, out=tmp_path / "fs", offload="disk", progress=False, plot=False)
    rankcut.oneshot(str(dense), fisher, out=tmp_path / "fm", offload="none", progress=False, plot=False)
    assert _compare(tmp_path / "fm", tmp_path / "fs") == 0.0
    config = Whiten(keep=0.5, calibration=CAL)
    done = rankcut.oneshot(str(dense), config, out=tmp_path / "s", offload="disk", progress=False, plot=False)
    rankcut.oneshot(str(dense), config, out=tmp_path / "m", offload="none", progress=False, plot=False)
    assert json.loads((tmp_path / "s" / "rankcut.json").read_text())["dtype"] == "bfloat16"
    assert _compare(tmp_path / "m", tmp_path / "s") == 0.0
    loaded = rankcut.load(tmp_path / "s")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert done.report.params_after == rankcut.count_params(loaded)
    assert done.bytes_after == 2 * done.report.params_after  # counted as stored, not as computed


def _mapped_from(folder: Path) -> list[tuple[int, int]]:
    """The address ranges this process maps from files under `folder`."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].startswith(str(folder)):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def _views_of(block: torch.nn.Module, folder: Path) -> list[str]:
    ranges = _mapped_from(folder)
    return [n for n, t in block.state_dict().items()
            if any(a <= t.untyped_storage().data_ptr() < b for a, b in ranges)]


def test_a_resident_block_holds_no_map_of_its_shard(tmp_path):
    """A block's tensors are copies: a view of the shard's memory map would keep every page of
    the block resident until the last of its weights is gone, though each is replaced in turn."""
    from rankcut.io.streamed import open_streamed

    if not Path("/proc/self/maps").is_file():
        pytest.skip("needs /proc/self/maps")
    dense = _folder("tiny-llama", tmp_path, dtype=torch.bfloat16)
    streamed = open_streamed(dense)
    assert _mapped_from(dense)  # the embedding is a view: only its looked-up rows are read
    residency = streamed.residency(tmp_path / "out")
    try:
        block = residency.load(0)
        assert _views_of(block, dense) == []
        stored = next(m for m in block.modules() if type(m) is StoredPrecisionLinear)
        assert stored._parameters["weight"].dtype == torch.bfloat16  # copied as stored, not cast
        residency.unload(0, changed=True)
        block = residency.load(0)  # now from its scratch shard
        assert _views_of(block, residency.scratch) == [] and not _mapped_from(residency.scratch)
        residency.unload(0, changed=False)
    finally:
        residency.close()


def test_a_bf16_model_is_cut_in_place_without_upcasting_it(tmp_path):
    """Blocks are computed in float32 one at a time; the model and its factors stay bfloat16, and the
    cut is the float32 model's up to bfloat16's rounding of the weights."""
    half = rankcut.load_model("tiny-llama").to(torch.bfloat16)
    full = rankcut.load_model("tiny-llama").to(torch.bfloat16).float()  # the same rounded weights
    config = Whiten(keep=0.5, calibration=CAL)
    rankcut.compress_(half, config, progress=False)
    rankcut.compress_(full, config, progress=False)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    for (name, a), (_, b) in zip(half.named_parameters(), full.named_parameters()):
        assert (a.float() - b).norm() <= 8e-3 * b.norm(), name  # bfloat16's relative rounding


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-mamba"])
def test_a_resident_half_precision_block_keeps_its_linears_stored_and_computes_in_float32(alias):
    """While resident, a bfloat16 block's dense linears stay bfloat16 (no float32 copy of the block)
    yet give the outputs of the block cast whole to float32; put back, the block is as it was."""
    model = rankcut.load_model(alias).to(torch.bfloat16)
    prefix, blocks = find_blocks(model)
    stored = {k: v.clone() for k, v in blocks[0].state_dict().items()}
    whole = copy.deepcopy(blocks[0]).float()
    hidden = torch.randn(2, 5, model.config.hidden_size)
    residency = Residency(blocks, prefix, "cpu", torch.float32, torch.bfloat16)
    with residency.resident(0) as block:
        linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and {m._parameters["weight"].dtype for m in linears} == {torch.bfloat16}
        assert all(p.dtype == torch.float32 for m in block.modules() if not isinstance(m, torch.nn.Linear)
                   for p in m.parameters(recurse=False))
        assert torch.equal(_first(block(hidden, **_block_kwargs(model, hidden))),
                           _first(whole(hidden, **_block_kwargs(model, hidden))))
    after = blocks[0].state_dict()
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], v) for k, v in stored.items())
    assert all(type(m) is not StoredPrecisionLinear for m in blocks[0].modules())


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _block_kwargs(model, hidden):
    """What a decoder block needs beside its hidden states: rotary position embeddings, where it has them."""
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None:
        return {}
    positions = torch.arange(hidden.shape[1])[None]
    return {"position_embeddings": rotary(hidden, positions), "attention_mask": None}


class _Moving(Residency):
    """An in-memory residency that takes the moving path (as a GPU's does) while staying on the CPU."""

    @property
    def moves(self) -> bool:
        return True


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-gpt2", "tiny-mamba"])
def test_blockwise_fisher_is_the_whole_model_backward_pass(alias):
    from rankcut.calibration.fisher import collect_output_fisher, collect_output_fisher_blockwise

    model = rankcut.load_model(alias)
    targets = select_targets(model, "all-linear")
    ids = calibration_ids(model, CAL)
    prefix, blocks = find_blocks(model)
    whole = collect_output_fisher(model, targets, ids, 2, progress=False)
    blockwise = collect_output_fisher_blockwise(model, _Moving(blocks, prefix), targets, ids, 2, progress=False)
    assert whole.keys() == blockwise.keys()
    for key in whole:
        assert whole[key].abs().max() > 0
        torch.testing.assert_close(blockwise[key], whole[key], rtol=1e-5, atol=1e-12)


def test_the_device_path_gives_the_in_memory_factors(monkeypatch):
    """Blocks moved to a device and back, the statistics and factorization done there: the result is
    the plain path's (here the 'device' is the CPU, through the same moving code a GPU takes)."""
    config = Fisher(budget=0.6, calibration=CAL)
    plain = rankcut.load_model("tiny-llama")
    rankcut.compress_(plain, config, progress=False)
    moved = rankcut.load_model("tiny-llama")
    prefix, blocks = find_blocks(moved)
    rankcut.compress_(moved, config, progress=False, residency=_Moving(blocks, prefix))
    sa, sb = plain.state_dict(), moved.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], rtol=1e-5, atol=1e-7)


def test_an_interrupted_streamed_run_resumes_to_the_same_factors(tmp_path, monkeypatch):
    dense = _folder("tiny-llama", tmp_path)
    config = Whiten(keep=0.5, calibration=CAL)
    rankcut.oneshot(str(dense), config, out=tmp_path / "whole", offload="disk", progress=False, plot=False)
    ck, out = tmp_path / "ck", tmp_path / "out"
    with monkeypatch.context() as m:
        kill_at(m, 16)
        with pytest.raises(Killed):
            rankcut.oneshot(str(dense), config, out=out, offload="disk", checkpoint=ck, progress=False, plot=False)
    assert not out.exists() and (ck / "progress.json").is_file()
    done = rankcut.oneshot(str(dense), config, out=out, offload="disk", checkpoint=ck, resume=True,
                           progress=False, plot=False)
    assert not ck.exists()
    assert _compare(tmp_path / "whole", out) == 0.0
    # nothing kept from the restore is a view of a checkpoint file: a 7B block's file is 600 MB,
    # and one small tensor pinning its map kept all of it resident, block after block
    maps = Path("/proc/self/maps")
    if maps.is_file():
        assert done.report.importance and str(ck) not in maps.read_text()


def test_streamed_output_loads_with_the_auto_class(tmp_path):
    from transformers import AutoModelForCausalLM

    dense = _folder("tiny-llama", tmp_path)
    rankcut.oneshot(str(dense), Whiten(keep=0.5, calibration=CAL), out=tmp_path / "s", offload="disk",
                    progress=False, plot=False)
    ids = torch.randint(0, 250, (1, 20))
    with torch.no_grad():
        ours = rankcut.load(tmp_path / "s")(input_ids=ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "s")(input_ids=ids).logits
    assert torch.equal(ours, theirs)


# --------------------------------------------------------------------------- bad input

def _refused(argv: list[str], capsys, match: str) -> None:
    assert main([*argv, "--json"]) == 2  # --json: no progress bars around the one line
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_a_device_that_is_not_there_is_one_line_and_writes_nothing(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    out = tmp_path / "o"
    _refused(["compress", "tiny-llama", "--method", "svd", "--keep", "0.5", "--device", "cuda", "--out", str(out)],
             capsys, "device 'cuda' is not available")
    assert not out.exists()
    with pytest.raises(RankcutError, match="not available"):
        rankcut.compress_(rankcut.load_model("tiny-llama"), SVD(keep=0.5), device="cuda", progress=False)


def test_a_missing_or_cut_shard_is_named_before_anything_is_written(tmp_path, capsys):
    dense = _folder("tiny-llama", tmp_path, shard="60KB")
    shards = sorted(dense.glob("model-*.safetensors"))
    argv = ["compress", str(dense), "--method", "svd", "--keep", "0.5", "--offload", "disk", "--out"]
    victim = shards[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    _refused([*argv, str(tmp_path / "a")], capsys, f"shard {victim} is truncated")
    victim.unlink()
    _refused([*argv, str(tmp_path / "b")], capsys, f"shard {victim} is missing")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not list(tmp_path.glob(".a.*")) + list(tmp_path.glob(".b.*"))


def test_a_shard_cut_mid_stream_is_named(tmp_path, monkeypatch):
    """A shard that goes bad after the run started (a network file system, a copy still running)."""
    from rankcut.io import shards as shard_module

    dense = _folder("tiny-llama", tmp_path, shard="60KB")
    real = shard_module.ShardSource.read
    calls = {"n": 0}

    def cutting(self, names, device="cpu", copy=False):
        names = list(names)
        calls["n"] += 1
        if calls["n"] == 3:
            victim = self.file_of(names[0])
            victim.write_bytes(victim.read_bytes()[:200])
            self._checked.discard(victim.name)
        return real(self, names, device, copy)
    monkeypatch.setattr(shard_module.ShardSource, "read", cutting)
    with pytest.raises(RankcutError, match=r"shard .*model-\d+-of-\d+\.safetensors is (truncated|unreadable)"):
        rankcut.oneshot(str(dense), SVD(keep=0.5), out=tmp_path / "o", offload="disk", progress=False, plot=False)
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]


def test_a_full_disk_is_one_line_and_leaves_no_partial_output(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    dense = _folder("tiny-llama", tmp_path)
    real = safetensors.torch.save_file
    calls = {"n": 0}

    def filling(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)
    monkeypatch.setattr(safetensors.torch, "save_file", filling)
    out = tmp_path / "o"
    _refused(["compress", str(dense), "--method", "svd", "--keep", "0.5", "--offload", "disk", "--out", str(out)],
             capsys, "No space left on device")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]


def test_a_precision_the_cpu_cannot_compute_in_is_refused(tmp_path, capsys):
    dense = _folder("tiny-llama", tmp_path)
    config = json.loads((dense / "config.json").read_text())
    config["dtype"] = "float8_e4m3fn"
    (dense / "config.json").write_text(json.dumps(config))
    for extra in ([], ["--offload", "disk"]):
        _refused(["compress", str(dense), "--method", "svd", "--keep", "0.5", *extra, "--out", str(tmp_path / "o")],
                 capsys, "float8_e4m3fn, which the CPU cannot compute a model in; pass --dtype bfloat16")
    assert main(["compress", str(dense), "--method", "svd", "--keep", "0.5", "--dtype", "float32",
                 "--out", str(tmp_path / "o"), "--json"]) == 0


def test_offload_needs_a_checkpoint_and_an_output(tmp_path):
    with pytest.raises(RankcutError, match="built in memory"):
        rankcut.oneshot("tiny-llama", SVD(keep=0.5), out=tmp_path / "o", offload="disk", progress=False)
    with pytest.raises(RankcutError, match="give --out"):
        rankcut.oneshot(str(_folder("tiny-llama", tmp_path)), SVD(keep=0.5), offload="disk", progress=False)


# --------------------------------------------------------------------------- checkpoint precision and large shapes

def test_a_checkpoint_loads_in_its_own_precision_unless_told(tmp_path):
    dense = _folder("tiny-llama", tmp_path, dtype=torch.bfloat16)
    assert next(rankcut.load_model(str(dense)).parameters()).dtype == torch.bfloat16
    assert next(rankcut.load_model(str(dense), dtype="float32").parameters()).dtype == torch.float32
    with pytest.raises(RankcutError, match="dtype 'int8'"):
        rankcut.load_model(str(dense), dtype="int8")


def test_random_zoo_models_are_written_once_in_bf16_shards(tmp_path, monkeypatch):
    from rankcut.io import zoo

    monkeypatch.setenv("RANKCUT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(zoo.RANDOM_CONFIGS, "random-test", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=300, max_position_embeddings=128, tie_word_embeddings=True))
    folder = zoo._random_folder("random-test")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) == 4  # one per block and one for the rest
    first = shards[1].read_bytes()
    import shutil

    shutil.rmtree(folder)
    assert zoo._random_folder("random-test") == folder and shards[1].read_bytes() == first  # seeded
    model = rankcut.load_model(str(folder))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[256, 72, 105]])).logits
    assert torch.isfinite(logits).all()
    for name, shape in (("random-llama-2-7b", (32, 4096, 11008, 32000)), ("random-llama-3.2-1b", (16, 2048, 8192, 128256))):
        c = zoo.RANDOM_CONFIGS[name]
        assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], c["vocab_size"]) == shape


def test_a_last_use_whitening_factors_the_gram_in_place_to_the_same_factor():
    from rankcut.methods.weighted import IN_PLACE_FROM, whitening

    x = torch.randn(IN_PLACE_FROM // 2, IN_PLACE_FROM, dtype=torch.float64)  # rank-deficient: damping decides
    gram = x.T @ x
    kept = whitening(gram, 1e-4)
    assert torch.equal(gram, x.T @ x)  # a reader after this one still sees the Gram
    consumed = whitening(gram, 1e-4, consume=True)
    assert consumed.matrix.data_ptr() == gram.data_ptr()  # no second n×n matrix
    assert torch.equal(consumed.matrix, kept.matrix) and consumed.shift == kept.shift


_MAPPED_PROBE = """
import ctypes, sys, torch
from rankcut.core.allocator import map_large_allocations

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
torch.ones(1 << 21).sum()  # an 8 MB tensor freed: glibc's own threshold rises past it
took = map_large_allocations() if sys.argv[1] == "map" else False
before = libc.mallinfo2().hblkhd  # bytes in memory maps of their own
held = [torch.ones(1 << 19) for _ in range(10)]  # ten 2 MB tensors
print(took, (libc.mallinfo2().hblkhd - before) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_streaming_maps_large_tensors_so_a_freed_one_leaves_memory_at_once():
    """Each tensor of a MB or more gets a map of its own (freed, it is unmapped); by default glibc
    serves them from the heap once a larger one was freed, where freed memory stays resident."""
    def mapped_mb(mode: str, **env: str) -> tuple[str, float]:
        done = subprocess.run([sys.executable, "-c", _MAPPED_PROBE, mode], capture_output=True, text=True,
                              check=True,
                              env={k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | env)
        took, mapped = done.stdout.split()
        return took, float(mapped)

    took, mapped = mapped_mb("map")
    assert took == "True" and mapped >= 20
    assert mapped_mb("heap")[1] < 2  # glibc's default, which streaming changes
    assert mapped_mb("map", MALLOC_MMAP_THRESHOLD_="65536")[0] == "False"  # the user's own setting stands
