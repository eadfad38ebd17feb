"""`--harness lm-eval`: the same tasks through lm-evaluation-harness, on the in-memory model,
for users who trust only that. lm-eval fetches its datasets from the hub, so this path needs
internet; the built-in evaluator reads the same sets from local files."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.errors import RankcutError
from ..core.model_facts import get_tokenizer

LM_EVAL_NAMES = {"wikitext2": "wikitext", "lambada": "lambada_openai"}


def run_lm_eval(model: nn.Module, tasks: list[str], limit: int | None = None,
                batch_size: int = 8) -> dict[str, Any]:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise RankcutError("--harness lm-eval needs lm-eval: pip install 'rankcut[lmeval]'") from None
    wrapped = HFLM(pretrained=model, tokenizer=get_tokenizer(model), batch_size=batch_size)
    names = [LM_EVAL_NAMES.get(t, t) for t in tasks]
    out = lm_eval.simple_evaluate(model=wrapped, tasks=names, limit=limit)
    return {"harness": "lm-eval", "results": out.get("results", {}), "versions": out.get("versions", {})}
