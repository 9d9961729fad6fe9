"""The step is the unit of privacy: every road to the optimizer is either clipped once per sample (exact
against the oracle) or refused with an error naming the road and the fix (bkcompile.runtime.ledger)."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import raises_bk
from oracle import clipped_sum

import bkcompile
from bkcompile.runtime.ledger import ledger_of

R = 0.5
OPTIONS = {"max_grad_norm": R, "compiler": "aot_eager", "loss_reduction": "mean"}  # the losses here: batch means
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _mlp(dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _batch(size: int, dtype=torch.float64, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 6, dtype=dtype, generator=generator), torch.randint(0, 3, (size,), generator=generator)


def _optimizer(model: nn.Module, **kwargs) -> bkcompile.DPOptimizer:
    return bkcompile.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=R,
        expected_batch_size=4,
        **kwargs,
    )


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


# --- the roads that train: exact against the oracle ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("size", [1, 7, 32])
def test_one_call_one_backward_is_exact(dtype, size: int) -> None:
    model = _mlp(dtype)
    x, y = _batch(size, dtype)
    want, norms = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=R)
    compiled = torch.compile(model, backend="bk_dp", options=OPTIONS)
    F.cross_entropy(compiled(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=TOL[dtype], atol=TOL[dtype], msg=name)
    recorded = bkcompile.last_per_sample_norms(compiled)
    assert recorded.dtype == dtype  # float32 norms for a float32 model, float64 for float64
    if size > 1:
        torch.testing.assert_close(recorded, norms, rtol=TOL[dtype], atol=0)


def test_micro_batches_of_different_samples_accumulate_then_step() -> None:
    model = _mlp()
    x, y = _batch(12)
    compiled = torch.compile(model, backend="bk_dp", options=OPTIONS)
    optimizer = _optimizer(model)
    optimizer.zero_grad()
    for xs, ys in zip(x.chunk(3), y.chunk(3)):
        F.cross_entropy(compiled(xs), ys).backward()
    want, _ = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=R)
    optimizer.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad * 4, want[name], rtol=1e-10, atol=1e-12, msg=name)


class _TwoPasses(nn.Module):
    """R-Drop done privately: both passes inside one compiled call, so each sample is clipped once."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, y):
        a = F.cross_entropy(self.model(x), y, reduction="none")
        b = F.cross_entropy(self.model(x + 0.1), y, reduction="none")
        return (a + b).mean()


def test_the_fix_for_two_calls_is_exact() -> None:
    model = _mlp()
    x, y = _batch(7)
    both = _TwoPasses(model)
    want, _ = clipped_sum(both, lambda loss: loss, (x, y), max_grad_norm=R)
    compiled = torch.compile(both, backend="bk_dp", options=OPTIONS)
    compiled(x, y).backward()
    for name, p in both.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("broken", [False, True], ids=["whole", "graph_break"])
def test_inductor_and_dynamic_batch_go_through_the_ledger(broken: bool) -> None:
    model = _mlp(torch.float32)
    target = _Broken(model) if broken else model
    compiled = torch.compile(
        target, backend="bk_dp", options={"max_grad_norm": R, "loss_reduction": "mean"}, dynamic=True
    )
    optimizer = _optimizer(model)
    for size in (5, 9):
        x, y = _batch(size, torch.float32, seed=size)
        optimizer.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        want, _ = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=R)
        optimizer.step()  # noise 0: the released gradient is the clipped sum over the expected batch size 4
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad * 4, want[name], rtol=1e-4, atol=1e-5, msg=name)


# --- the roads that are refused -------------------------------------------------------------------------


def test_compiled_model_called_twice_before_one_backward_is_refused() -> None:
    model = _mlp()
    x, y = _batch(4)
    cm = torch.compile(model, backend="bk_dp", options=OPTIONS)
    with pytest.raises(bkcompile.ClipOnceError) as error:
        (F.cross_entropy(cm(x), y) + F.cross_entropy(cm(x + 0.1), y)).backward()
    message = str(error.value)
    assert "called twice before one backward" in message
    assert message.count("test_step_privacy.py:") == 2  # the first and the second call, by line
    assert "put every use of the model in one compiled function" in message


def test_two_backwards_through_one_forward_are_refused() -> None:
    model = _mlp()
    x, y = _batch(4)
    cm = torch.compile(model, backend="bk_dp", options=OPTIONS)
    out = cm(x)
    F.cross_entropy(out, y).backward(retain_graph=True)
    with pytest.raises(bkcompile.ClipOnceError, match=r"second backward runs through the compiled call at .*test_step"):
        out.pow(2).mean().backward()


def test_tied_parameter_also_used_in_eager_code_is_refused() -> None:
    model = _mlp()
    x, y = _batch(4)
    cm = torch.compile(model, backend="bk_dp", options=OPTIONS)
    loss = F.cross_entropy(cm(x), y) + model[2].weight.pow(2).sum()  # a penalty on a weight, outside the call
    with pytest.raises(bkcompile.UnclippedGradientError, match="'2.weight'.*used outside the compiled call"):
        loss.backward()


def test_parameter_used_only_outside_the_call_is_refused_by_the_optimizer() -> None:
    model = _mlp()
    temperature = nn.Parameter(torch.ones((), dtype=torch.float64))
    x, y = _batch(4)
    cm = torch.compile(model, backend="bk_dp", options=OPTIONS)
    optimizer = bkcompile.DPOptimizer(
        torch.optim.SGD([*model.parameters(), temperature], lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=R,
        expected_batch_size=4,
    )
    optimizer.zero_grad()
    F.cross_entropy(cm(x) * temperature, y).backward()
    with pytest.raises(bkcompile.UnclippedGradientError, match=r"parameter 4 \(shape \(\)\): no bk_dp graph wrote"):
        optimizer.step()


class _Block(nn.Module):
    """A user block (dynamo skips the frames of torch.nn's own modules compiled with Module.compile)."""

    def __init__(self, width: int, out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, out)

    def forward(self, x):
        return torch.tanh(self.fc(x))


class _WithTemperature(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = _mlp()
        self.temperature = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x):
        return self.mlp(x)


def test_module_parameter_used_only_outside_the_call_is_refused_on_the_plain_path() -> None:
    model = _WithTemperature()
    x, y = _batch(4)
    cm = torch.compile(model, backend="bk_dp", options=OPTIONS)
    with pytest.raises(bkcompile.UnclippedGradientError, match="'temperature' received a gradient that no bk_dp"):
        F.cross_entropy(cm(x) * model.temperature, y).backward()


def test_eager_stem_before_a_compiled_block_is_refused() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), _Block(6, 3)).double()
    model[2].compile(backend="bk_dp", options=OPTIONS)
    x, y = _batch(4)
    with pytest.raises(bkcompile.UnclippedGradientError, match=r"shape \(6, 6\).*computed the inputs of the compiled"):
        F.cross_entropy(model(x), y).backward()


class _Scale(nn.Module):
    """An eager elementwise layer with a parameter (row-wise: allowed between compiled blocks)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x * self.scale


@pytest.mark.parametrize("where", [0, 1, 2])
def test_an_eager_parameter_before_or_between_blocks_compiled_one_by_one_is_refused(where: int) -> None:
    """A call's walk over its inputs stops at the bk_dp call before it; an eager parameter anywhere upstream
    is still refused, by the first call after it."""
    torch.manual_seed(0)
    blocks = [_Block(6, 6), _Block(6, 6), _Block(6, 3)]
    model = nn.Sequential(*blocks[:where], _Scale(6), *blocks[where:]).double()
    for block in blocks:
        block.compile(backend="bk_dp", options={**OPTIONS, "graphs": "several"})
    x, y = _batch(4)
    with pytest.raises(bkcompile.UnclippedGradientError, match=r"shape \(6,\).*computed the inputs of the compiled"):
        F.cross_entropy(model(x), y).backward()


class _BlockThenHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _Block(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.block(x))


@pytest.mark.parametrize("graphs", ["auto", "several"])
def test_eager_head_after_a_compiled_block_is_refused_on_the_plain_path(graphs: str) -> None:
    torch.manual_seed(0)
    model = _BlockThenHead().double()
    model.block.compile(backend="bk_dp", options={**OPTIONS, "graphs": graphs})
    x, y = _batch(4)
    with pytest.raises(bkcompile.UnclippedGradientError, match="'head.(weight|bias)' received a gradient that no"):
        F.cross_entropy(model(x), y).backward()


def test_blocks_compiled_one_by_one_are_refused_and_never_share_a_clip_state() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_Block(6, 6), _Block(6, 3)).double()
    for block in model:
        block.compile(backend="bk_dp", options=OPTIONS)
    x, y = _batch(4)
    with pytest.raises(bkcompile.ClipOnceError, match="two bk_dp graphs"):
        F.cross_entropy(model(x), y).backward()
    # both blocks name their parameters "fc.weight" and "fc.bias": their clip states are still apart
    states = ledger_of(model[0]).states + ledger_of(model[1]).states
    assert len(states) == 2 and states[0].names == states[1].names == (("fc.weight", "fc.bias"),)
    assert {id(s.members[0][0]()) for s in states} == {id(model[0].fc.weight), id(model[1].fc.weight)}


def test_blocks_stepped_from_different_backwards_need_one_optimizer_per_model() -> None:
    torch.manual_seed(0)
    first, second = nn.Linear(6, 3).double(), nn.Linear(6, 3).double()
    optimizer = bkcompile.DPOptimizer(
        torch.optim.SGD([*first.parameters(), *second.parameters()], lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=R,
        expected_batch_size=4,
    )
    x, y = _batch(4)
    optimizer.zero_grad()
    for model, inputs in ((first, x), (second, x.clone())):  # other memory: rows once per backward holds
        F.cross_entropy(torch.compile(model, backend="bk_dp", options=OPTIONS)(inputs), y).backward()
    with pytest.raises(bkcompile.PrivacyError, match="different clipping groups"):
        optimizer.step()


class _BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x))


@pytest.mark.parametrize("with_optimizer", [False, True])
def test_eager_fallback_of_suppress_errors_is_caught(with_optimizer: bool) -> None:
    model = _BatchNormNet().double()
    optimizer = _optimizer(model) if with_optimizer else None
    x, y = _batch(4)
    cm = torch.compile(model, backend="bk_dp", options=OPTIONS)
    with torch._dynamo.config.patch(suppress_errors=True, fail_on_recompile_limit_hit=False):
        loss = F.cross_entropy(cm(x)[:, :3], y)  # dynamo swallowed the refusal and ran the model eagerly
    with pytest.raises(bkcompile.UnclippedGradientError, match=r"suppress_errors = True\); the refusal: aten"):
        loss.backward()
    if optimizer is not None:
        with pytest.raises(bkcompile.UnclippedGradientError, match="not produced by a bk_dp backward"):
            optimizer.step()


def test_eager_stance_after_compiling_is_caught() -> None:
    model = _mlp()
    x, y = _batch(4)
    cm = torch.compile(model, backend="bk_dp", options=OPTIONS)
    F.cross_entropy(cm(x), y).backward()
    with torch.compiler.set_stance("force_eager"):
        loss = F.cross_entropy(cm(x), y)
    road = r"'2.bias'.*or the compiled model ran eagerly \(torch.compiler.set_stance"
    with pytest.raises(bkcompile.UnclippedGradientError, match=road):
        loss.backward()


def test_eager_stance_from_the_first_call_is_refused_by_the_optimizer() -> None:
    model = _mlp()
    optimizer = _optimizer(model)
    x, y = _batch(4)
    cm = torch.compile(model, backend="bk_dp", options=OPTIONS)
    optimizer.zero_grad()
    with torch.compiler.set_stance("force_eager"):
        F.cross_entropy(cm(x), y).backward()  # the backend never ran: nothing knew the model yet
    with pytest.raises(bkcompile.UnclippedGradientError, match=r"'0.weight'|parameter 0 .*no bk_dp graph wrote"):
        optimizer.step()


def test_gradient_set_by_hand_is_refused() -> None:
    model = _mlp()
    optimizer = _optimizer(model)
    x, y = _batch(4)
    cm = torch.compile(model, backend="bk_dp", options=OPTIONS)
    optimizer.zero_grad()
    model[0].bias.grad = torch.ones_like(model[0].bias)
    F.cross_entropy(cm(x), y).backward()
    with pytest.raises(bkcompile.UnclippedGradientError, match="'0.bias': p.grad holds a gradient that neither"):
        optimizer.step()


def test_batch_summed_embedding_table_is_sample_mixing() -> None:
    class Table(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x, y):
            onehot = (y[:, None] == torch.arange(3)).to(x.dtype)
            table = onehot.T @ self.fc(x)  # (3, 6): a sum over the batch
            return F.embedding(y, table).sum(1)

    model = Table().double()
    x, y = _batch(4)
    cm = torch.compile(model, backend="bk_dp", options=OPTIONS)
    with raises_bk(bkcompile.SampleMixingError, "aten.embedding", "F.embedding(y, table)", "a sum over the samples"):
        cm(x, y).sum().backward()


# --- sensitivity: whatever trains moves by at most 2R when one sample is replaced --------------------------------


def _plain(cm, x, y):
    F.cross_entropy(cm(x), y).backward()


def _micro_batches(cm, x, y):
    for xs, ys in zip(x.chunk(2), y.chunk(2)):
        F.cross_entropy(cm(xs), ys).backward()


def _two_calls(cm, x, y):
    (F.cross_entropy(cm(x), y) + F.cross_entropy(cm(x + 0.1), y)).backward()


def _two_backwards(cm, x, y):
    out = cm(x)
    F.cross_entropy(out, y).backward(retain_graph=True)
    F.cross_entropy(out * 2, y).backward()


def _eager_penalty(cm, x, y):
    (F.cross_entropy(cm(x), y) + sum(p.pow(2).sum() for p in cm.parameters())).backward()


ROADS = [_plain, _micro_batches, _two_calls, _two_backwards, _eager_penalty]


class _Broken(nn.Module):
    """The MLP with a graph break: two bk_dp graphs, clipped together at the end of the backward."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        h = self.mlp[1](self.mlp[0](x))
        torch._dynamo.graph_break()
        return self.mlp[2](h)


class _Part(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _whole(model: nn.Module, **options) -> nn.Module:
    return torch.compile(model, backend="bk_dp", options={**OPTIONS, **options})


def _graph_break(model: nn.Module, **options) -> nn.Module:
    return torch.compile(_Broken(model), backend="bk_dp", options={**OPTIONS, **options})


def _regional(model: nn.Module) -> nn.Module:
    """Each layer compiled on its own, with options graphs='several' (modules of this file: dynamo runs a
    torch.nn module's own compiled call eagerly)."""
    parts = nn.Sequential(_Part(model[0]), model[1], _Part(model[2]))
    for part in (parts[0], parts[2]):
        part.compile(backend="bk_dp", options={**OPTIONS, "graphs": "several"})
    return parts


BUILDS = [_whole, _graph_break, _regional]


@pytest.mark.parametrize("build", BUILDS, ids=[b.__name__ for b in BUILDS])
@pytest.mark.parametrize("road", ROADS, ids=[r.__name__ for r in ROADS])
def test_no_road_trains_with_sensitivity_above_r(road, build) -> None:
    """Replace sample 0 by an outlier: a road that trains must move the summed gradient by at most 2R."""
    x, y = _batch(6)
    outlier = x.clone()
    outlier[0] = 50.0
    sums = []
    for inputs in (x, outlier):
        model = _mlp()
        optimizer = _optimizer(model)
        cm = build(model)
        optimizer.zero_grad()
        try:
            road(cm, inputs, y)
            optimizer.step()  # noise 0: the clipped sum / expected batch size, after the ledger's audit
        except bkcompile.PrivacyError:
            return  # refused: never trained
        sums.append(torch.cat([p.grad.flatten() for p in model.parameters()]) * 4)
    assert (sums[0] - sums[1]).norm() <= 2 * R * (1 + 1e-9)


# --- no host round-trip in a warmed-up step ---------------------------------------------------------------------


@pytest.mark.parametrize("build", [_whole, _graph_break], ids=["whole", "graph_break"])
def test_a_warm_step_never_copies_to_the_host(monkeypatch, build) -> None:
    model = _mlp(torch.float32)
    optimizer = bkcompile.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=R,
        expected_batch_size=8,
        adaptive_clipping=bkcompile.AdaptiveClipping(count_noise=8.0),
    )
    cm = build(model, clipping="layer-wise")
    x, y = _batch(8, torch.float32)

    def step():
        optimizer.zero_grad()
        F.cross_entropy(cm(x), y).backward()
        optimizer.step()

    step()  # compiles
    thresholds = ledger_of(model).states[0].thresholds.clone()

    def refuse(*args, **kwargs):
        raise AssertionError("a host copy in the training step")

    for name in ("cpu", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    step()
    monkeypatch.undo()
    assert not torch.equal(thresholds, ledger_of(model).states[0].thresholds)  # adaptive clipping ran


def test_the_ledger_keeps_no_gradient_that_zero_grad_dropped() -> None:
    """The ledger notes which tensor the clips wrote without keeping it: after a plain optimizer's zero_grad()
    the step's gradients are freed (peak memory), and the next step is still audited."""
    model = _mlp()
    cm = torch.compile(model, backend="bk_dp", options=OPTIONS)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch(4)
    F.cross_entropy(cm(x), y).backward()
    grads = [weakref.ref(p.grad) for p in model.parameters()]
    sgd.zero_grad()
    assert all(ref() is None for ref in grads)
    F.cross_entropy(cm(x), y).backward()
    assert all(p.grad is ledger_of(model).entries[p].grad for p in model.parameters())
    want, _ = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=R)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-10, atol=1e-10)


class _DisabledHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    @torch.compiler.disable
    def forward(self, h):
        return self.fc(h)


class _WithDisabledHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = _DisabledHead()

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


@pytest.mark.parametrize("with_optimizer", [False, True])
def test_a_disabled_submodule_of_the_compiled_model_is_refused(with_optimizer: bool) -> None:
    """The plain path knows every parameter of the module torch.compile wraps, not only its graphs'."""
    model = _WithDisabledHead().double()
    optimizer = _optimizer(model) if with_optimizer else None
    x, y = _batch(4)
    cm = torch.compile(model, backend="bk_dp", options=OPTIONS)
    with pytest.raises(bkcompile.UnclippedGradientError, match=r"'head.fc.(weight|bias)'.*torch.compiler.disable"):
        F.cross_entropy(cm(x), y).backward()
    if optimizer is not None:
        with pytest.raises(bkcompile.UnclippedGradientError, match=r"'head.fc.(weight|bias)'"):
            optimizer.step()


@pytest.mark.parametrize("through", ["bkcompile.compile", "make_private"])
def test_a_model_dynamo_runs_eagerly_from_its_first_call_is_refused_on_every_path(through: str) -> None:
    """Training-mode BatchNorm with a dynamic batch: torch's batch-size check breaks the graph and dynamo runs
    the frame eagerly, so no bk_dp graph ever runs. The parameters are known from bkcompile.compile (and
    make_private) on, so the eager backward is refused even with no optimizer and no graph."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    x, y = _batch(5, torch.float32)
    if through == "bkcompile.compile":
        cm = bkcompile.compile(model, max_grad_norm=R, compiler="aot_eager", loss_reduction="mean")
    else:
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
        cm, _, _ = bkcompile.make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.1), data, max_grad_norm=R, target_delta=1e-5,
            noise_multiplier=1.0, compiler="aot_eager", loss_reduction="mean",
        )  # fmt: skip
    bkcompile.mark_batch_dynamic(x, y)
    with pytest.raises(bkcompile.UnclippedGradientError, match=r"'2.(weight|bias)' received a gradient that no"):
        F.cross_entropy(cm(x), y).backward()
