"""Clip state: the thresholds, per-sample norms and adaptive-clipping counts of one model's clipping groups.

Each privatized graph calls ``bkcompile::record_norms(norms, key, group)`` (``bkcompile.runtime.ledger``) on the
per-sample norms (B,) of each clipping group, before clipping. The op finds the clip state of the running call
and :meth:`ClipState.record` records them and returns the group's current threshold, which the graph's clip
factors use: thresholds are runtime values, so the DP optimizer can adapt them without a recompile, and the op's
result feeds the gradients, so no compiler removes it. One call per group keeps the groups independent: a group's
weighted reductions need only its own norms. The samples under each threshold (for adaptive clipping) are
counted when the counts are read, for all the backwards recorded since, in a few ops (the op runs in every
backward, the count once per step).

Mixed precision: under ``torch.amp.GradScaler`` the loss scale S multiplies every per-sample gradient in
the backward. Each graph divides its per-sample norms by ``bkcompile::loss_scale(like, key)`` before
clipping: S read from the scaler's scale tensor on the device when ``DPOptimizer(grad_scaler=...)`` gave
one (no host synchronisation), else 1. The clip factors are then those of the unscaled gradients (for
automatic clipping too), the weighted sums stay scaled by S, and ``scaler.step(dp_optimizer)`` unscales
them before the noise.

Everything stays on the model's device: the op reads and writes device tensors only (no ``.cpu()``,
no ``.item()``, no host synchronisation); the optimizer and ``last_per_sample_norms`` copy when
asked. A :class:`ClipState` belongs to the step ledger of its model (``bkcompile.runtime.ledger``), keyed by
the identity of its parameters.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily


@dataclasses.dataclass(eq=False)
class ClipState:
    """The clipping groups of one graph's parameters (recompiles with the same groups share it).

    ``members`` holds each group's parameters by identity, weakly: the model's step ledger (a value of a table
    keyed weakly by these parameters) holds its clip states, which must not keep the parameters alive;
    ``names`` their names, for messages."""

    groups: tuple[str, ...]  # group names
    members: tuple[tuple[torch.nn.Parameter, ...], ...]  # the parameters of each group (held as weakref.ref)
    names: tuple[tuple[str, ...], ...]  # their names
    initial: tuple[float, ...]  # the thresholds the options gave
    device: torch.device
    thresholds: torch.Tensor = dataclasses.field(init=False)  # (G,) float64 on the device: the current R_g
    _below: torch.Tensor = dataclasses.field(init=False)  # (G,) counted samples with group norm <= R_g (below)
    _rows: torch.Tensor = dataclasses.field(init=False)  # (G,) counted samples (rows)
    grad_scaler: Any = None  # the torch.amp.GradScaler whose scale multiplies the gradients, if any
    spans: list | None = None  # a clip over several graphs: its groups' ClipSpans (bkcompile.runtime.deferred)
    backwards: int = 0  # backwards that recorded norms
    task: int = -1  # the autograd graph task of ``latest`` (tasks are numbered in order)
    # the norms (B,) each group recorded in the last backward, kept as recorded: one copy per record, and the
    # (B, G) ``latest`` formed only when read
    _columns: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    _latest: torch.Tensor | None = None  # ``latest`` once formed (until the next record)
    _recorded: set[int] = dataclasses.field(default_factory=set)  # groups of the last backward not counted yet
    # the backwards not counted yet in ``below`` and ``rows``: the norms (B,) of the groups each recorded
    _uncounted: list[dict[int, torch.Tensor]] = dataclasses.field(default_factory=list)
    _split: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None  # the thresholds and a view of each R_g

    def __post_init__(self) -> None:
        self.members = tuple(tuple(weakref.ref(p) for p in group) for group in self.members)
        with unset_fake_temporarily():  # the pass may run under a fake mode: the state holds real tensors
            self.thresholds = torch.tensor(self.initial, dtype=torch.float64, device=self.device)
            self._below = torch.zeros_like(self.thresholds)
            self._rows = torch.zeros_like(self.thresholds)

    def same_groups(self, groups: tuple[str, ...], members: tuple[tuple, ...], initial) -> bool:
        return (
            self.groups == groups
            and self.initial == tuple(initial)
            and len(self.members) == len(members)
            and all(len(a) == len(b) and all(p() is q for p, q in zip(a, b)) for a, b in zip(self.members, members))
        )

    @property
    def latest(self) -> torch.Tensor | None:
        """(B, G): the norms of the last backward (0 for a group it did not record); None before any."""
        if self._latest is None and self._columns:
            self._latest = _stacked(self._columns, len(self.groups))
        return self._latest

    def sensitivity_tensor(self) -> torch.Tensor:
        """The L2 sensitivity of the summed clipped gradient, sqrt(sum_g R_g^2), on the device (no sync)."""
        return self.thresholds.pow(2).sum().sqrt()

    @property
    def sensitivity(self) -> float:
        """:meth:`sensitivity_tensor` as a number (copies it to the host)."""
        return float(self.sensitivity_tensor())

    @property
    def below(self) -> torch.Tensor:
        """(G,) the samples whose group norm was at most the group's threshold, since the last reset."""
        self._count()
        return self._below

    @property
    def rows(self) -> torch.Tensor:
        """(G,) the samples recorded since the last reset."""
        self._count()
        return self._rows

    def reset_counts(self) -> None:
        self._uncounted.clear()
        self._recorded = set()  # the last backward is not counted either
        self._below.zero_()
        self._rows.zero_()

    def move_thresholds(self, thresholds: torch.Tensor) -> None:
        """Set the thresholds (a restored checkpoint's), once the backwards clipped at the old ones are counted."""
        self._count()
        self.thresholds.copy_(thresholds)

    def _count(self) -> None:
        """Count the backwards recorded since the last count, at the thresholds they clipped with: the thresholds
        move only after the counts are read (the DP optimizer's step reads them first) or through
        :meth:`move_thresholds`. Counted in a few ops for many backwards, not in each group's record."""
        if self._recorded:  # the running backward's record is complete as far as the counts are read now
            self._uncounted.append({group: self._columns[group] for group in self._recorded})
            self._recorded = set()
        device = self._below.device  # the state's (a model moved after the state was made records elsewhere)
        size = len(self.groups)
        whole = [_stacked(columns, size).to(device) for columns in self._uncounted if len(columns) == size]
        if whole:
            norms = torch.cat(whole) if len(whole) > 1 else whole[0]
            self._below += (norms <= self.thresholds).sum(0).to(self._below)
            self._rows += len(norms)
        for columns in self._uncounted:  # a backward that recorded some of the groups only
            if len(columns) < size:
                for group, norms in columns.items():
                    below = norms.to(device) <= self.thresholds[group]
                    self._below[group] += below.sum().to(self._below)
                    self._rows[group] += len(norms)
        self._uncounted.clear()

    def loss_scale(self, like: torch.Tensor) -> torch.Tensor:
        """The GradScaler's current scale S as a 0-dim tensor like ``like`` (1 without an enabled scaler)."""
        scaler = self.grad_scaler
        scale = getattr(scaler, "_scale", None) if scaler is not None and scaler.is_enabled() else None
        if scale is None:  # no scaler, or it has not scaled a loss yet: the gradients are not scaled
            return torch.ones((), dtype=like.dtype, device=like.device)
        return scale.detach().reshape(()).to(dtype=like.dtype, device=like.device, copy=True)

    def record(self, norms: torch.Tensor, group: int) -> torch.Tensor:
        """Keep a group's norms of this backward (counted under the thresholds when the counts are read, or every
        ``_COUNT_EVERY`` backwards: :meth:`_count`); return the group's threshold.

        Two ops per call, a copy of the norms and one of the threshold (a graph with a group per layer records
        dozens of groups in each backward, where every op costs its dispatch)."""
        task = torch._C._current_graph_task_id()
        if not self._columns or task != self.task or group in self._columns:  # a new backward (or call)
            if self._recorded:
                self._uncounted.append({g: self._columns[g] for g in self._recorded})
                self._recorded = set()
            if len(self._uncounted) >= _COUNT_EVERY:
                self._count()
            self.task = task
            self.backwards += 1
            self._columns = {}
        self._latest = None
        self._recorded.add(group)
        own = norms.detach() if norms.requires_grad else norms
        self._columns[group] = own.to(dtype=_norm_dtype(norms), copy=True)  # the graph may reuse its buffer
        return self._thresholds()[group].to(device=norms.device, dtype=norms.dtype, copy=True)  # not the state's

    def _thresholds(self) -> tuple[torch.Tensor, ...]:
        """A view of each threshold R_g (views: they follow the in-place updates of adaptive clipping)."""
        split = self._split
        if split is None or split[0] is not self.thresholds:
            split = self._split = (self.thresholds, self.thresholds.unbind())
        return split[1]


_COUNT_EVERY = 16  # backwards whose norms wait to be counted together (their (B, G) norms are kept until then)


def _stacked(columns: dict[int, torch.Tensor], size: int) -> torch.Tensor:
    """(B, ``size``): the recorded norms of each group side by side, 0 for a group not recorded."""
    if len(columns) == size:
        return torch.stack([columns[group] for group in range(size)], 1)
    some = next(iter(columns.values()))
    return torch.stack([columns[g] if g in columns else torch.zeros_like(some) for g in range(size)], 1)


def _norm_dtype(norms: torch.Tensor) -> torch.dtype:
    return torch.float64 if norms.dtype == torch.float64 else torch.float32


def latest_norms(state: ClipState | None) -> torch.Tensor | None:
    if state is None or state.latest is None:
        return None
    latest = state.latest
    return latest[:, 0].clone() if latest.shape[1] == 1 else latest.clone()
