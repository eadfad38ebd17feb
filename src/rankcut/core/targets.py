"""Which weight matrices to compress: by kind (q, k, v, ...), by layer index, or by regex.

Each architecture names its matrices differently; a `Target` carries the architecture's own
kind name plus the generic aliases (q, k, v, o, gate, up, down) so that `--targets q,v` means
the same thing on Llama, BERT and GPT-2. Embeddings and the output head are never picked by
`all-linear`; a regex that names them picks them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from .errors import RankcutError
from .layers import FACTORED

ALL_LINEAR = "all-linear"

# (pattern on the module's full name, architecture's kind, generic aliases)
_KIND_RULES: list[tuple[re.Pattern[str], str, tuple[str, ...]]] = [
    (re.compile(p), kind, aliases)
    for p, kind, aliases in [
        # Llama family
        (r"self_attn\.q_proj$", "q", ()),
        (r"self_attn\.k_proj$", "k", ()),
        (r"self_attn\.v_proj$", "v", ()),
        (r"self_attn\.o_proj$", "o", ()),
        (r"mlp\.gate_proj$", "gate", ()),
        (r"mlp\.up_proj$", "up", ()),
        (r"mlp\.down_proj$", "down", ()),
        # BERT family
        (r"attention\.self\.query$", "query", ("q",)),
        (r"attention\.self\.key$", "key", ("k",)),
        (r"attention\.self\.value$", "value", ("v",)),
        (r"attention\.output\.dense$", "attention-output", ("o",)),
        (r"intermediate\.dense$", "intermediate", ("up",)),
        (r"layer\.\d+\.output\.dense$", "output", ("down",)),
        # GPT-2 (Conv1D)
        (r"attn\.c_attn$", "c_attn", ("qkv",)),
        (r"attn\.c_proj$", "attn_proj", ("o",)),
        (r"mlp\.c_fc$", "c_fc", ("up",)),
        (r"mlp\.c_proj$", "mlp_proj", ("down",)),
        # Mamba
        (r"mixer\.in_proj$", "in_proj", ()),
        (r"mixer\.x_proj$", "x_proj", ()),
        (r"mixer\.dt_proj$", "dt_proj", ()),
        (r"mixer\.out_proj$", "out_proj", ()),
    ]
]
# Kinds that all-linear leaves out: Mamba's dt_proj is tiny (its input is the time-step rank)
# and the model reads its weight directly, so hooks never see its input. Name it to pick it.
NOT_IN_ALL_LINEAR = {"dt_proj"}
_LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")


@dataclass
class Target:
    """One matrix to compress, seen as a dense (out_features × in_features) linear map."""

    name: str
    module: nn.Module
    kind: str
    layer: int | None
    out_features: int
    in_features: int
    transposed: bool  # GPT-2's Conv1D stores W as (in, out)
    aliases: tuple[str, ...] = field(default=())

    @property
    def params(self) -> int:
        return self.out_features * self.in_features

    @property
    def break_even_rank(self) -> float:
        """r* = mn/(m+n): at this rank the two factors hold as many numbers as the matrix."""
        m, n = self.out_features, self.in_features
        return m * n / (m + n)

    @property
    def max_rank(self) -> int:
        return min(self.out_features, self.in_features)

    def matches_kind(self, kind: str) -> bool:
        return kind == self.kind or kind in self.aliases


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return None
    return Conv1D


def is_compressible(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return type(module) is nn.Linear or (conv1d is not None and isinstance(module, conv1d))


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as an (out, in) matrix, whatever its storage layout."""
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return module.weight.t()
    return module.weight


def kind_of(name: str) -> tuple[str, tuple[str, ...]]:
    """A module's kind and generic aliases, from its full name (its own name where no rule fits)."""
    for pattern, kind, aliases in _KIND_RULES:
        if pattern.search(name):
            return kind, aliases
    return name.rsplit(".", 1)[-1], ()


# the kinds whose outputs attention reads (queries, keys, values; GPT-2's fused c_attn)
ATTENTION_INPUTS = frozenset({"q", "k", "v", "qkv"})


def feeds_attention(name: str) -> bool:
    kind, aliases = kind_of(name)
    return bool(ATTENTION_INPUTS & {kind, *aliases})


def _describe(name: str, module: nn.Module) -> Target:
    kind, aliases = kind_of(name)
    layer_match = _LAYER_INDEX.search(f".{name}.")
    w = dense_weight(module)
    return Target(
        name=name, module=module, kind=kind,
        layer=int(layer_match.group(1)) if layer_match else None,
        out_features=w.shape[0], in_features=w.shape[1],
        transposed=w is not module.weight, aliases=aliases,
    )


def all_candidates(model: nn.Module) -> list[Target]:
    """Every matrix rankcut knows how to factorize, including heads and poolers."""
    return [_describe(n, m) for n, m in model.named_modules() if n and is_compressible(m)]


def num_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    layers = [t.layer for t in all_candidates(model) if t.layer is not None]
    return max(layers) + 1 if layers else 0


def parse_layers(spec: str | Iterable[int] | None) -> list[int] | None:
    """'0-5,9' -> [0, 1, 2, 3, 4, 5, 9]; None means every layer."""
    if spec is None:
        return None
    if not isinstance(spec, str):
        return sorted({int(i) for i in spec})
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise RankcutError(f"bad layer list '{spec}': use indices and ranges like 0-5,9") from None
    if not out:
        raise RankcutError(f"empty layer list '{spec}': use indices and ranges like 0-5,9")
    return sorted(out)


def _tokens(targets: str | Sequence[str]) -> list[str]:
    if isinstance(targets, str):
        tokens = [t.strip() for t in targets.split(",") if t.strip()] if "," in targets else [targets.strip()]
    else:
        tokens = list(targets)
    if not tokens or any(not isinstance(t, str) or not t.strip() for t in tokens):
        # an empty regex matches every module name, the head and embeddings' neighbours included
        raise RankcutError(f"targets {targets!r} names nothing; give all-linear, kinds such as q,k,v or a regex "
                           "on module names (see `rankcut info`)")
    return tokens


def select_records(records: dict[str, dict], targets: str | Sequence[str] | None,
                   layers: str | Iterable[int] | None) -> dict[str, dict]:
    """A saved model's module records (name → record with "kind" and "layer") picked by the same
    spec as `select_targets` picks a dense model's modules; every token must match one."""
    chosen = dict(records)
    if targets is not None:
        chosen = {}
        for token in _tokens(targets):
            of_kind = {n: r for n, r in records.items() if token == r["kind"] or token in kind_of(n)[1]}
            if token == ALL_LINEAR:
                hits = {n: r for n, r in records.items() if r["layer"] is not None}
            elif of_kind:
                hits = of_kind
            else:
                try:
                    pattern = re.compile(token)
                except re.error as exc:
                    raise RankcutError(f"target '{token}' is neither a kind nor a valid regex ({exc})") from None
                hits = {n: r for n, r in records.items() if pattern.search(n)}
            if not hits:
                kinds = ", ".join(sorted({r["kind"] for r in records.values()}))
                raise RankcutError(f"target '{token}' matches none of the saved model's compressed modules "
                                   f"(kinds: {kinds}, or a regex on module names)")
            chosen.update(hits)
    wanted = parse_layers(layers)
    if wanted is not None:
        chosen = {n: r for n, r in chosen.items() if r["layer"] in wanted}
        if not chosen:
            raise RankcutError(f"no compressed module of the saved model lies in layers {layers}")
    return {n: r for n, r in records.items() if n in chosen}


def select_targets(
    model: nn.Module,
    targets: str | Sequence[str] | None = ALL_LINEAR,
    layers: str | Iterable[int] | None = None,
) -> list[Target]:
    """Resolve a target spec to modules; every kind, pattern and layer must match something.
    None means the default, all-linear."""
    targets = ALL_LINEAR if targets is None else targets
    candidates = all_candidates(model)
    if not candidates:
        raise RankcutError("this model has no nn.Linear or Conv1D modules left to compress")
    in_layers = [t for t in candidates if t.layer is not None]
    known_kinds = {k for t in in_layers for k in (t.kind, *t.aliases)}
    chosen: dict[str, Target] = {}
    for token in _tokens(targets):
        if token == ALL_LINEAR:
            hits = [t for t in in_layers if t.kind not in NOT_IN_ALL_LINEAR]
        elif token in known_kinds:
            hits = [t for t in in_layers if t.matches_kind(token)]
        else:
            try:
                pattern = re.compile(token)
            except re.error as exc:
                raise RankcutError(f"target '{token}' is neither a kind nor a valid regex ({exc})") from None
            hits = [t for t in candidates if pattern.search(t.name)]
        if not hits:
            factored = sum(isinstance(m, FACTORED) for m in model.modules())
            already = (f" that is still dense ({factored} are factored already: to cut those again, compress "
                       "the dense model)") if factored else ""
            kinds = (f"; kinds in this model: {', '.join(sorted(known_kinds))} (or a regex on module names; "
                     "see `rankcut info`)") if known_kinds else ""
            raise RankcutError(f"target '{token}' matches no module{already}{kinds}")
        for t in hits:
            chosen[t.name] = t
    wanted = parse_layers(layers)
    if wanted is not None:
        total = num_layers(model)
        past = [i for i in wanted if i >= total or i < 0]
        if past:
            raise RankcutError(
                f"layer {past[0]} is past the last layer: the model has {total} layers (0-{total - 1})"
            )
        chosen = {n: t for n, t in chosen.items() if t.layer in wanted}
        if not chosen:
            raise RankcutError(f"no selected target lies in layers {layers}")
    order = {t.name: i for i, t in enumerate(candidates)}
    return sorted(chosen.values(), key=lambda t: order[t.name])


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's repeated blocks: the longest ModuleList of layers."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and name.rsplit(".", 1)[-1] in (
                "layers", "layer", "h", "blocks"):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    return best
