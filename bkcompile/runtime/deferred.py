"""Several graphs, one clip: the clipping of a model compiled in pieces, at the end of its backward.

A *piece* is a bk_dp graph that is one of several graphs of the model: a graph dynamo cut at a graph
break, or a graph compiled with ``options={"graphs": "several"}`` (regional compilation). A piece's
backward does not clip. Through ``bkcompile::defer_grads`` it hands over its trainable parameters (the
tensors themselves: parameters are keyed by identity), the per-sample gradients (B, n) of each one's
share of the loss, and the loss scale s; it returns zero gradients. The call names the graph's run-time
record (``bkcompile.runtime.ledger.GraphRecord``), whose plan says what was handed over (``bkcompile.plan.PieceSpec``).
When the autograd backward ends (``bkcompile.runtime.backwards``), :func:`finalize`, once for all its pieces:

1. adds a parameter's per-sample gradients over the pieces (a tied embedding used by the first and the
   last piece gets its cross terms exactly: sample i's gradient is the sum of its parts);
2. joins the pieces' clipping groups across the pieces (a group may span pieces), by the clipping policy
   (``bkcompile.policy``), and gives each its threshold by the policy;
3. forms each group's per-sample norms ``n_ig = s ||G_ig|| / S`` (S: a GradScaler's scale, 1 without one),
   records them in the group's clip state
   (adaptive thresholds, ``last_per_sample_norms``), and the policy's clip factors ``C_ig`` once;
4. adds ``sum_i s C_ig G_i`` to each parameter's ``.grad``.

The rows of every piece are the same samples: row i of each piece's batch is sample i (the pieces of one
forward pass activations on; a piece that runs twice over the same parameters in one backward is a
second call, refused).
"""

from __future__ import annotations

import dataclasses

import torch

from bkcompile.errors import ClipOnceError, LossReductionError, PrivacyError, run_error, unset_loss_reduction
from bkcompile.plan import KeptGraphs, PieceSpec
from bkcompile.policy import ClipPolicy
from bkcompile.runtime.backwards import Backward, join_piece
from bkcompile.runtime.distributed import average_over_ranks, reduce_to_shards
from bkcompile.runtime.ledger import Clip, GraphRecord, ledger_for, ledger_of, live_ledgers, parameter_of, record_of


@dataclasses.dataclass
class Kept:
    """A kept parameter's part in one backward run of a piece: its ghost norm and its site's operands."""

    site: KeptGraphs
    norms: torch.Tensor  # (B,) squared norms of the per-sample gradients (the share of the loss)
    operands: list[torch.Tensor]

    def per_sample(self) -> torch.Tensor:
        return self.site.per_sample(*self.operands, self.norms)

    def reduce(self, weights: torch.Tensor) -> torch.Tensor:
        return self.site.reduce(*self.operands, weights)


@dataclasses.dataclass
class Piece:
    """One backward run of a piece: its parameters, their per-sample gradients or kept sites."""

    record: GraphRecord  # the piece's graph (its plan says what it handed over)
    params: list[torch.Tensor]
    grads: list[torch.Tensor | Kept]  # per parameter: (B, numel), unscaled share of the loss, or its kept site
    factor: torch.Tensor  # the loss scale s (0-dim)

    @property
    def batch(self) -> int:
        first = self.grads[0]
        return int((first.norms if isinstance(first, Kept) else first).shape[0])

    @property
    def label(self) -> str:
        return self.record.plan.label

    @property
    def policy(self) -> ClipPolicy:
        return self.record.plan.policy

    @property
    def spec(self) -> PieceSpec:
        return self.record.plan.piece


@torch.library.custom_op("bkcompile::defer_grads", mutates_args=())
def defer_grads(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    factor: torch.Tensor,
    key: int,
    norms: list[torch.Tensor],
    operands: list[torch.Tensor],
) -> list[torch.Tensor]:
    record = record_of(key)
    # the op declares no aliasing, so a compiler may reuse its inputs' memory once it returns: keep copies
    parts: list[torch.Tensor | Kept] = [_own(g) for g in grads]
    values = iter(operands)
    for site, norm in zip(record.plan.piece.kept, norms):
        parts.append(Kept(site, _own(norm), [_own(next(values)) for _ in range(site.operands)]))
    join_piece(Piece(record, [parameter_of(p) for p in params], parts, _own(factor)), finalize)
    return [torch.zeros_like(p) for p in params]  # the ledger takes no gradient from a piece's call


def _own(value: torch.Tensor) -> torch.Tensor:
    """A copy of ``value`` that outlives the call: Inductor reuses a buffer after its last reader in the graph."""
    return value.detach().clone()


@defer_grads.register_fake
def _defer_grads_fake(params, grads, factor, key, norms, operands):
    return [torch.empty_like(p) for p in params]


def _agree(pieces: list[Piece]) -> ClipPolicy:
    """The pieces of one backward must clip alike."""
    first = pieces[0]
    for piece in pieces[1:]:
        differs = piece.policy.differs(first.policy)
        if differs is not None:
            raise run_error(
                PrivacyError,
                f"{piece.label} and {first.label} run in one backward but clip differently ({differs})",
                "one sample's gradient spans both graphs and is clipped once",
                "compile every bk_dp module of the model with the same options",
            )
    sizes = {p.batch for p in pieces}
    if len(sizes) > 1:
        raise run_error(
            PrivacyError,
            f"the bk_dp graphs of one backward have different batch sizes {sorted(sizes)}",
            "their rows cannot be the same samples",
            "pass the same batch through every compiled module",
        )
    return first.policy


def _scale(pieces: list[Piece]) -> torch.Tensor:
    """s: from the loss computed in a graph when there is one (every piece's share is of that loss), else from the
    loss_reduction option; with neither, a batch of more than one sample is refused (``passes/loss.py``)."""
    losses = [p for p in pieces if p.spec.from_loss]
    said = [p for p in pieces if not p.spec.reduction_unset]
    if not losses and not said and pieces[0].batch > 1:
        labels = ", ".join(p.label for p in pieces)
        raise unset_loss_reduction(f"no bk_dp graph of this backward returns a loss ({labels})")
    chosen = losses or said or pieces
    kinds = {p.spec.loss for p in chosen}
    if len(kinds) > 1 or (kinds == {"weight"} and len(chosen) > 1):
        raise run_error(
            LossReductionError,
            f"the graphs of one backward reduce their loss over the batch differently ({sorted(kinds)}: "
            f"{', '.join(p.label for p in chosen)})",
            "no per-sample loss is defined",
            "reduce every loss term the same way (all .mean() or all .sum() over the batch)",
        )
    return chosen[0].factor


class _Union:
    """Union-find over hashable keys (the parameter groups that share a member are one group). Kept by hand:
    scipy's ``DisjointSet`` needs an ``add`` per key and roots by size, not by the last group joined (the
    group's name), and took 4-7x this one's time per backward (200 parameters)."""

    def __init__(self) -> None:
        self.parent: dict = {}

    def find(self, key):
        self.parent.setdefault(key, key)
        while self.parent[key] != key:
            key = self.parent[key]
        return key

    def join(self, a, b) -> None:
        self.parent[self.find(a)] = self.find(b)


@dataclasses.dataclass
class _Param:
    tensor: torch.Tensor
    name: str
    grad: torch.Tensor | Kept  # (B, numel): the sum of its pieces' per-sample gradients, or its one kept site
    pieces: list[str]  # labels of the graphs it has sites in
    key: object = None  # its global group (the root of its local groups)


def _combine(pieces: list[Piece]) -> dict[int, _Param]:
    """Per parameter identity, the sum over pieces of its per-sample gradients."""
    params: dict[int, _Param] = {}
    seen: set[tuple[int, int]] = set()
    for piece in pieces:
        for tensor, grad, name in zip(piece.params, piece.grads, piece.spec.names):
            if (id(piece.record), id(tensor)) in seen:
                raise run_error(
                    ClipOnceError,
                    f"{piece.label} ran twice over parameter {name!r} before one backward",
                    "the two calls' rows are not known to be the same samples, so neither clipping each call nor "
                    "adding them per row is private",
                    "one call of the compiled model per backward (put both inputs in one batch)",
                )
            seen.add((id(piece.record), id(tensor)))
            entry = params.get(id(tensor))
            if entry is None:
                params[id(tensor)] = _Param(tensor, name, grad, [piece.label])
            else:
                entry.grad = _dense(entry.grad) + _dense(grad)  # the cross terms of its norm come with the sum
                if piece.label not in entry.pieces:
                    entry.pieces.append(piece.label)
    return params


def _dense(grad: torch.Tensor | Kept) -> torch.Tensor:
    return grad.per_sample() if isinstance(grad, Kept) else grad


def _groups(pieces: list[Piece], params: dict[int, _Param], policy: ClipPolicy):
    """(group names, members, thresholds) across the pieces; sets each parameter's ``key``: its global group.

    A parameter's global group is its local groups joined through shared parameters (a tied parameter joins the
    groups of its modules); local groups meet across pieces by their key, except where the policy's style says
    that the names they are keyed by are relative to a graph compiled on its own (a module path, a parameter
    name) or that a parameter is its own group."""
    style = policy.style
    union = _Union()
    names: dict = {}  # local key -> the group's name
    own: dict = {}  # local key -> its own threshold (None: a share of max_grad_norm)
    for index, piece in enumerate(pieces):
        grouping = piece.record.plan.grouping
        for tensor, member in zip(piece.params, piece.spec.inputs):
            group = grouping.groups[grouping.group_of(member)]
            if style is not None and style.own:  # named by its parameter (made unique across the pieces)
                local = ("param", id(tensor))
            else:
                scope = index if style is not None and style.relative and piece.spec.relative_names else None
                local = ("group", scope, group.key)
                names[local] = group.name
            own[local] = None if group.shared else group.threshold
            union.join(("param", id(tensor)), local)
    order: list = []
    for key, param in params.items():
        param.key = union.find(("param", key))
        if param.key not in order:
            order.append(param.key)
    members = [[p for p in params.values() if p.key == key] for key in order]
    explicit = {union.find(local): threshold for local, threshold in own.items() if threshold is not None}
    thresholds = policy.thresholds([explicit.get(key) for key in order])
    labels: list[str] = []
    for key, group in zip(order, members):
        base = names.get(key, group[0].name)
        labels.append(base if base not in labels else f"{base}#{len(labels)}")
    return labels, members, thresholds


def _unique_names(params: dict[int, _Param]) -> None:
    """Parameter names of different pieces may clash (blocks compiled one by one): add the graph."""
    counts: dict[str, int] = {}
    for param in params.values():
        counts[param.name] = counts.get(param.name, 0) + 1
    for param in params.values():
        if counts[param.name] > 1:
            param.name = f"{param.name} ({param.pieces[0]})"


@dataclasses.dataclass
class ClipSpan:
    """One clipping group of a backward clipped over several graphs: the graphs its norm spans."""

    group: str
    params: list[str]
    graphs: list[str]
    threshold: torch.Tensor  # R_g at the clip (0-dim, on the model's device: read only when printed)

    def __str__(self) -> str:
        return (
            f"clipping group {self.group!r} (R = {float(self.threshold):.4g}, {len(self.params)} parameters) spans "
            f"{len(self.graphs)} graph(s): " + "; ".join(self.graphs)
        )


def last_clip_spans(model: torch.nn.Module | None = None) -> list[ClipSpan] | None:
    """For the last backward clipped over several graphs (of ``model``; without, of the models whose compiled
    graphs are alive): each clipping group and the graphs it spans."""
    if model is None:
        ledgers = live_ledgers()
    else:
        ledgers = [ledger for ledger in [ledger_of(model)] if ledger is not None]
    states = [state for ledger in ledgers for state in ledger.states if state.spans is not None]
    return max(states, key=lambda s: s.task).spans if states else None


def _norms(grad: torch.Tensor | Kept) -> torch.Tensor:
    """Squared per-sample norms (B,)."""
    return grad.norms if isinstance(grad, Kept) else (grad * grad).sum(1)


def _clipped(param: _Param, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i G_i in the parameter's shape and dtype."""
    grad = param.grad
    total = grad.reduce(weights) if isinstance(grad, Kept) else weights.to(grad.dtype).unsqueeze(0) @ grad
    return total.reshape(param.tensor.shape).to(param.tensor.dtype)


def finalize(backward: Backward) -> None:
    """Clip every sample's gradient over all the pieces of ``backward`` once, and write the clipped sums."""
    pieces = [p for p in reversed(backward.pieces) if p.grads]  # forward order: the backward runs them last first
    if not pieces:
        return
    policy = _agree(pieces)
    scale = _scale(pieces)
    params = _combine(pieces)
    _unique_names(params)
    names, members, thresholds = _groups(pieces, params, policy)
    tensors = [p.tensor for p in params.values()]
    ledger = ledger_for(tensors)  # pieces compiled one by one join one ledger, as an optimizer's would
    state = ledger.clip_state(
        tuple(names),
        tuple(tuple(p.tensor for p in g) for g in members),
        tuple(tuple(p.name for p in g) for g in members),
        tuple(thresholds),
        tensors[0].device,
    )
    clip_record = Clip(state, tuple(map(id, tensors)))
    dtype = torch.float64 if any(_norms(p.grad).dtype == torch.float64 for p in params.values()) else torch.float32
    scale = scale.to(dtype)
    amp = state.loss_scale(scale)  # a GradScaler's scale S in the gradients (1 without one): norms unscaled
    spans = []
    for group, group_params in enumerate(members):
        norms = torch.stack([_norms(p.grad).to(dtype) for p in group_params]).sum(0).sqrt() * scale / amp
        weights = policy.factor(norms, state.record(norms, group)) * scale
        for param in group_params:
            ledger.accumulate(param.tensor, _clipped(param, weights), clip_record)
        graphs = list(dict.fromkeys(label for p in group_params for label in p.pieces))
        spans.append(ClipSpan(names[group], [p.name for p in group_params], graphs, state.thresholds[group].clone()))
    average_over_ranks(tensors, ledger.gradients(tensors))  # under DDP: as DDP's all-reduce would leave them
    reduce_to_shards([p.tensor for p in params.values()])  # under FSDP2: its post-backward ran before the clip
    state.spans = spans
