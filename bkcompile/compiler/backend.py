"""The ``bk_dp`` torch.compile backend: aot_autograd with the privatizing pass on the joint graph."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.custom_graph_pass import CustomGraphPass

from bkcompile.compiler import warm
from bkcompile.compiler.breaks import refuse_batch_size_branch
from bkcompile.compiler.kernels import KernelGrouping
from bkcompile.compiler.options import BKOptions, parse_options
from bkcompile.compiler.recurrent import unfuse_recurrent
from bkcompile.compiler.transformers_version import refuse_old_transformers
from bkcompile.errors import BKError, NotSupportedYetError, OptionError, run_error
from bkcompile.frames import is_dynamo_entry, is_generated, is_library
from bkcompile.names import user_path
from bkcompile.passes import privatize
from bkcompile.passes.decompose import inline_decompositions
from bkcompile.passes.facts import REPLICATED, Batched
from bkcompile.passes.joint import GraphInput, InputKind
from bkcompile.passes.ops import DECOMPOSITIONS
from bkcompile.passes.ops.embedding import refuse_uneven_bags
from bkcompile.passes.pieces import GraphRole
from bkcompile.passes.site_kinds import kept_ops
from bkcompile.plan import GraphPlan
from bkcompile.runtime import rows, shared
from bkcompile.runtime.distributed import sharded_per_module
from bkcompile.runtime.ledger import GraphRecord, know_module, ledger_for

aten = torch.ops.aten

# Fused backward ops whose parameter reductions the pass must see as plain sums.
_DECOMPOSE = [
    aten.native_layer_norm_backward.default,
    aten.native_batch_norm_backward.default,
    aten.native_group_norm_backward.default,
]
# Ops the pass reads whole: the loss normaliser of nll_loss, GroupNorm (its decomposition views the batch
# through as_strided), and the sites some site kinds read whole.
_KEEP = [
    aten.nll_loss_forward.default,
    aten.nll_loss_backward.default,
    aten.native_group_norm.default,
    *kept_ops(),
]
# Ops the pass emits that Inductor lowers through their decomposition.
_EMITTED = [aten.im2col.default, aten.zeros.default]


def _param_name(source_name: str) -> str:
    """The name ``named_parameters()`` (or ``named_buffers()``) of the root module gives the input."""
    return user_path(source_name) or source_name


def _source_name(node: torch.fx.Node) -> str:
    """Dynamo's name for where a graph input comes from, e.g. ``L['self']._modules['fc']._parameters['weight']``."""
    grapharg = node.meta.get("grapharg")
    if grapharg is None or grapharg.source is None:
        return node.name
    name = grapharg.source.name
    return name() if callable(name) else name


def _is_module_state(source: str) -> bool:
    """Module attributes, buffers and globals are the same for every sample; forward arguments are not.

    Dynamo roots a compiled module at ``L['self']`` (or ``L['fn']`` when it calls the module itself).
    """
    return source.startswith(("L['self']", "L['fn']", "G[")) or any(
        part in source for part in ("_buffers", "_parameters", "_modules")
    )


def _classify(node: torch.fx.Node, example: Any, options: BKOptions) -> GraphInput:
    """A graph input's record: parameters and module state are replicated, other tensors hold samples on
    ``options.batch_dim``."""
    source = _source_name(node)
    is_state = _is_module_state(source)
    if shared.is_shared(example):  # an earlier piece computed it without sample data (bkcompile.runtime.shared)
        return GraphInput(node.name, source, InputKind.STATE, REPLICATED, False)
    if isinstance(example, torch.nn.Parameter):
        return GraphInput(_param_name(source), source, InputKind.PARAMETER, REPLICATED, example.requires_grad)
    if is_state:
        return GraphInput(_param_name(source), source, InputKind.STATE, REPLICATED, False)
    if isinstance(example, torch.Tensor) and example.dim() > options.batch_dim:
        return GraphInput(node.name, source, InputKind.SAMPLES, Batched(options.batch_dim), False)
    return GraphInput(node.name, source, InputKind.OTHER, REPLICATED, False)


def _classify_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: BKOptions):
    placeholders = gm.graph.find_nodes(op="placeholder")
    return tuple(_classify(n, e, options) for n, e in zip(placeholders, example_inputs, strict=True))


def _graph_role(gm: torch.fx.GraphModule, options: BKOptions) -> GraphRole:
    """A piece when dynamo cut the graph at a graph break, resumed a frame after one, or compiled a function
    that code it did not trace calls, or when the options say the model is compiled in several graphs; else
    the whole model (the fast path)."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    frames = list(reason.user_stack or []) if reason is not None else []
    broken = bool(reason is not None and reason.graph_break)
    resumed = any(f.name.startswith("torch_dynamo_resume_in_") for f in frames)
    nested = _called_from_untraced_code()
    users = [f for f in frames if not is_library(f.filename)]  # not bkcompile.explain's entry, nor nn.Sequential's
    last = users[-1] if users else frames[-1] if frames else None
    where = f"{last.filename}:{last.lineno} ({last.name})" if last is not None else "an unknown location"
    number = next(_GRAPH_NUMBERS)
    if broken:
        label = f"bk_dp graph #{number}, cut at the graph break at {where}"
    elif resumed:
        label = f"bk_dp graph #{number}, resumed after a graph break, ending at {where}"
    elif nested:
        label = f"bk_dp graph #{number}, called from code outside the graphs (after a graph break), ending at {where}"
    elif users:
        label = f"bk_dp graph #{number}, ending at {where}"
    else:
        label = f"bk_dp graph #{number}"
    piece = broken or resumed or nested or options.graphs == "several"
    return GraphRole(piece=piece, label=label, ends_at_break=broken)


def _called_from_untraced_code() -> bool:
    """Whether the function dynamo compiles now was called by user code that runs outside any graph inside the
    compiled model: a caller dynamo cut at a graph break or skipped (it runs eagerly and calls this function,
    whose frame dynamo compiles on its own). Such a graph is one of several of the model, never the whole.

    The frames between dynamo's entry into the compiled model (``compile_wrapper``) and this compilation are
    then not all torch's (a model dynamo traces whole is entered from torch's module call alone)."""
    frame = sys._getframe(1)
    nested = False
    while frame is not None:
        if is_dynamo_entry(frame):
            return nested
        file = frame.f_code.co_filename
        if not is_library(file) and not is_generated(file):
            nested = True
        frame = frame.f_back
    return False


_GRAPH_NUMBERS = itertools.count(1)


def _fake_mode(gm: torch.fx.GraphModule) -> Any:
    return torch._guards.detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"])


@dataclasses.dataclass(frozen=True)
class _Job:
    """What the joint-graph hook needs to privatize one graph, and the record that receives its plan."""

    inputs: tuple[GraphInput, ...]
    options: BKOptions
    role: GraphRole
    record: GraphRecord


def _joint_pass(gm: torch.fx.GraphModule, num_fwd_outputs: int, job: _Job) -> None:
    """Privatize the joint graph once; other graphs (inference, forward, backward) pass through."""
    if job.record.plan is not None:
        return
    plan = privatize(gm, num_fwd_outputs, job.inputs, job.options, _fake_mode(gm), job.record.key, job.role)
    if plan.report is not None and job.options.report:
        print(plan.report)
    job.record.plan = plan


def _partition(joint: torch.fx.GraphModule, joint_inputs: Any, *, job: _Job, **kwargs: Any):
    _joint_pass(joint, kwargs["num_fwd_outputs"], job)
    return min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)


class _InductorJointPass(CustomGraphPass):
    """Inductor's ``joint_custom_pre_pass`` hook: privatize the joint graph before Inductor partitions it.

    ``key``: :func:`bkcompile.compiler.warm.pass_key`, what the pass's output depends on beyond dynamo's graph, or
    None where the graph may not load from the AOTAutograd cache."""

    def __init__(self, job: _Job, key: str | None) -> None:
        self.job = job
        self.key = key

    def __call__(self, graph: torch.fx.Graph) -> None:
        gm = graph.owning_module
        primals = len(self.job.inputs)
        # Inductor runs this hook on inference graphs too (no tangents: nothing to clip); a joint graph
        # returns the forward outputs, then one gradient per primal
        if len(graph.find_nodes(op="placeholder")) > primals:
            _joint_pass(gm, len(graph.output_node().args[0]) - primals, self.job)
        # Inductor has no lowering for the ops kept whole for the analysis: decompose them now.
        inline_decompositions(gm, _KEEP + _EMITTED, _full_inductor_decompositions(), _fake_mode(gm))
        _single_bmm_to_mm(gm)
        _contiguous_bmm_inputs(gm)
        _split_head_views(gm)

    def uuid(self) -> str:
        """What torch's caches add to their keys for this pass.

        Inductor's FX graph cache keys each graph Inductor compiles (the forward and the backward, after the
        partition) by the graph's code, its inputs' shapes, strides and dtypes, Inductor's config and torch's
        version; this pass runs before, on the joint graph, so every choice of the privatization is in the code
        keyed: the clipping groups and their norms, ghost or explicit per site, the clip function and its constants,
        the loss rescale, the record's integer key (``bkcompile::record_norms(norms, key, group)``). What the
        options leave to run time (each group's threshold R_g, the loss scale) the graph reads from its record. What
        the key's graph does not show is bkcompile's code the compiled graph depends on (its custom ops' schemas and
        fake kernels): the uuid holds a hash of bkcompile's source.

        The AOTAutograd cache keys dynamo's graph, before this pass, so the uuid is the pass key, which also holds
        the compile-time options, the record key, the inputs' classification and the kernel rates
        (:mod:`bkcompile.compiler.warm`); without one that cache is off, and the uuid is the source hash."""
        return self.key or warm.source_hash()


def _single_bmm_to_mm(gm: torch.fx.GraphModule) -> None:
    """Each ``bmm`` of one matrix product (batch size 1: ``torch.einsum`` lowers to these) becomes an ``mm``.

    Inductor's CPU lowering of ``bmm`` asks whether a matrix's rows number one, which it cannot answer when they
    are a multiple of the unbacked batch size (``GuardOnDataDependentSymNode: Eq(3*u0, 1)``, torch 2.13); ``mm``
    asks no such question. The values are the same: the views drop and restore the size-1 dim."""
    graph = gm.graph
    for node in graph.find_nodes(op="call_function", target=aten.bmm.default):
        left, right = node.args
        if not all(type(m.meta["val"].shape[0]) is int and m.meta["val"].shape[0] == 1 for m in (left, right)):
            continue
        with graph.inserting_before(node):
            squeezed = [graph.call_function(aten.squeeze.dim, (m, 0)) for m in (left, right)]
            product = graph.call_function(aten.mm.default, tuple(squeezed))
            result = graph.call_function(aten.unsqueeze.default, (product, 0))
        with _fake_mode(gm) or contextlib.nullcontext():
            for new, m in zip(squeezed, (left, right)):
                new.meta["val"] = m.meta["val"].squeeze(0)
            product.meta["val"] = torch.mm(*(n.meta["val"] for n in squeezed))
            result.meta["val"] = product.meta["val"].unsqueeze(0)
        for new in (*squeezed, product, result):
            new.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "tensor_meta")})
        node.replace_all_uses_with(result)
        graph.erase_node(node)
    gm.recompile()


def _contiguous_bmm_inputs(gm: torch.fx.GraphModule) -> None:
    """Each ``bmm`` operand whose last two strides depend on the batch size (time-major ``nn.MultiheadAttention``'s
    ``(B * H, L, D)``, a transpose of ``(L, B * H, D)``) is copied contiguous first.

    Inductor's CPU lowering of ``bmm`` compares those strides with the sizes to decide on that copy, which it cannot
    when they are a multiple of the unbacked batch size (``GuardOnDataDependentSymNode: 4*u0 >= 4``, torch 2.13);
    the copy has the same values."""
    graph = gm.graph
    for node in graph.find_nodes(op="call_function", target=aten.bmm.default):
        for operand in dict.fromkeys(node.args):  # each once: bmm(x, x) copies x once
            if not any(isinstance(stride, torch.SymInt) for stride in operand.meta["val"].stride()[-2:]):
                continue
            with graph.inserting_before(node):
                copy = graph.call_function(aten.clone.default, (operand,), {"memory_format": torch.contiguous_format})
            with _fake_mode(gm) or contextlib.nullcontext():
                copy.meta["val"] = operand.meta["val"].clone(memory_format=torch.contiguous_format)
            copy.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "tensor_meta")})
            node.replace_input_with(operand, copy)
    gm.recompile()


def _split_head_views(gm: torch.fx.GraphModule) -> None:
    """Each view that moves a factor between a batch-sized dim and the next (``nn.MultiheadAttention``'s
    ``(L, B, E) -> (L, B * H, E / H)`` and back) becomes two views through their common refinement
    ``(L, B, H, E / H)``.

    Inductor's CPU lowering of such a view matches sizes from the last dim and asserts ``Eq(8*u0, 8)`` (the batch is
    one) when the batch size is unbacked (torch 2.13); a view that only splits, then one that only merges, asserts
    nothing. The values are the same: the same elements in the same order."""
    graph = gm.graph
    for target in (aten.view.default, aten._unsafe_view.default):
        for node in graph.find_nodes(op="call_function", target=target):
            refined = _refinement(node.args[0].meta["val"].shape, node.meta["val"].shape)
            if refined is None:
                continue
            with graph.inserting_before(node):
                split = graph.call_function(target, (node.args[0], refined))
            with _fake_mode(gm) or contextlib.nullcontext():
                split.meta["val"] = node.args[0].meta["val"].view(refined)
            split.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "tensor_meta")})
            node.args = (split, *node.args[1:])
    gm.recompile()


def _refinement(old: torch.Size, new: torch.Size) -> list | None:
    """The shape that splits ``old``'s and ``new``'s one differing pair of dims ``(s, a)`` / ``(s * k, a / k)``
    (``s`` symbolic, ``a`` an int), or the reverse, into ``(s, k, a / k)``; None for any other pair of shapes."""
    if len(old) != len(new) or len(old) < 2:
        return None
    differ = [i for i in range(len(old)) if old[i] is not new[i] and not _same_size(old[i], new[i])]
    if len(differ) != 2 or differ[1] != differ[0] + 1:
        return None
    i = differ[0]
    (p, q), (r, t) = old[i : i + 2], new[i : i + 2]
    if not (isinstance(p, torch.SymInt) and isinstance(r, torch.SymInt) and type(q) is int and type(t) is int):
        return None
    small, large, fine = (p, r, t) if q > t else (r, p, q)
    coarse = max(q, t)
    if min(q, t) < 1 or coarse % fine or not _same_size(small * (coarse // fine), large):
        return None
    return [*old[:i], small, coarse // fine, fine, *old[i + 2 :]]


def _same_size(a: Any, b: Any) -> bool:
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    return type(a) is int and type(b) is int and a == b


@functools.cache
def _full_inductor_decompositions() -> dict:
    from torch._inductor.decomposition import select_decomp_table

    return select_decomp_table()


class _DecompositionTable(dict):
    """bk_dp's decomposition table, pickled as the function that builds it.

    Inductor's FX graph cache pickles the table Inductor is given into its key, and many of torch's decomposition
    functions do not pickle (``geometric``: not the object ``torch._refs.geometric`` names), which makes Inductor
    bypass its cache. The table is a function of torch's version and bkcompile's source, both in the key
    (:meth:`_InductorJointPass.uuid`), so the function's name stands for its entries."""

    def __reduce__(self) -> tuple:
        return _inductor_decompositions, ()


@functools.cache
def _inductor_decompositions() -> _DecompositionTable:
    kept = {op: fn for op, fn in _full_inductor_decompositions().items() if op not in _KEEP}
    return _DecompositionTable({**kept, **DECOMPOSITIONS})


class _OptionErrorPastDynamo(OptionError, torch._dynamo.exc.ShortenTraceback):
    """An :class:`OptionError` that reaches the user as itself. Dynamo wraps what a backend raises in its
    ``BackendCompilerFailed`` (which ``except bkcompile.OptionError`` does not catch), except a
    ``ShortenTraceback``, which it re-raises as it is (torch 2.13: ``OutputGraph._call_user_compiler``,
    ``convert_frame``, ``eval_frame``)."""

    def __init__(self, error: OptionError) -> None:
        ValueError.__init__(self, *error.args)
        self.first_useful_frame = None  # ShortenTraceback's: keep the whole traceback


def bk_dp(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: dict | None = None,
    mode: str | None = None,
    **_: Any,
):
    """The ``bk_dp`` backend: the compiled backward returns the sum of per-sample-clipped gradients (a piece
    of the model: hands its per-sample gradients to the clip at the end of the backward).

    The compiled graph is returned wrapped (:meth:`bkcompile.runtime.ledger.GraphRecord.wrap`): its clipped
    gradients reach ``p.grad`` through the model's step ledger, which refuses every other road. An
    :class:`OptionError` raised while compiling leaves dynamo unwrapped (:class:`_OptionErrorPastDynamo`)."""
    indices = tuple(i for i, e in enumerate(example_inputs) if isinstance(e, torch.nn.Parameter) and e.requires_grad)
    params = [example_inputs[i] for i in indices]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ledger = ledger_for(params)
    names = tuple(_param_name(_source_name(placeholders[i])) for i in indices)
    try:
        if mode is not None:  # torch.compile passes its mode only when no options are given
            raise OptionError(
                f"torch.compile(..., backend='bk_dp', mode={mode!r}): torch takes mode or options, not both, and "
                f"bk_dp needs options (max_grad_norm). Fix: options={{'max_grad_norm': R, 'mode': {mode!r}}}, or "
                f"bkcompile.compile(model, max_grad_norm=R, mode={mode!r})"
            )
        opts = parse_options(options)
        if opts.graphs == "auto" and sharded_per_module(params):  # FSDP2 per block: a graph per sharded module
            opts = dataclasses.replace(opts, graphs="several")
        role = _graph_role(gm, opts)
        device = params[0].device if params else torch.device("cpu")
        anchor = torch.zeros((), device=device, requires_grad=True)  # the taps' anchor, on the model's device
        inputs = _classify_inputs(gm, example_inputs, opts)
        samples = tuple(i for i, x in enumerate(inputs) if x.kind is InputKind.SAMPLES)
        record = GraphRecord(indices, names, piece=role.piece, anchor=anchor, samples=samples, batch_dim=opts.batch_dim)
        data = [x.kind in (InputKind.SAMPLES, InputKind.OTHER) and isinstance(e, torch.Tensor)
                for x, e in zip(inputs, example_inputs)]  # fmt: skip
        refuse_old_transformers(gm)
        refuse_batch_size_branch(gm, [isinstance(x.fact, Batched) for x in inputs], opts.batch_dim)
        tagged = shared.shared_outputs(gm, data) if role.piece else ()
        unfuse_recurrent(gm)
        compiled = refuse_uneven_bags(gm, _compile(gm, example_inputs, _Job(inputs, opts, role, record), device))
    except BKError as error:
        if torch._dynamo.config.suppress_errors:  # dynamo will run the model eagerly: the ledger refuses that
            ledger.refusal = str(error).splitlines()[0]
            ledger.adopt(params, names)
        if isinstance(error, OptionError):
            raise _OptionErrorPastDynamo(error).with_traceback(error.__traceback__) from None
        raise
    if params and record.plan is not None and not role.piece:  # the clip state of the compiling instance
        record.state = record.clip_of(params).state
    ledger.adopt(params, names)
    if role.piece:
        batched = [i for i, x in enumerate(inputs) if isinstance(x.fact, Batched)]
        compiled = shared.tagging(rows.guard(compiled, batched, list(indices), role.label), tagged)
    known = [i for i, e in enumerate(example_inputs) if shared.is_shared(e)]
    compiled = shared.checking(compiled, known, [inputs[i].source for i in known], role.label)
    return record.wrap(compiled)


def compile(model: Any, *, dynamic: bool | None = None, fullgraph: bool = False, **options: Any) -> Any:
    """``torch.compile(model, backend="bk_dp", options=options)``, with the options checked first: a bad one is
    an :class:`OptionError` raised here, before the first forward.

    ``options`` are the backend's (:class:`BKOptions`: ``max_grad_norm`` is required; ``mode`` and ``inductor``
    choose Inductor's compile mode and config); ``dynamic`` and ``fullgraph`` are ``torch.compile``'s. Returns
    what ``torch.compile`` does: for a module, the compiled module (its parameters are the model's).

    A module's trainable parameters are known to the step ledger from here on, before any graph compiles: if
    dynamo runs the model eagerly instead (a graph break it skips the frame for, an eager fallback), the backward
    that accumulates an unclipped gradient into one of them is refused, on the plain path too."""
    parse_options(options)
    if isinstance(model, torch.nn.Module):
        know_module(model)
    return torch.compile(model, backend="bk_dp", options=options, dynamic=dynamic, fullgraph=fullgraph)


def _inductor_config(job: _Job, device: torch.device, key: str | None) -> dict:
    """Inductor's options for a bk_dp graph: bk_dp's defaults, the entries of the ``mode`` option, the user's
    ``inductor`` entries, then what bk_dp needs: its joint-graph pass, with the joint-graph passes on whatever
    the global config says (``use_joint_graph_passes=False`` skips them: the graph would not be privatized).

    On CPU the convolutions stay in the default (NCHW) layout unless the user's entries say otherwise: a
    per-sample convolution weight gradient is one convolution over (1, B*C, H, W), a free view of an NCHW
    tensor, and the im2col of a ghost norm reads NCHW too; under channels-last (Inductor's CPU default) every
    such site copies its operands between layouts, and oneDNN's grouped channels-last kernel is slower still
    (ResNet-GN: 0.67x of non-private throughput in channels-last, 0.87x in NCHW). On CPU too, the scheduler's
    kernels are grouped between extern calls (:class:`bkcompile.compiler.kernels.KernelGrouping`): each C++ kernel is
    a build of its own, and a privatized backward's norms and weighted operands sit between its matrix products."""
    from torch._inductor import list_mode_options

    options = job.options
    config: dict[str, Any] = {"trace.provenance_tracking_level": 1}
    if device.type == "cpu":
        config["layout_optimization"] = False
        config["_post_fusion_custom_pass"] = KernelGrouping()
    config.update(list_mode_options(options.mode))
    config.update(options.inductor)
    config.update({"joint_custom_pre_pass": _InductorJointPass(job, key), "use_joint_graph_passes": True})
    return config


def _compile(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], job: _Job, device: torch.device):
    if job.options.compiler == "aot_eager":
        from functorch.compile import make_boxed_func
        from torch._decomp import get_decompositions

        def boxed(graph: torch.fx.GraphModule, _inputs: Any):
            return make_boxed_func(graph.forward)

        return aot_autograd(
            fw_compiler=boxed,
            bw_compiler=boxed,
            partition_fn=functools.partial(_partition, job=job),
            decompositions={**get_decompositions(_DECOMPOSE), **DECOMPOSITIONS},
            keep_inference_input_mutations=True,
        )(gm, example_inputs)
    # Inductor's FX graph cache may hit (keyed after the pass); the AOTAutograd cache, keyed before it, skips the
    # pass on a hit: it is on only with a pass key (bkcompile.compiler.warm), and a hit takes the plan saved beside
    key = warm.pass_key(job.options, job.record.key, job.inputs, device, job.role.piece)
    plan_key = warm.plan_key(key, gm, example_inputs, job.options) if key is not None else None
    saved = warm.load(plan_key) if plan_key is not None else None
    hits = counters["aot_autograd"]["autograd_cache_hit"]
    compiled = _compile_fx(gm, example_inputs, job, device, key, aot_cache=key is not None)
    loaded = job.record.plan is None and counters["aot_autograd"]["autograd_cache_hit"] > hits
    if loaded and saved is not None and _clips_trainable(saved, job.inputs):
        job.record.plan = dataclasses.replace(saved, label=job.role.label)
        if saved.report is not None and job.options.report:
            print(saved.report)
        return compiled
    if loaded:  # no plan saved for this graph and these options (another threshold's): compile again, with the pass
        compiled = _compile_fx(gm, example_inputs, job, device, key, aot_cache=False)
    if job.record.plan is not None and plan_key is not None:
        warm.save(plan_key, job.record.plan)
    return compiled


def _clips_trainable(plan: GraphPlan, inputs: tuple[GraphInput, ...]) -> bool:
    """Whether every parameter ``plan`` clips is a trainable input of the graph (a saved plan that does not fit the
    graph it was loaded for is not used)."""
    trainable = {i for i, graph_input in enumerate(inputs) if graph_input.trainable}
    return all(set(group.members) <= trainable for group in plan.grouping.groups)


def _compile_fx(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    job: _Job,
    device: torch.device,
    key: str | None,
    aot_cache: bool,
):
    """Inductor's compile of dynamo's graph, the pass keyed by ``key``; from the AOTAutograd cache if ``aot_cache``."""
    from torch._inductor.compile_fx import compile_fx

    with torch._functorch.config.patch(enable_autograd_cache=aot_cache, enable_remote_autograd_cache=False):
        return compile_fx(
            gm,
            example_inputs,
            inner_compile=functools.partial(_inner_compile, label=job.role.label),
            # provenance tracking keeps node.meta["stack_trace"], so errors can name the user's source line
            config_patches=_inductor_config(job, device, key),
            decompositions=_inductor_decompositions(),
        )


def _inner_compile(*args: Any, label: str, **kwargs: Any) -> Any:
    """Inductor's compile of one privatized graph (forward, backward or inference; a backward compiles at its first
    run): an exception of torch's compiler here is a bkcompile error naming it (:func:`torch_compiler_error`)."""
    from torch._inductor.compile_fx import compile_fx_inner

    try:
        return compile_fx_inner(*args, **kwargs)
    except BKError:
        raise
    except Exception as error:
        raise torch_compiler_error(error, label) from error


def torch_compiler_error(error: Exception, label: str) -> NotSupportedYetError:
    """What reaches the user when Inductor fails on a graph the pass accepted: torch's first line, that the failure
    is in torch's compiler, and the fixes (the original exception is chained as the cause)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return run_error(
        NotSupportedYetError,
        f"torch's compiler (Inductor) failed on {label}: {cause}",
        "bk_dp accepted the model and privatized its graph; the failure is inside torch's compiler, not a privacy "
        "refusal. A symbol u0 in the message is the batch size, marked dynamic (bkcompile.mark_batch_dynamic, as "
        "the PoissonLoader marks each batch), which some of Inductor's lowerings cannot reason about",
        "compile with compiler='aot_eager' (bkcompile.compile(model, max_grad_norm=R, compiler='aot_eager'), "
        "exact, slower); or give the model a static batch (batches not marked dynamic: the PoissonLoader has no "
        "option for it, a copy of its batch, x.clone(), is unmarked, and torch recompiles per batch size); and "
        "please report the issue to bkcompile with this traceback",
    )
