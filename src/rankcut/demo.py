"""`rankcut demo`: the main job end to end on the embedded default, with nothing downloaded.

Load SmolLM2-135M from its wheel, measure perplexity on real news text, compress, save, reload
from disk, check the reloaded model is the same one, and measure again. Every figure printed
comes from this run.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch

from .compress import compress_, count_bytes, count_params
from .evaluate.perplexity import perplexity, tokenize_text
from .io import load, save
from .methods import config_class
from .models import load_model
from .texts import embedded_text

DEMO_TOKENS = 2048
DEMO_SEQLEN = 512


def run_demo(model_name: str = "smollm2-135m", out: str = "out/demo", keep: float = 0.5,
             method: str = "svd", as_json: bool = False) -> dict[str, Any]:
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
    config = config_class(method)(keep=keep)
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

    result = {
        "model": model_name, "config": config.to_dict(), "out": out,
        "modules": len(report.modules),
        "params": {"dense": params_before, "compressed": count_params(reloaded)},
        "bytes": {"dense": bytes_before, "compressed": count_bytes(reloaded)},
        "perplexity": {"dense": dense.perplexity, "compressed": after.perplexity,
                       "text": "gensim-news", "tokens": dense.tokens, "seqlen": DEMO_SEQLEN},
        "reload_max_abs_diff": diff, "timings": timings,
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
    print(f"\n{method} keep={keep} on {len(report.modules)} modules; compression {timings['compress_s']:.1f} s; "
          f"saved to {out} and reloaded (max |Δlogit| {diff:.1e})")
    return result
