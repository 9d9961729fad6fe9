"""Clip state shared by the compiled graphs and the DP optimizer: thresholds, recorded norms, counts.

Each privatized graph calls ``bkcompile::record_norms(norms, key, group)`` on the per-sample norms
(B,) of each clipping group, before clipping. The op records them, counts the samples under the
group's threshold (for adaptive clipping), and returns the group's current threshold, which the
graph's clip factors use: thresholds are runtime values, so the DP optimizer can adapt them without a
recompile, and the op's result feeds the gradients, so no compiler removes it. One call per group
keeps the groups independent: a group's weighted reductions need only its own norms.
"""

from __future__ import annotations

import dataclasses

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily


@dataclasses.dataclass
class ClipState:
    """The clipping groups of one model (recompiles with the same groups share it)."""

    groups: tuple[str, ...]  # group names
    params: tuple[tuple[str, ...], ...]  # the parameters of each group
    initial: tuple[float, ...]  # the thresholds the options gave
    thresholds: torch.Tensor = dataclasses.field(init=False)  # (G,) float64: the current R_g
    below: torch.Tensor = dataclasses.field(init=False)  # (G,) samples with group norm <= R_g since the reset
    rows: torch.Tensor = dataclasses.field(init=False)  # (G,) samples recorded since the reset
    latest: torch.Tensor | None = None  # (B, G): the norms of the last backward
    recorded: set[int] = dataclasses.field(default_factory=set)  # groups the current backward has recorded

    def __post_init__(self) -> None:
        self.thresholds = torch.tensor(self.initial, dtype=torch.float64)
        self.below = torch.zeros_like(self.thresholds)
        self.rows = torch.zeros_like(self.thresholds)

    @property
    def sensitivity(self) -> float:
        """The L2 sensitivity of the summed clipped gradient: sqrt(sum_g R_g^2)."""
        return float(self.thresholds.pow(2).sum().sqrt())

    def reset_counts(self) -> None:
        self.below.zero_()
        self.rows.zero_()


_STATES: list[ClipState] = []
_ACTIVE: set[int] = set()  # states that recorded a backward since the optimizer last took them
_LAST: dict[str, int] = {}  # "key": the clip state of the last backward
_COUNT = [0]


def register_clip_state(
    groups: tuple[str, ...], params: tuple[tuple[str, ...], ...], thresholds: tuple[float, ...]
) -> int:
    """The key of the clip state of these groups and initial thresholds (created on first use)."""
    for key, state in enumerate(_STATES):
        if state.groups == groups and state.params == params and state.initial == thresholds:
            return key
    with unset_fake_temporarily():  # the pass may run under a fake mode: the state holds real tensors
        _STATES.append(ClipState(groups, params, thresholds))
    return len(_STATES) - 1


def clip_state(key: int) -> ClipState:
    return _STATES[key]


def take_active() -> list[ClipState]:
    """The clip states whose graphs ran a backward since the last call (the DP optimizer's step)."""
    states = [_STATES[k] for k in sorted(_ACTIVE)]
    _ACTIVE.clear()
    return states


@torch.library.custom_op("bkcompile::record_norms", mutates_args=())
def record_norms(norms: torch.Tensor, key: int, group: int) -> torch.Tensor:
    state = _STATES[key]
    values = norms.detach().double().cpu()
    if len(state.recorded) == len(state.groups):  # every group of the last backward is in: a new one starts
        state.recorded.clear()
    if not state.recorded:  # the graph calls the groups in any order, once each per backward
        _COUNT[0] += 1
        _ACTIVE.add(key)
        _LAST["key"] = key
        state.latest = torch.zeros(len(values), len(state.groups), dtype=values.dtype)
    state.recorded.add(group)
    state.latest[:, group] = values
    state.below[group] += (values <= state.thresholds[group]).sum()
    state.rows[group] += len(values)
    return state.thresholds[group].to(dtype=norms.dtype, device=norms.device, copy=True)  # not a view of the state


@record_norms.register_fake
def _record_norms_fake(norms: torch.Tensor, key: int, group: int) -> torch.Tensor:
    return norms.new_empty(())


def last_per_sample_norms() -> torch.Tensor | None:
    """Per-sample gradient norms of the most recent bk_dp backward, before clipping (None before any).

    With all-layer clipping a (B,) tensor of ||g_i|| over all trainable parameters (the fraction of
    clipped samples is ``(norms > max_grad_norm).float().mean()``); with clipping groups (B, G), one
    column per group.
    """
    if "key" not in _LAST:
        return None
    latest = _STATES[_LAST["key"]].latest
    return latest[:, 0].clone() if latest.shape[1] == 1 else latest.clone()


def backward_count() -> int:
    """How many bk_dp backwards have run in this process (the DP optimizer checks its gradients' origin)."""
    return _COUNT[0]
