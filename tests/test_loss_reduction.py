"""The loss's reduction over the batch never silently mis-scales the clip (issue 25, item 4).

A loss returned by the compiled model is recognised from its own reduction (an option that disagrees is refused);
a loss computed outside is the ``loss_reduction`` option's ("mean" or "sum"), and with the default "auto" it is a
``LossReductionError`` that says why and names the fix: the gradient the backward receives cannot tell a sum from
a mean (``passes/loss.py``). Each case is checked against the oracle (clipped per-sample gradients of the same loss
on batches of one) for classification (sum, mean) and a sequence model (per-token means), inside and outside.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_matches, raises_bk
from oracle import clipped_sum

import bkcompile
from bkcompile.errors import find_error

VOCAB, LENGTH = 7, 5


class Tagger(nn.Module):
    """Token ids (B, T) -> logits (B, T, V)."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, d), nn.Linear(d, VOCAB)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)


class WithLoss(nn.Module):
    """The loss inside the compiled model: ``loss(inner(x), *targets)``."""

    def __init__(self, inner: nn.Module, loss: Callable) -> None:
        super().__init__()
        self.inner, self.loss = inner, loss

    def forward(self, x, *targets):
        return self.loss(self.inner(x), *targets)


def token_losses(logits, labels):
    b, t, v = logits.shape
    return F.cross_entropy(logits.reshape(b * t, v), labels.reshape(b * t), reduction="none").view(b, t)


def sample_token_mean(logits, labels, mask):
    """Each sample's mean over its own (unmasked) tokens, averaged over the batch."""
    return ((token_losses(logits, labels) * mask).sum(1) / mask.sum(1)).mean()


def sample_token_mean_summed(logits, labels, mask):
    """Each sample's mean over its own tokens, summed over the batch."""
    return ((token_losses(logits, labels) * mask).sum(1) / mask.sum(1)).sum()


def batch_token_mean(logits, labels, mask):  # noqa: ARG001
    """One mean over every token of the batch (no token ignored: a mean over samples of their token means)."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def ce_sum(logits, labels):
    return F.cross_entropy(logits, labels, reduction="sum")


def _classes(batch: int) -> tuple[tuple, tuple]:
    return (torch.randn(batch, 6, dtype=torch.float64),), (torch.randint(0, 3, (batch,)),)


def _tokens(batch: int) -> tuple[tuple, tuple]:
    ids, labels = torch.randint(0, VOCAB, (batch, LENGTH)), torch.randint(0, VOCAB, (batch, LENGTH))
    lengths = torch.randint(2, LENGTH + 1, (batch,))
    return (ids,), (labels, (torch.arange(LENGTH) < lengths[:, None]).double())


@dataclasses.dataclass
class Case:
    make: Callable[[], nn.Module]
    loss: Callable
    data: Callable[[int], tuple[tuple, tuple]]
    inside: bool
    options: dict = dataclasses.field(default_factory=dict)


MEAN, SUM = {"loss_reduction": "mean"}, {"loss_reduction": "sum"}
CASES = {
    "mean-outside": Case(Classifier, F.cross_entropy, _classes, False, MEAN),
    "sum-outside": Case(Classifier, ce_sum, _classes, False, SUM),
    "mean-inside": Case(Classifier, F.cross_entropy, _classes, True),
    "mean-inside-said": Case(Classifier, F.cross_entropy, _classes, True, MEAN),
    "sum-inside": Case(Classifier, ce_sum, _classes, True),
    "sum-inside-said": Case(Classifier, ce_sum, _classes, True, SUM),
    "token-mean-outside": Case(Tagger, sample_token_mean, _tokens, False, MEAN),
    "token-mean-summed-outside": Case(Tagger, sample_token_mean_summed, _tokens, False, SUM),
    "token-mean-inside": Case(Tagger, sample_token_mean, _tokens, True),
    "token-mean-summed-inside": Case(Tagger, sample_token_mean_summed, _tokens, True),
    "batch-token-mean-outside": Case(Tagger, batch_token_mean, _tokens, False, MEAN),
}
# What a loss computed outside with loss_reduction not given meets (after the first line, which says which graphs
# return no loss): the README's text.
UNSET = (
    ": the loss is computed outside, and the option loss_reduction is not given\n"
    "  why: each sample's gradient of its own loss depends on how the loss reduces over the batch, and a sum and a "
    "mean are indistinguishable from the backward (a sum of per-sample losses and a mean of B times them send it "
    "the same gradient); a wrong guess scales every per-sample norm by B and makes each clipped gradient depend on "
    "the batch size, which breaks the per-sample bound R the privacy accounting relies on\n"
    "  fix: say how your loss reduces over the batch, loss_reduction='mean' (F.cross_entropy's default, "
    "loss.mean()) or 'sum' (reduction='sum', loss.sum()): bkcompile.compile(model, ..., loss_reduction='mean'), "
    "options={'loss_reduction': 'mean', ...} or make_private(..., loss_reduction='mean'); or return the loss from "
    "the compiled model"
)
WHOLE_UNSET = "the compiled function returns no loss" + UNSET + "\n  pass: loss_scale"


def _oracle(case: Case, model: nn.Module, inputs: tuple, targets: tuple, radius: float):
    if case.inside:
        return clipped_sum(WithLoss(model, case.loss), lambda loss: loss, (*inputs, *targets), max_grad_norm=radius)
    return clipped_sum(model, case.loss, inputs, targets, max_grad_norm=radius)


def _step(case: Case, model: nn.Module, inputs: tuple, targets: tuple, options: dict) -> tuple:
    """One backward through a bk_dp copy of ``model``: its gradients and per-sample norms."""
    twin = copy.deepcopy(model)
    compiled = torch.compile(WithLoss(twin, case.loss) if case.inside else twin, backend="bk_dp", options=options)
    loss = compiled(*inputs, *targets) if case.inside else case.loss(compiled(*inputs), *targets)
    loss.backward()
    return {k: p.grad for k, p in twin.named_parameters()}, bkcompile.last_per_sample_norms()


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("name", list(CASES))
def test_each_reduction_matches_the_oracle(name: str, batch: int) -> None:
    case = CASES[name]
    model = case.make().double()
    inputs, targets = case.data(batch)
    _, norms = _oracle(case, model, inputs, targets, float("inf"))
    radius = norms.median().item()  # some samples clipped, some not
    want, norms = _oracle(case, model, inputs, targets, radius)
    options = {"max_grad_norm": radius, "compiler": "aot_eager", **case.options}
    got, got_norms = _step(case, model, inputs, targets, options)
    assert_matches(got, {k.removeprefix("inner."): v for k, v in want.items()}, torch.float64)
    torch.testing.assert_close(got_norms, norms, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mean-outside", "sum-outside", "token-mean-outside", "token-mean-summed-outside"])
def test_a_loss_outside_without_loss_reduction_is_refused_when_it_compiles(name: str) -> None:
    """Whatever the loss (a mean, a sum, per-token means), the first forward refuses it, before any backward."""
    case = CASES[name]
    inputs, targets = case.data(5)
    compiled = torch.compile(
        case.make().double(), backend="bk_dp", options={"max_grad_norm": 1.0, "compiler": "aot_eager"}
    )
    with pytest.raises(Exception) as info:
        compiled(*inputs)
    assert str(find_error(info.value, bkcompile.LossReductionError)) == WHOLE_UNSET


def test_the_readme_shows_the_refusal() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert all(line in readme for line in f"LossReductionError: {WHOLE_UNSET}".splitlines())


def test_a_batch_of_one_needs_no_loss_reduction() -> None:
    """A graph compiled for one sample clips its whole gradient: a sum is a mean there."""
    case = CASES["sum-outside"]
    model = case.make().double()
    inputs, targets = case.data(1)
    want, norms = _oracle(case, model, inputs, targets, 0.1)
    got, got_norms = _step(case, model, inputs, targets, {"max_grad_norm": 0.1, "compiler": "aot_eager"})
    assert_matches(got, want, torch.float64)
    torch.testing.assert_close(got_norms, norms)


def test_a_sum_outside_the_model_is_never_silently_taken_as_a_mean() -> None:
    """The issue's case: F.cross_entropy(cm(x), y, reduction="sum") with the default options was clipped as a mean
    (norms B times too large). It is refused now with the fix, and the fix gives the oracle."""
    model = Classifier().double()
    (x,), (y,) = _classes(6)
    options = {"max_grad_norm": 10.0, "compiler": "aot_eager"}
    case = CASES["sum-outside"]
    with raises_bk(bkcompile.LossReductionError) as info:
        _step(case, model, (x,), (y,), options)
    assert str(find_error(info.value, bkcompile.LossReductionError)) == WHOLE_UNSET
    want, true_norms = clipped_sum(model, ce_sum, (x,), (y,), max_grad_norm=10.0)
    got, norms = _step(case, model, (x,), (y,), {**options, "loss_reduction": "sum"})
    assert_matches(got, want, torch.float64)
    torch.testing.assert_close(norms, true_norms)


def test_make_private_takes_loss_reduction() -> None:
    """make_private's loss_reduction is the option: left out with a loss outside, the first forward refuses."""
    (x,), (y,) = _classes(6)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    for reduction in ("auto", "sum"):
        model = Classifier().double()
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        private, _, _ = bkcompile.make_private(
            model, sgd, loader, max_grad_norm=0.5, target_delta=1e-5, noise_multiplier=1.0,
            loss_reduction=reduction, compiler="aot_eager",
        )  # fmt: skip
        if reduction == "auto":
            with raises_bk(bkcompile.LossReductionError, "the compiled function returns no loss", "make_private"):
                private(x)
            continue
        ce_sum(private(x), y).backward()
        _, norms = clipped_sum(model, ce_sum, (x,), (y,), max_grad_norm=0.5)
        torch.testing.assert_close(bkcompile.last_per_sample_norms(), norms)


def test_dp_trainer_sets_loss_reduction_itself() -> None:
    """DPTrainer computes a mean of per-sample losses outside the model: backend_options cannot say otherwise."""
    pytest.importorskip("transformers")
    from bkcompile.integrations.transformers import PrivacyArguments

    PrivacyArguments(target_delta=1e-5, noise_multiplier=1.0, backend_options={"loss_reduction": "mean"})
    with pytest.raises(bkcompile.OptionError) as info:
        PrivacyArguments(target_delta=1e-5, noise_multiplier=1.0, backend_options={"loss_reduction": "sum"})
    assert str(info.value) == (
        "backend_options loss_reduction='sum': DPTrainer computes the loss itself, a mean over the batch of "
        "per-sample losses (loss_fn), and sets loss_reduction='mean'. Fix: leave loss_reduction out"
    )


class _Broken(nn.Module):
    """Two pieces (a graph break); the loss, when given, in the second."""

    def __init__(self, loss: Callable | None = None) -> None:
        super().__init__()
        self.net, self.loss = Classifier().net, loss

    def forward(self, x, *targets):
        h = self.net[1](self.net[0](x))
        torch._dynamo.graph_break()
        out = self.net[2](h)
        return out if self.loss is None else self.loss(out, *targets)


@pytest.mark.parametrize("said", [False, True], ids=["unset", "said"])
@pytest.mark.parametrize("inside", [False, True], ids=["outside", "inside"])
def test_pieces_refuse_at_the_clip_only_when_no_piece_computes_the_loss_and_no_option_says(
    inside: bool, said: bool
) -> None:
    """A piece cannot know at compile time whether another piece computes the loss: the clip at the end of the
    backward refuses a loss outside with no loss_reduction, and takes one in the last piece or the option's."""
    model = _Broken(ce_sum if inside else None).double()
    (x,), (y,) = _classes(5)
    if inside:
        want, _ = clipped_sum(model, lambda loss: loss, (x, y), max_grad_norm=0.5)
    else:
        want, _ = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=0.5)
    twin = copy.deepcopy(model)
    options = {
        "max_grad_norm": 0.5,
        "compiler": "aot_eager",
        **({"loss_reduction": "sum" if inside else "mean"} if said else {}),
    }
    compiled = torch.compile(twin, backend="bk_dp", options=options)
    for _ in range(2):
        out = compiled(x, y) if inside else compiled(x)
        twin.zero_grad(set_to_none=True)
        if inside or said:
            (out if inside else F.cross_entropy(out, y)).backward()
            assert_matches({k: p.grad for k, p in twin.named_parameters()}, want, torch.float64)
            continue
        with pytest.raises(bkcompile.LossReductionError) as info:
            F.cross_entropy(out, y).backward()
        message = str(info.value)
        assert message.startswith("no bk_dp graph of this backward returns a loss (bk_dp graph #"), message
        assert message.endswith(")" + UNSET), message
        assert all(p.grad is None for p in twin.parameters())  # nothing released


@pytest.mark.parametrize(
    "loss, option, reduction",
    [
        (F.cross_entropy, "sum", "mean"),
        (ce_sum, "mean", "sum"),
        (sample_token_mean, "sum", "mean"),
        (sample_token_mean_summed, "mean", "sum"),
    ],
    ids=["mean-said-sum", "sum-said-mean", "token-mean-said-sum", "token-mean-summed-said-mean"],
)
def test_an_option_that_disagrees_with_the_returned_loss_is_refused(loss, option: str, reduction: str) -> None:
    tokens = loss in (sample_token_mean, sample_token_mean_summed)
    model = WithLoss(Tagger() if tokens else Classifier(), loss).double()
    inputs, targets = (_tokens if tokens else _classes)(4)
    options = {"max_grad_norm": 1.0, "compiler": "aot_eager", "loss_reduction": option}
    compiled = torch.compile(model, backend="bk_dp", options=options)
    with raises_bk(
        bkcompile.LossReductionError,
        f"the loss returned by the compiled function reduces over the batch by a {reduction}, "
        f"but the option loss_reduction={option!r} says otherwise",
        f"fix: set loss_reduction={reduction!r}, or leave it out ('auto' recognises a returned loss)",
        "test_loss_reduction.py",  # the user's line
        "pass: loss_scale",
    ):
        compiled(*inputs, *targets).backward()


def test_a_token_mean_over_the_whole_batch_inside_the_model_is_refused() -> None:
    """Its normaliser counts the non-ignored tokens of every sample: no per-sample loss (outside, with no token
    ignored, it is a mean of the samples' token means: the case batch-token-mean-outside above)."""
    compiled = torch.compile(
        WithLoss(Tagger(), batch_token_mean).double(),
        backend="bk_dp",
        options={"max_grad_norm": 1.0, "compiler": "aot_eager"},
    )
    (ids,), targets = _tokens(4)
    with raises_bk(bkcompile.LossReductionError, "mean over all tokens of the whole batch", "reduction='none'"):
        compiled(ids, *targets).backward()


@pytest.mark.slow
def test_inductor_per_token_mean_outside_with_a_dynamic_batch() -> None:
    """Under Inductor, one graph for two batch sizes (s = B is the symbolic batch size), sum and mean; with no
    loss_reduction, Inductor's joint-graph pass refuses the graph when it compiles."""
    model = Tagger().double()
    for loss, reduction in ((sample_token_mean, "mean"), (sample_token_mean_summed, "sum"), (sample_token_mean, None)):
        torch._dynamo.reset()
        twin = copy.deepcopy(model)
        options = {"max_grad_norm": 0.3, **({"loss_reduction": reduction} if reduction else {})}
        compiled = torch.compile(twin, backend="bk_dp", options=options)
        torch._dynamo.utils.counters.clear()
        for batch in (6, 3):
            (ids,), targets = _tokens(batch)
            bkcompile.mark_batch_dynamic(ids, *targets)
            twin.zero_grad(set_to_none=True)
            if reduction is None:
                with pytest.raises(Exception) as info:
                    compiled(ids)
                assert str(find_error(info.value, bkcompile.LossReductionError)) == WHOLE_UNSET
                break
            loss(compiled(ids), *targets).backward()
            want, norms = clipped_sum(model, loss, (ids,), targets, max_grad_norm=0.3)
            assert_matches({k: p.grad for k, p in twin.named_parameters()}, want, torch.float64)
            torch.testing.assert_close(bkcompile.last_per_sample_norms(), norms)
        else:
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
