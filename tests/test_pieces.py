"""A model in several bk_dp graphs (graph breaks, regional compilation) is clipped once per sample, at the
end of the backward, against the torch.func oracle (the per-sample loss is the sum over all graphs)."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_matches, raises_bk
from oracle import clipped_sum, compiled_grads, per_sample_grads
from torch import nn

import bkcompile
import bkcompile.compiler.backend

R = 0.5
LOG = logging.getLogger("bkcompile.tests.pieces")


def _options(**extra) -> dict:
    """The tests' options: their losses are computed outside the model, means over the batch, unless ``extra``
    says otherwise."""
    return {"max_grad_norm": R, "compiler": "aot_eager", "loss_reduction": "mean", **extra}


class Broken(nn.Module):
    """Two linear layers with a graph break between them (``torch._dynamo.graph_break()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        torch._dynamo.graph_break()
        return self.b(h)


class Logged(nn.Module):
    """A logging call and a print in the forward: each is a graph break."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        LOG.warning("hidden shape %s", h.shape)
        h = torch.relu(self.b(h))
        print("forward at", h.shape)
        return self.c(h)


class TiedLM(nn.Module):
    """A tied embedding used in the first graph (lookup) and the last (output projection)."""

    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.fc = nn.Linear(width, width)

    def forward(self, ids):
        h = torch.tanh(self.fc(self.emb(ids)))
        torch._dynamo.graph_break()
        return h @ self.emb.weight.t()


def _token_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def _data(dtype: torch.dtype, batch: int, shape=(4,), classes: int = 3):
    return torch.randn(batch, *shape, dtype=dtype), torch.randint(0, classes, (batch,))


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("make", [Broken, Logged])
def test_graph_breaks_clip_once_per_sample(make, dtype: torch.dtype, batch: int) -> None:
    torch.manual_seed(0)
    model = make().to(dtype)
    x, y = _data(dtype, batch)
    want, norms = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=R)
    got, _ = compiled_grads(model, (x,), F.cross_entropy, (y,), options=_options())
    assert_matches(got, want, dtype)
    torch.testing.assert_close(bkcompile.last_per_sample_norms().to(dtype), norms)
    assert (norms > R).any(), "some samples must be clipped for the test to mean something"
    spans = bkcompile.last_clip_spans()
    assert len(spans) == 1 and len(spans[0].graphs) == (3 if make is Logged else 2), spans


@pytest.mark.slow
def test_graph_break_with_inductor() -> None:
    torch.manual_seed(1)
    model = Broken()
    x, y = _data(torch.float32, 7)
    want, _ = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=R)
    got, _ = compiled_grads(model, (x,), F.cross_entropy, (y,), options={"max_grad_norm": R, "loss_reduction": "mean"})
    assert_matches(got, want, torch.float32)


@pytest.mark.parametrize("batch", [1, 7])
def test_tied_embedding_across_two_graphs_gets_its_cross_terms(batch: int) -> None:
    torch.manual_seed(2)
    model = TiedLM().double()
    ids, y = torch.randint(0, 11, (batch, 5)), torch.randint(0, 11, (batch, 5))
    want, norms = clipped_sum(model, _token_loss, (ids,), (y,), max_grad_norm=R)
    got, _ = compiled_grads(model, (ids,), _token_loss, (y,), options=_options())
    assert_matches(got, want, torch.float64)
    spans = bkcompile.last_clip_spans()
    assert len(spans[0].graphs) == 2 and (norms > R).any()


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, h):
        return h + torch.tanh(self.fc(self.ln(h)))


class Stem(nn.Module):
    """An embedding (a module of the model's own: dynamo runs a bare torch.nn module's compiled call eagerly)."""

    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab, width)

    def forward(self, ids):
        return self.table(ids)


class Head(nn.Module):
    """Mean over positions, then the output projection tied to the stem's embedding."""

    def __init__(self, stem: Stem, classes: int) -> None:
        super().__init__()
        self.stem, self.bias = stem, nn.Parameter(torch.zeros(classes))

    def forward(self, h):
        return h.mean(1) @ self.stem.table.weight[: self.bias.shape[0]].t() + self.bias


class Regional(nn.Module):
    """An embedding stem, blocks and a head tied to the stem, each compiled on its own."""

    def __init__(self, vocab: int = 11, width: int = 6, depth: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.stem = Stem(vocab, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(depth)])
        self.head = Head(self.stem, classes)

    def forward(self, ids):
        h = self.stem(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    def compile_regions(self, **options) -> None:
        for module in [self.stem, *self.blocks, self.head]:
            module.compile(backend="bk_dp", options=options)


def _regional_grads(model: Regional, ids, y, **options) -> dict:
    twin = copy.deepcopy(model)
    twin.compile_regions(**options)
    F.cross_entropy(twin(ids), y).backward()
    return {k: v.grad for k, v in twin.named_parameters()}


@pytest.mark.parametrize(("dtype", "batch"), [(torch.float32, 7), (torch.float64, 7), (torch.float64, 1)])
def test_regional_compilation_clips_all_parameters_together(dtype: torch.dtype, batch: int) -> None:
    torch.manual_seed(3)
    model = Regional().to(dtype)
    ids, y = torch.randint(0, 11, (batch, 4)), torch.randint(0, 3, (batch,))
    got = _regional_grads(model, ids, y, **_options(graphs="several"))  # first: the oracle leaves wrappers
    want, norms = clipped_sum(model, F.cross_entropy, (ids,), (y,), max_grad_norm=R)
    assert_matches(got, want, dtype)
    assert (norms > R).all()
    spans = bkcompile.last_clip_spans()
    assert len(spans) == 1 and len(spans[0].params) == len(want)


class EagerBetween(Regional):
    """Eager code between the compiled blocks: ``between`` maps the hidden batch."""

    def __init__(self, between) -> None:
        super().__init__(depth=2)
        self.between = between

    def forward(self, ids):
        h = self.stem(ids)
        for block in self.blocks:
            h = self.between(block(h))
        return self.head(h)


def test_row_wise_eager_code_between_graphs_is_allowed() -> None:
    torch.manual_seed(10)
    model = EagerBetween(lambda h: torch.relu(h) * torch.tanh(h) + h.clone().view(h.shape)).double()
    ids, y = torch.randint(0, 11, (7, 4)), torch.randint(0, 3, (7,))
    got = _regional_grads(model, ids, y, **_options(graphs="several"))
    want, _ = clipped_sum(model, F.cross_entropy, (ids,), (y,), max_grad_norm=R)
    assert_matches(got, want, torch.float64)


@pytest.mark.parametrize(
    ("between", "op"),
    [
        (lambda h: h.flip(0), "FlipBackward0"),
        (lambda h: h - h.mean(0), "MeanBackward1"),
        (lambda h: h[[1, 0, *range(2, len(h))]], "IndexBackward0"),
    ],
)
def test_eager_code_that_moves_or_mixes_rows_between_graphs_is_refused(between, op: str) -> None:
    model = EagerBetween(between)
    ids, y = torch.randint(0, 11, (7, 4)), torch.randint(0, 3, (7,))
    with pytest.raises(bkcompile.PrivacyError, match=f"computed outside the bk_dp graphs by {op}"):
        _regional_grads(model, ids, y, **_options(graphs="several"))


def _layers(names: list[str]) -> list[list[str]]:
    layers = list(dict.fromkeys(n.rpartition(".")[0] for n in names))
    return [[n for n in names if n.rpartition(".")[0] == layer] for layer in layers]


def test_layer_wise_clipping_spans_graphs() -> None:
    torch.manual_seed(4)
    model = Logged().double()
    x, y = _data(torch.float64, 7)
    layers = _layers([n for n, _ in model.named_parameters()])
    groups = [(members, R / math.sqrt(len(layers))) for members in layers]
    want, norms = clipped_sum(model, F.cross_entropy, (x,), (y,), groups=groups)
    got, _ = compiled_grads(model, (x,), F.cross_entropy, (y,), options=_options(clipping="layer-wise"))
    assert_matches(got, want, torch.float64)
    torch.testing.assert_close(bkcompile.last_per_sample_norms(), norms)


class SplitLayer(nn.Module):
    """One layer whose weight is used before a graph break and its bias after it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(5))
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = x @ self.weight.t()
        torch._dynamo.graph_break()
        return self.out(torch.tanh(h + self.bias))


@pytest.mark.parametrize("clip_fn", ["abadi", "automatic"])
def test_a_group_spans_graphs(clip_fn: str) -> None:
    torch.manual_seed(5)
    model = SplitLayer().double()
    x, y = _data(torch.float64, 7)
    groups = [(["weight", "bias"], 0.3), (["out.weight", "out.bias"], R)]
    want, _ = clipped_sum(model, F.cross_entropy, (x,), (y,), groups=groups, clip_fn=clip_fn)
    clipping = [{"params": ["weight", "bias"], "max_grad_norm": 0.3}, "out.*"]
    got, _ = compiled_grads(model, (x,), F.cross_entropy, (y,), options=_options(clipping=clipping, clip_fn=clip_fn))
    assert_matches(got, want, torch.float64)
    spans = {span.group: span for span in bkcompile.last_clip_spans()}
    assert len(spans["weight,bias"].graphs) == 2 and len(spans["out.*"].graphs) == 1


def test_layer_wise_of_regional_blocks_keeps_each_block_apart() -> None:
    torch.manual_seed(6)
    model = Regional(depth=2).double()
    ids, y = torch.randint(0, 11, (7, 4)), torch.randint(0, 3, (7,))
    modules = {
        "stem.table": ["stem.table.weight"],  # also the head's projection: one group over two graphs
        "head": ["head.bias"],
        "blocks.0.ln": ["blocks.0.ln.weight", "blocks.0.ln.bias"],
        "blocks.0.fc": ["blocks.0.fc.weight", "blocks.0.fc.bias"],
        "blocks.1.ln": ["blocks.1.ln.weight", "blocks.1.ln.bias"],
        "blocks.1.fc": ["blocks.1.fc.weight", "blocks.1.fc.bias"],
    }
    groups = [(members, R / math.sqrt(len(modules))) for members in modules.values()]
    got = _regional_grads(model, ids, y, **_options(graphs="several", clipping="layer-wise"))
    want, _ = clipped_sum(model, F.cross_entropy, (ids,), (y,), groups=groups)
    assert_matches(got, want, torch.float64)


class LossInside(nn.Module):
    def __init__(self, reduction: str) -> None:
        super().__init__()
        self.a, self.b, self.reduction = nn.Linear(4, 5), nn.Linear(5, 3), reduction

    def forward(self, x, y):
        h = torch.tanh(self.a(x))
        torch._dynamo.graph_break()
        return F.cross_entropy(self.b(h), y, reduction=self.reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_in_the_last_graph_scales_every_graph(reduction: str) -> None:
    torch.manual_seed(7)
    model = LossInside(reduction).double()
    x, y = _data(torch.float64, 7)
    grads = per_sample_grads(model, lambda loss: loss, (x, y))
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
    factors = (R / (norms + 1e-6)).clamp(max=1.0)
    want = {k: torch.einsum("b,b...->...", factors, g) for k, g in grads.items()}
    twin = copy.deepcopy(model)
    torch.compile(twin, backend="bk_dp", options=_options(loss_reduction="auto"))(x, y).backward()  # recognised
    assert_matches({k: v.grad for k, v in twin.named_parameters()}, want, torch.float64)


def test_replacing_one_sample_moves_the_clipped_sum_by_at_most_2R() -> None:
    """The loss <out, t_i> flips both graphs' parts of sample 3's gradient when t_3 flips: clipped per graph
    (each part above R), the sum would move by 2 sqrt(2) R; clipped once, by at most 2R."""
    torch.manual_seed(8)
    model = Broken().double()
    x = 30 * torch.randn(7, 4, dtype=torch.float64)
    signs = torch.randint(0, 2, (7, 3)).double() * 2 - 1
    flipped = signs.clone()
    flipped[3] = -signs[3]

    def loss(out, t):
        return (out * t).sum(1).mean()

    def clipped(t):
        got, _ = compiled_grads(model, (x,), loss, (t,), options=_options())
        return torch.cat([g.flatten() for g in got.values()])

    moved = (clipped(signs) - clipped(flipped)).norm()
    assert moved <= 2 * R * (1 + 1e-9), moved

    def per_graph(t):  # what clipping each graph on its own would release
        grads = per_sample_grads(model, loss, (x,), (t,))
        out = []
        for prefix in ("a.", "b."):
            part = torch.cat([g.flatten(1) for k, g in grads.items() if k.startswith(prefix)], 1)
            out.append(((R / (part.norm(dim=1) + 1e-6)).clamp(max=1.0)[:, None] * part).sum(0))
        return torch.cat(out)

    assert (per_graph(signs) - per_graph(flipped)).norm() > 2.5 * R


def _joint_graphs(monkeypatch: pytest.MonkeyPatch) -> list[torch.fx.GraphModule]:
    """The joint graphs the backend partitions, after the privatizing pass."""
    graphs = []
    partition = bkcompile.compiler.backend.min_cut_rematerialization_partition

    def spy(joint, *args, **kwargs):
        graphs.append(copy.deepcopy(joint))
        return partition(joint, *args, **kwargs)

    monkeypatch.setattr(bkcompile.compiler.backend, "min_cut_rematerialization_partition", spy)
    return graphs


def _targets(gm: torch.fx.GraphModule) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def test_one_graph_stays_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Graph in, graph out: a model in one graph clips in the graph (no deferral); a piece defers."""
    graphs = _joint_graphs(monkeypatch)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = _data(torch.float32, 7)
    compiled_grads(model, (x,), F.cross_entropy, (y,), options=_options())
    (whole,) = graphs
    assert torch.ops.bkcompile.record_norms.default in _targets(whole)
    assert torch.ops.bkcompile.defer_grads.default not in _targets(whole)
    outputs = whole.graph.output_node().args[0]
    weight = next(o for o in outputs if isinstance(o, torch.fx.Node) and tuple(o.meta["val"].shape) == (3, 5))
    while weight.target is not torch.ops.aten.mm.default:  # the clip-weighted reduction, inside the graph
        weight = weight.args[0]
    assert any(torch.ops.aten.mul.Tensor == a.target for a in weight.all_input_nodes)
    graphs.clear()
    compiled_grads(Broken(), (x,), F.cross_entropy, (y,), options=_options(strategy="ghost"))
    assert len(graphs) == 2
    for piece in graphs:
        targets = _targets(piece)
        assert torch.ops.bkcompile.record_norms.default not in targets
        (call,) = piece.graph.find_nodes(op="call_function", target=torch.ops.bkcompile.defer_grads.default)
        params, grads, _, _, norms, operands = call.args
        # ghost: the weight hands over its norm (B,) and its site's operands, no per-sample gradients; the bias
        # its per-sample sums (B, n), which give both its norm and its clipped sum
        assert len(params) == 2 and len(norms) == len(grads) == 1
        assert tuple(norms[0].meta["val"].shape) == (7,) and len(operands) == 2
        assert tuple(grads[0].meta["val"].shape) in ((7, 5), (7, 3))  # the bias of self.a or of self.b
        outputs = [o for o in piece.graph.output_node().args[0] if isinstance(o, torch.fx.Node) and o.args]
        assert sum(o.args[0] is call for o in outputs) == 2


class ConvBroken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.out = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(3 * 5 * 5, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        torch._dynamo.graph_break()
        return self.out(h.flatten(1))


@pytest.mark.parametrize("strategy", ["auto", "ghost", "explicit"])
def test_kept_sites_and_per_sample_gradients_across_graphs(strategy: str) -> None:
    torch.manual_seed(12)
    model = ConvBroken().double()
    x, y = _data(torch.float64, 7, shape=(2, 5, 5))
    want, _ = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=R)
    got, _ = compiled_grads(model, (x,), F.cross_entropy, (y,), options=_options(strategy=strategy))
    assert_matches(got, want, torch.float64)


def test_whole_graph_meeting_other_graphs_is_refused() -> None:
    torch.manual_seed(9)
    model = Regional(depth=2)
    ids, y = torch.randint(0, 11, (7, 4)), torch.randint(0, 3, (7,))
    with pytest.raises(bkcompile.ClipOnceError, match="'graphs': 'several'"):
        _regional_grads(model, ids, y, **_options())


class ItemOfBatchMean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.a(x)
        if h.mean().item() > 0:  # a graph break: .item() of a batch statistic
            h = 2 * h
        return self.b(h)


class BranchOnBatchMean(ItemOfBatchMean):
    def forward(self, x):
        h = self.a(x)
        if h.mean() > 0:  # a graph break: a branch on a batch statistic
            h = 2 * h
        return self.b(h)


def test_item_of_a_batch_statistic_is_refused() -> None:
    x, y = _data(torch.float32, 7)
    with raises_bk(bkcompile.SampleMixingError, "aten.mean", "h.mean().item()", "leaves the bk_dp graph", "fix:"):
        compiled_grads(ItemOfBatchMean(), (x,), F.cross_entropy, (y,), options=_options())


def test_branch_on_a_batch_statistic_is_refused() -> None:
    x, y = _data(torch.float32, 7)
    with raises_bk(bkcompile.SampleMixingError, "h.mean() > 0", "fix:"):
        compiled_grads(BranchOnBatchMean(), (x,), F.cross_entropy, (y,), options=_options())


def test_two_calls_of_a_model_in_pieces_before_one_backward_are_refused() -> None:
    model = torch.compile(Broken(), backend="bk_dp", options=_options())
    x, y = _data(torch.float32, 7)
    loss = F.cross_entropy(model(x), y) + F.cross_entropy(model(x + 0.1), y)
    with pytest.raises(bkcompile.ClipOnceError, match="ran twice"):
        loss.backward()


def test_graphs_option_is_validated() -> None:
    with raises_bk(bkcompile.OptionError, "'graphs'"):
        compiled_grads(Broken(), _data(torch.float32, 3)[:1], lambda out: out.sum(), options=_options(graphs="many"))


def test_dp_optimizer_steps_a_model_in_pieces_over_dynamic_batches() -> None:
    torch.manual_seed(11)
    model = Broken().double()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="bk_dp", options=_options(clipping="layer-wise"))
    optimizer = bkcompile.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=R, expected_batch_size=5
    )
    groups = [(members, R / math.sqrt(2)) for members in _layers([n for n, _ in model.named_parameters()])]
    for batch in (5, 3):
        x, y = _data(torch.float64, batch)
        bkcompile.mark_batch_dynamic(x, y)
        optimizer.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        optimizer.step()
        want, _ = clipped_sum(reference, F.cross_entropy, (x,), (y,), groups=groups)
        got = {k: v.grad * 5 for k, v in model.named_parameters()}
        assert_matches(got, want, torch.float64)
        assert optimizer.sensitivity == pytest.approx(R)
    report = bkcompile.last_report()
    assert "resumed after a graph break" in report.graph and "at the end of the backward" in report.clipped
    assert "clipped at the end of the backward" in str(report)


class Checkpointed(Regional):
    def __init__(self, reentrant: bool) -> None:
        super().__init__(depth=2)
        self.reentrant = reentrant

    def forward(self, ids):
        h = self.stem(ids)
        for block in self.blocks:
            h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=self.reentrant)
        return self.head(h)


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_pieces_are_exact(reentrant: bool) -> None:
    """torch.utils.checkpoint around blocks compiled one by one: each block's forward runs again in the
    backward (a recomputation of its call, not a second call) and is clipped with the others, once."""
    torch.manual_seed(11)
    model = Checkpointed(reentrant).double()
    ids, y = torch.randint(0, 11, (7, 4)), torch.randint(0, 3, (7,))
    got = _regional_grads(model, ids, y, **_options(graphs="several"))
    plain = Regional(depth=2).double()
    plain.load_state_dict(model.state_dict())
    want, norms = clipped_sum(plain, F.cross_entropy, (ids,), (y,), max_grad_norm=R)
    assert_matches(got, want, torch.float64)
    spans = bkcompile.last_clip_spans()
    assert (norms > R).any() and len(spans) == 1 and len(spans[0].params) == len(want)


class Replayed(torch.autograd.Function):
    """Identity on the logits whose backward runs a compiled block (with gradients) on other rows: a forward
    inside the backward that recomputes no call."""

    @staticmethod
    def forward(ctx, logits, block, hidden):
        ctx.block, ctx.hidden = block, hidden
        return logits.clone()

    @staticmethod
    def backward(ctx, grad):
        with torch.enable_grad():
            ctx.block(torch.randn_like(ctx.hidden))
        return grad, None, None


class ReplaysOtherRows(Regional):
    def forward(self, ids):
        h = self.blocks[0](self.stem(ids))
        return Replayed.apply(self.head(h), self.blocks[0], h.detach())


def test_forward_inside_backward_that_recomputes_no_call_is_refused() -> None:
    model = ReplaysOtherRows(depth=1)
    ids, y = torch.randint(0, 11, (7, 4)), torch.randint(0, 3, (7,))
    with pytest.raises(bkcompile.ClipOnceError, match="runs its forward inside a backward on inputs that no earlier"):
        _regional_grads(model, ids, y, **_options(graphs="several"))


class CheckpointThenFlip(Regional):
    """A reentrant checkpoint whose function moves rows after the block (seen only when it is recomputed)."""

    def forward(self, ids):
        h = self.stem(ids)
        h = torch.utils.checkpoint.checkpoint(lambda x: self.blocks[0](x).flip(0), h, use_reentrant=True)
        return self.head(h)


def test_rows_moved_inside_a_reentrant_checkpoint_are_refused() -> None:
    model = CheckpointThenFlip(depth=1)
    ids, y = torch.randint(0, 11, (7, 4)), torch.randint(0, 3, (7,))
    with pytest.raises(bkcompile.PrivacyError, match="through a checkpoint.* by FlipBackward0"):
        _regional_grads(model, ids, y, **_options(graphs="several"))


def test_graphs_of_one_backward_with_different_options_are_refused() -> None:
    model = Regional(depth=1)
    model.stem.compile(backend="bk_dp", options=_options(graphs="several", max_grad_norm=2 * R))
    for module in (model.blocks[0], model.head):
        module.compile(backend="bk_dp", options=_options(graphs="several"))
    ids, y = torch.randint(0, 11, (7, 4)), torch.randint(0, 3, (7,))
    with pytest.raises(bkcompile.PrivacyError, match="clip differently .max_grad_norm=") as info:
        F.cross_entropy(model(ids), y).backward()
    assert "fix: compile every bk_dp module of the model with the same options" in str(info.value)
    assert model.blocks[0].fc.weight.grad is None  # nothing was written


def test_rows_regrouped_between_graphs_are_refused() -> None:
    """A view between the graphs that puts two samples' positions in one row changes the batch size."""
    model = EagerBetween(lambda h: h.reshape(2 * h.shape[0], h.shape[1] // 2, h.shape[2]))
    ids = torch.randint(0, 11, (7, 4))
    compiled = copy.deepcopy(model)
    compiled.compile_regions(**_options(graphs="several", loss_reduction="sum"))
    with pytest.raises(bkcompile.PrivacyError, match=r"different batch sizes \[7, 14"):
        compiled(ids).sum().backward()


class Positions(nn.Module):
    """Position ids (1, T) built before a graph break and used after it (transformers 4.57's Llama)."""

    def __init__(self, positions) -> None:
        super().__init__()
        self.table, self.where, self.fc = nn.Embedding(11, 6), nn.Embedding(11, 6), nn.Linear(6, 3)
        self.positions = positions

    def forward(self, ids):
        h = self.table(ids)
        positions = self.positions(ids)
        torch._dynamo.graph_break()
        return self.fc(torch.tanh(h + self.where(positions)).mean(1))


def test_positions_shared_by_every_sample_pass_between_graphs() -> None:
    """arange(T)[None] holds no sample's data: the resumed graph takes it as shared, not as a batch of one."""
    torch.manual_seed(12)
    model = Positions(lambda ids: torch.arange(ids.shape[1]).unsqueeze(0)).double()
    ids, y = torch.randint(0, 11, (7, 4)), torch.randint(0, 3, (7,))
    got, _ = compiled_grads(model, (ids,), F.cross_entropy, (y,), options=_options())
    want, norms = clipped_sum(model, F.cross_entropy, (ids,), (y,), max_grad_norm=R)
    assert_matches(got, want, torch.float64)
    assert (norms > R).any() and len(bkcompile.last_clip_spans()[0].graphs) == 2


def test_a_batch_of_one_cut_from_the_samples_is_not_shared() -> None:
    """ids[:1] (cut in code dynamo does not trace) has the shape of shared position ids but holds sample 0's data:
    still a per-sample input, whose batch size disagrees. (Cut inside a graph, the slice of the batch is refused
    there.)"""
    model = Positions(torch._dynamo.disable(lambda ids: ids[:1]))
    ids, y = torch.randint(0, 11, (7, 4)), torch.randint(0, 3, (7,))
    with raises_bk(bkcompile.PrivacyError, "has 7 rows on its batch dim but 'l_positions_' has 1"):
        compiled_grads(model, (ids,), F.cross_entropy, (y,), options=_options())


def test_a_shared_input_is_checked_on_every_call() -> None:
    """The resumed graph compiled with shared position ids is reused for a tensor of the same shape that no
    bk_dp graph computed (dynamo's guards check shapes only): refused."""
    model = Positions(lambda ids: torch.arange(ids.shape[1]).unsqueeze(0))
    compiled = torch.compile(model, backend="bk_dp", options=_options())
    ids, y = torch.randint(0, 11, (7, 4)), torch.randint(0, 3, (7,))
    F.cross_entropy(compiled(ids), y).backward()
    model.positions = torch._dynamo.disable(lambda ids: ids[:1])
    with pytest.raises(bkcompile.PrivacyError, match="was compiled with input .*'position.* shared by every sample"):
        compiled(ids)


def test_defer_grads_keeps_copies_of_what_it_is_handed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The op declares no aliasing, so Inductor reuses its inputs' buffers once it returns (a bias's per-sample
    sums were overwritten before the clip under FSDP2 per block): what the piece keeps must be its own."""
    import bkcompile.runtime.deferred as deferred
    from bkcompile.compiler.options import BKOptions
    from bkcompile.plan import ClipGroup, GraphPlan, Grouping, PieceSpec
    from bkcompile.policy import ClipPolicy
    from bkcompile.runtime.ledger import GraphRecord

    joined = []
    monkeypatch.setattr(deferred, "join_piece", lambda piece, finalize: joined.append(piece))
    grouping = Grouping((ClipGroup("all", "all", (0,), 1.0, True),))
    spec = PieceSpec((0,), ("b",), "sum", False, False, False)
    record = GraphRecord((0,), ("b",), piece=True)
    record.plan = GraphPlan("piece", ClipPolicy.of(BKOptions(max_grad_norm=1.0)), grouping, spec)
    bias, sums, factor = torch.zeros(3), torch.arange(6.0).reshape(2, 3), torch.tensor(2.0)
    torch.ops.bkcompile.defer_grads([bias], [sums], factor, record.key, [], [])
    sums.fill_(-1.0)  # the buffer reused by a later kernel of the same graph
    factor.fill_(-1.0)
    (piece,) = joined
    assert torch.equal(piece.grads[0], torch.arange(6.0).reshape(2, 3))
    assert piece.factor.item() == 2.0


def _no_grad(write):
    def between(h):
        with torch.no_grad():
            write(h)
        return h

    return between


@pytest.mark.parametrize(
    "between",
    [
        _no_grad(lambda h: h.add_(h.flip(0))),
        _no_grad(lambda h: h.copy_(h.cumsum(0))),
        _no_grad(lambda h: h.index_add_(0, torch.arange(len(h)).flip(0), h.clone())),
        lambda h: torch.relu_(h * 1),
    ],
    ids=["add_flip_no_grad", "cumsum_no_grad", "index_add_no_grad", "relu_in_place"],
)
def test_in_place_writes_between_graphs_are_refused(between) -> None:
    """Writes outside autograd's record (under no_grad) are seen by the tensors' version counters; in-place ops
    in grad mode too (default-deny: write them out of place)."""
    model = EagerBetween(between)
    ids, y = torch.randint(0, 11, (7, 4)), torch.randint(0, 3, (7,))
    with pytest.raises(bkcompile.PrivacyError, match="written in place"):
        _regional_grads(model, ids, y, **_options(graphs="several"))


def test_a_gradient_hook_on_a_tensor_between_graphs_is_refused() -> None:
    def hooked(h):
        h = h * 1
        h.register_hook(lambda grad: grad.flip(0))
        return h

    model = EagerBetween(hooked)
    ids, y = torch.randint(0, 11, (7, 4)), torch.randint(0, 3, (7,))
    with pytest.raises(bkcompile.PrivacyError, match=r"with a gradient hook \(Tensor.register_hook\)"):
        _regional_grads(model, ids, y, **_options(graphs="several"))


class _Cache:
    """A Python-side cache of the previous call's activations."""

    def __init__(self) -> None:
        self.last = None

    def __call__(self, h):
        out = h if self.last is None else h + self.last
        self.last = h.detach()
        return out


@pytest.mark.parametrize(
    "between",
    [
        lambda h: h - h.detach().mean(0),
        lambda h: h * h.detach().std(0),
        lambda h: 0.5 * h,
        _Cache(),
    ],
    ids=["detached_batch_mean", "detached_batch_std", "python_number", "cached_activation"],
)
def test_an_operand_outside_autograds_record_between_graphs_is_refused(between) -> None:
    """Default-deny between pieces: add/sub keep no operand to look at, so an untraced one (a detached batch
    statistic, a cache, a constant) cannot be proved per-sample; compile that code instead."""
    model = EagerBetween(between)
    ids, y = torch.randint(0, 11, (7, 4)), torch.randint(0, 3, (7,))
    with pytest.raises(bkcompile.PrivacyError, match="with an operand outside autograd's record"):
        for _ in range(2):  # the cache has something from the second call on
            _regional_grads(model, ids, y, **_options(graphs="several"))


class _BufferBetween(Regional):
    """A module buffer written from a batch statistic in eager code between the blocks, then subtracted."""

    def __init__(self) -> None:
        super().__init__(depth=2)
        self.register_buffer("centre", torch.zeros(6))

    def forward(self, ids):
        h = self.stem(ids)
        for block in self.blocks:
            h = block(h)
            with torch.no_grad():
                self.centre.copy_(h.mean((0, 1)))
            h = h - self.centre
        return self.head(h)


def test_a_buffer_written_from_a_batch_statistic_between_graphs_is_refused() -> None:
    ids, y = torch.randint(0, 11, (7, 4)), torch.randint(0, 3, (7,))
    with pytest.raises(bkcompile.PrivacyError, match="SubBackward0, with an operand outside autograd's record"):
        _regional_grads(_BufferBetween(), ids, y, **_options(graphs="several"))


def test_a_write_through_data_between_graphs_is_the_one_road_not_seen() -> None:
    """Documented in the README: ``.data`` has a version counter of its own, so a write through it between
    compiled modules is not seen (and trains mixed rows). This pins the gap: if it starts being refused, the
    README's table changes with it."""

    def through_data(h):
        h.data.add_(h.data.flip(0))
        return h

    model = EagerBetween(through_data)
    ids, y = torch.randint(0, 11, (7, 4)), torch.randint(0, 3, (7,))
    grads = _regional_grads(model, ids, y, **_options(graphs="several"))
    assert all(g is not None for g in grads.values())
