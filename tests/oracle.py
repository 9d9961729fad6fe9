"""The oracle: per-sample gradients from torch.func (vmap of grad), clipped and summed in eager mode."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch.func import functional_call, grad, vmap

EPS = 1e-6


def per_sample_grads(model: torch.nn.Module, sample_loss: Callable, inputs: tuple, targets: tuple = ()):
    """Gradients of each sample's own loss ``sample_loss(model(*inputs_i), *targets_i)`` (batches of one)."""
    trainable = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    frozen.update(dict(model.named_buffers()))
    n_inputs = len(inputs)

    def loss_of_one(params, *sample):
        batch = tuple(s.unsqueeze(0) for s in sample)
        out = functional_call(model, {**params, **frozen}, batch[:n_inputs])
        return sample_loss(out, *batch[n_inputs:])

    in_dims = (None,) + (0,) * (n_inputs + len(targets))
    return vmap(grad(loss_of_one), in_dims=in_dims, randomness="same")(trainable, *inputs, *targets)


def clip_factors(norms: torch.Tensor, threshold: float, clip_fn: str = "abadi", gamma: float = 0.01) -> torch.Tensor:
    """C_i from the per-sample norms: automatic clipping R / (n_i + gamma), else Abadi's min(1, R / n_i)."""
    if clip_fn == "automatic":
        return threshold / (norms + gamma)
    return (threshold / (norms + EPS)).clamp(max=1.0)


def clipped_sum(
    model, sample_loss, inputs, targets=(), max_grad_norm=1.0, groups=None, clip_fn="abadi", gamma=0.01, grads=None
):
    """(sum_i C_i g_i per parameter, per-sample norms ||g_i||) with all-layer clipping; with ``groups``
    (a list of (parameter names, threshold)) each group is clipped on its own and the norms are (B, G). ``grads``:
    the per-sample gradients when the caller has them (else computed here)."""
    grads = per_sample_grads(model, sample_loss, inputs, targets) if grads is None else grads
    groups = groups or [(list(grads), max_grad_norm)]
    out, columns = {}, []
    for names, threshold in groups:
        norms = torch.stack([grads[k].flatten(1).pow(2).sum(1) for k in names]).sum(0).sqrt()
        factors = clip_factors(norms, threshold, clip_fn, gamma)
        out.update({k: torch.einsum("b,b...->...", factors, grads[k]) for k in names})
        columns.append(norms)
    return out, columns[0] if len(columns) == 1 else torch.stack(columns, 1)


def compiled_grads(model, inputs, loss_fn, targets=(), options=None, **compile_kwargs):
    """Gradients of a bk_dp-compiled copy of ``model`` after ``loss_fn(output, *targets).backward()``."""
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="bk_dp", options=options, **compile_kwargs)
    loss_fn(compiled(*inputs), *targets).backward()
    return {k: v.grad for k, v in twin.named_parameters() if v.requires_grad}, compiled


def looped_clipped_sum(model, sample_loss, inputs, targets=(), max_grad_norm=1.0):
    """The oracle's result by a Python loop over samples (batches of one) instead of vmap, for models whose
    forward has data-dependent control flow that vmap refuses (transformers' SDPA mask: ``torch.all(mask == 1)``)."""
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    per_sample = []
    for i in range(len(inputs[0])):
        loss = sample_loss(model(*(x[i : i + 1] for x in inputs)), *(y[i : i + 1] for y in targets))
        per_sample.append(dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True))))
    grads = {
        k: torch.stack([g[k] if g[k] is not None else torch.zeros_like(p) for g in per_sample])
        for k, p in params.items()
    }
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
    factors = (max_grad_norm / (norms + EPS)).clamp(max=1.0)
    return {k: torch.einsum("b,b...->...", factors, g) for k, g in grads.items()}, norms
