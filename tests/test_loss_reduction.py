"""The loss's reduction over the batch never silently mis-scales the clip (issue 25, item 4).

A loss returned by the compiled model is recognised from its own reduction; a loss computed outside is the
``loss_reduction`` option's ("mean" or "sum"), and with the default "auto" it is taken as a mean with a
``LossReductionWarning`` that names the fix: the gradient the backward receives cannot tell a sum from a mean
(``passes/loss.py``). Each case is checked against the oracle (clipped per-sample gradients of the same loss on
batches of one) for classification (sum, mean) and a sequence model (per-token means), inside and outside.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_matches, raises_bk
from oracle import clipped_sum

import bkcompile

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

    def warns(self, batch: int) -> bool:
        """Only a loss computed outside with no loss_reduction is assumed (a batch of one: a sum is a mean)."""
        return not self.inside and "loss_reduction" not in self.options and batch > 1


MEAN, SUM = {"loss_reduction": "mean"}, {"loss_reduction": "sum"}
CASES = {
    "mean-outside": Case(Classifier, F.cross_entropy, _classes, False, MEAN),
    "mean-outside-auto": Case(Classifier, F.cross_entropy, _classes, False),
    "sum-outside": Case(Classifier, ce_sum, _classes, False, SUM),
    "mean-inside": Case(Classifier, F.cross_entropy, _classes, True),
    "sum-inside": Case(Classifier, ce_sum, _classes, True),
    "sum-inside-said": Case(Classifier, ce_sum, _classes, True, SUM),
    "token-mean-outside": Case(Tagger, sample_token_mean, _tokens, False, MEAN),
    "token-mean-outside-auto": Case(Tagger, sample_token_mean, _tokens, False),
    "token-mean-summed-outside": Case(Tagger, sample_token_mean_summed, _tokens, False, SUM),
    "token-mean-inside": Case(Tagger, sample_token_mean, _tokens, True),
    "token-mean-summed-inside": Case(Tagger, sample_token_mean_summed, _tokens, True),
    "batch-token-mean-outside": Case(Tagger, batch_token_mean, _tokens, False, MEAN),
}


def _oracle(case: Case, model: nn.Module, inputs: tuple, targets: tuple, radius: float):
    if case.inside:
        return clipped_sum(WithLoss(model, case.loss), lambda loss: loss, (*inputs, *targets), max_grad_norm=radius)
    return clipped_sum(model, case.loss, inputs, targets, max_grad_norm=radius)


def _step(case: Case, model: nn.Module, inputs: tuple, targets: tuple, options: dict) -> tuple:
    """One backward through a bk_dp copy of ``model``: its gradients, per-sample norms and LossReductionWarnings."""
    twin = copy.deepcopy(model)
    compiled = torch.compile(WithLoss(twin, case.loss) if case.inside else twin, backend="bk_dp", options=options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = compiled(*inputs, *targets) if case.inside else case.loss(compiled(*inputs), *targets)
        loss.backward()
    grads = {k: p.grad for k, p in twin.named_parameters()}
    return (
        grads,
        bkcompile.last_per_sample_norms(),
        [str(w.message) for w in caught if issubclass(w.category, bkcompile.LossReductionWarning)],
    )


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
    got, got_norms, warned = _step(case, model, inputs, targets, options)
    assert_matches(got, {k.removeprefix("inner."): v for k, v in want.items()}, torch.float64)
    torch.testing.assert_close(got_norms, norms, rtol=1e-10, atol=1e-12)
    assert len(warned) == case.warns(batch)


def test_a_sum_outside_the_model_is_never_silently_taken_as_a_mean() -> None:
    """The issue's case: F.cross_entropy(cm(x), y, reduction="sum") with the default options. Nothing the graph
    sees tells this sum from a mean, so bk_dp takes a mean and says so, with the fix; the fix gives the oracle."""
    model = Classifier().double()
    (x,), (y,) = _classes(6)
    options = {"max_grad_norm": 10.0, "compiler": "aot_eager"}
    case = CASES["sum-outside"]
    got, norms, warned = _step(case, model, (x,), (y,), options)
    assert warned == [
        "bk_dp takes the loss as a mean over the batch, as F.cross_entropy's default: it is computed outside the "
        "compiled model, where bk_dp cannot see how it reduces, and the gradient the backward receives cannot tell "
        "a sum from a mean (a sum of per-sample losses and a mean of B times them send the same gradient but clip "
        "differently). If it is a sum (reduction='sum', loss.sum()), the per-sample norms are B times too large, "
        "the gradients clipped B times too hard, and each sample's clipped gradient depends on the batch size: one "
        "sample added to the batch can move the sum by up to 2R, not R, which the privacy accounting does not allow "
        "for.\n"
        "  fix: say how the loss reduces over the batch: options={'loss_reduction': 'mean'} or 'sum' "
        "(bkcompile.compile(model, ..., loss_reduction='mean')), or compute the loss in the compiled model"
    ]
    want, true_norms = clipped_sum(model, ce_sum, (x,), (y,), max_grad_norm=10.0)
    torch.testing.assert_close(norms, 6 * true_norms)  # what the warning says: taken as a mean, B times too large
    got, norms, warned = _step(case, model, (x,), (y,), {**options, "loss_reduction": "sum"})
    assert warned == []
    assert_matches(got, want, torch.float64)
    torch.testing.assert_close(norms, true_norms)


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


@pytest.mark.parametrize("inside", [False, True], ids=["outside", "inside"])
def test_pieces_warn_at_the_clip_only_when_no_piece_computes_the_loss(inside: bool) -> None:
    """A piece cannot know at compile time whether another piece computes the loss: the clip at the end of the
    backward warns (once), and not when the loss is in the last piece."""
    model = _Broken(ce_sum if inside else None).double()
    (x,), (y,) = _classes(5)
    if inside:
        want, _ = clipped_sum(model, lambda loss: loss, (x, y), max_grad_norm=0.5)
    else:
        want, _ = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=0.5)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="bk_dp", options={"max_grad_norm": 0.5, "compiler": "aot_eager"})
    for step in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = compiled(x, y) if inside else compiled(x)
            twin.zero_grad(set_to_none=True)
            (out if inside else F.cross_entropy(out, y)).backward()
        warned = [w for w in caught if issubclass(w.category, bkcompile.LossReductionWarning)]
        assert len(warned) == (not inside and step == 0)
        assert_matches({k: p.grad for k, p in twin.named_parameters()}, want, torch.float64)


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
    """Under Inductor, one graph for two batch sizes (s = B is the symbolic batch size), sum and mean."""
    model = Tagger().double()
    for loss, reduction in ((sample_token_mean, "mean"), (sample_token_mean_summed, "sum")):
        torch._dynamo.reset()
        twin = copy.deepcopy(model)
        compiled = torch.compile(twin, backend="bk_dp", options={"max_grad_norm": 0.3, "loss_reduction": reduction})
        torch._dynamo.utils.counters.clear()
        for batch in (6, 3):
            (ids,), targets = _tokens(batch)
            bkcompile.mark_batch_dynamic(ids, *targets)
            twin.zero_grad(set_to_none=True)
            loss(compiled(ids), *targets).backward()
            want, norms = clipped_sum(model, loss, (ids,), targets, max_grad_norm=0.3)
            assert_matches({k: p.grad for k, p in twin.named_parameters()}, want, torch.float64)
            torch.testing.assert_close(bkcompile.last_per_sample_norms(), norms)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
