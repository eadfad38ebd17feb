"""The loss's output-side Fisher information per target: the mean squared gradient of the loss
with respect to each module's output (or, with `full`, the gradients' whole out × out
covariance, the output factor of a Kronecker-factored curvature), gathered in one backward pass
over the calibration windows, blocks recomputed in the backward and the head scored in chunks to
bound memory."""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import RankcutError
from ..core.targets import Target
from ..io.residency import Residency
from .hooks import BlockReplay, _forward_kwargs, recomputed_blocks, run_until
from .sources import batches


def collect_output_fisher(model: nn.Module, targets: Sequence[Target], ids: torch.Tensor,
                          batch_size: int, progress: bool = True, lean: bool = True,
                          full: bool = False) -> dict[str, torch.Tensor]:
    """Mean squared loss gradient per output channel of each target (diagonal output Fisher);
    with `full`, the mean of gᵀg over tokens (out × out), whose diagonal is the former.

    Weights get no gradients (requires_grad is switched off for the pass); the gradient flows
    from the input embeddings, so memory is activations only, not a second copy of the model.
    With `lean` (the default) even those are bounded: each block keeps only its input and is
    recomputed during the backward pass, and a plain language-model head scores the tokens a
    chunk at a time, so the vocabulary-wide logits never exist for the whole sequence at once.
    Both change memory, not the result.
    """
    if not any(k in inspect.signature(model.forward).parameters for k in ("labels",)):
        raise RankcutError("the fisher method needs a model with a loss (a language-modelling "
                           "or classification head); use whiten for a bare encoder")
    sums = {t.name: _zeros(t.out_features, full) for t in targets}
    counts = {t.name: 0 for t in targets}
    handles = []

    # Under recomputation a block runs twice; only the first run's outputs are part of the graph
    # being differentiated, so the second run's hooks never fire.
    def out_hook(name: str):  # noqa: ANN202
        return _square_output_gradient(sums, counts, name)

    def embed_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_(True)

    head = plain_lm_head(model) if lean else None
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    handles.append(model.get_input_embeddings().register_forward_hook(embed_hook))
    handles += [t.module.register_forward_hook(out_hook(t.name)) for t in targets]
    was_training = model.training
    model.eval()
    try:
        with recomputed_blocks(model, enabled=lean):
            windows = batches(ids, batch_size)
            for number, batch in enumerate(tqdm(windows, desc="calibrate (gradients)", disable=not progress)):
                with torch.enable_grad():
                    if head is not None:
                        chunked_lm_backward(model, head, batch)
                    else:
                        gradient_loss(model, batch, number).backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return {n: sums[n] / max(1, counts[n]) for n in sums}


def collect_output_fisher_blockwise(model: nn.Module, residency: Residency, targets: Sequence[Target],
                                    ids: torch.Tensor, batch_size: int,
                                    progress: bool = True, full: bool = False,
                                    sink: Callable[[str, torch.Tensor], None] | None = None) -> dict[str, torch.Tensor]:
    """`collect_output_fisher` with one block resident at a time (on a device, or streamed from disk).

    A forward pass keeps each block's inputs; the loss's gradient at the last block's output
    comes from running the rest of the model (embeddings, final norm, head, loss) with every
    block passing that output through; then the blocks are walked in reverse, each recomputed
    from its kept input and back-propagated, its targets' output gradients squared and summed.
    The same statistic as the whole-model backward pass, up to float rounding. A block's sums
    exist only while it is walked; with `sink`, each finished statistic is handed to it (to disk)
    instead of being returned, so memory holds one block's statistics whatever the depth.
    """
    if "labels" not in inspect.signature(model.forward).parameters:
        raise RankcutError("the fisher method needs a model with a loss (a language-modelling "
                           "or classification head); use whiten for a bare encoder")
    was_training = model.training
    model.eval()  # as the whole-model pass: no dropout
    try:
        return _blockwise(model, residency, targets, ids, batch_size, progress, full, sink)
    finally:
        model.train(was_training)


def _blockwise(model: nn.Module, residency: Residency, targets: Sequence[Target], ids: torch.Tensor,
               batch_size: int, progress: bool, full: bool,
               sink: Callable[[str, torch.Tensor], None] | None) -> dict[str, torch.Tensor]:
    blocks = residency.blocks
    lowest = min(t.layer for t in targets)
    highest = len(blocks) - 1
    sums: dict[str, torch.Tensor] = {}
    counts = {t.name: 0 for t in targets}
    done: dict[str, torch.Tensor] = {}
    windows = list(batches(ids, batch_size))
    replay = BlockReplay(model, ids, batch_size, place=residency.place)
    kept: list[list[tuple[tuple, dict]]] = []
    shapes: list[int] = []  # each block's output: 0 for a tensor, else the tuple's length
    bar = tqdm(total=2 * (highest + 1) - lowest, desc="calibrate (gradients)", disable=not progress, unit="block")
    for index in range(highest + 1):
        kept.append(replay.inputs)
        with residency.resident(index, changed=False) as block:
            outputs = []
            for args, kwargs in replay.inputs:
                with torch.no_grad():
                    out = block(*args, **kwargs)
                outputs.append(out[0] if isinstance(out, tuple) else out)
                if index == highest:
                    shapes.append(len(out) if isinstance(out, tuple) else 0)
        replay.set_hidden(outputs)
        bar.update()
    head = plain_lm_head(model)
    # a plain head is read a slice at a time in float32 (`next_token_loss_gradient`): it and the
    # embedding stay in their stored precision rather than be copied whole
    stored = set() if head is None else {id(head.weight), id(model.get_input_embeddings().weight)}
    with _outside_in(model, blocks, residency.compute_dtype, keep=stored), _frozen(model):
        grads = [_head_gradient(model, blocks, batch, hidden, shapes[0], number, head, residency.compute_dtype)
                 for number, (batch, hidden) in enumerate(zip(windows, outputs))]
    del outputs
    for index in range(highest, lowest - 1, -1):
        mine = [t for t in targets if t.layer == index]
        sums.update({t.name: _zeros(t.out_features, full) for t in mine})
        with residency.resident(index, changed=False) as block, _frozen(block):
            handles = [t.module.register_forward_hook(_square_output_gradient(sums, counts, t.name)) for t in mine]
            try:
                for number, (args, kwargs) in enumerate(kept[index]):
                    hidden = BlockReplay._hidden(args, kwargs).detach().requires_grad_(True)
                    args2, kwargs2 = BlockReplay._with_hidden(args, kwargs, hidden)
                    with torch.enable_grad():
                        out = block(*args2, **kwargs2)
                        out = out[0] if isinstance(out, tuple) else out
                        out.backward(grads[number].to(out.device, out.dtype))
                    grads[number] = hidden.grad
            finally:
                for h in handles:
                    h.remove()
        kept[index] = []
        for t in mine:
            mean = sums.pop(t.name) / max(1, counts[t.name])
            if sink is None:
                done[t.name] = mean
            else:
                sink(t.name, mean)
        bar.update()
    bar.close()
    return done


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """No weight gradients for the span: the backward passes here want the gradients at module
    outputs only, and a .grad beside every weight would be a second copy of the model."""
    flags = {p: p.requires_grad for p in module.parameters()}
    for p in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


@contextmanager
def _outside_in(model: nn.Module, blocks: nn.ModuleList, dtype: torch.dtype | None,
                keep: set[int] | frozenset[int] = frozenset()) -> Iterator[None]:
    """The parts outside the blocks (embeddings, final norm, head) computed in `dtype` for the span:
    a half-precision head is the loss's largest matmul, and many CPUs only emulate it (25× slower
    here); cast back exactly afterwards (half → float32 → half loses nothing). Parameters whose
    ids are in `keep` stay as stored."""
    inside = {id(p) for p in blocks.parameters()}
    outside = {id(p): p for p in model.parameters() if id(p) not in inside and id(p) not in keep and not p.is_meta}
    stored = {key: p.data for key, p in outside.items()}
    if dtype is not None:
        for p in outside.values():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    try:
        yield
    finally:
        for key, p in outside.items():
            p.data = stored[key]


def _zeros(width: int, full: bool) -> torch.Tensor:
    return torch.zeros((width, width) if full else width, dtype=torch.float64)


def _square_output_gradient(sums: dict[str, torch.Tensor], counts: dict[str, int], name: str):  # noqa: ANN202
    """A forward hook that adds the squares of the loss gradient at the module's output to
    `sums[name]`: per channel (a vector sum), or as gᵀg (a matrix sum), in float64."""
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        def grad_hook(g: torch.Tensor) -> None:
            g = g.detach().reshape(-1, g.shape[-1]).double()
            sums[name] += (g.square().sum(0) if sums[name].ndim == 1 else g.T @ g).cpu()
            counts[name] += g.shape[0]
        if output.requires_grad:
            output.register_hook(grad_hook)
    return hook


def _head_gradient(model: nn.Module, blocks: nn.ModuleList, batch: torch.Tensor, hidden: torch.Tensor,
                   shape: int, window: int = 0, head: nn.Linear | None = None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """The summed loss's gradient (`gradient_loss`) at the last block's output `hidden`: the model runs with
    every block replaced by a pass-through and the last one handing out `hidden` (on the CPU, in
    `dtype`, else the precision of the parts outside the blocks). With a plain language-model
    `head`, the loss is scored a slice of the vocabulary at a time (`chunked_lm_backward`)."""
    outside = next(p for p in model.get_output_embeddings().parameters()) if model.get_output_embeddings() \
        is not None else next(p for p in model.parameters() if not p.is_meta)
    leaf = hidden.detach().to(outside.device, dtype or outside.dtype).requires_grad_(True)

    def passthrough(last: bool):  # noqa: ANN202
        def forward(*args, **kwargs):  # noqa: ANN002, ANN003
            h = leaf if last else BlockReplay._hidden(args, kwargs)
            return (h,) + (None,) * (shape - 1) if shape else h
        return forward

    for number, block in enumerate(blocks):
        block.forward = passthrough(number == len(blocks) - 1)
    try:
        with torch.enable_grad():
            if head is not None:
                chunked_lm_backward(model, head, batch)
            else:
                gradient_loss(model, batch, window).backward()
    finally:
        for block in blocks:
            del block.forward
    return leaf.grad


def is_sequence_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def gradient_loss(model: nn.Module, batch: torch.Tensor, number: int) -> torch.Tensor:
    """The summed loss whose output gradients the statistics square, for calibration window batch
    `number`.

    A language model: next-token cross-entropy on the window itself, summed over predicted
    tokens (the empirical Fisher, per token). A sequence classifier: calibration text carries no
    labels, so each window's label is drawn from the model's own prediction (seeded by `number`,
    so every pass over the same windows draws the same), which makes the squared gradients the
    true Fisher of the model's predictive distribution; a regression head (one output) draws
    its target from a unit Gaussian around the prediction, the Gauss-Newton curvature of the
    squared error.
    """
    if not is_sequence_classifier(model):
        loss = model(input_ids=batch, labels=batch, **_forward_kwargs(model)).loss
        return loss * batch.shape[0] * (batch.shape[1] - 1)  # the mean over predicted tokens, made a sum
    logits = model(input_ids=batch, **_forward_kwargs(model)).logits.float()
    return sampled_label_loss(logits, number)


def sampled_label_loss(logits: torch.Tensor, seed: int) -> torch.Tensor:
    """Summed loss against labels drawn from the prediction itself (see `gradient_loss`)."""
    generator = torch.Generator().manual_seed(seed)
    if logits.shape[-1] == 1:  # regression: d/df ½(f − y)² = −ε for y = f + ε, ε ~ N(0, 1)
        noise = torch.randn(logits.shape, generator=generator, dtype=torch.float32).to(logits.device)
        return (logits * noise).sum()
    probs = logits.detach().softmax(-1).cpu()
    labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)
    return nn.functional.cross_entropy(logits, labels, reduction="sum")


# Configuration fields that put something between the head's output and the loss (soft caps,
# scales): where one is set, the chunked loss would not be the model's loss.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def plain_lm_head(model: nn.Module) -> nn.Linear | None:
    """The output embedding, when the model's loss is plain next-token cross-entropy on it."""
    if not type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 0, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    return head if isinstance(head, nn.Linear) else None


HEAD_SLICE_NUMBERS = 1 << 24  # entries of one slice of the head's weight, or of its logits (64 MB in float32)


@torch.no_grad()
def next_token_loss_gradient(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             labels: torch.Tensor) -> torch.Tensor:
    """∂/∂h of Σ_t cross-entropy(W·h_t + b, label_t), for `hidden` (tokens × d), in float32,
    without the tokens × vocabulary logits or a float32 copy of W ever existing whole.

    The head is read a slice of rows at a time, each slice cast to float32 as it is used: a
    half-precision head's matmul is emulated many times slower on most CPUs, and a float32 copy
    of a 128k-word head is a gigabyte. The gradient is softmax·W − W[label]; one pass over the
    slices accumulates Σ_j exp(l_j − m)·W_j and Σ_j exp(l_j − m) against each token's running
    maximum m, rescaling both when m rises (the online softmax), so each slice is cast and
    multiplied once for the logits and once for the sum. Exactly the gradient of the summed
    loss, up to float rounding."""
    h = hidden.float()
    tokens, vocab = h.shape[0], weight.shape[0]
    step = max(1, HEAD_SLICE_NUMBERS // max(1, weight.shape[1], tokens))  # vocabulary rows a slice
    running_max = torch.full((tokens,), float("-inf"), dtype=torch.float32, device=h.device)
    total = torch.zeros(tokens, dtype=torch.float32, device=h.device)
    weighted = torch.zeros_like(h)  # Σ_j exp(l_j − m)·W_j
    at_label = torch.zeros_like(h)  # W[label]
    for start in range(0, vocab, step):
        w = weight[start:start + step].float()
        logits = h @ w.T
        if bias is not None:
            logits += bias[start:start + step].float()
        new_max = torch.maximum(running_max, logits.max(1).values)
        rescale = torch.exp(running_max - new_max)  # 0 on the first slice (exp(−inf))
        logits.sub_(new_max[:, None]).exp_()
        total.mul_(rescale).add_(logits.sum(1))
        weighted.mul_(rescale[:, None]).addmm_(logits, w)
        running_max = new_max
        inside = (labels >= start) & (labels < start + w.shape[0])
        at_label[inside] = w[labels[inside] - start]
    return weighted / total[:, None] - at_label


def chunked_lm_backward(model: nn.Module, head: nn.Linear, batch: torch.Tensor) -> None:
    """Back-propagate the summed next-token loss with the head applied a slice of its vocabulary
    at a time (`next_token_loss_gradient`).

    The forward pass stops at the head's input; the loss gradient with respect to that hidden
    state is computed there, then sent back through the model in one backward pass.
    """
    reached = run_until(model, head, batch)
    if reached is None:
        raise RankcutError(f"{type(model).__name__} never called its output head; cannot score tokens")
    hidden = BlockReplay._hidden(*reached)
    predicting = hidden[:, :-1]  # the last position predicts nothing inside the window
    labels = batch[:, 1:].reshape(-1).to(hidden.device)
    grad = next_token_loss_gradient(predicting.reshape(-1, predicting.shape[-1]), head.weight, head.bias, labels)
    full = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    full[:, :-1] = grad.reshape(predicting.shape)
    hidden.backward(full.to(hidden.dtype))
