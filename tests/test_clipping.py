"""Clipping styles: groups with their own norms and thresholds, automatic clipping, adaptive thresholds and
the noise each needs, against the oracle (per-group clipping of torch.func per-sample gradients)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import zoo
from helpers import assert_matches, expected_groups, raises_bk
from oracle import clipped_sum, compiled_grads
from torch import nn

import bkcompile
from bkcompile.optimizer import gradient_noise_multiplier
from bkcompile.runtime.ledger import ledger_of

MODELS = {"transformer-block": (zoo.PreNormBlock, (4, 8)), "conv": (zoo.ConvNet, (3, 8, 8))}


def _expected_groups(names: list[str], style: str, prefix: str, radius: float) -> list[tuple[list[str], float]]:
    """The groups the options describe, built here independently of the pass."""
    if style != "groups":
        return expected_groups(names, style, radius)
    first = [n for n in names if n.startswith(prefix + ".")]  # its own threshold; the rest shares R alone
    return [(first, 0.05), ([n for n in names if n not in first], radius)]


STYLES = ["all-layer", "layer-wise", "param-wise", "groups"]
PREFIX = {"transformer-block": "qkv", "conv": "stem"}


def _option(style: str, prefix: str):
    return [{"params": f"{prefix}.*", "max_grad_norm": 0.05}, "*"] if style == "groups" else style


def _by_members(groups) -> dict[frozenset, float]:
    return {frozenset(members): threshold for members, threshold in groups}


@pytest.mark.parametrize("clip_fn", ["abadi", "automatic"])
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_clipping_style_matches_the_oracle(model_name: str, style: str, clip_fn: str) -> None:
    make, shape = MODELS[model_name]
    torch.manual_seed(0)
    model = make().double()
    x, y = torch.randn(7, *shape, dtype=torch.float64), torch.randint(0, 3, (7,))
    _, norms = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=float("inf"))
    radius = norms.median().item()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    expected = _expected_groups(names, style, PREFIX[model_name], radius)
    want, _ = clipped_sum(model, F.cross_entropy, (x,), (y,), groups=expected, clip_fn=clip_fn)
    got, _ = compiled_grads(
        model,
        (x,),
        F.cross_entropy,
        (y,),
        {
            "max_grad_norm": radius,
            "compiler": "aot_eager",
            "loss_reduction": "mean",
            "clipping": _option(style, PREFIX[model_name]),
            "clip_fn": clip_fn,
        },
    )
    assert_matches(got, want, torch.float64)
    found = _by_members((g["params"], g["threshold"]) for g in bkcompile.last_report().groups)
    assert found.keys() == _by_members(expected).keys()
    assert all(found[k] == pytest.approx(v) for k, v in _by_members(expected).items())


@pytest.mark.parametrize("clip_fn", ["abadi", "automatic"])
@pytest.mark.parametrize("style", ["all-layer", "layer-wise", "param-wise"])
def test_each_sample_contributes_at_most_its_group_threshold(style: str, clip_fn: str) -> None:
    torch.manual_seed(1)
    model = zoo.MLP().double()
    twin = copy.deepcopy(model)
    compiled = torch.compile(
        twin,
        backend="bk_dp",
        options={
            "max_grad_norm": 1.0,
            "compiler": "aot_eager",
            "loss_reduction": "sum",
            "clipping": style,
            "clip_fn": clip_fn,
        },
    )
    scales = torch.logspace(-3, 3, 13, dtype=torch.float64)  # gradients from 1e-3 to 1e3 times the usual
    x = torch.randn(13, 6, dtype=torch.float64) * scales[:, None]
    groups = None
    for i in range(len(x)):
        sample = x[i : i + 1]
        bkcompile.mark_batch_dynamic(sample)  # one graph for every batch size: the batched pipeline
        twin.zero_grad(set_to_none=True)
        (compiled(sample) * scales[i]).sum().backward()
        groups = groups or bkcompile.last_report().groups
        for group in groups:
            norm = torch.cat([twin.get_parameter(n).grad.flatten() for n in group["params"]]).norm().item()
            assert norm <= group["threshold"] * (1 + 1e-9), (i, group["name"], norm)
    assert sum(g["threshold"] ** 2 for g in groups) == pytest.approx(1.0)  # the sensitivity stays R


def test_adaptive_thresholds_converge_to_the_target_quantile() -> None:
    torch.manual_seed(2)
    model = nn.Linear(1, 1, bias=False)
    compiled = torch.compile(
        model, backend="bk_dp", options={"max_grad_norm": 5.0, "compiler": "aot_eager", "loss_reduction": "sum"}
    )
    optimizer = bkcompile.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=1.0,
        max_grad_norm=5.0,
        expected_batch_size=64,
        generator=torch.Generator().manual_seed(0),
        adaptive_clipping=bkcompile.AdaptiveClipping(target_quantile=0.7, learning_rate=0.2, count_noise=1.0),
    )
    stream = torch.distributions.LogNormal(0.0, 0.5)
    for _ in range(200):  # per-sample gradient norms |x_i| from the stream
        x = stream.sample((64, 1))
        bkcompile.mark_batch_dynamic(x)
        optimizer.zero_grad()
        compiled(x).sum().backward()
        optimizer.step()
    target = stream.icdf(torch.tensor(0.7)).item()
    assert optimizer.sensitivity == pytest.approx(target, rel=0.1)


def test_adaptive_counts_of_many_backwards_use_the_thresholds_each_clipped_with() -> None:
    """The counts wait for a read (or 16 backwards) and are counted together: they equal each backward's own
    count at its thresholds, thresholds moved by a restored checkpoint included, and a reset drops them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    options = {"max_grad_norm": 1.0, "compiler": "aot_eager", "loss_reduction": "sum", "clipping": "layer-wise"}
    compiled = torch.compile(model, backend="bk_dp", options=options)
    below, rows = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    for step in range(20):  # more backwards than wait to be counted
        x = torch.randn(5, 3)
        compiled(x).sum().backward()
        state = ledger_of(model).last_state()
        norms = bkcompile.last_per_sample_norms(model)
        below += (norms <= state.thresholds).sum(0)
        rows += 5
        if step == 17:  # the next backwards clip at other thresholds
            ledger_of(model).restore_thresholds(state.groups, state.names, state.initial, state.thresholds * 2)
    assert state.rows.tolist() == rows.tolist()
    assert state.below.tolist() == below.tolist()
    compiled(torch.randn(5, 3)).sum().backward()
    state.reset_counts()
    assert state.below.tolist() == state.rows.tolist() == [0.0, 0.0]


def test_noise_scale_is_sigma_times_the_groups_sensitivity() -> None:
    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 100))
    twin = copy.deepcopy(model)  # the plain path (no DP optimizer): p.grad is the clipped sum
    options = {
        "max_grad_norm": 1.0,
        "compiler": "aot_eager",
        "loss_reduction": "mean",
        "clipping": [{"params": "0.*", "max_grad_norm": 0.3}, {"params": "1.*", "max_grad_norm": 0.4}],
    }
    compiled = torch.compile(model, backend="bk_dp", options=options)
    optimizer = bkcompile.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=2.0,
        max_grad_norm=1.0,
        expected_batch_size=8,
        generator=torch.Generator().manual_seed(3),
    )
    x = torch.randn(8, 100)
    compiled(x).sum(1).mean().backward()
    torch.compile(twin, backend="bk_dp", options=options)(x).sum(1).mean().backward()
    optimizer.step()
    noise = torch.cat([(p.grad * 8 - q.grad).flatten() for p, q in zip(model.parameters(), twin.parameters())])
    assert optimizer.sensitivity == pytest.approx(0.5)
    assert noise.std().item() == pytest.approx(2.0 * 0.5, rel=0.02)  # 20200 draws: 2% is > 4 standard errors


def test_adaptive_count_noise_raises_the_gradient_noise() -> None:
    # (sigma_g^-2 + (2 * 4 / sqrt(2))^-2)^(-1/2) = 1: sigma_g = (1 - 1/32)^(-1/2)
    assert gradient_noise_multiplier(1.0, 4.0, 2) == pytest.approx((1 - 1 / 32) ** -0.5)
    with pytest.raises(bkcompile.PrivacyError, match="raise count_noise above"):
        gradient_noise_multiplier(1.0, 0.5, 4)


def test_per_device_groups_one_per_device() -> None:
    report = bkcompile.explain(
        zoo.MLP(), torch.randn(4, 6), clipping="per-device", max_grad_norm=2.0, compiler="aot_eager"
    )
    assert [(g["name"], g["threshold"]) for g in report.groups] == [("cpu", 2.0)]


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"clipping": "per-tensor"}, "clipping"),
        ({"clipping": [{"params": 3}]}, "name pattern"),
        ({"clipping": ["net.0.*"]}, "is in no clipping group"),
        ({"clip_fn": "tanh"}, "clip_fn"),
        ({"clip_gamma": 0}, "clip_gamma"),
    ],
)
def test_bad_clipping_options_are_refused(options: dict, fragment: str) -> None:
    with raises_bk(bkcompile.OptionError, fragment):
        bkcompile.explain(zoo.MLP(), torch.randn(4, 6), **options)
