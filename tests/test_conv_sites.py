"""Convolution sites: ghost norms from the padded input's Gram matrices equal the oracle and replace the im2col
Grams where they are cheaper; on CPU the Inductor graphs of bk_dp keep convolutions in the NCHW layout; per-sample
weight gradients read the weight as a zero-stride view."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
import zoo
from bkcompile.passes.site_kinds import conv
from helpers import assert_matches
from joint_graphs import run_until
from oracle import clipped_sum
from test_oracle import CASES, run_case
from torch._inductor.utils import run_and_get_code
from torch.func import grad, vmap


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_ghost_norms_of_stride_one_convolutions_skip_im2col(dtype: torch.dtype, monkeypatch) -> None:
    unfolded, original = [], conv._unfolded_gram
    record = lambda emit, node, *rest: unfolded.append(node) or original(emit, node, *rest)  # noqa: E731
    monkeypatch.setattr(conv, "_unfolded_gram", record)
    case = dataclasses.replace(CASES["conv-geometries"], options={"strategy": "ghost"})
    got, want, *_ = run_case(case, 7, dtype, "aot_eager")
    assert_matches(got, want, dtype)
    # padded 3x3, dilated grouped 3x3, 1x1 and the 1-d convolution read the padded Grams; the strided one unfolds
    assert [n.args[4] for n in unfolded] == [[2, 2]]


def test_gram_choice_follows_the_sizes() -> None:
    graph = torch.fx.Graph()

    def convolution(shape, kernel, stride, padding, dilation=1) -> torch.fx.Node:
        x, w = graph.placeholder("x"), graph.placeholder("w")
        x.meta["val"], w.meta["val"] = torch.empty(shape), torch.empty(4, shape[1], *kernel)
        go = graph.placeholder("go")
        go.meta["val"] = torch.empty(0)
        two = len(kernel) == 2
        args = (go, x, w, None, [stride] * len(kernel), [padding] * len(kernel), [dilation] * len(kernel))
        return graph.call_function(
            torch.ops.aten.convolution_backward.default, (*args, False, [0] * (1 + two), 1, [False, True, False])
        )

    assert conv._gram_of_padded(convolution((2, 3, 8, 8), (3, 3), 1, 1))  # P = 100, L = 64: 1e4 <= 9 * 4096
    assert conv._gram_of_padded(convolution((2, 3, 8, 8), (1, 1), 1, 0))  # P = L
    assert not conv._gram_of_padded(convolution((2, 3, 16, 16), (3, 3), 2, 1))  # P = 324, L = 64
    assert not conv._gram_of_padded(convolution((2, 3, 16, 16), (1, 1), 2, 0))  # P = 4L
    assert conv._gram_of_padded(convolution((2, 3, 10), (3,), 1, 1))  # 1-d: P = 12, L = 10


@pytest.mark.slow
def test_inductor_ghost_norms_from_padded_grams_in_nchw(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "1")  # Inductor's strict checks, on as in a user's CI
    torch.manual_seed(0)
    model = zoo.ConvGeometries()
    twin = copy.deepcopy(model)
    compiled = torch.compile(
        twin, backend="bk_dp", options={"max_grad_norm": 0.5, "strategy": "ghost", "loss_reduction": "mean"}
    )
    x, y = torch.randn(5, 3, 8, 8), torch.randint(0, 3, (5,))

    def step() -> None:
        F.cross_entropy(compiled(x), y).backward()

    _, code = run_and_get_code(step)
    want, _ = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=0.5)
    assert_matches({k: p.grad for k, p in twin.named_parameters()}, want, torch.float32)
    # (5, 4, 8, 8) activations: NCHW strides (256, 64, 8, 1); channels-last would be (256, 1, 32, 4)
    assert code and all("(256, 1, 32, 4)" not in c for c in code)
    assert any("(256, 64, 8, 1)" in c for c in code)


def _conv_mean(w, x):
    return torch.tanh(F.conv2d(x, w, padding=1)).mean()


def test_per_sample_weight_gradients_read_the_weight_as_a_zero_stride_view() -> None:
    # the per-sample gradients are one op on the weight itself (inside it, the grouped convolution_backward reads
    # the weight's B copies as one zero-stride view): B materialised copies were B*p*d values that Inductor
    # computed at the start of the backward and held until the call
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    state = run_until("clipping", _conv_mean, {"w": w}, x, strategy="explicit", max_grad_norm=0.05)
    op = torch.ops.bkcompile.conv_weight_per_sample.default
    (per_sample,) = state.joint.gm.graph.find_nodes(op="call_function", target=op)
    assert tuple(per_sample.args[2].meta["val"].shape) == (4, 3, 3, 3)
    assert tuple(per_sample.meta["val"].shape) == (6, 4, 3, 3, 3)
    state.joint.gm.recompile()
    _, (got, _) = state.joint.gm([w.detach(), x], [torch.ones((), dtype=torch.float64)])
    grads = vmap(grad(lambda w, xi: _conv_mean(w, xi[None])), in_dims=(None, 0))(w.detach(), x)
    factors = (0.05 / (grads.flatten(1).norm(dim=1) + 1e-6)).clamp(max=1)
    assert factors.max() < 1  # every sample clipped
    torch.testing.assert_close(got, torch.einsum("b,b...->...", factors, grads), rtol=1e-10, atol=1e-12)
