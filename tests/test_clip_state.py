"""The run-time clip state: what ``record`` keeps of each group's norms, the thresholds it returns and the counts
of adaptive clipping, checked against exact values (records made outside any backward: a group recorded again
starts a new backward)."""

from __future__ import annotations

import torch

from bkcompile.runtime.norms import ClipState, latest_norms


def _state(thresholds: tuple[float, ...]) -> ClipState:
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in thresholds]
    groups = tuple(f"g{g}" for g in range(len(thresholds)))
    return ClipState(
        groups, tuple((p,) for p in params), tuple(("w",) for _ in params), thresholds, torch.device("cpu")
    )


def test_latest_holds_each_group_and_zero_for_a_group_not_recorded() -> None:
    state = _state((1.0, 2.0, 3.0))
    norms = torch.tensor([0.5, 4.0])
    state.record(norms, 0)
    state.record(norms * 2, 2)
    assert state.backwards == 1
    assert torch.equal(state.latest, torch.tensor([[0.5, 0.0, 1.0], [4.0, 0.0, 8.0]]))
    norms.fill_(7.0)  # the graph may reuse the buffer of the norms it recorded: the state keeps its own copy
    assert torch.equal(latest_norms(state)[:, 0], torch.tensor([0.5, 4.0]))


def test_record_returns_the_current_threshold_in_the_norms_dtype() -> None:
    state = _state((1.0, 2.0))
    norms = torch.tensor([1.5], dtype=torch.float32)
    first = state.record(norms, 1)
    assert first.dtype == torch.float32 and first.item() == 2.0
    state.thresholds.mul_(0.5)  # adaptive clipping moves the thresholds in place
    assert state.record(norms, 0).item() == 0.5
    assert state.record(norms, 1).item() == 1.0
    first.fill_(9.0)  # a returned threshold is the graph's to overwrite, never the state's
    assert state.thresholds.tolist() == [0.5, 1.0]


def test_counts_cover_whole_and_partial_backwards_once() -> None:
    state = _state((1.0, 2.0))
    state.record(torch.tensor([0.5, 1.5]), 0)  # backward 1: both groups
    state.record(torch.tensor([2.5, 1.0]), 1)
    state.record(torch.tensor([3.0, 0.0, 2.0]), 0)  # backward 2: group 0 only
    state.record(torch.tensor([1.0]), 0)  # backward 3: group 0 only, counted when read
    assert state.backwards == 3
    assert state.below.tolist() == [3.0, 1.0] and state.rows.tolist() == [6.0, 2.0]
    assert state.below.tolist() == [3.0, 1.0]  # read again: nothing counted twice
