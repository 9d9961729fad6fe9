"""Per-sample norms, clip factors and the weighted reductions (passes 4-6 of the pipeline).

For each trainable parameter the pass forms ``||G_i||^2``, the squared norm of sample i's gradient, by
one of two strategies:

- ``ghost``: a parameter with one site whose kind has a ghost norm (``site_kinds``); book-keeping then
  re-emits the site with its per-sample operand scaled by w_i, so the one reduction gives sum_i w_i G_i::

      before:  grad = mm(t(grad_out), act)
      after:   grad = mm(t(grad_out) * w[rows], act)

- ``explicit``: the per-sample gradients G_i (B, *param shape) are formed (the sum over the sites of a
  parameter used at several places, with the views between them replayed per sample); the norm is
  taken from them and the gradient becomes ``sum_i w_i G_i``, one matrix-vector product.

Clipping, per clipping group g: ``n_ig = s * sqrt(sum over the group's parameters ||G_i||^2) / S`` (s: the
loss scale of the reduction, S: a GradScaler's loss scale, read at run time), ``C_ig = min(1, R_g / (n_ig +
1e-6))`` (or automatic clipping), ``w_i = s * C_ig`` for the group's parameters (the sum stays scaled by S).
Norms are accumulated in float32 (float64 when the model is float64).
"""

from __future__ import annotations

import torch
import torch.fx
from bkcompile.passes.cost import ParamPlan, Strategy
from bkcompile.passes.emit import Emitter
from bkcompile.passes.groups import Grouping
from bkcompile.passes.joint import JointGraph
from bkcompile.passes.loss import LossScale, ScaleKind
from bkcompile.passes.site_kinds.common import Size, static_shape
from bkcompile.passes.site_kinds.embedding import mask_padding, per_sample_tables
from bkcompile.passes.sites import ParamGrad, linear_term, preserved_operand

import bkcompile.norms  # noqa: F401  (registers bkcompile::record_norms and bkcompile::loss_scale)
from bkcompile.errors import NotSupportedYetError, node_error
from bkcompile.options import BKOptions

aten = torch.ops.aten
EPS = 1e-6
_SHAPE_ONLY = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.unsqueeze.default,
}
_IDENTITY = {aten.clone.default, aten.alias.default, aten.detach.default}


def acc_dtype(params: list[ParamGrad]) -> torch.dtype:
    """float64 when a site's operands or a gradient are float64 (a convolution site's operands sit behind its
    convolution_backward: the gradient's dtype says it), else float32."""
    dtypes = {
        a.meta["val"].dtype
        for p in params
        for s in p.sites
        for a in s.node.all_input_nodes
        if isinstance(a.meta.get("val"), torch.Tensor)
    } | {p.grad.meta["val"].dtype for p in params}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _lift(emit: Emitter, node: torch.fx.Node, value: torch.fx.Node) -> torch.fx.Node:
    """Apply the norm-preserving op ``node`` to per-sample values (B, *shape of its input)."""
    if node.target in _SHAPE_ONLY:
        return emit(aten.reshape.default, value, [-1, *static_shape(node)])
    if node.target in _IDENTITY:
        return value
    if node.target in (aten._to_copy.default, torch.ops.prims.convert_element_type.default):
        return emit.to_dtype(value, node.meta["val"].dtype)
    if node.target in (aten.slice_backward.default, aten.select_backward.default):
        _, sizes, dim, *rest = node.args
        return emit(node.target, value, [emit.size(value, 0), *sizes], dim % len(sizes) + 1, *rest)
    if node.target in (aten.slice_scatter.default, aten.select_scatter.default):  # into zeros
        _, _, dim, *rest = node.args
        out = node.meta["val"]
        zeros = emit(
            aten.zeros.default, [emit.size(value, 0), *out.shape], dtype=value.meta["val"].dtype, device=out.device
        )
        return emit(node.target, zeros, value, dim % out.dim() + 1, *rest)
    ndim = node.meta["val"].dim()
    order = list(range(ndim))
    if node.target == aten.permute.default:
        order = [d % ndim for d in node.args[1]]
    elif node.target == aten.t.default:
        order = order[::-1]
    elif node.target == aten.transpose.int:
        a, b = (d % ndim for d in node.args[1:3])
        order[a], order[b] = order[b], order[a]
    else:
        raise node_error(  # sites.NORM_PRESERVING lets through an op that has no per-sample form here
            NotSupportedYetError,
            node,
            "the parameter's gradient passes through this op, which has no per-sample form for explicit norms yet",
            "use strategy='ghost' if the parameter has a single site, or freeze the parameter",
        )
    return emit(aten.permute.default, value, [0] + [d + 1 for d in order])


def _lift_linear(
    emit: Emitter, node: torch.fx.Node, term: torch.fx.Node, value: torch.fx.Node, batch: Size
) -> torch.fx.Node:
    """Apply the linear map ``node`` (``sites.LINEAR_MAPS``) of ``term`` to its per-sample values ``value``
    (B, *shape of ``term``)."""
    if node.target == aten.sum.dim_IntList:
        ndim = node.args[0].meta["val"].dim()
        dims = [d % ndim + 1 for d in node.args[1]]
        return emit(aten.sum.dim_IntList, value, dims, *node.args[2:])
    if node.target == aten.embedding_dense_backward.default:
        _, indices, vocab, padding_idx = node.args[:4]
        rows = emit(aten.reshape.default, value, [batch, -1, value.meta["val"].shape[-1]])  # (B, n, d)
        index = emit(aten.reshape.default, indices, [1, -1])  # the n indices every sample shares
        return per_sample_tables(emit, mask_padding(emit, rows, index, padding_idx), index, vocab, batch)
    return emit(node.target, *[value if a is term else a for a in node.args])  # a scaling


def per_sample_grad(emit: Emitter, joint: JointGraph, node: torch.fx.Node, sites: dict, batch: Size, dtype):
    """The per-sample gradient (B, *shape of ``node``) of the gradient tree under ``node``."""
    if node in sites:
        return sites[node].kind.per_sample(emit, joint, node, batch, dtype)
    if node.target is aten.add.Tensor:
        left, right = (per_sample_grad(emit, joint, a, sites, batch, dtype) for a in node.args)
        return emit(aten.add.Tensor, left, right)
    term = linear_term(joint, node)
    if term is not None:  # the same linear map for every sample: apply it to each sample's values
        return _lift_linear(emit, node, term, per_sample_grad(emit, joint, term, sites, batch, dtype), batch)
    return _lift(emit, node, per_sample_grad(emit, joint, preserved_operand(node), sites, batch, dtype))


def erase_dead(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Erase ``node`` and the inputs only it used; a convolution_backward loses the outputs nobody reads."""
    if node.users or node.op != "call_function":
        return
    inputs = node.all_input_nodes
    graph.erase_node(node)
    for value in inputs:
        if value.target == aten.convolution_backward.default and value.users:
            _drop_unread_outputs(graph, value)
        erase_dead(graph, value)


def _drop_unread_outputs(graph: torch.fx.Graph, conv: torch.fx.Node) -> None:
    read = {user.args[1] for user in conv.users}
    mask = [m and i in read for i, m in enumerate(conv.args[10])]
    conv.args = (*conv.args[:10], mask)
    conv.meta["val"] = tuple(v if mask[i] else None for i, v in enumerate(conv.meta["val"]))


def clip_weights(
    emit: Emitter,
    squares: dict[str, torch.fx.Node],
    grouping: Grouping,
    key: int,
    factor: torch.fx.Node | None,
    options: BKOptions,
) -> dict[str, torch.fx.Node]:
    """Each parameter's weights w_i = s * C_i^g (B,) from the squared norms of its per-sample gradients.

    Group norms ``n_ig = s * sqrt(sum over the group's parameters) / S`` (S: ``loss_scale``, the
    GradScaler's scale or 1) go through ``record_norms``, which returns the group's current threshold
    R_g; ``C_ig = min(1, R_g / (n_ig + 1e-6))`` ("abadi") or ``R_g / (n_ig + gamma)`` ("automatic").
    """
    columns = []
    scaled = emit(torch.ops.bkcompile.loss_scale.default, next(iter(squares.values())), key)
    for group, members in enumerate(grouping.members):  # each group on its own: no group waits for another
        total = squares[members[0]]
        for member in members[1:]:
            total = emit(aten.add.Tensor, total, squares[member])
        norms = emit(aten.div.Tensor, emit(aten.sqrt.default, total), scaled)
        if factor is not None:
            norms = emit(aten.mul.Tensor, norms, factor)
        threshold = emit(torch.ops.bkcompile.record_norms.default, norms, key, group)
        if options.clip_fn == "automatic":
            clip = emit(aten.div.Tensor, threshold, emit(aten.add.Scalar, norms, options.clip_gamma))
        else:
            clip = emit(
                aten.clamp_max.default, emit(aten.div.Tensor, threshold, emit(aten.add.Scalar, norms, EPS)), 1.0
            )
        columns.append(emit(aten.mul.Tensor, clip, factor) if factor is not None else clip)
    return {param: columns[grouping.group_of(param)] for param in squares}


def batch_size_value(emit: Emitter, joint: JointGraph) -> Size:
    if joint.batch.is_Integer:
        return int(joint.batch)
    source, dim = joint.batch_source
    return emit.size(source, dim)


def loss_factor(emit: Emitter, scale: LossScale, batch: Size, dtype: torch.dtype) -> torch.fx.Node | None:
    if scale.kind is ScaleKind.MEAN:
        return emit(aten.scalar_tensor.default, batch, dtype=dtype)
    if scale.kind is ScaleKind.WEIGHT:
        return emit.to_dtype(scale.node, dtype)
    return None


def insert_clipping(
    joint: JointGraph,
    plans: list[ParamPlan],
    dtype: torch.dtype,
    scale: LossScale,
    grouping: Grouping,
    key: int,
    options: BKOptions,
    fake_mode,
) -> None:
    """Insert norms, clip factors and the weighted reductions, each parameter by its plan's strategy; norms in
    ``dtype`` (``acc_dtype``)."""
    graph = joint.gm.graph
    emit = Emitter(graph, fake_mode)
    if not plans:
        return
    params = [plan.param for plan in plans]
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first_op):
        batch = batch_size_value(emit, joint)
    squares, explicit = {}, {}
    for plan in plans:
        param = plan.param
        if plan.strategy is Strategy.GHOST:
            site = param.sites[0]
            with graph.inserting_before(site.node):
                squares[param.name] = site.kind.sq_norm(emit, joint, site.node, batch, dtype)
            continue
        with graph.inserting_before(graph.output_node()):
            grads = per_sample_grad(emit, joint, param.grad, {s.node: s for s in param.sites}, batch, dtype)
            flat = emit(aten.reshape.default, grads, [batch, -1])
            squares[param.name] = emit(aten.sum.dim_IntList, emit(aten.mul.Tensor, flat, flat), [1])
            explicit[param.name] = flat
    with graph.inserting_before(graph.output_node()):
        weights = clip_weights(emit, squares, grouping, key, loss_factor(emit, scale, batch, dtype), options)
        reduced = {}
        for param in params:
            if param.name in explicit:
                row = emit(aten.unsqueeze.default, weights[param.name], 0)
                total = emit(
                    aten.view.default, emit(aten.mm.default, row, explicit[param.name]), static_shape(param.grad)
                )
                reduced[param.index] = emit.to_dtype(total, param.grad.meta["val"].dtype)
                continue
            site = param.sites[0]
            weighted = site.kind.reweight(emit, joint, site.node, weights[param.name], batch)
            site.node.replace_all_uses_with(weighted)
            erase_dead(graph, site.node)
    outputs = joint.outputs
    for index, value in reduced.items():
        outputs[joint.num_fwd_outputs + index] = value
    graph.output_node().args = (outputs,)
    for param in params:
        if param.name in explicit:
            erase_dead(graph, param.grad)


def clip_single_sample(joint: JointGraph, grouping: Grouping, key: int, options: BKOptions, fake_mode) -> None:
    """A graph compiled for a batch of exactly one sample: its gradient is that sample's gradient.

    Nothing can mix samples, so no sites are needed: each group's norm is that of its gradient outputs,
    and every gradient output is scaled by its group's clip factor.
    """
    graph = joint.gm.graph
    emit = Emitter(graph, fake_mode)
    grads = trainable_grads(joint)
    if not grads:
        return
    dtype = torch.float64 if any(g.meta["val"].dtype == torch.float64 for _, _, g in grads) else torch.float32
    with graph.inserting_before(graph.output_node()):
        squares = {}
        for _, name, grad in grads:
            g = emit.to_dtype(grad, dtype)
            squares[name] = emit(aten.view.default, emit(aten.sum.default, emit(aten.mul.Tensor, g, g)), [1])
        weights = clip_weights(emit, squares, grouping, key, None, options)
        outputs = joint.outputs
        for index, name, grad in grads:
            factor = emit(aten.view.default, emit.to_dtype(weights[name], grad.meta["val"].dtype), [])
            outputs[joint.num_fwd_outputs + index] = emit(aten.mul.Tensor, grad, factor)
    graph.output_node().args = (outputs,)


def trainable_grads(joint: JointGraph) -> list[tuple[int, str, torch.fx.Node]]:
    """(output index, parameter name, gradient node) of every trainable parameter with a gradient."""
    return [
        (i, graph_input.name, g)
        for i, (g, graph_input) in enumerate(zip(joint.gradient_outputs, joint.inputs, strict=True))
        if g is not None and graph_input.trainable
    ]
