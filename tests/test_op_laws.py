"""Sweep over the op-law table: every op's batch rule against torch.func.vmap on random inputs.

For each op an example call on a batch of B samples (dim 0 of the per-sample tensors; parameters shared);
the rule gives the output's fact. vmap runs the same call on each sample as a batch of one, and
- ``Batched(k, inner, outer)``: sample i's rows of dim k (seen as (outer, B, inner)) are vmap's result i;
- ``Reduced``: the output is the sum over samples of vmap's results (or their mean, for a mean);
- a refused op raises the rule's error.
Ops whose values are random or uninitialised are checked for shape only; ops that cannot run here are
listed in NOT_SWEPT with the reason. VARIANTS holds more cases of ops in CASES: other laws of the same op (the
sample axis indexed by the sample's own index) and the spellings Inductor's decompositions give the graph before
the pass (``prims.iota`` for ``arange``, a ``slice_scatter`` over the whole batch for the gradient of ``x[:]``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import sympy
import torch
import torch._inductor.inductor_prims  # noqa: F401  (registers prims._low_memory_max_pool_*)
import torch.fx
from bkcompile.passes.facts import Batched, Reduced, Replicated
from bkcompile.passes.ops import LAWS, RuleInput, rule_for
from torch.func import vmap

import bkcompile

aten = torch.ops.aten
prims = torch.ops.prims
B = 3
F64 = torch.float64


@dataclasses.dataclass(frozen=True)
class T:
    """A tensor argument: per-sample (``batched``: B is prepended) or shared; ``make(shape)`` fills it."""

    shape: tuple
    batched: bool
    make: Callable[[tuple], torch.Tensor] = lambda shape: torch.randn(shape, dtype=F64)


def S(*shape: int, make=None) -> T:
    return T(shape, True, make or T.make)


def R(*shape: int, make=None) -> T:
    return T(shape, False, make or T.make)


def ints(high: int) -> Callable:
    return lambda shape: torch.randint(0, high, shape)


def bools(shape: tuple) -> torch.Tensor:
    return torch.rand(shape) < 0.5


def positive(shape: tuple) -> torch.Tensor:
    return torch.rand(shape, dtype=F64) + 0.5


@dataclasses.dataclass(frozen=True)
class Dep:
    """A non-tensor argument that depends on the batch size (sizes that name it)."""

    of: Callable[[int], Any]


@dataclasses.dataclass(frozen=True)
class Zeros:
    """A shared tensor of zeros with B rows in front (the buffer a gradient is written into): no sample data, so
    replicated; one row in each per-sample call."""

    shape: tuple

    def build(self, batch: int) -> torch.Tensor:
        return torch.zeros((batch, *self.shape), dtype=F64)


@dataclasses.dataclass(frozen=True)
class Own:
    """The sample's own index: ``arange(B)`` made by ``op`` (``aten.arange``, or ``prims.iota`` as Inductor spells
    it), unsqueezed to ``rank`` dims with B on ``dim`` (``batch_idx[:, None, None, None]``); replicated, and
    ``arange(1)`` in each per-sample call."""

    op: Any
    rank: int = 1
    dim: int = 0

    def build(self, batch: int) -> torch.Tensor:
        return torch.arange(batch).view([batch if d == self.dim else 1 for d in range(self.rank)])

    def nodes(self, graph: torch.fx.Graph, batch: int) -> torch.fx.Node:
        kwargs = {}
        if self.op is prims.iota.default:  # prims.iota(length, *, start, step, dtype, device, requires_grad)
            kwargs = dict(start=0, step=1, dtype=torch.int64, device=torch.device("cpu"), requires_grad=False)
        node = graph.call_function(self.op, (batch,), kwargs)
        node.meta["val"] = torch.arange(batch)
        for at in [0] * self.dim + [-1] * (self.rank - 1 - self.dim):
            node = graph.call_function(aten.unsqueeze.default, (node, at))
            node.meta["val"] = node.args[0].meta["val"].unsqueeze(at)
        return node


@dataclasses.dataclass(frozen=True)
class Case:
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    values: bool = True  # False: random or uninitialised outputs, shapes only
    refused: type | None = None  # the rule refuses the op here
    checked_by: tuple = ()  # ops that read the result in the graph, in a chain (a runtime assertion)


def C(*args: Any, **kwargs: Any) -> Case:
    return Case(args, kwargs)


X = S(4, 5)  # a per-sample matrix
POOL = S(2, 6, 6)  # a per-sample image (C, H, W)
POOL3 = S(2, 4, 4, 4)
BN = (S(3, 4), R(3), R(3), R(3, make=lambda s: torch.zeros(s, dtype=F64)), R(3, make=positive))

CASES: dict[Any, Case] = {
    # pointwise
    aten.add.Tensor: C(X, R(5)),
    aten.add.Scalar: C(X, 2.0),
    aten.sub.Tensor: C(X, S(4, 5)),
    aten.sub.Scalar: C(X, 2.0),
    aten.mul.Tensor: C(X, R(4, 1)),
    aten.mul.Scalar: C(X, 3.0),
    aten.div.Tensor: C(X, R(5, make=positive)),
    aten.div.Scalar: C(X, 3.0),
    aten.neg.default: C(X),
    aten.where.self: C(S(4, 5, make=bools), X, R(5)),
    aten.masked_fill.Scalar: C(X, S(4, 5, make=bools), 0.0),
    aten.clone.default: C(X),
    aten.alias.default: C(X),
    aten.detach.default: C(X),
    aten.lift_fresh_copy.default: C(X),
    aten._to_copy.default: C(X, dtype=torch.float32),
    prims.convert_element_type.default: C(X, torch.float32),
    aten.zeros_like.default: C(X),
    aten.ones_like.default: C(X),
    aten.full_like.default: C(X, 2.0),
    aten.empty_like.default: Case((X,), values=False),
    aten.new_zeros.default: C(X, [2, 3]),
    aten.new_ones.default: C(X, [2, 3]),
    aten.new_full.default: C(X, [2, 3], 4.0),
    aten.new_empty.default: Case((X, [2, 3]), values=False),
    aten.rand_like.default: Case((X,), values=False),
    aten.randn_like.default: Case((X,), values=False),
    aten.bernoulli.default: Case((S(4, 5, make=lambda s: torch.rand(s, dtype=F64)),), values=False),
    aten.bernoulli.p: Case((X, 0.5), values=False),
    aten.native_dropout.default: Case((X, 0.5, True), values=False),
    # views
    aten.view.default: C(X, [-1, 20]),
    aten._unsafe_view.default: C(X, [-1, 2, 10]),
    aten.reshape.default: C(X, [-1, 5]),
    aten.squeeze.dim: C(S(4, 1), 2),
    aten.squeeze.dims: C(S(4, 1), [2]),
    aten.unsqueeze.default: C(X, 1),
    aten.flatten.using_ints: C(S(2, 3, 4), 1, 2),
    aten.unflatten.int: C(X, 2, [5, 1]),
    aten.expand.default: C(S(4, 1), [-1, 4, 6]),
    aten.permute.default: C(S(2, 3, 4), [0, 3, 1, 2]),
    aten.t.default: C(S(5)),  # (B, 5) -> (5, B)
    aten.transpose.int: C(X, 1, 2),
    aten.select.int: C(X, 1, 2),
    aten.select_backward.default: C(S(5), Dep(lambda b: [b, 4, 5]), 1, 2),
    aten.slice.Tensor: C(X, 2, 1, 4),
    aten.slice_backward.default: C(S(4, 3), Dep(lambda b: [b, 4, 5]), 2, 1, 4, 1),
    aten.select_scatter.default: C(X, S(5), 1, 2),
    aten.slice_scatter.default: C(X, S(4, 2), 2, 1, 3),
    aten.copy.default: C(X, S(4, 5)),
    aten.constant_pad_nd.default: C(X, [1, 2]),
    aten.split.Tensor: C(X, 2, 1),
    aten.split_with_sizes.default: C(X, [2, 3], 2),
    aten.unbind.int: C(X, 1),
    aten.cat.default: C([X, S(4, 2)], 2),
    aten.stack.default: C([X, S(4, 5)], 1),
    aten.flip.default: C(X, [2]),  # along a per-sample dim (a bidirectional RNN's time axis)
    prims.rev.default: C(X, [1, 2]),  # flip as Inductor's decompositions spell it
    # reductions
    aten.sum.dim_IntList: C(X, [0]),
    aten.mean.dim: C(X, [0, 2]),
    aten.sum.default: C(X),
    aten.mean.default: C(X),
    aten.amax.default: C(X, [2]),
    aten.amin.default: C(X, [1], True),
    aten.logsumexp.default: C(X, [2]),
    aten.var.correction: C(X, [2]),
    aten.std.correction: C(X, [1], correction=0),
    aten.linalg_vector_norm.default: C(X, 2, [2]),
    aten.var_mean.correction: C(X, [2]),
    aten.argmax.default: C(X, 2),
    aten.argmin.default: C(X, 1),
    aten.max.dim: C(X, 2),
    aten.min.dim: C(X, 1),
    aten.all.dim: C(S(4, 5, make=bools), 2),
    aten.any.dim: C(S(4, 5, make=bools), 1),
    aten.all.dims: C(S(4, 5, make=bools), [2]),
    aten.any.dims: C(S(4, 5, make=bools), [1, 2]),
    aten.max.default: Case((X,), refused=bkcompile.SampleMixingError),  # over every dim: the samples' too
    aten.min.default: Case((X,), refused=bkcompile.SampleMixingError),
    aten.prod.default: Case((X,), refused=bkcompile.SampleMixingError),
    aten.all.default: Case((S(4, make=bools),), refused=bkcompile.SampleMixingError),
    aten.any.default: Case((S(4, make=bools),), refused=bkcompile.SampleMixingError),
    aten._softmax.default: C(X, 2, False),
    aten._safe_softmax.default: C(X, 2),
    aten._log_softmax.default: C(X, 1, False),
    aten._softmax_backward_data.default: C(X, S(4, 5), 2, F64),
    aten._log_softmax_backward_data.default: C(X, S(4, 5), 2, F64),
    aten.cumsum.default: C(X, 2),
    aten.glu.default: C(S(4, 6), 2),
    aten.glu_backward.default: C(S(4, 3), S(4, 6), 2),
    aten.sort.default: C(X, 2),
    aten.sort.stable: C(X, stable=True, dim=1, descending=True),
    aten.triu.default: C(S(4, 5), 1),
    aten.tril.default: C(S(4, 5), -1),
    # matrix products
    aten.mm.default: C(S(5), R(5, 3)),  # (B, 5) @ (5, 3): rows are samples
    aten.bmm.default: C(X, S(5, 2)),
    aten.mv.default: C(S(5), R(5)),  # (B, 5) @ (5,): rows are samples
    aten.addmm.default: C(R(3), S(5), R(5, 3)),
    # normalisation
    aten.native_layer_norm.default: C(X, [5], R(5), R(5), 1e-5),
    aten.native_group_norm.default: C(S(4, 6), R(4), R(4), Dep(lambda b: b), 4, 6, 2, 1e-5),
    aten._native_batch_norm_legit_no_training.default: C(*BN, 0.1, 1e-5),
    aten.native_batch_norm.default: C(*BN, False, 0.1, 1e-5),
    aten._native_batch_norm_legit.default: Case((*BN, True, 0.1, 1e-5), refused=bkcompile.SampleMixingError),
    aten._native_batch_norm_legit_functional.default: Case((*BN, True, 0.1, 1e-5), refused=bkcompile.SampleMixingError),
    aten._native_batch_norm_legit.no_stats: Case(
        (BN[0], None, None, True, 0.1, 1e-5), refused=bkcompile.SampleMixingError
    ),
    # losses
    aten.nll_loss_forward.default: C(S(4), S(make=ints(4)), None, 2, -100),
    aten.nll_loss_backward.default: C(R(), S(4), S(make=ints(4)), None, 2, -100, R()),
    aten.mse_loss.default: C(S(4), S(4), 1),
    aten.mse_loss_backward.default: C(R(), S(4), S(4), 2),
    # embeddings and convolutions
    aten.embedding.default: C(R(10, 3), S(4, make=ints(10))),
    aten.embedding_dense_backward.default: C(S(4, 3), S(4, make=ints(10)), 10, -1, False),
    aten.convolution.default: C(POOL, R(3, 2, 3, 3), R(3), [1, 1], [0, 0], [1, 1], False, [0, 0], 1),
    aten.convolution_backward.default: C(
        S(3, 4, 4), POOL, R(3, 2, 3, 3), [3], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, True]
    ),
    aten.avg_pool1d.default: C(S(2, 6), [2]),
    aten.max_pool1d.default: C(S(2, 6), [2]),
    aten.max_pool2d_with_indices.default: C(POOL, [2, 2]),
    aten.max_pool2d_with_indices_backward.default: C(
        S(2, 3, 3), POOL, [2, 2], [2, 2], [0, 0], [1, 1], False, S(2, 3, 3, make=ints(36))
    ),
    aten.avg_pool2d.default: C(POOL, [2, 2]),
    aten.avg_pool2d_backward.default: C(S(2, 3, 3), POOL, [2, 2], [2, 2], [0, 0], False, True, None),
    aten._adaptive_avg_pool2d.default: C(POOL, [2, 2]),
    aten._adaptive_avg_pool2d_backward.default: C(S(2, 2, 2), POOL),
    aten.adaptive_max_pool2d.default: C(POOL, [2, 2]),
    aten.adaptive_max_pool2d_backward.default: C(S(2, 2, 2), POOL, S(2, 2, 2, make=ints(36))),
    aten.upsample_nearest2d.default: C(POOL, [12, 12]),
    aten.upsample_nearest2d.vec: C(POOL, [12, 12], None),
    aten.upsample_nearest2d_backward.default: C(S(2, 12, 12), [12, 12], Dep(lambda b: [b, 2, 6, 6])),
    aten.upsample_bilinear2d.default: C(POOL, [12, 12], False),
    aten.upsample_bilinear2d.vec: C(POOL, [12, 12], False, None),
    aten.upsample_bilinear2d_backward.default: C(S(2, 12, 12), [12, 12], Dep(lambda b: [b, 2, 6, 6]), False),
    aten.reflection_pad2d.default: C(POOL, [1, 1, 1, 1]),
    aten.reflection_pad2d_backward.default: C(S(2, 8, 8), POOL, [1, 1, 1, 1]),
    aten.replication_pad2d.default: C(POOL, [1, 1, 1, 1]),
    aten.replication_pad2d_backward.default: C(S(2, 8, 8), POOL, [1, 1, 1, 1]),
    aten.max_pool3d_with_indices.default: C(POOL3, [2, 2, 2]),
    aten.max_pool3d_with_indices_backward.default: C(
        S(2, 2, 2, 2), POOL3, [2, 2, 2], [2, 2, 2], [0, 0, 0], [1, 1, 1], False, S(2, 2, 2, 2, make=ints(64))
    ),
    aten.avg_pool3d.default: C(POOL3, [2, 2, 2]),
    # Inductor's max pooling: values and offsets in the window, then offsets to indices in the plane
    prims._low_memory_max_pool_with_offsets.default: C(POOL, [2, 2], [2, 2], [0, 0], [1, 1], False),
    prims._low_memory_max_pool_offsets_to_indices.default: C(
        S(2, 3, 3, make=lambda s: torch.randint(0, 4, s, dtype=torch.int8)), [2, 2], [6, 6], [2, 2], [0, 0], [1, 1]
    ),
    aten.avg_pool3d_backward.default: C(S(2, 2, 2, 2), POOL3, [2, 2, 2], [2, 2, 2], [0, 0, 0], False, True, None),
    aten._adaptive_avg_pool3d.default: C(POOL3, [2, 2, 2]),
    aten._adaptive_avg_pool3d_backward.default: C(S(2, 2, 2, 2), POOL3),
    # attention (the CPU kernel)
    aten._scaled_dot_product_flash_attention_for_cpu.default: C(S(2, 4, 8), S(2, 4, 8), S(2, 4, 8)),
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: C(
        S(2, 4, 8), S(2, 4, 8), S(2, 4, 8), S(2, 4, 8), S(2, 4, 8), S(2, 4), 0.0, False
    ),
    # indexing
    aten.index.Tensor: C(R(10, 3), [S(4, make=ints(10))]),  # a lookup by per-sample indices
    aten._unsafe_index.Tensor: C(X, [None, R(3, make=ints(4))]),  # a fixed gather along a per-sample dim
    aten.index_put.default: C(X, [None, R(2, make=ints(4))], S(2, 5), True),
    aten._unsafe_index_put.default: C(X, [None, None, R(2, make=ints(5))], S(4, 2), True),
    # gather and scatter along a per-sample dim (a scatter's indices distinct where writes would collide)
    aten.gather.default: C(X, 2, S(4, 3, make=ints(5))),
    aten.scatter_add.default: C(X, 2, S(4, 3, make=ints(5)), S(4, 3)),
    aten.scatter.src: C(X, 1, S(2, 5, make=lambda s: torch.rand(s[0], 4, s[2]).argsort(1)[:, :2]), S(2, 5)),
    aten.scatter.value: C(X, 2, S(4, 1, make=ints(5)), 1.0),
}

# More cases of ops in CASES, by name: other laws of the op, and Inductor's spellings
VARIANTS: dict[str, tuple[Any, Case]] = {
    # the sample axis indexed by the sample's own index (x[arange(B), j]), arange or Inductor's iota
    "index-own-arange": (aten.index.Tensor, C(S(6), [Own(aten.arange.default), S(make=ints(6))])),
    "index-own-iota": (aten.index.Tensor, C(S(6), [Own(prims.iota.default), S(make=ints(6))])),
    # transformers' padding mask: padding_mask[batch_idx[:, None, None, None], kv_idx[None, None, None, :]]
    "index-own-iota-broadcast": (
        aten.index.Tensor,
        C(S(8, make=bools), [Own(prims.iota.default, rank=4), R(1, 1, 1, 8, make=ints(8))]),
    ),
    "index-own-iota-against-another-axis": (
        aten.index.Tensor,
        Case(
            (S(6, 6), [Own(prims.iota.default, rank=2, dim=1), S(1, make=ints(6))]), refused=bkcompile.SampleMixingError
        ),
    ),
    "index_put-own-iota": (
        aten.index_put.default,
        C(Zeros((4, 3)), [Own(prims.iota.default), S(make=ints(4))], S(3), True),
    ),
    # the gradient of x[:] with a symbolic batch, as Inductor decomposes slice_backward: the whole batch dim
    "slice_scatter-whole-batch": (aten.slice_scatter.default, C(Zeros((4, 5)), X, 0, 0, Dep(lambda b: b))),
    "slice_scatter-part-of-batch": (
        aten.slice_scatter.default,
        Case((X, R(1, 4, 5), 0, 0, 1), refused=bkcompile.SampleMixingError),
    ),
    # stack over a new leading dim, flattened: the gradient of unbind (an RNN's steps) as Inductor decomposes it
    # an in-place slice assignment, functionalized: copy(mask[..., :n], v) (a shared v, or a per-sample v into a
    # mask of B shared rows, as transformers 4.50's Llama builds its padding mask); src broadcast onto other axes
    # than the batch mixes samples
    "copy-shared-into-per-sample": (aten.copy.default, C(X, R(5))),
    "copy-per-sample-into-shared-rows": (aten.copy.default, C(Zeros((4, 5)), X)),
    "copy-batch-onto-another-axis": (
        aten.copy.default,
        Case((S(3, 5), S(5)), refused=bkcompile.SampleMixingError),
    ),
    "cat-blocks-of-the-batch": (aten.cat.default, C([S(5), S(5), S(5)], 0)),
    "cat-batch-and-shared-rows": (aten.cat.default, Case(([X, R(1, 4, 5)], 0), refused=bkcompile.SampleMixingError)),
    "select_scatter-batch": (
        aten.select_scatter.default,
        Case((X, R(4, 5), 0, 0), refused=bkcompile.SampleMixingError),
    ),
    "max-pool-3d-low-memory": (
        prims._low_memory_max_pool_with_offsets.default,
        C(POOL3, [2, 2, 2], [2, 2, 2], [0, 0, 0], [1, 1, 1], False),
    ),
    # max_pool2d_with_indices_backward as Inductor decomposes it: scattered into zeros along each flat plane
    "scatter_add-into-zeros": (aten.scatter_add.default, C(Zeros((4, 9)), 2, S(4, 3, make=ints(9)), S(4, 3))),
    "flip-along-batch": (aten.flip.default, Case((X, [0, 1]), refused=bkcompile.SampleMixingError)),
    "rev-along-batch": (prims.rev.default, Case((X, [0]), refused=bkcompile.SampleMixingError)),
    "sort-along-batch": (aten.sort.default, Case((X, 0), refused=bkcompile.SampleMixingError)),
    "triu-over-batch": (aten.triu.default, Case((S(5),), refused=bkcompile.SampleMixingError)),
    # all/any over the batch read by assertions alone (F.one_hot's range checks): no computation reads the value,
    # so there is no per-sample value to compare, only the shape (aot spelling, then Inductor's not-any-not)
    "all-asserted": (
        aten.all.default,
        Case((S(4, make=bools),), values=False, checked_by=(aten._assert_async.msg,)),
    ),
    "any-dims-asserted-through-not": (
        aten.any.dims,
        Case(
            (S(4, make=bools), [0, 1]),
            values=False,
            checked_by=(aten.logical_not.default, aten._assert_async.msg),
        ),
    ),
    "any-dims-over-batch-read": (aten.any.dims, Case((S(4, make=bools), [0, 1]), refused=bkcompile.SampleMixingError)),
    "gather-along-batch": (
        aten.gather.default,
        Case((X, 0, S(4, 5, make=ints(B))), refused=bkcompile.SampleMixingError),
    ),
    "scatter_add-along-batch": (
        aten.scatter_add.default,
        Case((X, 0, S(4, 5, make=ints(B)), S(4, 5)), refused=bkcompile.SampleMixingError),
    ),
}

NOT_SWEPT = {
    # squeezing every size-1 dim also squeezes a batch of one: no per-sample call to compare with
    aten.squeeze.default: "checked by the model tests (tests/test_models.py)",
} | {
    op: "a CUDA kernel (its rule is checked on meta tensors in test_attention_rules.py)"
    for op in (
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_flash_attention_backward.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_efficient_attention_backward.default,
        aten._scaled_dot_product_cudnn_attention.default,
        aten._scaled_dot_product_cudnn_attention_backward.default,
    )
}


def test_every_op_in_the_table_is_swept() -> None:
    missing = [str(op) for op in LAWS if op not in CASES and op not in NOT_SWEPT]
    assert not missing, f"ops with a law but no sweep case: {missing}"


def _build(value: Any, batch: int) -> Any:
    if isinstance(value, T):
        return value.make(((batch,) if value.batched else ()) + tuple(value.shape))
    if isinstance(value, Dep):
        return value.of(batch)
    if isinstance(value, (Zeros, Own)):
        return value.build(batch)
    if isinstance(value, (list, tuple)):
        return type(value)(_build(v, batch) for v in value)
    return value


def _tensors(spec: Any, built: Any) -> list[tuple[T, torch.Tensor]]:
    """The tensor leaves of an argument, each with its spec."""
    if isinstance(spec, T):
        return [(spec, built)]
    if isinstance(spec, (list, tuple)):
        return [leaf for s, b in zip(spec, built) for leaf in _tensors(s, b)]
    return []


def _facts_of(op: Any, case: Case, args: tuple, out: Any) -> Any:
    graph = torch.fx.Graph()
    facts = {}

    def node_of(spec: Any, value: Any) -> Any:
        if isinstance(spec, T):
            node = graph.placeholder(f"t{len(facts)}")
            node.meta["val"] = value
            facts[node] = Batched(0) if spec.batched else Replicated()
            return node
        if isinstance(spec, Zeros):
            node = graph.placeholder(f"t{len(facts)}")
            node.meta["val"] = value
            facts[node] = Replicated()
            return node
        if isinstance(spec, Own):
            node = spec.nodes(graph, B)
            facts[node] = Replicated()
            return node
        if isinstance(spec, (list, tuple)):
            return type(value)(node_of(s, v) for s, v in zip(spec, value))
        return value

    node = graph.call_function(op, node_of(case.args, args), case.kwargs)
    node.meta["val"] = out
    user = node
    for reader in case.checked_by:
        user = graph.call_function(reader, (user, "check") if reader is aten._assert_async.msg else (user,))
    return rule_for(op)(RuleInput(node=node, batch=sympy.Integer(B), facts=facts))


def _per_sample(op: Any, case: Case, args: tuple) -> Any:
    """vmap over the samples of the op called on each sample as a batch of one."""
    leaves = _tensors(case.args, args)
    batched = [t for spec, t in leaves if spec.batched]

    def one(*samples: torch.Tensor) -> Any:
        it = iter(samples)

        def rebuild(spec: Any, value: Any) -> Any:
            if isinstance(spec, T):
                return next(it).unsqueeze(0) if spec.batched else value
            if isinstance(spec, Dep):
                return spec.of(1)
            if isinstance(spec, (Zeros, Own)):
                return spec.build(1)
            if isinstance(spec, (list, tuple)):
                return type(value)(rebuild(s, v) for s, v in zip(spec, value))
            return value

        return op(*rebuild(case.args, args), **case.kwargs)

    return vmap(one, randomness="different")(*batched)


def _check(fact: Any, out: torch.Tensor, per: torch.Tensor, values: bool, op: Any) -> None:
    if isinstance(fact, Batched):
        size = out.shape[fact.dim]
        outer, inner = int(fact.outer), int(fact.inner)
        assert size == outer * B * inner, (op, fact, out.shape)
        rows = out.unflatten(fact.dim, (outer, B, inner))
        for i in range(B):
            mine = per[i].unflatten(fact.dim, (outer, 1, inner)).select(fact.dim + 1, 0)
            got = rows.select(fact.dim + 1, i)
            assert got.shape == mine.shape, (op, fact, got.shape, mine.shape)
            if values:
                torch.testing.assert_close(got, mine, msg=lambda m: f"{op} {fact}: {m}")
    elif isinstance(fact, Replicated):  # the same for every sample
        for i in range(B):
            assert out.shape == per[i].shape, (op, out.shape, per[i].shape)
            if values:
                torch.testing.assert_close(out, per[i], msg=lambda m: f"{op} {fact}: {m}")
    elif isinstance(fact, Reduced) and values:
        total = per.sum(0).to(out.dtype) if out.is_floating_point() else per.sum(0)
        assert out.shape == total.shape, (op, out.shape, total.shape)
        if out.is_floating_point() and not torch.allclose(out, total):
            torch.testing.assert_close(out, total / B, msg=lambda m: f"{op} {fact} (a mean): {m}")
        elif not out.is_floating_point():
            assert torch.equal(out, total)


SWEEP = [pytest.param(op, case, id=str(op)) for op, case in CASES.items()] + [
    pytest.param(op, case, id=name) for name, (op, case) in VARIANTS.items()
]


@pytest.mark.parametrize(("op", "case"), SWEEP)
def test_rule_agrees_with_vmap(op: Any, case: Case) -> None:
    torch.manual_seed(0)
    args = _build(case.args, B)
    out = op(*args, **case.kwargs)
    if case.refused is not None:
        with pytest.raises(case.refused):
            _facts_of(op, case, args, out)
        return
    facts = _facts_of(op, case, args, out)
    per = _per_sample(op, case, args)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    pers = per if isinstance(per, (tuple, list)) else (per,)
    fact_list = facts if isinstance(facts, tuple) else (facts,)
    assert len(fact_list) == len(outs), (op, facts)
    checked = 0
    for fact, value, mine in zip(fact_list, outs, pers):
        if isinstance(value, torch.Tensor) and value.numel():
            _check(fact, value, mine, case.values, op)
            checked += 1
    assert checked, f"{op}: no per-sample or summed output was checked ({facts})"
