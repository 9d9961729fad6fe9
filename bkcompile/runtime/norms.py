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
    latest: torch.Tensor | None = None  # (B, G): the norms of the last backward
    grad_scaler: Any = None  # the torch.amp.GradScaler whose scale multiplies the gradients, if any
    spans: list | None = None  # a clip over several graphs: its groups' ClipSpans (bkcompile.runtime.deferred)
    backwards: int = 0  # backwards that recorded norms
    task: int = -1  # the autograd graph task of ``latest`` (tasks are numbered in order)
    _recorded: set[int] = dataclasses.field(default_factory=set)  # groups the task has recorded
    # the backwards not counted yet in ``below`` and ``rows``: their norms (B, G) and the groups they recorded
    _uncounted: list[tuple[torch.Tensor, frozenset[int]]] = dataclasses.field(default_factory=list)

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
            self._uncounted.append((self.latest, frozenset(self._recorded)))
            self._recorded = set()
        device = self._below.device  # the state's (a model moved after the state was made records elsewhere)
        whole = [latest.to(device) for latest, groups in self._uncounted if len(groups) == len(self.groups)]
        if whole:
            norms = torch.cat(whole) if len(whole) > 1 else whole[0]
            self._below += (norms <= self.thresholds).sum(0).to(self._below)
            self._rows += len(norms)
        for latest, groups in self._uncounted:  # a backward that recorded some of the groups only
            if len(groups) < len(self.groups):
                for group in groups:
                    below = latest[:, group].to(device) <= self.thresholds[group]
                    self._below[group] += below.sum().to(self._below)
                    self._rows[group] += len(latest)
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
        ``_COUNT_EVERY`` backwards: :meth:`_count`); return the group's threshold."""
        task = torch._C._current_graph_task_id()
        if self.latest is None or task != self.task or group in self._recorded:  # a new backward (or call)
            if self._recorded:
                self._uncounted.append((self.latest, frozenset(self._recorded)))
                self._recorded = set()
            if len(self._uncounted) >= _COUNT_EVERY:
                self._count()
            self.task = task
            self.backwards += 1
            self.latest = norms.new_zeros(len(norms), len(self.groups), dtype=_norm_dtype(norms))
        self._recorded.add(group)
        self.latest[:, group] = norms.detach()
        return self.thresholds[group].to(device=norms.device, dtype=norms.dtype, copy=True)  # not a view of the state


_COUNT_EVERY = 16  # backwards whose norms wait to be counted together (their (B, G) norms are kept until then)


def _norm_dtype(norms: torch.Tensor) -> torch.dtype:
    return torch.float64 if norms.dtype == torch.float64 else torch.float32


def latest_norms(state: ClipState | None) -> torch.Tensor | None:
    if state is None or state.latest is None:
        return None
    latest = state.latest
    return latest[:, 0].clone() if latest.shape[1] == 1 else latest.clone()
