"""`rankcut demo`: the main job end to end on the embedded default, with nothing downloaded.

Load SmolLM2-135M from its wheel, measure perplexity on real news text, compress it with the
best training-free method (Fisher-weighted whitening with a global parameter budget, two
passes: ranks first, then each block calibrated on the blocks already cut;
calibrated on the gensim Wikipedia extract; factors stored pivoted, so the budget buys higher
ranks), save, reload from disk, check the reloaded model
is the same one, and measure perplexity and prefill speed against the dense model. Every
figure printed comes from this run.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch

from .bench import benchmark, ratios
from .calibration import Calibration
from .compress import compress_, count_bytes, count_params
from .evaluate.perplexity import perplexity, tokenize_text
from .io import load, save
from .methods import config_class
from .models import load_model
from .texts import embedded_text

DEMO_TOKENS = 2048
DEMO_SEQLEN = 512


def run_demo(model_name: str = "smollm2-135m", out: str = "out/demo", keep: float = 0.8,
             method: str = "fisher", as_json: bool = False) -> dict[str, Any]:
    say = (lambda *a: None) if as_json else print
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    model = load_model(model_name)
    timings["load_s"] = time.perf_counter() - t0
    ids = tokenize_text(model, embedded_text("gensim-news"))[:DEMO_TOKENS]
    say(f"loaded {model_name} in {timings['load_s']:.1f} s; scoring {ids.numel()} tokens of "
        f"gensim news text in {DEMO_SEQLEN}-token windows")
    dense = perplexity(model, ids, seqlen=DEMO_SEQLEN, progress=False)
    params_before, bytes_before = count_params(model), count_bytes(model)

    t0 = time.perf_counter()
    cls = config_class(method)
    # Calibrated methods spread the budget over modules; the others cut every module alike.
    config = cls(budget=keep, pivot=True, calibration=Calibration(two_pass=True)) if cls.needs \
        else cls(keep=keep, pivot=True)
    report = compress_(model, config, progress=not as_json)
    timings["compress_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    save(model, out, overwrite=True)
    reloaded = load(out)
    timings["save_reload_s"] = time.perf_counter() - t0
    probe = ids[None, :64]
    with torch.no_grad():
        diff = (model(input_ids=probe).logits - reloaded(input_ids=probe).logits).abs().max().item()
    after = perplexity(reloaded, ids, seqlen=DEMO_SEQLEN, progress=False)
    dense_model = load_model(model_name)
    speed = benchmark({"dense": dense_model, "compressed": reloaded}, seqlen=DEMO_SEQLEN, repeats=3)
    speedup = ratios(speed["dense"], speed["compressed"])["prefill_speedup"]

    result = {
        "model": model_name, "config": config.to_dict(), "out": out,
        "modules": len(report.modules),
        "params": {"dense": params_before, "compressed": count_params(reloaded)},
        "bytes": {"dense": bytes_before, "compressed": count_bytes(reloaded)},
        "perplexity": {"dense": dense.perplexity, "compressed": after.perplexity,
                       "text": "gensim-news", "tokens": dense.tokens, "seqlen": DEMO_SEQLEN},
        "reload_max_abs_diff": diff, "timings": timings,
        "prefill_s": {"dense": speed["dense"].summary()["prefill_s_median"],
                      "compressed": speed["compressed"].summary()["prefill_s_median"],
                      "seqlen": DEMO_SEQLEN, "speedup": speedup},
    }
    if as_json:
        print(json.dumps(result, indent=2))
        return result
    p, b, ppl = result["params"], result["bytes"], result["perplexity"]
    print(f"\n{'':<22}{'dense':>14}{'compressed':>14}{'ratio':>9}")
    print(f"{'parameters':<22}{p['dense']:>14,}{p['compressed']:>14,}{p['compressed'] / p['dense']:>9.3f}")
    print(f"{'bytes (MiB)':<22}{b['dense'] / 2**20:>14.1f}{b['compressed'] / 2**20:>14.1f}"
          f"{b['compressed'] / b['dense']:>9.3f}")
    print(f"{'perplexity (news)':<22}{ppl['dense']:>14.2f}{ppl['compressed']:>14.2f}"
          f"{ppl['compressed'] / ppl['dense']:>9.2f}")
    pre = result["prefill_s"]
    print(f"{'prefill 512 tok (s)':<22}{pre['dense']:>14.3f}{pre['compressed']:>14.3f}"
          f"{pre['compressed'] / pre['dense']:>9.3f}   ({speedup:.2f}× faster)")
    policy = "budget" if cls.needs else "keep"
    ranks = [r["rank"] for r in report.modules.values() if r["rank"] is not None]
    dense = len(report.modules) - len(ranks)
    print(f"\n{method} {policy}={keep} on {len(report.modules)} modules "
          f"(ranks {min(ranks)}–{max(ranks)}, stored pivoted; {dense} left dense); "
          f"compression {timings['compress_s']:.1f} s; saved to {out} and reloaded (max |Δlogit| {diff:.1e})")
    return result
