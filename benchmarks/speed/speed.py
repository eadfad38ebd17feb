"""Dense against compressed, in one run: prefill, decode and encoder throughput, with ratios.

For each keep fraction the model is compressed (uniform ranks: speed depends on the ranks, not
on how the factors were found), given `speed_up_`'s layouts and dense fallback, saved, and
loaded back, so every compressed figure is of a reloaded model. Three variants are timed
interleaved (dense, plain, fused, dense, ...):
  plain: what `rankcut.load` gives: two matmuls per factored module, each factor in the memory
    order `speed_up_` timed fastest here;
  row-major (with `--row-major`): the same, every factor row-major (what the layout buys);
  fused: `rankcut.load(..., fast=True)`: siblings (q, k, v; gate, up) share one stacked matmul;
  pivot (with `--pivot`): the same fraction kept in the pivoted form (`SVD(keep, pivot=True)`):
    as many parameters as plain, at a higher rank; r of each module's outputs come straight
    from the first matmul, the rest from a second one, both written into place by index.
Medians over the repeats; ratios are dense time / variant time (> 1 is faster).

`--compile` adds dense and plain under `torch.compile`, timed against each other: decoding
(static KV cache) and the batch-1 prefill, and the encoder. Compilation removes per-call Python
overhead, which a factored model pays twice per module. Each mode in `--compile-modes`
("compile": the defaults; "autotune": max-autotune with frozen weights) gets a fresh dense and
plain model, all timed interleaved, ratios within a mode; compiled outputs are checked against
the same model's eager ones, and compile time is reported apart.

    python benchmarks/speed/speed.py --out benchmarks/results/speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

import rankcut
from rankcut.speed.layouts import Speed, speed_up_
from rankcut.speed.timing import time_decode, time_prefill


def _ids(vocab: int, batch: int, seqlen: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _encoder_time(model: torch.nn.Module, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return time.perf_counter() - t0


def interleaved(models: dict[str, torch.nn.Module], fn, repeats: int) -> dict[str, float]:
    for m in models.values():  # warm-up
        fn(m)
    times: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(repeats):
        for n, m in models.items():
            times[n].append(fn(m))
    return {n: statistics.median(v) for n, v in times.items()}


@torch.no_grad()
def max_rel_err(a: torch.nn.Module, b: torch.nn.Module, ids: torch.Tensor) -> float:
    return _rel_err(a(input_ids=ids)[0], b(input_ids=ids)[0])


def variants(name: str, keep: float, folder: Path, pivot: bool = False, row_major: bool = False
             ) -> tuple[dict[str, torch.nn.Module], dict]:
    dense = rankcut.load_model(name)
    models: dict[str, torch.nn.Module] = {"dense": dense}
    info: dict = {"keep": keep, "compress_s": {}, "speed_up_s": {}, "params": {}, "dense_fallback": {},
                  "column_major_modules": {}, "pivot_outputs": {}}
    forms = ["plain"] + (["row-major"] if row_major else []) + (["pivot"] if pivot else [])
    for form in forms:
        model = rankcut.load_model(name)
        t0 = time.perf_counter()
        rankcut.compress_(model, rankcut.SVD(keep=keep, pivot=form == "pivot"), progress=False)
        info["compress_s"][form] = time.perf_counter() - t0
        t0 = time.perf_counter()
        # layouts and dense fallback as timed here (recorded in the manifest, redone by rankcut.load)
        report = speed_up_(model, Speed(choose_layout=form != "row-major"))
        info["speed_up_s"][form] = time.perf_counter() - t0
        info["dense_fallback"][form] = len(report.dense_fallback)
        info["column_major_modules"][form] = len(report.column_major)
        if report.pivot_outputs is not None:
            info["pivot_outputs"][form] = {"chosen": report.pivot_outputs, "forward_s": report.pivot_output_timings}
        rankcut.save(model, folder / form)
        del model
        models[form] = rankcut.load(folder / form)
        if form == "plain":
            models["fused"] = rankcut.load(folder / form, fast=True)
    info["params"] = {n: rankcut.count_params(m) for n, m in models.items()}
    return models, info


# torch.compile settings timed by `--compile-modes`. "autotune": inductor's max-autotune with
# frozen weights: each matmul shape is timed against inductor's own C++ GEMM templates, which
# pack the (then constant) weights once. A stack of one-token products ran about twice as fast
# that way as through MKL on this CPU, so it is worth knowing whether the factored model gains
# more from it than the dense one.
# The settings go to `torch.compile(options=...)` (a backend of their own, so no mode reuses
# another's graphs) and are also set while the first calls trace: dynamo decides whether the
# weights become constants ("freezing") when it traces, outside the options' reach; with the
# options alone the weights stayed graph inputs and the GEMM templates never ran.
COMPILE_MODES: dict[str, dict] = {
    "compile": {},
    "autotune": {"max_autotune": True, "freezing": True, "max_autotune_gemm_backends": "CPP,ATEN"},
}


def compile_in_mode(model: torch.nn.Module, mode: str, first_calls: Callable[[], object]) -> object:
    """Compile `model.forward` in place; `first_calls` (which compile every graph timed later)
    run under the mode's inductor settings. Returns what `first_calls` returned."""
    import torch._inductor.config as inductor

    model.forward = torch.compile(model.forward, dynamic=False, options=COMPILE_MODES[mode] or None)
    with inductor.patch(COMPILE_MODES[mode]):
        return first_calls()


def _compiled(make: dict[str, Callable[[], torch.nn.Module]], modes: list[str],
              output: Callable[[torch.nn.Module], torch.Tensor],
              warm: Callable[[torch.nn.Module], object] = lambda m: None) -> tuple[dict, dict, dict]:
    """A fresh dense and plain model per mode, each compiled. The compilation (`warm`, then
    `output`) is timed apart, and `output` is compared with the same model's eager one."""
    # every model runs through transformers' shared forward wrapper: one code object, so later
    # models' graphs count against the first's recompile limit (8 by default) and would
    # silently fall back to eager
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.reset()  # no graphs left from an earlier block: every model compiles here
    chosen, compile_s, errors = {}, {}, {}
    for mode in modes:
        for n in ("dense", "plain"):
            key, m = f"{n}+{mode}", make[n]()
            eager = output(m)
            t0 = time.perf_counter()
            errors[key] = _rel_err(compile_in_mode(m, mode, lambda: (warm(m), output(m))[1]), eager)
            compile_s[key] = time.perf_counter() - t0
            chosen[key] = m
    return chosen, compile_s, errors


def compiled_decode(make: dict[str, Callable[[], torch.nn.Module]], modes: list[str], prompt: torch.Tensor,
                    new_tokens: int, repeats: int, prefill: torch.Tensor) -> dict:
    """Decode tokens/s (static cache) and batch-1 prefill seconds of dense and plain, compiled in
    each mode, all interleaved; ratios within a mode."""
    def warm(m: torch.nn.Module) -> None:  # compiles the decode graphs, on the static cache timed later
        m.generation_config.cache_implementation = "static"
        time_decode(m, prompt, new_tokens)

    chosen, compile_s, errors = _compiled(make, modes, lambda m: _last_logits(m, prefill), warm)
    decode = interleaved(chosen, lambda m: time_decode(m, prompt, new_tokens), repeats)
    pre = interleaved(chosen, lambda m: time_prefill(m, prefill), repeats)
    return {"modes": modes, "decode_tok_s": decode, "prefill_s": pre, "compile_and_first_run_s": compile_s,
            "max_rel_err_compiled_vs_eager": errors,
            "speedup": {mode: {"decode": decode[f"plain+{mode}"] / decode[f"dense+{mode}"],
                               "prefill_b1": pre[f"dense+{mode}"] / pre[f"plain+{mode}"]} for mode in modes}}


def compiled_encoder(make: dict[str, Callable[[], torch.nn.Module]], modes: list[str], ids: torch.Tensor,
                     repeats: int) -> dict:
    """The encoder's batch time, dense and plain compiled in each mode, all interleaved."""
    @torch.no_grad()
    def output(m: torch.nn.Module) -> torch.Tensor:
        return m(input_ids=ids, attention_mask=torch.ones_like(ids))[0]

    chosen, compile_s, errors = _compiled(make, modes, output)
    times = interleaved(chosen, lambda m: _encoder_time(m, ids), repeats)
    return {"modes": modes, "batch32x128_s": times, "compile_and_first_run_s": compile_s,
            "max_rel_err_compiled_vs_eager": errors,
            "speedup": {mode: times[f"dense+{mode}"] / times[f"plain+{mode}"] for mode in modes}}


@torch.no_grad()
def _last_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, logits_to_keep=1).logits  # the call `time_prefill` makes: one graph


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).abs().max() / ref.abs().max())


def ratios(times: dict[str, float], higher_is_better: bool = False) -> dict[str, float]:
    base = times["dense"]
    return {n: (v / base if higher_is_better else base / v) for n, v in times.items() if n != "dense"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decoder", default="smollm2-135m")
    p.add_argument("--encoder", default="minilm-l6")
    p.add_argument("--keeps", default="0.8,0.5")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch8-repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true",
                   help="also time dense and plain under torch.compile (the modes in --compile-modes)")
    p.add_argument("--compile-modes", default="compile",
                   help=f"comma-separated, of {', '.join(COMPILE_MODES)}: each a fresh dense and plain model")
    p.add_argument("--pivot", action="store_true", help="also time the pivoted form at the same keep")
    p.add_argument("--row-major", action="store_true",
                   help="also time plain factors all stored row-major (no layout choice): what the layout buys")
    p.add_argument("--compiled-only", action="store_true", help="time only the compiled decoding (decoder)")
    p.add_argument("--encoder-only", action="store_true", help="time only the encoder")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    modes = args.compile_modes.split(",")
    if unknown := sorted(set(modes) - set(COMPILE_MODES)):
        p.error(f"unknown --compile-modes {unknown}: choose from {', '.join(COMPILE_MODES)}")
    doc = {"machine": {"cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "platform": platform.platform()},
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "decoder": [], "encoder": []}
    with tempfile.TemporaryDirectory() as tmp:
        for keep in [] if args.encoder_only else [float(k) for k in args.keeps.split(",")]:
            models, info = variants(args.decoder, keep, Path(tmp) / f"d{keep}", args.pivot, args.row_major)
            vocab = models["dense"].config.vocab_size
            one, eight = _ids(vocab, 1, args.prefill), _ids(vocab, 8, args.prefill)
            info["max_rel_err_fused_vs_plain"] = max_rel_err(models["fused"], models["plain"], one[:, :128])
            info["speedup"] = {}
            if not args.compiled_only:
                info["prefill_b1_s"] = interleaved(models, lambda m: time_prefill(m, one), args.repeats)
                info["prefill_b8_s"] = interleaved(models, lambda m: time_prefill(m, eight), args.batch8_repeats)
                info["decode_tok_s"] = interleaved(models, lambda m: time_decode(m, one[:, :32], args.decode),
                                                   max(1, args.repeats - 2))
                info["speedup"] = {"prefill_b1": ratios(info["prefill_b1_s"]),
                                   "prefill_b8": ratios(info["prefill_b8_s"]),
                                   "decode": ratios(info["decode_tok_s"], higher_is_better=True)}
            if args.compile or args.compiled_only:
                folder = Path(tmp) / f"d{keep}" / "plain"
                make = {"dense": lambda: rankcut.load_model(args.decoder), "plain": lambda: rankcut.load(folder)}
                info["compiled"] = compiled_decode(make, modes, one[:, :32], args.decode,
                                                   max(1, args.repeats - 2), one)
                info["speedup"]["compiled"] = info["compiled"]["speedup"]
            doc["decoder"].append(info)
            print(json.dumps({"model": args.decoder, **{k: info[k] for k in ("keep", "params", "dense_fallback",
                                                                              "column_major_modules", "pivot_outputs",
                                                                              "max_rel_err_fused_vs_plain",
                                                                              "speedup")}}, indent=1), flush=True)
            del models
        if args.compiled_only:
            models = None
        else:
            models, info = variants(args.encoder, 0.5, Path(tmp) / "enc", args.pivot, args.row_major)
        if models is not None:
            ids = _ids(models["dense"].config.vocab_size, 32, 128)
            info["max_rel_err_fused_vs_plain"] = max_rel_err(models["fused"], models["plain"], ids[:4])
            info["batch32x128_s"] = interleaved(models, lambda m: _encoder_time(m, ids), args.repeats)
            info["speedup"] = ratios(info["batch32x128_s"])
            if args.compile:
                make = {"dense": lambda: rankcut.load_model(args.encoder),
                        "plain": lambda: rankcut.load(Path(tmp) / "enc" / "plain")}
                info["compiled"] = compiled_encoder(make, modes, ids, args.repeats)
                info["speedup"]["compiled"] = info["compiled"]["speedup"]
            doc["encoder"].append(info)
            print(json.dumps({"model": args.encoder, **{k: info[k] for k in ("keep", "params", "dense_fallback",
                                                                              "column_major_modules", "pivot_outputs",
                                                                              "max_rel_err_fused_vs_plain",
                                                                              "speedup")}}, indent=1), flush=True)
    if args.out:
        from rankcut.core.fsutil import atomic_write_text

        atomic_write_text(args.out, json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
