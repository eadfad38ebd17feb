"""Cutting attention's head channels jointly: MoDeGPT's Q·Kᵀ and V·O decompositions (Lin et al. 2024).

Attention uses its four matrices in two pairs, and each pair can be cut as one map:
- **Q with K.** A head's score is Σ_i q_i·k_i over its channels. Dropping channel i from both q
  and k removes exactly one term, so the cut is a column–row (CR) selection: keep the channels
  whose terms are largest. By Cauchy–Schwarz, E|q_i·k_i| ≤ √E[q_i²]·√E[k_i²], and with X's Gram
  C, E[q_i²] ∝ w_qᵢᵀ C w_qᵢ. RoPE rotates channels in fixed pairs (i, i + d/2 with transformers'
  rotate_half), so a pair is scored and kept as one unit, by the norms of its two-channel blocks.
  With grouped-query attention a key channel serves every query head of its group, so the
  group's query heads add their scores and the group keeps one channel set.
- **V with O.** Head h adds O_h·(attention-weighted v) to the output, with v = V_g·x shared by
  the query heads of group g. Any k×d map P applied to v, with each O_h refit to read P·v, is a
  cut of the pair. Treating attention's averaging as passing v's statistics through, the error
  Σ_h E‖O_h v − O_h' P v‖² is least when P spans the top k right singular vectors of
  M^{1/2}·Σ_v^{1/2} (M = Σ_h O_hᵀO_h, Σ_v = E[v vᵀ]): P = W_kᵀ Σ_v^{-1/2}, O_h' = O_h Σ_v^{1/2} W_k.
  At k = d it is exact.

Pure math on float64 tensors: no model, no hooks (the pipeline is `compress.attention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def channel_units(head_dim: int, rotary_dim: int | None) -> list[list[int]]:
    """A head's channels grouped into what must be kept together: RoPE's rotate_half pairs
    (i, i + rotary_dim/2) over the first `rotary_dim` channels, every other channel alone."""
    units: list[list[int]] = []
    rotary = rotary_dim or 0
    half = rotary // 2
    units += [[i, i + half] for i in range(half)]
    units += [[i] for i in range(2 * half, head_dim)]
    return units


def qk_kept_channels(gram: torch.Tensor, query: torch.Tensor, key: torch.Tensor, heads: int, kv_heads: int,
                     head_dim: int, keep_units: int, rotary_dim: int | None) -> list[torch.Tensor]:
    """Each key-value group's kept channels, ascending (the same count in every group unless
    RoPE spans only part of the head, where a group may keep pairs or single channels).

    `gram`: E[x̃ x̃ᵀ] of the shared input, with a ones column appended when the maps have biases;
    `query`, `key`: the (heads·d × in) and (kv_heads·d × in) weights, bias as a last column then.
    Each unit (a channel, or a RoPE pair) is scored Σ_{h in group} ‖q_unit‖·‖k_unit‖ with
    ‖·‖² the expected square through `gram`; the `keep_units` best of each group are kept."""
    q_energy = ((query @ gram) * query).sum(1).clamp_min(0).reshape(heads, head_dim)
    k_energy = ((key @ gram) * key).sum(1).clamp_min(0).reshape(kv_heads, head_dim)
    units = channel_units(head_dim, rotary_dim)
    per_group = heads // kv_heads
    scores = torch.zeros(kv_heads, len(units), dtype=gram.dtype, device=gram.device)
    for u, channels in enumerate(units):
        q_norm = q_energy[:, channels].sum(1).sqrt().reshape(kv_heads, per_group)
        k_norm = k_energy[:, channels].sum(1).sqrt()
        scores[:, u] = (q_norm * k_norm[:, None]).sum(1)
    best = scores.topk(keep_units, dim=1).indices
    return [torch.tensor(sorted(c for u in row.tolist() for c in units[u]), dtype=torch.int64, device=gram.device)
            for row in best]


@dataclass
class ValueOutputCut:
    """One key-value group's V·O cut: the new value rows (k × in, and k bias entries or None)
    and, for each of the group's query heads, its output map's new columns (out × k)."""

    value: torch.Tensor
    value_bias: torch.Tensor | None
    outputs: list[torch.Tensor]


def _sqrt_and_inverse(sym: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ^{1/2} and Σ^{-1/2} of a symmetric PSD matrix, damped by `damp` × its mean diagonal so
    a rank-deficient one (a value channel no input reaches) still has a finite inverse root."""
    n = sym.shape[0]
    scale = sym.diagonal().mean().clamp_min(torch.finfo(sym.dtype).tiny)
    values, vectors = torch.linalg.eigh(sym + damp * scale * torch.eye(n, dtype=sym.dtype, device=sym.device))
    values = values.clamp_min(damp * scale)
    root = (vectors * values.sqrt()) @ vectors.T
    inverse_root = (vectors / values.sqrt()) @ vectors.T
    return root, inverse_root


def value_output_cut(gram: torch.Tensor, value: torch.Tensor, value_bias: torch.Tensor | None,
                     outputs: list[torch.Tensor], keep: int, damp: float = 1e-6) -> ValueOutputCut:
    """The V·O cut of one key-value group to `keep` channels (see the module docstring).

    `gram`: E[x xᵀ] of the input, or of [x; 1] when the value map has a bias (`value_bias`);
    `value`: the group's d × in value rows; `outputs`: each query head's out × d output columns."""
    head_dim = value.shape[0]
    if not 1 <= keep <= head_dim:
        raise ValueError(f"cannot keep {keep} of {head_dim} channels")
    full = value if value_bias is None else torch.cat([value, value_bias[:, None]], dim=1)
    root, inverse_root = _sqrt_and_inverse(full @ gram @ full.T, damp)
    mixed = sum(o.T @ o for o in outputs)
    m_values, m_vectors = torch.linalg.eigh(mixed)
    m_root = (m_vectors * m_values.clamp_min(0).sqrt()) @ m_vectors.T
    _, _, vh = torch.linalg.svd(m_root @ root)
    basis = vh[:keep].T  # d × k, orthonormal columns
    project = basis.T @ inverse_root  # k × d
    new_value = project @ full
    lift = root @ basis  # d × k
    bias = None if value_bias is None else new_value[:, -1]
    return ValueOutputCut(new_value[:, :value.shape[1]], bias, [o @ lift for o in outputs])
