"""torch recurrent layers (``nn.RNN``, ``nn.GRU``, ``nn.LSTM``) against the oracle, on both compilers.

The oracle loops over samples (``looped_clipped_sum``: torch.func.vmap cannot batch these layers). Covered: an
LSTM in float32 on CPU (which torch would trace into oneDNN's fused layer, ``bkcompile.compiler.recurrent``),
bidirectional layers (a flip of the time axis: ``aten.flip``, ``prims.rev`` under Inductor), two layers with
dropout between them in eval mode, a time-major input (``batch_first=False``, the batch on dim 1 of the input:
option ``batch_dim=1``), the last step's output and every step's output. Under ``aot_eager`` with a static and a
dynamic batch; on the default path (Inductor, a dynamic batch marked by ``bkcompile.mark_batch_dynamic``) in two
compiles that group the cases.
"""

from __future__ import annotations

import copy
import inspect
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import TOL, assert_matches, check_default_path, raises_bk
from oracle import clipped_sum, looped_clipped_sum
from torch._dynamo.utils import counters
from torch.nn.utils.rnn import pack_padded_sequence

import bkcompile
from bkcompile.runtime.ledger import ledger_of

IN, HIDDEN, CLASSES = 4, 5, 3


class Recurrent(nn.Module):
    """A recurrent layer and a linear head: logits of the last step (B, 3) or of every step (B, T, 3).

    With ``batch_first=False`` the layer is time-major; the model takes (T, B, 4) when ``time_major_input`` is set
    (the compiled twin, with ``batch_dim=1``), else (B, T, 4), which it transposes (the oracle's twin, which slices
    samples on dim 0)."""

    def __init__(self, kind: type, steps: str = "last", **layer) -> None:
        super().__init__()
        self.rnn = kind(IN, HIDDEN, **layer)
        self.head = nn.Linear(HIDDEN * (2 if self.rnn.bidirectional else 1), CLASSES)
        self.steps, self.time_major_input = steps, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time_major = not self.rnn.batch_first
        if time_major and not self.time_major_input:
            x = x.transpose(0, 1)
        out, _ = self.rnn(x)
        if self.steps == "last":
            return self.head(out[-1] if time_major else out[:, -1])
        logits = self.head(out)
        return logits.transpose(0, 1) if time_major else logits


def last_step_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def every_step_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy of every step, summed over each sample's steps, averaged over the batch."""
    b, t, c = logits.shape
    return F.cross_entropy(logits.reshape(b * t, c), labels.reshape(b * t), reduction="none").view(b, t).sum(1).mean()


def batch(model: Recurrent, size: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(size, length, IN)
    labels = torch.randint(0, CLASSES, (size,) if model.steps == "last" else (size, length))
    return x, labels


def check(model: Recurrent, *, compiler: str | None, dynamic: bool, sizes=(5, 3), length: int = 6) -> None:
    """bk_dp (``compiler``; None: the default, Inductor) trains ``model`` in float32 exactly as the oracle clips,
    R = the median per-sample norm of the first batch: the recorded per-sample norms and the clipped sums, for
    each batch size of ``sizes`` (with a dynamic batch: one compile for all; else the first size only)."""
    sizes = sizes if dynamic else sizes[:1]
    loss = last_step_loss if model.steps == "last" else every_step_loss
    batches = [batch(model, size, length) for size in sizes]
    _, norms = looped_clipped_sum(model, loss, (batches[0][0],), (batches[0][1],), max_grad_norm=float("inf"))
    radius = norms.quantile(0.5).item()
    assert (norms > radius).any() and (norms < radius).any()  # some samples are clipped and some are not
    time_major = not model.rnn.batch_first
    twin = copy.deepcopy(model)
    twin.time_major_input = time_major
    options = {"max_grad_norm": radius, "loss_reduction": "mean", "batch_dim": int(time_major)}
    if compiler is not None:
        options["compiler"] = compiler
    compiled = torch.compile(twin, backend="bk_dp", options=options)
    counters.clear()
    for step, (x, labels) in enumerate(batches, 1):
        want, norms = looped_clipped_sum(model, loss, (x,), (labels,), max_grad_norm=radius)
        x = x.transpose(0, 1).contiguous() if time_major else x
        if dynamic:
            bkcompile.mark_batch_dynamic(x, dim=int(time_major))
        twin.zero_grad(set_to_none=True)
        loss(compiled(x), labels).backward()
        ledger = ledger_of(compiled)
        assert ledger is not None and ledger.last_state().backwards == step, "no bk_dp backward ran"
        tol = 1e-4 if compiler is None else TOL[torch.float32]
        torch.testing.assert_close(bkcompile.last_per_sample_norms(compiled), norms, rtol=tol, atol=0)
        assert_matches({k: p.grad for k, p in twin.named_parameters()}, want, torch.float32, tol)
    assert counters["stats"]["unique_graphs"] == 1, "recompiled"


CASES = {
    # torch would trace an LSTM in float32 on CPU into oneDNN's fused layer: bk_dp traces it step by step
    "lstm": lambda: Recurrent(nn.LSTM, batch_first=True),
    # a bidirectional layer flips the time axis (aten.flip), per sample
    "rnn-bidirectional": lambda: Recurrent(nn.RNN, batch_first=True, bidirectional=True),
    "gru-bidirectional": lambda: Recurrent(nn.GRU, batch_first=True, bidirectional=True),
    "lstm-bidirectional": lambda: Recurrent(nn.LSTM, batch_first=True, bidirectional=True),
    # two time-major layers, dropout between them (eval: the identity), the output of every step
    "lstm-2-layers-time-major-dropout-eval-every-step": lambda: Recurrent(
        nn.LSTM, "every", num_layers=2, dropout=0.5
    ).eval(),
    "gru-2-layers-bidirectional-time-major": lambda: Recurrent(nn.GRU, num_layers=2, bidirectional=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_recurrent_layers_on_aot_eager(case: str) -> None:
    torch.manual_seed(0)
    check(CASES[case](), compiler="aot_eager", dynamic=False)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_recurrent_layers_on_aot_eager_with_a_dynamic_batch(case: str) -> None:
    torch.manual_seed(0)
    check(CASES[case](), compiler="aot_eager", dynamic=True)


class LastValidStep(nn.Module):
    """Sequences of different lengths, padded (the unpacked default): the output at each sample's last valid step,
    ``out[arange(B), lengths - 1]`` (a forward layer's output there never reads the padding). ``packed``: the same
    through ``pack_padded_sequence`` and the final hidden state."""

    def __init__(self, packed: bool = False) -> None:
        super().__init__()
        self.rnn, self.head, self.packed = nn.LSTM(IN, HIDDEN, batch_first=True), nn.Linear(HIDDEN, CLASSES), packed

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.packed:
            _, (h, _) = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
            return self.head(h[-1])
        out, _ = self.rnn(x)
        return self.head(out[torch.arange(x.shape[0]), lengths - 1])


def lengths_batch(size: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor]]:
    return (torch.randn(size, 6, IN), torch.randint(1, 7, (size,))), (torch.randint(0, CLASSES, (size,)),)


@pytest.mark.parametrize("dynamic", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["static", "dynamic"])
def test_padded_sequences_of_different_lengths_match_the_oracle(dynamic: bool) -> None:
    torch.manual_seed(0)
    model = LastValidStep()
    (x, lengths), (labels,) = lengths_batch(5)
    _, norms = looped_clipped_sum(model, last_step_loss, (x, lengths), (labels,), max_grad_norm=float("inf"))
    radius = norms.quantile(0.5).item()
    twin = copy.deepcopy(model)
    options = {"max_grad_norm": radius, "loss_reduction": "mean", "compiler": "aot_eager"}
    compiled = torch.compile(twin, backend="bk_dp", options=options)
    for size in (5, 3) if dynamic else (5,):
        (x, lengths), (labels,) = lengths_batch(size)
        want, norms = looped_clipped_sum(model, last_step_loss, (x, lengths), (labels,), max_grad_norm=radius)
        if dynamic:
            bkcompile.mark_batch_dynamic(x, lengths)
        twin.zero_grad(set_to_none=True)
        last_step_loss(compiled(x, lengths), labels).backward()
        torch.testing.assert_close(bkcompile.last_per_sample_norms(compiled), norms, rtol=TOL[torch.float32], atol=0)
        assert_matches({k: p.grad for k, p in twin.named_parameters()}, want, torch.float32)


class EmbeddedPacked(nn.Module):
    """Token ids embedded, packed by length and run through a GRU: the packing takes a batch that needs a
    gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.rnn, self.head = (
            nn.Embedding(10, IN),
            nn.GRU(IN, HIDDEN, batch_first=True),
            nn.Linear(HIDDEN, 3),
        )

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.embed(ids), lengths, batch_first=True, enforce_sorted=False)
        _, h = self.rnn(packed)
        return self.head(h[-1])


def _line_of(function, text: str) -> str:
    lines, start = inspect.getsourcelines(function)
    return f"test_recurrent.py:{start + next(i for i, line in enumerate(lines) if text in line)}:"


@pytest.mark.parametrize(
    ("model", "ids", "dynamic"),
    [(lambda: LastValidStep(packed=True), False, False), (EmbeddedPacked, True, True)],
    ids=["static-padded-data", "dynamic-embedded"],
)
def test_packed_sequences_are_refused(model, ids: bool, dynamic: bool) -> None:
    """``pack_padded_sequence`` stops dynamo's graph (dynamo does not trace it: its rows are the samples sorted by
    length, its step sizes data), so the packing and the layer run eagerly, outside every bk_dp graph: refused where
    the next graph takes their output, naming the packing's line and the padded recipe, which trains
    (``test_padded_sequences_of_different_lengths_match_the_oracle``)."""
    (x, lengths), (labels,) = lengths_batch(5)
    x = torch.randint(0, 10, (5, 6)) if ids else x
    if dynamic:
        bkcompile.mark_batch_dynamic(x, lengths)
    options = {"max_grad_norm": 1.0, "loss_reduction": "mean", "compiler": "aot_eager"}
    model = model()
    compiled = torch.compile(model, backend="bk_dp", options=options)
    with raises_bk(
        bkcompile.NotSupportedYetError,
        f"torch.nn.utils.rnn.pack_padded_sequence at {Path(__file__)}:",
        _line_of(type(model).forward, "pack_padded_sequence("),
        "resumed after a graph break, ending at",
        "takes a batch computed from a PackedSequence\n  why: dynamo does not trace pack_padded_sequence (its rows are "
        "the samples sorted by length, each step's batch size read from the lengths on the CPU: data-dependent "
        "shapes), so the packing and the recurrent layer on it run eagerly, outside the bk_dp graphs, where nothing "
        "proves per-sample gradients\n  fix: run the layer on the padded batch and read each sample's last valid "
        "step (a forward layer's output there never reads the padding): `out, _ = self.rnn(x)` then "
        "`last = out[torch.arange(x.shape[0]), lengths - 1]`",
    ):
        last_step_loss(compiled(x, lengths), labels).backward()
    assert all(p.grad is None for p in model.parameters()), "a gradient left the refused step"


@pytest.mark.slow
def test_lstm_two_layers_bidirectional_on_the_default_path() -> None:
    """Inductor, a dynamic batch: the LSTM unfused; its reverse direction's flip is ``prims.rev``; dropout between
    the layers in eval mode."""
    torch.manual_seed(0)
    model = Recurrent(nn.LSTM, num_layers=2, bidirectional=True, dropout=0.5, batch_first=True).eval()
    check(model, compiler=None, dynamic=True, length=2)


@pytest.mark.slow
def test_gru_bidirectional_time_major_every_step_on_the_default_path() -> None:
    """Inductor, a dynamic batch on dim 1 of a time-major input, the output of every step."""
    torch.manual_seed(0)
    check(Recurrent(nn.GRU, "every", bidirectional=True), compiler=None, dynamic=True, length=2)


# --- torch functions that branch on the batch size (under a dynamic batch) ---------------------------------------


class Branching(nn.Module):
    def __init__(self, layer) -> None:
        super().__init__()
        self.conv, self.layer, self.head = nn.Conv2d(2, 3, 3, padding=1), layer, nn.Linear(3 * 16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.conv(x)).flatten(1))


@pytest.mark.parametrize(
    ("layer", "name", "source"),
    [
        (lambda h: F.local_response_norm(h, 2), "local_response_norm", "torch/nn/functional.py"),
        (lambda h: F.dropout2d(h, 0.5, training=True), "dropout2d", "torch/nn/functional.py"),
    ],
    ids=["local_response_norm", "dropout2d-train"],
)
def test_a_torch_function_that_branches_on_a_dynamic_batch_size_is_refused(layer, name: str, source: str) -> None:
    """``input.numel() == 0`` in torch's code: dynamo would cut the graph and run the function eagerly."""
    x, labels = torch.randn(5, 2, 4, 4), torch.randint(0, CLASSES, (5,))
    bkcompile.mark_batch_dynamic(x)
    options = {"max_grad_norm": 1.0, "loss_reduction": "mean", "compiler": "aot_eager"}
    compiled = torch.compile(Branching(layer), backend="bk_dp", options=options)
    with raises_bk(
        bkcompile.NotSupportedYetError,
        f"torch's {name} ({source}:",
        "test_recurrent.py:",
        "it branches on the batch size",
        "fix: compile with a static batch size (leave out mark_batch_dynamic)",
    ):
        last_step_loss(compiled(x), labels).backward()


@pytest.mark.parametrize(
    ("groups", "shape"),
    [(2, (6,)), (2, (6, 3))],
    ids=["2d-3-values-per-group", "3d-9-values-per-group"],
)
def test_group_norm_under_a_dynamic_batch_matches_the_oracle(groups: int, shape: tuple) -> None:
    """``F.group_norm`` first checks ``B * C // G * H * ... != 1`` in Python: on an unbacked batch ``u0`` the shape
    environment decides it only for an even ``C // G * H * ...`` (by parity), so a (B, C) input broke the graph.
    ``bkcompile.passes.tracing`` answers it for any multiple of 2 or more: one graph, exact for batches of 5, 3
    and 1."""
    torch.manual_seed(0)
    width = math.prod(shape)
    model = nn.Sequential(
        nn.Linear(shape[-1], shape[-1]), nn.GroupNorm(groups, shape[0]), nn.Flatten(), nn.Linear(width, CLASSES)
    )
    check_default_path(
        model,
        lambda b: ((torch.randn(b, *shape),), (torch.randint(0, CLASSES, (b,)),)),
        last_step_loss,
        sizes=(5, 3, 1),
        oracle=clipped_sum,
        tol=TOL[torch.float32],
        options={"loss_reduction": "mean", "compiler": "aot_eager"},
    )


class OneValuePerGroup(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.norm, self.head = nn.Linear(IN, 6), nn.GroupNorm(6, 6), nn.Linear(6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.fc(x)))


def test_group_norm_of_one_value_per_group_under_a_dynamic_batch_is_refused() -> None:
    """``G == C`` on a (B, C) input: ``B != 1`` is a real branch on the batch size (eager torch refuses a batch of
    one), so the graph break is refused, naming torch's check and the GroupNorm's line."""
    x, labels = torch.randn(5, IN), torch.randint(0, CLASSES, (5,))
    bkcompile.mark_batch_dynamic(x)
    options = {"max_grad_norm": 1.0, "loss_reduction": "mean", "compiler": "aot_eager"}
    compiled = torch.compile(OneValuePerGroup(), backend="bk_dp", options=options)
    with raises_bk(
        bkcompile.NotSupportedYetError,
        "torch's _verify_batch_size (torch/nn/functional.py:",
        "nn/modules/normalization.py:",
        "it branches on the batch size (Eq(u0, 1), a batch of one)",
        "fix: compile with a static batch size (leave out mark_batch_dynamic)",
    ):
        last_step_loss(compiled(x), labels).backward()
