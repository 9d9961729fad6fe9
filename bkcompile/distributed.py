"""Data-parallel DP-SGD: each rank clips its own samples, the noise is drawn once for all of them.

Under DDP every rank's bk_dp backward clips the samples it holds, and DDP's all-reduce leaves on every
rank the *average* of the ranks' clipped sums, ``(1/W) sum_r S_r``. One private step must release

    (sum_r S_r + N(0, (sigma * sensitivity)^2)) / B_global,

the single-process update on the union batch: one Gaussian draw per coordinate, not one per rank (W
draws would add W times the variance to the sum of the ranks' updates, or, averaged, leave the
replicas apart). So every rank draws the *same* noise from a generator whose state rank 0 owns and
broadcasts once (:func:`shared_generator`), undoes DDP's average (times W), adds that noise and
divides by the global expected batch size: the replicas apply bit-identical updates and stay equal.
Before adding noise :func:`sum_of_clipped_sums` checks that every rank holds the same gradients
(a fingerprint all-gathered): gradients that no all-reduce combined (a model not wrapped in DDP)
would otherwise be released at the wrong scale and leave the replicas apart.

Poisson sampling of the union (:class:`DistributedPoissonLoader`): every rank draws the same global
mask from a shared generator and keeps every W-th selected row, so the global batch is exactly the
single-process one and the local batches differ in size by at most one (they may be empty; the batch
axis is dynamic, so an empty local batch runs the compiled graph without a recompile, and every rank
still runs its backward, which DDP's all-reduce needs). The accountant sees the global sample rate.

FSDP2 (``fully_shard`` on the root module, compiled whole) leaves DTensor gradients: each rank holds a
shard of the average of the ranks' clipped sums (reduce-scattered). Every rank draws the whole noise
tensor from the shared generator and adds its own shard of it (:func:`shard_like`), so each
coordinate's noise is drawn once and the shards put together are the single-process update.
``fully_shard`` on blocks as well makes dynamo compile one graph per block with FSDP's own autograd
functions between them; the several-graphs clip refuses that (the rows between the graphs do not come
from the data through row-wise ops).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bkcompile.data import PoissonLoader
from bkcompile.errors import NotSupportedYetError, PrivacyError


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
        generator = torch.Generator()
        generator.seed()  # OS entropy: only rank 0's survives the broadcast
    if world_size() > 1:
        state = [generator.get_state()]
        dist.broadcast_object_list(state, src=0)
        generator.set_state(state[0])
    return generator


def refuse_sharded(params: list[torch.Tensor]) -> None:
    """Sharded (DTensor) gradients must be FSDP2's average over a 1-D mesh of every rank: the sum of the
    ranks' clipped sums is then W times it, and each rank noises its own shard."""
    world = world_size()
    for p in params:
        grad = p.grad
        if _is_dtensor(grad) and (grad.device_mesh.ndim != 1 or grad.device_mesh.size() != world):
            raise NotSupportedYetError(
                f"a sharded gradient of shape {tuple(grad.shape)} lives on a device mesh of shape "
                f"{tuple(grad.device_mesh.shape)}, not on one dimension over all {world} ranks\n"
                "  why: the noise and the undoing of FSDP2's average assume every rank holds a shard of one "
                "average over all ranks (hybrid sharding or tensor parallelism is not supported yet)\n"
                "  fix: fully_shard(model, mesh=init_device_mesh(device, (world_size,)))"
            )


def _is_dtensor(value: object) -> bool:
    return isinstance(value, torch.distributed.tensor.DTensor)


def shard_like(noise: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``noise`` (drawn whole, identically on every rank) where ``grad`` is sharded:
    each shard's owner adds its shard of the one draw."""
    if not _is_dtensor(grad):
        return noise
    return torch.distributed.tensor.distribute_tensor(noise, grad.device_mesh, grad.placements, src_data_rank=None)


def sum_of_clipped_sums(params: list[torch.Tensor]) -> None:
    """Turn DDP's all-reduced (FSDP2's reduce-scattered) average of the ranks' clipped sums into their sum
    (times W), in place.

    Refuses replicated gradients that differ between ranks: only gradients an all-reduce combined are the
    union batch's; noising per-rank gradients would release each rank's own clipped sum.
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
    """Per replicated parameter (not an FSDP2 shard): whether it has a gradient, its sum and its sum of
    squares (float64)."""
    rows = []
    for p in params:
        grad = p.grad
        if _is_dtensor(p) or _is_dtensor(grad):  # a shard, different on every rank
            continue
        if grad is None:
            rows.append(torch.zeros(3, dtype=torch.float64))
        else:
            g = grad.detach().double()
            rows.append(torch.stack([torch.ones((), dtype=torch.float64), g.sum().cpu(), g.pow(2).sum().cpu()]))
    fingerprint = torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)
    backend = dist.get_backend()
    return fingerprint.cuda() if backend == "nccl" else fingerprint


def average_over_ranks(params: list[torch.Tensor]) -> None:
    """Average the parameters' gradients over the ranks in place (every rank calls it with the same list).

    A model in several bk_dp graphs clips at the end of the backward, after DDP's reducer all-reduced the
    zeros the graphs returned: the clipped sums are combined here, as DDP would have. Gradients already
    equal on every rank keep their value.
    """
    world = world_size()
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def sum_over_ranks(counts: torch.Tensor) -> None:
    """Sum per-rank counts in place (adaptive clipping's samples under each threshold)."""
    if world_size() == 1:
        return
    if dist.get_backend() == "nccl":
        on_device = counts.cuda()
        dist.all_reduce(on_device)
        counts.copy_(on_device.cpu())
    else:
        dist.all_reduce(counts)


class DistributedPoissonLoader(PoissonLoader):
    """Poisson sampling of the union of the ranks' data: each rank yields its part of one global batch.

    Every rank passes the same full tensors. Each step draws one global mask (each of the N rows in
    with probability ``sample_rate``) from a generator shared by all ranks, and rank r keeps the
    selected rows ``r, r + W, r + 2W, ...``. ``expected_batch_size`` is the global ``q * N``.
    """

    def __init__(
        self,
        *tensors: torch.Tensor,
        sample_rate: float,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(*tensors, sample_rate=sample_rate, steps=steps, generator=shared_generator(generator))
        self.rank = dist.get_rank() if world_size() > 1 else 0
        self.world = world_size()

    def sample_indices(self) -> torch.Tensor:
        return super().sample_indices()[self.rank :: self.world]

    def state_dict(self) -> dict:
        """The shared generator's state (the same on every rank): resuming draws the batches that follow."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
