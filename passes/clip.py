"""Per-sample norms, clip factors and the weighted reductions (passes 4-6 of the pipeline).

For each trainable parameter the pass forms ``||G_i||^2``, the squared norm of sample i's gradient, by
one of two strategies:

- ``ghost``: a parameter with one site whose kind has a ghost norm (``site_kinds``); book-keeping then
  re-emits the site with its per-sample operand scaled by w_i, so the one reduction gives sum_i w_i G_i::

      before:  grad = mm(t(grad_out), act)
      after:   grad = mm(t(grad_out) * w[rows], act)    (or act * w[rows]: the narrower operand is weighted)

- ``explicit``: the per-sample gradients G_i (B, *param shape) are formed (the sum over the sites of a
  parameter used at several places, with the views between them replayed per sample) where the gradient is
  complete, so that the operands need not be held until the clip factors are known; the norm is taken from them
  and the gradient becomes ``sum_i w_i G_i``, one weighted sum over the rows.

Clipping, per clipping group g: ``n_ig = s * sqrt(sum over the group's parameters ||G_i||^2) / S`` (s: the
loss scale of the reduction, S: a GradScaler's loss scale, read at run time), ``C_ig = f(n_ig, R_g)`` (the
policy's clip factor, ``bkcompile.policy``, traced into the graph), ``w_i = s * C_ig`` for the group's
parameters (the sum stays scaled by S). Norms are accumulated in float32 (float64 when the model is float64).
Parameters are keyed by their graph input (``ParamGrad.index``), never by name.
"""

from __future__ import annotations

import math

import torch
import torch.fx
from bkcompile.passes.cost import ParamPlan, Strategy
from bkcompile.passes.emit import Emitter, static_shape
from bkcompile.passes.facts import Reduced
from bkcompile.passes.joint import JointGraph
from bkcompile.passes.loss import LossScale, ScaleKind
from bkcompile.passes.ops import law_for
from bkcompile.passes.site_kinds.common import Size
from bkcompile.passes.sites import ParamGrad, linear_term, preserved_operand, split_free_terms
from torch._prims_common import is_contiguous_or_false

import bkcompile.runtime.ledger  # noqa: F401  (registers bkcompile::record_norms and bkcompile::loss_scale)
from bkcompile.compiler.options import BKOptions
from bkcompile.errors import NotSupportedYetError, OptionError, node_error
from bkcompile.plan import Grouping
from bkcompile.policy import ClipPolicy

aten = torch.ops.aten


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
    """Apply the norm-preserving op ``node`` (its op law's ``lift``) to per-sample values (B, *shape of its input)."""
    lift = law_for(node.target).lift
    if lift is None:
        raise node_error(
            NotSupportedYetError,
            node,
            "the parameter's gradient passes through this op, which has no per-sample form for explicit norms yet",
            "use strategy='ghost' if the parameter has a single site, or freeze the parameter",
        )
    return lift(emit, node, value)


def per_sample_grad(emit: Emitter, joint: JointGraph, node: torch.fx.Node, sites: dict, batch: Size, dtype):
    """The per-sample gradient (B, *shape of ``node``) of the gradient tree under ``node``."""
    if node in sites:
        return sites[node].kind.per_sample(emit, joint, node, batch, dtype)
    if node.target is aten.add.Tensor:
        terms = [a for a in node.args if isinstance(joint.facts.get(a), Reduced)]  # not the free terms
        grads = [per_sample_grad(emit, joint, a, sites, batch, dtype) for a in terms]
        return grads[0] if len(grads) == 1 else emit(aten.add.Tensor, *grads)
    if node.target is aten.sub.Tensor:
        return emit(aten.sub.Tensor, *[per_sample_grad(emit, joint, a, sites, batch, dtype) for a in node.args])
    if node.target is aten.cat.default:  # blocks of the gradient side by side: each sample's blocks alike
        blocks = [per_sample_grad(emit, joint, a, sites, batch, dtype) for a in node.args[0]]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return emit(aten.cat.default, blocks, dim % node.meta["val"].dim() + 1)
    term = linear_term(joint, node)
    if term is not None:  # the same linear map for every sample: apply it to each sample's values
        grads = per_sample_grad(emit, joint, term, sites, batch, dtype)
        return law_for(node.target).lift_linear(emit, node, term, grads, batch)
    return _lift(emit, node, per_sample_grad(emit, joint, preserved_operand(node), sites, batch, dtype))


_VIEWS = (aten.permute.default, aten.reshape.default, aten.view.default)


def products_in_layout(emit: Emitter, grads: torch.fx.Node) -> torch.fx.Node:
    """``grads`` (B, *shape), contiguous where it is views of one product ``bmm(a, b)`` that transpose it (a weight
    whose gradient is the transpose of the site's, as einsum writes it): the product computed transposed,
    ``bmm(b^T, a^T)``, and the same views applied to its transpose, so that the per-sample gradients are written
    once, in the layout the norm and the weighted sum read them (viewing them flat would otherwise copy them, or
    read them across their rows). Else ``grads`` itself."""
    chain, product = [], grads
    while product.op == "call_function" and product.target in _VIEWS:
        chain.append(product)
        product = product.args[0]
    if is_contiguous_or_false(grads.meta["val"]) or product.target is not aten.bmm.default or product.kwargs:
        return grads
    a, b = product.args
    swapped = emit(aten.bmm.default, *(emit(aten.permute.default, v, [0, 2, 1]) for v in (b, a)))
    value = emit(aten.permute.default, swapped, [0, 2, 1])
    for view in reversed(chain):
        value = emit(view.target, value, *view.args[1:], **view.kwargs)
        if not torch._C._is_alias_of(value.meta["val"], swapped.meta["val"]):  # a reshape that copies
            break
    laid_out = value.meta["val"]  # known contiguous without a guard on the batch size (unbacked under a dynamic batch)
    if not is_contiguous_or_false(laid_out) or not torch._C._is_alias_of(laid_out, swapped.meta["val"]):
        erase_dead(emit.graph, value)
        return grads
    return value


def param_numel(grad: torch.fx.Node) -> int:
    """The values of a parameter's gradient: the width of its flat per-sample values (B, n), given explicitly so
    that the reshape holds for an empty batch too."""
    return math.prod(static_shape(grad))


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
    squares: dict[int, torch.fx.Node],
    grouping: Grouping,
    key: int,
    factor: torch.fx.Node | None,
    policy: ClipPolicy,
) -> dict[int, torch.fx.Node]:
    """Each parameter's weights w_i = s * C_i^g (B,) from the squared norms of its per-sample gradients (by graph
    input).

    Group norms ``n_ig = s * sqrt(sum over the group's parameters) / S`` (S: ``loss_scale``, the
    GradScaler's scale or 1) go through ``record_norms``, which returns the group's current threshold
    R_g; ``C_ig = policy.factor(n_ig, R_g)``, its torch ops traced into the graph. ``key``: the graph's run-time
    record.
    """
    columns = []
    # the scale read off the squared norms computed first: a group's clip factors wait for its own norms only
    position = {node: index for index, node in enumerate(emit.graph.nodes)}
    scaled = emit(torch.ops.bkcompile.loss_scale.default, min(squares.values(), key=position.__getitem__), key)
    for group, clip_group in enumerate(grouping.groups):  # each group on its own: no group waits for another
        members = clip_group.members
        total = squares[members[0]]
        if len(members) > 1:
            stacked = emit(aten.cat.default, [squares[m] for m in members])
            rows = [len(members), emit.size(squares[members[0]], 0)]  # explicit: the batch may be empty
            total = emit(aten.sum.dim_IntList, emit(aten.view.default, stacked, rows), [0])
        norms = emit(aten.div.Tensor, emit(aten.sqrt.default, total), scaled)
        if factor is not None:
            norms = emit(aten.mul.Tensor, norms, factor)
        threshold = emit(torch.ops.bkcompile.record_norms.default, norms, key, group)
        clip = emit.trace(policy.factor, norms, threshold)
        columns.append(emit(aten.mul.Tensor, clip, factor) if factor is not None else clip)
    return {param: columns[grouping.group_of(param)] for param in squares}


def batch_size_value(emit: Emitter, joint: JointGraph) -> Size:
    if joint.batch.is_Integer:
        return int(joint.batch)
    source, dim = joint.batch_source
    return emit.size(source, dim)


def loss_factor(emit: Emitter, scale: LossScale, batch: Size, dtype: torch.dtype) -> torch.fx.Node | None:
    if scale.kind is ScaleKind.MEAN:
        factor = emit(aten.scalar_tensor.default, batch, dtype=dtype)
        for count in scale.checks:  # counts that must be B for the per-sample loss to be defined
            factor = emit(torch.ops.bkcompile.same_count.default, emit.to_dtype(count, dtype), factor)
        return factor
    if scale.kind is ScaleKind.WEIGHT:
        return emit.to_dtype(scale.node, dtype)
    return None


def free_scale(options: BKOptions, name: str) -> float:
    """The factor of a data-independent gradient term: the expected batch size."""
    if options.expected_batch_size is None:
        raise OptionError(
            f"the loss adds a data-independent term to the gradient of {name!r} (a term of the "
            "parameters alone, such as weight decay written in the loss): give "
            "options={'expected_batch_size': E}, the expected batch size the DP optimizer divides by, "
            "so that the term acts as in non-private training (make_private and the Trainer "
            "integration set it)"
        )
    return options.expected_batch_size


def scale_free_terms(emit: Emitter, params: list[ParamGrad], options: BKOptions) -> dict[int, list[torch.fx.Node]]:
    """Multiply each data-independent gradient term by the expected batch size E, in place: it has no
    sensitivity (no sample reaches it), so it is neither clipped nor noised, and after the DP optimizer's
    division by E it acts exactly as in non-private training. Returns each parameter's scaled terms (by graph
    input)."""
    scaled_terms: dict[int, list[torch.fx.Node]] = {}
    for param in params:
        for add, term in param.free:
            with emit.graph.inserting_before(add):
                scaled = emit(aten.mul.Tensor, term, free_scale(options, param.name))
            add.replace_input_with(term, scaled)
            scaled_terms.setdefault(param.index, []).append(scaled)
    return scaled_terms


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
    ``dtype`` (``acc_dtype``); ``key``: the graph's run-time record."""
    graph = joint.gm.graph
    emit = Emitter(graph, fake_mode)
    if not plans:
        return
    params = [plan.param for plan in plans]
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first_op):
        batch = batch_size_value(emit, joint)
    free = scale_free_terms(emit, params, options)
    squares, explicit = {}, {}
    for plan in plans:
        param = plan.param
        if plan.strategy is Strategy.GHOST:
            site = param.sites[0]
            with graph.inserting_before(site.node):
                squares[param.index] = site.kind.sq_norm(emit, joint, site.node, batch, dtype)
            continue
        with graph.inserting_before(param.grad):  # where the gradient is complete: its operands are not held
            grads = per_sample_grad(emit, joint, param.grad, {s.node: s for s in param.sites}, batch, dtype)
            laid_out = products_in_layout(emit, grads)
            if laid_out is not grads:  # the product emitted transposed: the first one and its views are unread
                erase_dead(graph, grads)
            flat = emit(aten.reshape.default, laid_out, [batch, param_numel(param.grad)])
            squares[param.index] = emit(aten.sum.dim_IntList, emit(aten.mul.Tensor, flat, flat), [1])
            explicit[param.index] = flat
    with graph.inserting_before(graph.output_node()):
        weights = clip_weights(
            emit, squares, grouping, key, loss_factor(emit, scale, batch, dtype), ClipPolicy.of(options)
        )
        reduced = {}
        for param in params:
            if param.index in explicit:
                # sum_i w_i G_i as a weighted sum over the rows (one fused reduction under Inductor): an mm of (1, B)
                # weights needs a fixed layout that Inductor cannot order for an unbacked batch size (strides B and 1),
                # and mv has both a fallback and a decomposition there
                column = emit(aten.unsqueeze.default, weights[param.index], 1)
                rows = emit(aten.mul.Tensor, explicit[param.index], column)
                total = emit(aten.view.default, emit(aten.sum.dim_IntList, rows, [0]), static_shape(param.grad))
                reduced[param.index] = emit.to_dtype(total, param.grad.meta["val"].dtype)
                for term in free.get(param.index, []):  # an explicit sum leaves the graph's adds: add them here
                    reduced[param.index] = emit(aten.add.Tensor, reduced[param.index], term)
                continue
            site = param.sites[0]
            weighted = site.kind.reweight(emit, joint, site.node, weights[param.index], batch)
            site.node.replace_all_uses_with(weighted)
            erase_dead(graph, site.node)
    outputs = joint.outputs
    for index, value in reduced.items():
        outputs[joint.num_fwd_outputs + index] = value
    graph.output_node().args = (outputs,)
    for param in params:
        if param.index in explicit:
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
        squares, parts = {}, {}
        for index, name, grad in grads:
            rest, free = split_free_terms(joint, grad)
            total = rest[0]
            for term in rest[1:]:
                total = emit(aten.add.Tensor, total, term)
            parts[index] = (total, [emit(aten.mul.Tensor, term, free_scale(options, name)) for term in free])
            g = emit.to_dtype(total, dtype)
            squares[index] = emit(aten.view.default, emit(aten.sum.default, emit(aten.mul.Tensor, g, g)), [1])
        weights = clip_weights(emit, squares, grouping, key, None, ClipPolicy.of(options))
        outputs = joint.outputs
        for index, _, grad in grads:
            total, free = parts[index]
            factor = emit(aten.view.default, emit.to_dtype(weights[index], grad.meta["val"].dtype), [])
            clipped = emit(aten.mul.Tensor, total, factor)
            for term in free:
                clipped = emit(aten.add.Tensor, clipped, term)
            outputs[joint.num_fwd_outputs + index] = clipped
    graph.output_node().args = (outputs,)


def trainable_grads(joint: JointGraph) -> list[tuple[int, str, torch.fx.Node]]:
    """(graph input, parameter name, gradient node) of every trainable parameter with a gradient (its gradient is
    the graph's gradient output of the same index)."""
    return [
        (i, graph_input.name, g)
        for i, (g, graph_input) in enumerate(zip(joint.gradient_outputs, joint.inputs, strict=True))
        if g is not None and graph_input.trainable
    ]
