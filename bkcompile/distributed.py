"""Data-parallel DP-SGD: each rank clips its own samples, the noise is drawn once for all of them.

Under DDP every rank's bk_dp backward clips the samples it holds. The step ledger writes those clipped
sums into ``p.grad`` itself, so DDP's reducer never sees them: a bk_dp graph called inside a DDP
forward switches DDP's gradient sync off for that forward (:func:`sync_under_ddp`) and bkcompile
all-reduces each clipped sum as it is written (:func:`average_over_ranks`), leaving on every rank what
DDP would have left, the *average* of the ranks' clipped sums ``(1/W) sum_r S_r``. One private step
must release

    (sum_r S_r + N(0, (sigma * sensitivity)^2)) / B_global,

the single-process update on the union batch: one Gaussian draw per coordinate, not one per rank (W
draws would add W times the variance to the sum of the ranks' updates, or, averaged, leave the
replicas apart). So every rank draws the *same* noise from a generator whose state rank 0 owns and
broadcasts once (:func:`shared_generator`), undoes the average (times W), adds that noise and
divides by the global expected batch size: the replicas apply bit-identical updates and stay equal.
Before adding noise :func:`sum_of_clipped_sums` checks that every rank holds the same gradients
(a fingerprint all-gathered): gradients that no all-reduce combined (a model not wrapped in DDP)
would otherwise be released at the wrong scale and leave the replicas apart.

Poisson sampling of the union (:class:`DistributedPoissonLoader`): every rank draws the same global
mask from a shared generator and keeps every W-th selected row, so the global batch is exactly the
single-process one and the local batches differ in size by at most one (they may be empty; the batch
axis is dynamic, so an empty local batch runs the compiled graph without a recompile, and every rank
still runs its backward, which DDP's all-reduce needs). The accountant sees the global sample rate.

FSDP2 (``fully_shard``): a model sharded at its root and compiled whole is one bk_dp graph on the
unsharded parameters, and FSDP2 reduce-scatters its clipped sums into sharded (DTensor) gradients, the
ranks' average, exactly (bf16 mixed precision too). ``DPOptimizer`` refuses those gradients
(:func:`refuse_sharded`): the step ledger proves the unsharded parameters' gradients, not the shards.
``fully_shard`` on blocks as well makes one graph per block, refused by the step ledger (two graphs
compiled as the whole model in one backward) or, as pieces, by the several-graphs clip (FSDP2's own
autograd functions between the graphs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.weak import WeakIdKeyDictionary

from bkcompile.data import PoissonLoader
from bkcompile.errors import NotSupportedYetError, PrivacyError
from bkcompile.randomness import secret_generator


def world_size() -> int:
    """The number of ranks of the default process group (1 when none is initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def shared_generator(generator: torch.Generator | None) -> torch.Generator:
    """A generator in the same state on every rank: rank 0's ``generator`` (OS entropy when None).

    Outside a process group the generator is returned as it is (seeded from OS entropy when None).
    The state is broadcast into ``generator`` itself, so an object shared by the loader and the
    optimizer stays one stream.
    """
    if generator is None:
        generator = secret_generator()  # OS entropy: only rank 0's survives the broadcast
    if world_size() > 1:
        state = [generator.get_state()]
        dist.broadcast_object_list(state, src=0)
        generator.set_state(state[0])
    return generator


def refuse_sharded(params: list[torch.Tensor]) -> None:
    """FSDP2's sharded (DTensor) gradients: refused by the DP optimizer (not supported yet)."""
    sharded = [p for p in params if _is_dtensor(p) or _is_dtensor(p.grad)]
    if sharded:
        raise NotSupportedYetError(
            f"{len(sharded)} parameters are sharded DTensors (FSDP2's fully_shard) at DPOptimizer.step()\n"
            "  why: the step ledger proves that each gradient is a clipped sum for the parameters a bk_dp graph "
            "receives, which under FSDP2 are the unsharded parameters; the sharded gradients FSDP2 reduce-scatters "
            "for the optimizer are not proven yet, so they cannot be released\n"
            "  fix: train with DistributedDataParallel (DDP(torch.compile(model, backend='bk_dp')), or "
            "torch.compile(DDP(model), ...)); FSDP2 is not supported by DPOptimizer yet"
        )


def _is_dtensor(value: object) -> bool:
    return isinstance(value, torch.distributed.tensor.DTensor)


def sum_of_clipped_sums(params: list[torch.Tensor]) -> None:
    """Turn the all-reduced average of the ranks' clipped sums into their sum (times W), in place.

    Refuses gradients that differ between ranks: only gradients an all-reduce combined are the union
    batch's; noising per-rank gradients would release each rank's own clipped sum.
    """
    world = world_size()
    if world == 1:
        return
    mine = _fingerprint(params)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    if any(not torch.equal(other, mine) for other in every):
        raise PrivacyError(
            "the clipped gradients differ between ranks at DPOptimizer.step()\n"
            "  why: in a process group every rank must hold the all-reduced clipped sums of the union batch; "
            "noising each rank's own gradients would not be one private step of the whole batch\n"
            "  fix: wrap the model in DistributedDataParallel (DDP(model) compiled with backend='bk_dp', or "
            "DDP(torch.compile(model, backend='bk_dp'))) and run forward and backward on every rank at every "
            "step, with an empty batch where a rank has no sample"
        )
    for p in params:
        if p.grad is not None:
            p.grad.mul_(world)


def _fingerprint(params: list[torch.Tensor]) -> torch.Tensor:
    """Per parameter: whether it has a gradient, its sum and its sum of squares (float64)."""
    rows = []
    for p in params:
        grad = p.grad
        if grad is None:
            rows.append(torch.zeros(3, dtype=torch.float64))
        else:
            g = grad.detach().double()
            rows.append(torch.stack([torch.ones((), dtype=torch.float64), g.sum().cpu(), g.pow(2).sum().cpu()]))
    return torch.stack(rows).to(_collective_device()) if rows else torch.zeros(0, 3, dtype=torch.float64)


def _collective_device() -> torch.device:
    """Where the process group's collectives take tensors: the current GPU for NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


_SYNCED = WeakIdKeyDictionary()  # parameters whose gradients bkcompile all-reduces in place of DDP's reducer


def sync_under_ddp(params: list[torch.Tensor]) -> None:
    """At a bk_dp graph's forward call inside a DDP forward: bkcompile takes over DDP's gradient all-reduce.

    The step ledger writes a graph's clipped gradients into ``p.grad`` itself (autograd never accumulates
    them), so DDP's reducer, whose hooks fire on autograd's accumulation, would wait for gradients that
    never come. Its backward sync is switched off for this forward (as ``no_sync()`` does) and the
    parameters are all-reduced by :func:`average_over_ranks` when their clipped sums are written.
    """
    ddp = DistributedDataParallel._get_active_ddp_module()
    if ddp is None:
        return
    ddp.require_backward_grad_sync = False
    for p in params:
        _SYNCED[p] = True


def average_over_ranks(params: list[torch.Tensor]) -> None:
    """Average the gradients of the parameters DDP holds over the ranks, in place, once their clipped sums
    are written (every rank runs the same graphs, so every rank calls this with the same parameters).

    The result is what DDP's all-reduce leaves: the ranks' average of their clipped sums. Gradients already
    equal on every rank (earlier micro-batches of the step) keep their value.
    """
    if world_size() == 1:  # first: a single process walks no parameter
        return
    synced = [p for p in params if p in _SYNCED and p.grad is not None]
    for p in synced:
        dist.all_reduce(p.grad)
        p.grad.div_(world_size())


def sum_over_ranks(counts: torch.Tensor) -> None:
    """Sum per-rank counts in place (adaptive clipping's samples under each threshold)."""
    if world_size() == 1:
        return
    on_device = counts.to(_collective_device())
    dist.all_reduce(on_device)
    if on_device is not counts:
        counts.copy_(on_device)


class DistributedPoissonLoader(PoissonLoader):
    """Poisson sampling of the union of the ranks' data: each rank yields its part of one global batch.

    Every rank passes the same whole dataset (and the same options as to :class:`PoissonLoader`). Each
    step draws one global mask (each of the N examples in with probability ``sample_rate``) from a
    generator shared by all ranks, and rank r keeps the selected examples ``r, r + W, r + 2W, ...``.
    ``expected_batch_size`` is the global ``q * N``; ``state_dict`` (the shared generator and the
    position in the epoch) is the same on every rank.
    """

    def __init__(self, *data: Any, generator: torch.Generator | None = None, **options: Any) -> None:
        super().__init__(*data, generator=shared_generator(generator), **options)  # sample_rate, steps, ...
        if world_size() > 1:
            self.batch_sampler.part = slice(dist.get_rank(), None, world_size())
