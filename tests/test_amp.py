"""Mixed precision: torch.autocast and torch.amp.GradScaler with DPOptimizer(grad_scaler=...), against the oracle
under the same autocast (per-sample gradients by a loop of batches of one: vmap of grad refuses fp16 on CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import zoo
from oracle import looped_clipped_sum

import bkcompile

TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}  # of each parameter's largest oracle value


def _oracle(model, x, y, dtype):
    with torch.autocast("cpu", dtype=dtype):
        _, norms = looped_clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=float("inf"))
        radius = norms.median().item()
        want, norms = looped_clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=radius)
    return want, norms, radius


class BrokenMLP(zoo.MLP):
    """The MLP with a graph break inside: two bk_dp graphs, clipped once at the end of the backward."""

    def forward(self, x):
        h = self.net[1](self.net[0](x))
        torch._dynamo.graph_break()
        return self.net[3](self.net[2](h))


def _setup(dtype, scaler, lr=0.0, noise_multiplier=0.0, compiler="aot_eager", make=zoo.MLP, **optimizer_kwargs):
    torch.manual_seed(0)
    model = make()
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    want, norms, radius = _oracle(model, x, y, dtype)
    twin = copy.deepcopy(model)
    optimizer = bkcompile.DPOptimizer(
        torch.optim.SGD(twin.parameters(), lr=lr),
        noise_multiplier=noise_multiplier,
        max_grad_norm=radius,
        expected_batch_size=1.0,
        grad_scaler=scaler,
        **optimizer_kwargs,
    )
    compiled = torch.compile(
        twin, backend="bk_dp", options={"max_grad_norm": radius, "compiler": compiler, "loss_reduction": "mean"}
    )
    return twin, compiled, optimizer, (x, y), want, norms


def _backward(compiled, optimizer, scaler, x, y, dtype, factor: float = 1.0) -> None:
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        loss = F.cross_entropy(compiled(x), y) * factor
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _assert_close(twin, want, dtype) -> None:
    for name, ref in want.items():
        got = dict(twin.named_parameters())[name].grad
        error = ((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()
        assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.3g}"


@pytest.mark.parametrize(
    "dtype, scaled", [(torch.float16, True), (torch.bfloat16, True), (torch.bfloat16, False)], ids=str
)
def test_autocast_and_grad_scaler_match_the_oracle(dtype: torch.dtype, scaled: bool) -> None:
    _check_against_the_oracle(dtype, scaled, "aot_eager")


def test_grad_scaler_with_a_graph_break() -> None:
    _check_against_the_oracle(torch.float16, True, "aot_eager", BrokenMLP)


@pytest.mark.slow
def test_grad_scaler_with_inductor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "1")  # Inductor's strict checks, on as in a user's CI
    _check_against_the_oracle(torch.float16, True, "inductor")


def _check_against_the_oracle(dtype: torch.dtype, scaled: bool, compiler: str, make=zoo.MLP) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if scaled else None
    twin, compiled, optimizer, (x, y), want, norms = _setup(dtype, scaler, compiler=compiler, make=make)
    for scale in (2.0**12, 2.0**5):  # a new scale between steps: the graph reads it at run time
        assert scaler is None or scaler.get_scale() == scale
        _backward(compiled, optimizer, scaler, x, y, dtype)
        recorded = bkcompile.last_per_sample_norms()
        assert recorded.dtype == torch.float32  # norms accumulate in float32
        torch.testing.assert_close(recorded, norms, rtol=TOLERANCE[dtype], atol=0)  # unscaled norms
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update(new_scale=2.0**5)
        _assert_close(twin, want, dtype)  # the released gradient: the unscaled clipped sum (no noise, batch 1)


def test_step_the_scaler_skips_is_still_counted() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    accountant = bkcompile.PrivacyAccountant()
    twin, compiled, optimizer, (x, y), _, _ = _setup(
        torch.float16, scaler, lr=0.1, noise_multiplier=1.0, sample_rate=0.1, accountant=accountant
    )
    before = {k: p.detach().clone() for k, p in twin.named_parameters()}
    _backward(compiled, optimizer, scaler, x, y, torch.float16, factor=float("inf"))
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**11  # the scaler saw inf and backed off
    assert all(torch.equal(p, before[k]) for k, p in twin.named_parameters())  # nothing updated, no noise
    assert accountant.history == [[0.1, 1.0, 1]]  # but the step is counted
    _backward(compiled, optimizer, scaler, x, y, torch.float16)
    scaler.step(optimizer)
    scaler.update()
    assert not torch.equal(twin.net[0].weight, before["net.0.weight"])
    assert accountant.history == [[0.1, 1.0, 2]]


def test_grad_scaler_not_given_to_the_optimizer_is_refused() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    _, compiled, optimizer, (x, y), _, _ = _setup(torch.float16, None)
    _backward(compiled, optimizer, scaler, x, y, torch.float16)
    with pytest.raises(bkcompile.BKError, match=r"DPOptimizer\(\.\.\., grad_scaler=scaler\)"):
        scaler.step(optimizer)


def test_optimizer_with_a_grad_scaler_steps_through_it() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    _, compiled, optimizer, (x, y), _, _ = _setup(torch.float16, scaler)
    _backward(compiled, optimizer, scaler, x, y, torch.float16)
    with pytest.raises(bkcompile.BKError, match=r"scaler\.step\(dp_optimizer\)"):
        optimizer.step()


@pytest.mark.parametrize("build", [zoo.MLP, BrokenMLP], ids=["whole", "graph_break"])
def test_a_scale_changed_between_micro_batches_unscales_each_by_its_own(build) -> None:
    """scaler.update() between two micro-batches of one step: each backward's clipped sum is unscaled by the
    scale it was computed with (the ledger divides it as it writes), so the release is the oracle's."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    twin, compiled, optimizer, (x, y), want, _ = _setup(torch.float16, scaler, make=build)
    optimizer.zero_grad()
    for rows, new_scale in ((slice(0, 3), None), (slice(3, 7), 2.0**2)):
        if new_scale is not None:
            scaler.update(new_scale=new_scale)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(compiled(x[rows]), y[rows])
        scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    _assert_close(twin, want, torch.float16)
