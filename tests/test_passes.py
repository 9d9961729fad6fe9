"""Per-pass tests: one pass at a time on the joint graphs of small functions (each well under a second)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bkcompile.passes.cost import Reason, Strategy
from bkcompile.passes.facts import REDUCED, REPLICATED, Batched
from bkcompile.passes.loss import ScaleKind
from bkcompile.passes.site_kinds import SITE_KINDS, kept_ops, mv
from helpers import check_default_path
from joint_graphs import node, run_until
from torch.func import grad, vmap

aten = torch.ops.aten


def _linear_mean(w, b, x):
    return F.linear(x, w, b).tanh().sum(1).mean()


def _linear_params(p: int = 3, d: int = 4) -> dict[str, torch.Tensor]:
    return {
        "fc.weight": torch.randn(p, d, dtype=torch.float64, requires_grad=True),
        "fc.bias": torch.randn(p, dtype=torch.float64, requires_grad=True),
    }


# --- batch_axis ------------------------------------------------------------------------------------------


def test_batch_axis_facts_of_a_linear_layer() -> None:
    state = run_until("batch_axis", _linear_mean, _linear_params(), torch.randn(5, 4, dtype=torch.float64))
    facts, joint = state.joint.facts, state.joint
    assert [facts[p] for p in joint.primals] == [REPLICATED, REPLICATED, Batched(0)]
    assert [facts[t] for t in joint.tangents] == [REPLICATED]  # d(loss): one value for the batch
    assert facts[node(state, aten.addmm.default)] == Batched(0)
    assert facts[node(state, aten.mean.default)] == REDUCED
    assert facts[node(state, aten.mm.default)] == REDUCED  # the weight gradient sums over samples
    assert [facts[g] for g in joint.gradient_outputs[:2]] == [REDUCED, REDUCED]


def test_batch_axis_keeps_a_merged_batch_as_the_major_factor() -> None:
    def fn(w, x):  # (B, T, d) -> (B*T, d): B is the major factor of the merged dim
        return (x.reshape(-1, 4) @ w.t()).sum()

    params = {"w": torch.randn(3, 4, requires_grad=True)}
    state = run_until("batch_axis", fn, params, torch.randn(5, 2, 4))
    products = state.joint.gm.graph.find_nodes(op="call_function", target=aten.mm.default)
    # the forward product (B*T, 3) keeps the layout; the weight gradient sums over the samples
    assert {state.joint.facts[n] for n in products} == {Batched(0, inner=2), REDUCED}


# --- sites -----------------------------------------------------------------------------------------------


def test_sites_of_a_linear_layer_and_of_a_weight_used_twice() -> None:
    state = run_until("sites", _linear_mean, _linear_params(), torch.randn(5, 4, dtype=torch.float64))
    assert [(p.name, [s.kind.name for s in p.sites]) for p in state.params] == [
        ("fc.weight", ["matmul"]),
        ("fc.bias", ["sum"]),
    ]
    assert state.params[0].sites[0].node.target == aten.mm.default

    def twice(w, x):
        return (x @ w @ w).sum()

    state = run_until("sites", twice, {"w": torch.randn(4, 4, requires_grad=True)}, torch.randn(5, 4))
    (param,) = state.params
    assert (param.name, [s.kind.name for s in param.sites]) == ("w", ["matmul", "matmul"])


def test_sites_of_a_vector_parameter_are_an_mv_and_the_kinds_are_one_table() -> None:
    def score(v, x):  # (B, T, d) @ (d,): mv on the (B*T, d) view
        return torch.tanh(x @ v).sum()

    state = run_until("sites", score, {"v": torch.randn(4, requires_grad=True)}, torch.randn(5, 3, 4))
    (param,) = state.params
    assert [s.kind for s in param.sites] == [mv.KIND] and param.sites[0].node.target == aten.mv.default
    assert len({kind.name for kind in SITE_KINDS}) == len(SITE_KINDS)
    assert set(kept_ops()) == {aten.embedding_dense_backward.default, aten.convolution_backward.default}


# --- loss_scale ------------------------------------------------------------------------------------------


def test_loss_scale_of_a_mean_a_sum_a_cross_entropy_and_an_outside_loss() -> None:
    x = torch.randn(5, 4, dtype=torch.float64)
    mean = run_until("loss_scale", _linear_mean, _linear_params(), x).scale
    assert mean.kind is ScaleKind.MEAN and mean.source.startswith("aten.mean.default over the batch at ")
    assert mean.describe().startswith("s = B, from aten.mean.default over the batch")

    def summed(w, b, x):
        return F.linear(x, w, b).tanh().sum()

    assert run_until("loss_scale", summed, _linear_params(), x).scale.kind is ScaleKind.SUM

    def cross_entropy(w, b, x, y):
        return F.cross_entropy(F.linear(x, w, b), y)

    scale = run_until("loss_scale", cross_entropy, _linear_params(), x, torch.tensor([0, 1, 2, 0, 1])).scale
    assert scale.kind is ScaleKind.WEIGHT and scale.node is not None
    assert "cross-entropy/nll loss, reduction='mean'" in scale.source

    def outputs(w, b, x):
        return F.linear(x, w, b)

    outside = run_until("loss_scale", outputs, _linear_params(), x, loss_reduction="sum").scale
    assert outside.kind is ScaleKind.SUM
    assert outside.source == "option loss_reduction='sum': the loss is computed outside the compiled model"


# --- cost ------------------------------------------------------------------------------------------------


def _tokens(w, x):
    return (x @ w.t()).sum()


def test_cost_chooses_ghost_for_few_rows_and_explicit_for_many() -> None:
    params = {"w": torch.randn(64, 64, requires_grad=True)}
    few = run_until("cost", _tokens, params, torch.randn(4, 2, 64)).cost.plans[0]  # 2T^2 = 8 < pd = 4096
    assert (few.strategy, few.reason) == (Strategy.GHOST, Reason.FASTER)
    assert few.estimates[Strategy.GHOST].seconds < few.estimates[Strategy.EXPLICIT].seconds
    params = {"w": torch.randn(4, 4, requires_grad=True)}
    many = run_until("cost", _tokens, params, torch.randn(4, 16, 4)).cost.plans[0]  # 2T^2 = 512 > pd = 16
    assert (many.strategy, many.reason) == (Strategy.EXPLICIT, Reason.FASTER)
    forced = run_until("cost", _tokens, params, torch.randn(4, 16, 4), strategy="ghost").cost.plans[0]
    assert (forced.strategy, forced.reason, forced.describe()) == (Strategy.GHOST, Reason.FORCED, "strategy='ghost'")


def test_cost_makes_a_weight_used_twice_explicit() -> None:
    def twice(w, x):
        return (x @ w @ w).sum()

    plan = run_until("cost", twice, {"w": torch.randn(4, 4, requires_grad=True)}, torch.randn(5, 4)).cost.plans[0]
    assert (plan.strategy, plan.reason) == (Strategy.EXPLICIT, Reason.SHARED)
    assert plan.describe().startswith("used at 2 places")


# --- clipping --------------------------------------------------------------------------------------------


def _clipped_and_per_sample(state, params: dict, x: torch.Tensor):
    """The clipped weight and bias gradients the graph gives, and the per-sample gradients of the summed tanh
    of the linear layer (the oracle's)."""
    state.joint.gm.recompile()
    w, b = (t.detach() for t in params.values())
    _, (grad_w, grad_b, _) = state.joint.gm([w, b, x], [torch.ones((), dtype=torch.float64)])

    def sample_loss(w, b, xi):
        return F.linear(xi, w, b).tanh().sum()

    return grad_w, grad_b, *vmap(grad(sample_loss, argnums=(0, 1)), in_dims=(None, None, 0))(w, b, x)


@pytest.mark.parametrize("clipping, groups", [("all-layer", 1), ("param-wise", 2)])
def test_clipping_inserts_one_norm_record_per_group_and_clips_the_gradients(clipping: str, groups: int) -> None:
    params = _linear_params()
    x = torch.randn(6, 4, dtype=torch.float64)
    state = run_until("clipping", _linear_mean, params, x, clipping=clipping, max_grad_norm=0.5)
    records = state.joint.gm.graph.find_nodes(op="call_function", target=torch.ops.bkcompile.record_norms.default)
    assert len(records) == groups
    grad_w, grad_b, gw, gb = _clipped_and_per_sample(state, params, x)
    radius = 0.5 if groups == 1 else 0.5 / 2**0.5
    if groups == 1:
        norms = (gw.flatten(1).pow(2).sum(1) + gb.pow(2).sum(1)).sqrt()
        factors_w = factors_b = (radius / (norms + 1e-6)).clamp(max=1)
    else:
        factors_w = (radius / (gw.flatten(1).norm(dim=1) + 1e-6)).clamp(max=1)
        factors_b = (radius / (gb.norm(dim=1) + 1e-6)).clamp(max=1)
    assert factors_w.min() < 1  # some samples are clipped
    torch.testing.assert_close(grad_w, torch.einsum("b,bij->ij", factors_w, gw), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_b, torch.einsum("b,bi->i", factors_b, gb), rtol=1e-10, atol=1e-12)


def _tokens_mean(w, b, x):
    return F.linear(x, w, b).tanh().sum((1, 2)).mean()


@pytest.mark.parametrize("strategy", ["auto", "ghost", "fastest"])
def test_cost_reuses_the_per_sample_sums_of_a_bias(strategy: str) -> None:
    """A sum site's norm needs its per-sample sums (B, p) anyway: they are reused for the clipped sum (explicit)
    instead of reading the operand again once the clip factors are known."""
    state = run_until(
        "cost", _linear_mean, _linear_params(), torch.randn(6, 5, 4, dtype=torch.float64), strategy=strategy
    )
    plans = {plan.param.name: plan for plan in state.cost.plans}
    assert (plans["fc.bias"].strategy, plans["fc.bias"].reason) == (Strategy.EXPLICIT, Reason.DIRECT)
    assert plans["fc.weight"].reason is not Reason.DIRECT


@pytest.mark.parametrize(("p", "d", "activation"), [(16, 4, True), (4, 16, False), (6, 6, True)])
def test_ghost_weighting_scales_the_narrower_operand_and_matches_the_oracle(p: int, d: int, activation: bool) -> None:
    """mm(t(g), a) weighted by the clip factors scales the operand with fewer columns (the activation on a
    tie): g (B*T, p) or a (B*T, d)."""
    params = _linear_params(p, d)
    x = torch.randn(6, 5, d, dtype=torch.float64)
    state = run_until("clipping", _tokens_mean, params, x, strategy="ghost", max_grad_norm=0.5)
    weighted = [
        n
        for n in state.joint.gm.graph.find_nodes(op="call_function", target=aten.mm.default)
        if any(a.target == aten.mul.Tensor for a in n.all_input_nodes)
    ]
    assert len(weighted) == 1
    scaled = next(a for a in weighted[0].all_input_nodes if a.target == aten.mul.Tensor)
    value = scaled.args[0]
    while value.op == "call_function" and value.target in (aten.view.default, aten.t.default, aten.permute.default):
        value = value.args[0]
    assert (value.op == "placeholder") == activation  # the input x, or the output gradient g
    grad_w, grad_b, gw, gb = _clipped_and_per_sample(state, params, x)
    factors = (0.5 / ((gw.flatten(1).pow(2).sum(1) + gb.pow(2).sum(1)).sqrt() + 1e-6)).clamp(max=1)
    assert factors.min() < 1
    torch.testing.assert_close(grad_w, torch.einsum("b,bij->ij", factors, gw), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_b, torch.einsum("b,bi->i", factors, gb), rtol=1e-10, atol=1e-12)


def _two_layers(w1, w2, x):
    return F.linear(F.linear(x, w1).tanh(), w2).sum(1).mean()


def _ancestors(value: torch.fx.Node) -> set[torch.fx.Node]:
    seen, stack = set(), [value]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                stack.append(arg)
    return seen


def test_a_group_clips_without_waiting_for_the_norms_of_layers_before_it() -> None:
    params = {
        name: torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        for name, shape in [("w1", (5, 4)), ("w2", (3, 5))]
    }
    state = run_until("clipping", _two_layers, params, torch.randn(6, 4, dtype=torch.float64), clipping="param-wise")
    records = state.joint.gm.graph.find_nodes(op="call_function", target=torch.ops.bkcompile.record_norms.default)
    first, second = sorted(records, key=lambda r: r.args[2])  # groups in parameter order: w1, then w2
    (root,) = [n for n in _ancestors(first) if n.target is aten.sqrt.default]  # of w1's squared norms
    squares_w1 = root.args[0]
    assert squares_w1.target is aten.mul.Tensor and squares_w1.meta["val"].shape == (6,)  # ||a_i||^2 ||g_i||^2
    # the backward reaches w2 first: its clip (and weighted reduction) must not wait for w1's norms
    assert squares_w1 not in _ancestors(second)


def _views_up_to(value: torch.fx.Node, original: set[str]) -> int:
    """The view ops between ``value`` and the first value of the graph as traced (named in ``original``)."""
    views = 0
    while value.name not in original:
        assert value.target in (aten.reshape.default, aten.view.default, aten.permute.default, aten.t.default)
        value, views = value.args[0], views + 1
    return views


def test_a_ghost_norm_reads_its_operands_through_one_view_and_one_transpose() -> None:
    """The Gram matrices of a linear layer read the activation (B*T, d) and the output gradient, held as (p, B*T),
    through one reshape to (B, T, .) and a transpose (the gradient's): every node the pass emits is one more node
    for Inductor to lower, schedule and generate code for."""
    params = _linear_params()
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    traced = run_until("cost", _tokens_mean, params, x, strategy="ghost").joint.gm.graph.nodes
    state = run_until("clipping", _tokens_mean, params, x, strategy="ghost", max_grad_norm=0.5)
    grams = state.joint.gm.graph.find_nodes(op="call_function", target=aten.bmm.default)
    assert len(grams) == 2
    original = {n.name for n in traced}
    assert sorted(_views_up_to(gram.args[0], original) for gram in grams) == [1, 2]
    assert len(state.joint.gm.graph.nodes) - len(traced) <= 34  # norms, clip factors and weighted reductions
    grad_w, grad_b, gw, gb = _clipped_and_per_sample(state, params, x)
    factors = (0.5 / ((gw.flatten(1).pow(2).sum(1) + gb.pow(2).sum(1)).sqrt() + 1e-6)).clamp(max=1)
    assert factors.min() < 1
    torch.testing.assert_close(grad_w, torch.einsum("b,bij->ij", factors, gw), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_b, torch.einsum("b,bi->i", factors, gb), rtol=1e-10, atol=1e-12)


def test_a_group_sums_the_squared_norms_of_its_parameters_in_one_reduction() -> None:
    """The squared norms of a group's parameters are concatenated and summed once: under Inductor each one
    stays in the kernel that computes it, where a chain of adds fused every per-sample reduction of the model
    into one large kernel at the end of the backward (compiled, and holding its operands, until then)."""
    params = {
        name: torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        for name, shape in [("w1", (5, 4)), ("w2", (3, 5))]
    }
    x = torch.randn(6, 4, dtype=torch.float64)
    state = run_until("clipping", _two_layers, params, x, max_grad_norm=0.5)
    (record,) = state.joint.gm.graph.find_nodes(op="call_function", target=torch.ops.bkcompile.record_norms.default)
    (root,) = [n for n in _ancestors(record) if n.target is aten.sqrt.default]
    total = root.args[0]
    assert total.target is aten.sum.dim_IntList and total.args[0].target is aten.view.default
    stacked = total.args[0].args[0]
    assert stacked.target is aten.cat.default and len(stacked.args[0]) == 2
    state.joint.gm.recompile()
    w1, w2 = (t.detach() for t in params.values())
    _, (grad_w1, grad_w2, _) = state.joint.gm([w1, w2, x], [torch.ones((), dtype=torch.float64)])
    g1, g2 = vmap(grad(lambda a, b, xi: _two_layers(a, b, xi[None]), argnums=(0, 1)), in_dims=(None, None, 0))(
        w1, w2, x
    )
    factors = (0.5 / ((g1.flatten(1).pow(2).sum(1) + g2.flatten(1).pow(2).sum(1)).sqrt() + 1e-6)).clamp(max=1)
    assert factors.min() < 1
    torch.testing.assert_close(grad_w1, torch.einsum("b,bij->ij", factors, g1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_w2, torch.einsum("b,bij->ij", factors, g2), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("strategy", ["ghost", "explicit"])
def test_the_pass_emits_no_view_that_leaves_its_input_as_it_is(strategy: str) -> None:
    params = _linear_params()
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    traced = {n.name for n in run_until("cost", _tokens_mean, params, x, strategy=strategy).joint.gm.graph.nodes}
    state = run_until("clipping", _tokens_mean, params, x, strategy=strategy, max_grad_norm=0.5)
    views = (aten.reshape.default, aten.view.default, aten.permute.default, aten.expand.default)
    emitted = [n for n in state.joint.gm.graph.nodes if n.name not in traced and n.target in views]
    assert emitted  # the per-sample views are there
    for view in emitted:
        before, after = view.args[0].meta["val"], view.meta["val"]
        assert (before.shape, before.stride()) != (after.shape, after.stride()), view.format_node()


def _einsum_tokens(w, x):  # the weight's gradient is the transpose of the site's product
    return torch.einsum("btd,pd->btp", x, w).tanh().sum((1, 2)).mean()


def _linear_tokens(w, x):
    return F.linear(x, w).tanh().sum((1, 2)).mean()


@pytest.mark.parametrize("fn", [_einsum_tokens, _linear_tokens])
def test_explicit_products_are_written_once_in_the_layout_the_norm_and_the_weighted_sum_read(fn) -> None:
    """The per-sample gradients are one product, read by the squared norm and by the weighted sum through views of
    it alone: a flat view of a transposed product would copy it (B x p x d written twice), or read it across its
    rows."""
    params = {"w": torch.randn(3, 4, dtype=torch.float64, requires_grad=True)}
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    state = run_until("clipping", fn, params, x, strategy="explicit", max_grad_norm=0.5)
    bmms = state.joint.gm.graph.find_nodes(op="call_function", target=aten.bmm.default)
    (product,) = [n for n in bmms if n.meta["val"].shape == (6, 3, 4)]  # (B, p, d), not einsum's own
    readers, stack = [], [product]
    while stack:
        for user in stack.pop().users:
            if user.target in (aten.reshape.default, aten.view.default, aten.permute.default):
                assert torch._C._is_alias_of(user.meta["val"], product.meta["val"]), user.format_node()
                stack.append(user)
            else:
                readers.append(user)
    assert [r.target for r in readers] == [aten.mul.Tensor, aten.mul.Tensor]  # the squares, the weighting
    state.joint.gm.recompile()
    w = params["w"].detach()
    _, (grad_w, _) = state.joint.gm([w, x], [torch.ones((), dtype=torch.float64)])
    gw = vmap(grad(lambda v, xi: fn(v, xi[None])), in_dims=(None, 0))(w, x)
    factors = (0.5 / (gw.flatten(1).norm(dim=1) + 1e-6)).clamp(max=1)
    assert factors.min() < 1
    torch.testing.assert_close(grad_w, torch.einsum("b,bij->ij", factors, gw), rtol=1e-10, atol=1e-12)


class _EinsumTokens(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return torch.einsum("btd,pd->btp", x, self.w).tanh().mean(1)


def test_explicit_products_written_transposed_under_a_dynamic_batch_match_the_oracle() -> None:
    """The transposed product is checked contiguous without a guard on the batch size (unbacked when marked
    dynamic): one compile for two batch sizes, each equal to the oracle."""
    torch.manual_seed(0)
    check_default_path(
        _EinsumTokens(),
        lambda batch: ((torch.randn(batch, 5, 4),), (torch.randint(0, 3, (batch,)),)),
        F.cross_entropy,
        options={"compiler": "aot_eager", "strategy": "explicit", "loss_reduction": "mean"},
    )
