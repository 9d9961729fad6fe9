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
broadcasts once (``randomness.shared_generator``), undoes the average (times W), adds that noise and
divides by the global expected batch size: the replicas apply bit-identical updates and stay equal.
Before adding noise :func:`sum_of_clipped_sums` checks that every rank holds the same gradients
(a fingerprint all-gathered): gradients that no all-reduce combined (a model not wrapped in DDP)
would otherwise be released at the wrong scale and leave the replicas apart.

Poisson sampling of the union is the data's (``bkcompile.data.DistributedPoissonLoader``), the shared
generator the randomness's (``bkcompile.randomness.shared_generator``): this module is the run time's
collectives and FSDP2 bookkeeping alone, so the step ledger does not depend on the data loader.

FSDP2 (``fully_shard``): the bk_dp graphs run on the unsharded parameters FSDP2 all-gathers, and the
step ledger writes their clipped sums into those; FSDP2 reduce-scatters them into the sharded (DTensor)
gradients, the ranks' average, which the optimizer holds. The ledger follows that move by identity: the
post-accumulate-grad hook FSDP2 itself calls from ``foreach_reduce`` on each sharded parameter hands the
unsharded parameter's clips to the shard (:func:`fsdp_params_of` finds the pairs), and a hook called by
autograd instead (a shard used eagerly) is refused. A model sharded per block is compiled in pieces (a
graph per sharded module, :func:`sharded_per_module`), clipped together at the end of the backward, after
FSDP2's post-backward has run: the deferred clip reduce-scatters them itself through FSDP2
(:func:`reduce_to_shards`). ``DPOptimizer`` multiplies each
shard by FSDP2's divisor (:func:`sum_of_clipped_sums`) and adds this rank's part of one noise draw: every
rank draws the whole parameter's noise from the shared generator and keeps its shard
(:func:`local_part`), so each coordinate gets one draw and the update is the single-process one.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed._composable_state import _module_state_mapping
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_collectives import foreach_reduce
from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.weak import WeakIdKeyDictionary

from bkcompile.errors import NotSupportedYetError, PrivacyError, run_error


def world_size() -> int:
    """The number of ranks of the default process group (1 when none is initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_dtensor(value: object) -> bool:
    """Whether ``value`` is a DTensor (FSDP2's sharded parameters and gradients are)."""
    return isinstance(value, DTensor)


def sum_of_clipped_sums(params: list[torch.Tensor], sums: list[torch.Tensor | None]) -> None:
    """Turn the ranks' average of their clipped sums (``sums``, one per parameter) into their sum, in place:
    DDP's all-reduced gradients times W, FSDP2's sharded gradients times the divisor of their reduce-scatter.

    Refuses replicated gradients that differ between ranks: only gradients an all-reduce combined are the
    union batch's; noising per-rank gradients would release each rank's own clipped sum.
    """
    world = world_size()
    if world == 1:
        return
    sharded = [(p, s) for p, s in zip(params, sums) if is_dtensor(s)]
    replicated = [s for s in sums if not is_dtensor(s)]
    mine = _fingerprint(replicated)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    if any(not torch.equal(other, mine) for other in every):
        raise run_error(
            PrivacyError,
            "the clipped gradients differ between ranks at DPOptimizer.step()",
            "in a process group every rank must hold the all-reduced clipped sums of the union batch; noising "
            "each rank's own gradients would not be one private step of the whole batch",
            "wrap the model in DistributedDataParallel (DDP(model) compiled with backend='bk_dp', or "
            "DDP(torch.compile(model, backend='bk_dp'))) or shard it with fully_shard, and run forward and "
            "backward on every rank at every step, with an empty batch where a rank has no sample",
        )
    for s in replicated:
        if s is not None:
            s.mul_(world)
    for p, s in sharded:
        s.mul_(_divisor(p))


def _divisor(p: torch.Tensor) -> float:
    """What FSDP2's reduce-scatter divided the sum of the ranks' gradients of ``p`` by."""
    group = _SHARDS.get(p)
    mesh = p.device_mesh
    if group is None or mesh.size() != world_size():
        raise run_error(
            NotSupportedYetError,
            f"a sharded parameter of shape {tuple(p.shape)} on a device mesh of {mesh.size()} of the "
            f"{world_size()} ranks at DPOptimizer.step()",
            "bkcompile proves FSDP2 gradients reduce-scattered over the whole process group (fully_shard on a "
            "one-dimensional mesh of every rank); other meshes (tensor parallel, a sub-mesh) hold other sums",
            "fully_shard(module, mesh=init_device_mesh(device_type, (world_size,))), or DDP",
        )
    return float(group.gradient_divide_factor or mesh.size())


def local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full`` (a whole parameter's values, the same on every rank) where ``like`` is
    sharded (a DTensor), split as FSDP2 splits the parameter, with no communication; else ``full``."""
    if not is_dtensor(like):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the tensor itself when it is not one)."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def like_parameter(values: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``values`` (this rank's part) as the gradient of ``p``: a DTensor sharded as ``p`` when ``p`` is one."""
    if not is_dtensor(p):
        return values
    return DTensor.from_local(values, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False)


_FOREACH_REDUCE = inspect.unwrap(foreach_reduce).__code__  # under its torch.no_grad() decorator
_SHARDS = WeakIdKeyDictionary()  # FSDP2's sharded parameter -> its parameter group (which reduce-scatters it)
_UNSHARDED = WeakIdKeyDictionary()  # FSDP2's unsharded parameter -> its FSDPParam


def is_fully_sharded(module: torch.nn.Module) -> bool:
    """Whether FSDP2's ``fully_shard`` was applied to ``module`` or one of its submodules."""
    return any(isinstance(m, FSDPModule) for m in module.modules())


def _gathered_fsdp_params():
    """(FSDP2 state, parameter group, FSDPParam) of every module ``fully_shard`` was applied to, for the
    parameters all-gathered once (their unsharded parameter exists from the first forward on)."""
    for module in list(_module_state_mapping):
        if isinstance(module, FSDPModule):
            state = module._get_fsdp_state()
            for group in state._fsdp_param_groups:
                for fsdp_param in group.fsdp_params:
                    if hasattr(fsdp_param, "_unsharded_param"):
                        yield state, group, fsdp_param


def fsdp_params_of(params: list[torch.Tensor]) -> list[FSDPParam]:
    """FSDP2's parameters whose unsharded parameter is one of ``params`` (a graph's inputs): each pairs it
    with the sharded parameter the optimizer holds. Found from FSDP2's states (every module ``fully_shard``
    was applied to), so also where the compiled module is a torch module (``nn.Sequential``)."""
    wanted = {id(p) for p in params}
    found = []
    for _, group, fsdp_param in _gathered_fsdp_params():
        if id(fsdp_param.unsharded_param) in wanted:
            _SHARDS[fsdp_param.sharded_param] = group
            _UNSHARDED[fsdp_param.unsharded_param] = fsdp_param
            found.append(fsdp_param)
    return found


def sharded_per_module(params: list[torch.Tensor]) -> bool:
    """Whether some of ``params`` are FSDP2's unsharded parameters of a model sharded in several modules
    (``fully_shard`` per block): dynamo then compiles a graph per sharded module (it does not trace
    FSDP2's hooks), and those graphs are pieces of one clip."""
    wanted = {id(p) for p in params}
    return any(
        len(state._state_ctx.all_states) > 1 and id(fsdp_param.unsharded_param) in wanted
        for state, _, fsdp_param in _gathered_fsdp_params()
    )


def used_eagerly_in_sharded_model(p: torch.Tensor) -> str | None:
    """Why FSDP2's unsharded parameter ``p`` of a model sharded per module got a gradient from eager autograd,
    when no bk_dp graph ever received it (else None: a graph's parameter used eagerly besides, or no FSDP2's).

    Dynamo compiles a graph per forward of a module of the user's code and does not trace FSDP2's hooks (its
    pre- and post-forward are ``torch._dynamo.disable``'d): each call of a sharded module is a graph break,
    and a forward that makes it in a loop (``for block in self.blocks``) is skipped whole, since dynamo does
    not resume inside a loop. What that forward runs itself (a final norm, a head held by the root's own
    parameter group) then runs eagerly, as does a torch module, whose frames dynamo never compiles on their
    own (nor under ``Module.compile``)."""
    if p in _UNSHARDED:
        return None
    for state, group, fsdp_param in _gathered_fsdp_params():
        if fsdp_param.unsharded_param is p and len(state._state_ctx.all_states) > 1:
            holder = next(c for c in type(group.modules[0]).__mro__ if not issubclass(c, FSDPModule)).__name__
            owner = type(fsdp_param._module_info.module)
            path = fsdp_param._param_fqn.rpartition(".")[0] if fsdp_param._param_fqn else ""
            torch_own = (
                f"; {owner.__name__} is torch's own module, which dynamo never compiles on its own (nor under "
                "Module.compile())"
                if owner.__module__.startswith("torch.")
                else ""
            )
            return (
                f"no bk_dp graph received it: FSDP2 holds it in {holder}'s own parameter group (fully_shard per "
                f"module), and the code that used it ({owner.__name__} {path!r}) ran eagerly. Dynamo compiles a "
                "graph per forward of a module of your own code and does not trace FSDP2's hooks: a forward that "
                "calls the sharded modules in a loop (`for block in self.blocks: x = block(x)`) is skipped whole "
                f"(a graph break in a loop), so the layers it runs itself run eagerly{torch_own}. Move those layers "
                "into a module of your own code (a Head(nn.Module) whose forward runs the final norm and the output "
                "layer), called from that forward, with or without a fully_shard of its own; compile it too when "
                "compiling module by module"
            )
    return None


def from_fsdp_reduce(frame) -> bool:
    """Whether a post-accumulate-grad hook was called by FSDP2's reduce-scatter (its caller's frame), not
    by autograd."""
    return frame is not None and frame.f_code is _FOREACH_REDUCE


def fsdp_accumulated(frame) -> bool:
    """In FSDP2's reduce-scatter (``frame``): whether it added to the gradient the shard held (else it set a
    new one). Unknown counts as added: the ledger then requires the gradient to be the one it knows."""
    return bool(frame.f_locals.get("to_accumulate_grad", True))


def reduce_to_shards(params: list[torch.Tensor]) -> None:
    """Reduce-scatter the unsharded parameters' gradients written after FSDP2's post-backward ran (the
    deferred clip at the end of the backward) into their shards: FSDP2's own post-backward of their
    parameter groups, run again as its end-of-backward callback runs it."""
    groups = []
    for p in params:
        fsdp_param = _UNSHARDED.get(p)
        group = _SHARDS.get(fsdp_param.sharded_param) if fsdp_param is not None else None
        if group is not None and group._training_state == TrainingState.IDLE and group not in groups:
            groups.append(group)
    for group in groups:
        group.post_backward()
        group._training_state = TrainingState.IDLE
        group.finalize_backward()


def _fingerprint(grads: list[torch.Tensor | None]) -> torch.Tensor:
    """Per gradient: whether there is one, its sum and its sum of squares (float64)."""
    rows = []
    for grad in grads:
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


def average_over_ranks(params: list[torch.Tensor], grads: Iterable[torch.Tensor | None]) -> None:
    """Average the clipped sums ``grads`` of the parameters DDP holds over the ranks, in place, once they are
    written (every rank runs the same graphs, so every rank calls this with the same parameters).

    The result is what DDP's all-reduce leaves: the ranks' average of their clipped sums. Sums already
    equal on every rank (earlier micro-batches of the step) keep their value.
    """
    if world_size() == 1:  # first: a single process walks no parameter
        return
    synced = [g for p, g in zip(params, grads) if p in _SYNCED and g is not None]
    for grad in synced:
        dist.all_reduce(grad)
        grad.div_(world_size())


def sum_over_ranks(counts: torch.Tensor) -> None:
    """Sum per-rank counts in place (adaptive clipping's samples under each threshold)."""
    if world_size() == 1:
        return
    on_device = counts.to(_collective_device())
    dist.all_reduce(on_device)
    if on_device is not counts:
        counts.copy_(on_device)
