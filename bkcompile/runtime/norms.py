"""Clip state: the thresholds, per-sample norms and adaptive-clipping counts of one model's clipping groups.

Each privatized graph calls ``bkcompile::record_norms(norms, key, group)`` (``bkcompile.runtime.ledger``) on the
per-sample norms (B,) of each clipping group, before clipping. The op finds the clip state of the running call
and :meth:`ClipState.record` records them, counts the samples under the group's threshold (for adaptive
clipping), and returns the group's current threshold, which the graph's clip factors use: thresholds are
runtime values, so the DP optimizer can adapt them without a recompile, and the op's result feeds the
gradients, so no compiler removes it. One call per group keeps the groups independent: a group's weighted
reductions need only its own norms.

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
    below: torch.Tensor = dataclasses.field(init=False)  # (G,) samples with group norm <= R_g since the reset
    rows: torch.Tensor = dataclasses.field(init=False)  # (G,) samples recorded since the reset
    latest: torch.Tensor | None = None  # (B, G): the norms of the last backward
    grad_scaler: Any = None  # the torch.amp.GradScaler whose scale multiplies the gradients, if any
    spans: list | None = None  # a clip over several graphs: its groups' ClipSpans (bkcompile.runtime.deferred)
    backwards: int = 0  # backwards that recorded norms
    task: int = -1  # the autograd graph task of ``latest`` (tasks are numbered in order)
    _recorded: set[int] = dataclasses.field(default_factory=set)  # groups the task has recorded

    def __post_init__(self) -> None:
        self.members = tuple(tuple(weakref.ref(p) for p in group) for group in self.members)
        with unset_fake_temporarily():  # the pass may run under a fake mode: the state holds real tensors
            self.thresholds = torch.tensor(self.initial, dtype=torch.float64, device=self.device)
            self.below = torch.zeros_like(self.thresholds)
            self.rows = torch.zeros_like(self.thresholds)

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

    def reset_counts(self) -> None:
        self.below.zero_()
        self.rows.zero_()

    def loss_scale(self, like: torch.Tensor) -> torch.Tensor:
        """The GradScaler's current scale S as a 0-dim tensor like ``like`` (1 without an enabled scaler)."""
        scaler = self.grad_scaler
        scale = getattr(scaler, "_scale", None) if scaler is not None and scaler.is_enabled() else None
        if scale is None:  # no scaler, or it has not scaled a loss yet: the gradients are not scaled
            return torch.ones((), dtype=like.dtype, device=like.device)
        return scale.detach().reshape(()).to(dtype=like.dtype, device=like.device, copy=True)

    def record(self, norms: torch.Tensor, group: int) -> torch.Tensor:
        """Keep a group's norms of this backward, count those under its threshold; return the threshold."""
        values = norms.detach() if norms.dtype == torch.float64 else norms.detach().float()
        task = torch._C._current_graph_task_id()
        if self.latest is None or task != self.task or group in self._recorded:  # a new backward (or call)
            self.task, self._recorded = task, set()
            self.backwards += 1
            self.latest = values.new_zeros(len(values), len(self.groups))
        self._recorded.add(group)
        self.latest[:, group] = values
        threshold = self.thresholds[group].to(values.device)
        self.below[group] += (values <= threshold).sum().to(self.below)
        self.rows[group] += len(values)
        return threshold.to(dtype=norms.dtype, copy=True)  # not a view of the state


def latest_norms(state: ClipState | None) -> torch.Tensor | None:
    if state is None or state.latest is None:
        return None
    latest = state.latest
    return latest[:, 0].clone() if latest.shape[1] == 1 else latest.clone()
