"""The step ledger: what the bk_dp graphs of one model wrote into each parameter's gradient in this step.

Privacy is a property of what one optimizer step releases: every sample's whole contribution to the
step must be clipped once. The ledger makes that checkable, per parameter (by identity, never by name):

- The backend wraps each compiled graph (:meth:`GraphRecord.wrap`). When a call runs with gradients
  enabled, the wrapper passes the graph's trainable parameters through :class:`_Tap`, an identity
  autograd function. Its backward receives the graph's clipped gradients and the ledger accumulates
  them into ``p.grad`` itself, returning nothing to autograd. So every accumulation autograd makes
  into ``p.grad`` is, by construction, not a bk_dp clip: a post-accumulate-grad hook on each parameter
  the ledger knows (those of the graphs, and all of the compiled module's and of the user's module that
  calls it) refuses it at once (an eager use, dynamo's eager fallback). No host synchronisation.
- Each tap belongs to one forward call. A tap whose backward runs twice is a second backward through
  the same forward; two taps in one autograd backward (one graph task) are two calls clipped on their
  own, unless all are pieces of a model (clipped together at the end of the backward,
  ``bkcompile.runtime.deferred``). Both would let a sample contribute more than R, and are refused by
  :class:`_BackwardWatch`.
- A call whose inputs were computed with parameters outside any bk_dp graph (an eager stem before a
  compiled block) is refused when its backward runs.
- The release is sealed. A parameter a ``DPOptimizer`` holds (:func:`own`) never gets its clipped sum in
  ``p.grad``: the ledger keeps it (``_Entry.sealed``, unscaled by each backward's own GradScaler scale), and
  only that optimizer's ``step()`` takes it (:func:`take_release`), adds the noise and writes the noised
  average to ``p.grad``. Editing ``p.grad``, stepping another optimizer over the parameter, freezing it or
  removing it from the optimizer between backward and step cannot release an un-noised sum. Once a DP
  optimizer holds parameters of a model, a clip into any other parameter of that model is refused. The
  step also refuses a ``p.grad`` that neither a clip nor its own last step wrote (a model that ran eagerly
  from its first call, a gradient set by hand).

A model's ledger is found from any of its parameters (a weak table keyed by parameter identity); the
graphs of one model (recompiles, blocks compiled one by one) share it once an optimizer holds them all.
A call's ledger and clip state are those of the parameters it passes (found once per parameter list),
never those of the instance that compiled the graph: dynamo reuses a graph for every instance of a class.

Each compiled graph has one :class:`GraphRecord`, which owns the graph's :class:`bkcompile.plan.GraphPlan` and
lives as long as the compiled graph. The graph names its record by an integer in its calls of the run-time ops
(``bkcompile::record_norms``, ``bkcompile::loss_scale`` here, ``bkcompile::defer_grads`` in
``bkcompile.runtime.deferred``): :func:`record_of` finds it in a table of weak references, so a model dropped (and
``torch._dynamo.reset()``) leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import sys
import types
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch._dynamo.eval_frame import OptimizedModule
from torch._dynamo.utils import orig_code_map
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils.weak import WeakIdKeyDictionary

from bkcompile.errors import ClipOnceError, PrivacyError, UnclippedGradientError, release_error, run_error
from bkcompile.frames import is_dynamo_entry, is_generated, is_library
from bkcompile.plan import GraphPlan
from bkcompile.runtime.backwards import current_task, storage_key
from bkcompile.runtime.distributed import (
    average_over_ranks,
    from_fsdp_reduce,
    fsdp_accumulated,
    fsdp_params_of,
    is_dtensor,
    sync_under_ddp,
    used_eagerly_in_sharded_model,
)
from bkcompile.runtime.draws import Span, StepRows, span_of
from bkcompile.runtime.norms import ClipState, latest_norms

_RECORDS: weakref.WeakValueDictionary[int, GraphRecord] = weakref.WeakValueDictionary()  # by key, in compile order
_KEYS = itertools.count()
_LEDGERS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> weakref to the DP optimizer releasing it
_MODULES: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()  # compiled modules whose parameters are known

_FOREIGN = (
    "p.grad already held a gradient no bk_dp graph wrote when a graph accumulated into it (set by hand, or "
    "left from an eager backward)"
)
_OUTSIDE = (
    "it was used outside the compiled call (eager code such as `cm(x) * p`, a tied weight also used outside "
    "the compiled model, a submodule run eagerly under @torch.compiler.disable), or the compiled model ran "
    "eagerly (torch.compiler.set_stance('force_eager'), dynamo's eager fallback)"
)


@dataclasses.dataclass(frozen=True)
class Clip:
    """One way the gradient was clipped: the clip state (thresholds) over a set of parameters (by identity).

    Two graphs over different parameters (blocks compiled one by one, even when dynamo reuses one
    compiled graph and its clip state for them) are two clips: a sample in both gets up to R from each."""

    state: ClipState
    params: tuple[int, ...]

    def __hash__(self) -> int:  # cached: one clip is noted in the entry of every parameter it writes
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        return hash((self.state, self.params))


@dataclasses.dataclass(eq=False)
class _Entry:
    """One parameter in the ledger: the gradient tensor the clips accumulate into this step."""

    name: str
    road: str | None = None  # how a gradient no clip wrote got in (None: only clips wrote)
    clips: set[Clip] = dataclasses.field(default_factory=set)  # the clips that wrote this step
    hooked: bool = False
    source: weakref.ref | None = None  # FSDP2's shard: the unsharded parameter reduce-scattered into it
    written: bool = False  # a clip wrote since the step started (FSDP2's unsharded parameter: since its reduce)
    shard: weakref.ref | None = None  # FSDP2's unsharded parameter: the shard the optimizer holds for it
    sealed: torch.Tensor | None = None  # owned by a DP optimizer: the step's clipped sum (never put in p.grad)
    _grad: weakref.ref | None = None  # weak: a gradient zero_grad() dropped is freed, not kept by the ledger

    @property
    def grad(self) -> torch.Tensor | None:
        """The gradient tensor the clips wrote (None when there is none, or it is gone)."""
        return self._grad() if self._grad is not None else None

    @grad.setter
    def grad(self, tensor: torch.Tensor | None) -> None:
        self._grad = weakref.ref(tensor) if tensor is not None else None


@dataclasses.dataclass(eq=False)
class GraphRecord:
    """One compiled bk_dp graph at run time: where its trainable parameters sit among its inputs, its plan, and
    what its calls have bound."""

    indices: tuple[int, ...]
    names: tuple[str, ...]
    piece: bool = False  # one of several graphs of the model: clipped with the others at the end of the backward
    plan: GraphPlan | None = None  # what the pass decided (set once the pass has run)
    state: ClipState | None = None  # the clip state it was compiled with (None for a piece)
    # the taps' only input that needs a gradient: the parameters enter detached, so autograd keeps no edge
    # to their gradient accumulators and never touches p.grad for a bk_dp graph
    anchor: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros((), requires_grad=True))
    binding: _Binding | None = None  # the parameters of the last call
    # every parameter list the graph was called with (instances of one model class), by their identities
    bindings: dict[tuple[int, ...], _Binding] = dataclasses.field(default_factory=dict)
    others: tuple[int, ...] | None = None  # the indices of the inputs that are not trainable parameters
    samples: tuple[int, ...] = ()  # the indices of the inputs that hold the batch (forward arguments)
    batch_dim: int = 0
    key: int = dataclasses.field(init=False)  # the graph's name for its record in the run-time ops

    def __post_init__(self) -> None:
        self.key = next(_KEYS)
        _RECORDS[self.key] = self

    @functools.cached_property
    def trainable(self) -> frozenset[int]:
        return frozenset(self.indices)

    def wrap(self, compiled: Callable) -> Callable:
        """The compiled graph, with its trainable parameters passed through the ledger's tap."""
        indices = self.indices

        def run(*args: Any) -> Any:
            if not indices or not torch.is_grad_enabled():
                return compiled(*args)
            args = list(args)
            params = [args[i] for i in indices]
            binding = self.binding
            if binding is None or not _alive(binding.refs, params):  # a graph dynamo reuses for other parameters
                binding = self.binding = self.bind(params)
            where, modules = _caller()
            for module in modules:
                know_module(module)
            sync_under_ddp(params)  # DDP's reducer sees no gradient of a bk_dp graph: bkcompile all-reduces them
            if self.others is None:
                self.others = tuple(i for i in range(len(args)) if i not in self.trainable)
            call = CallRecord(self, where, _eager_upstream([args[i] for i in self.others]), params, binding)
            self.note_samples(call, args)
            for i, tapped in zip(indices, _Tap.apply(self.anchor, call)):
                args[i] = tapped
            return compiled(*args)

        return run

    def note_samples(self, call: CallRecord, args: list) -> None:
        """The call's rows: its batch size and the memory of its sample inputs (:mod:`bkcompile.runtime.draws`)."""
        batch = [args[i] for i in self.samples if isinstance(args[i], torch.Tensor)]
        if batch:
            call.rows = batch[0].shape[self.batch_dim]
            call.spans = tuple(span for t in batch if (span := span_of(t)) is not None)

    def bind(self, params: list[torch.nn.Parameter]) -> _Binding:
        """What is known of a call's parameters: computed on the first call with them, then found by identity."""
        key = tuple(map(id, params))
        binding = self.bindings.get(key)
        if binding is not None and _alive(binding.refs, params):
            return binding
        _know(params, self.names)
        for fsdp_param in fsdp_params_of(params):  # FSDP2: the graph receives the unsharded parameters
            _know_shard(fsdp_param.unsharded_param, fsdp_param.sharded_param, fsdp_param._param_fqn)
        for stale in [k for k, b in self.bindings.items() if not all(r() is not None for r in b.refs)]:
            del self.bindings[stale]  # parameters gone (a model deleted): their identities may be reused
        binding = self.bindings[key] = _Binding([weakref.ref(p) for p in params], self.clip_of(params))
        if self.piece:
            _BY_STORAGE.update((storage, p) for p in params if (storage := storage_key(p)) is not None)
        return binding

    def clip_of(self, params: Sequence[torch.nn.Parameter]) -> Clip | None:
        """The clip of a call with these parameters: the clip state of the plan's groups over them, in their
        ledger (None for a piece, clipped at the end of the backward). The compiled graph records its norms
        into its record; :func:`running_state` finds the state of each backward's own call's parameters."""
        plan = self.plan
        if plan is None or self.piece:
            return None
        position = {index: k for k, index in enumerate(self.indices)}
        groups = plan.grouping.groups
        members = tuple(tuple(params[position[m]] for m in group.members) for group in groups)
        names = tuple(tuple(self.names[position[m]] for m in group.members) for group in groups)
        state = ledger_for(params).clip_state(
            plan.grouping.names, members, names, plan.grouping.thresholds, params[0].device
        )
        return Clip(state, tuple(map(id, params)))


def record_of(key: int) -> GraphRecord:
    """The live record a graph names by ``key`` (its graph is alive while it runs, and holds its record)."""
    return _RECORDS[key]


def live_records() -> list[GraphRecord]:
    """The records of the compiled graphs alive now, in compile order."""
    return [record for _, record in sorted(_RECORDS.items())]


def records_of(model: torch.nn.Module) -> list[GraphRecord]:
    """The live records of the graphs whose calls passed parameters of ``model``, in compile order."""
    params = {id(p) for p in model.parameters()}
    return [r for r in live_records() if any(not params.isdisjoint(key) for key in r.bindings)]


def running_state(record: GraphRecord) -> ClipState:
    """The clip state of the call whose backward is running the graph of ``record``.

    Dynamo reuses one compiled graph for every instance of a model class (the parameters are graph inputs),
    so the graph's record is shared by all of them. The running autograd node is the graph's backward; among
    its inputs' edges is the tap of its call, which holds the clip of the parameters that call passed. A graph
    run outside any autograd backward (a joint graph called as a function, as the passes' unit tests do) has
    no call but its own: it keeps the state it was compiled with."""
    if torch._C._current_graph_task_id() < 0:
        return record.state
    node = torch._C._current_autograd_node()
    tap = _Tap._backward_cls
    for edge, _ in node.next_functions if node is not None else ():
        if isinstance(edge, tap) and edge.call.graph is record:
            return edge.call.binding.clip.state
    groups = record.plan.grouping.names if record.plan is not None else ()
    raise run_error(
        PrivacyError,
        f"the backward of a bk_dp graph (clipping groups {', '.join(groups)}) ran outside the call that "
        "produced it, so bkcompile cannot tell which model's clip state it clips with",
        "clipping with another model's thresholds would not match the noise of that model's optimizer",
        "run the backward through torch's autograd engine (not compiled autograd) after calling the compiled model",
    )


# The run-time ops are plain kernels for every device (no ``torch.library.custom_op``, whose Python autograd
# wrapper costs four times the op itself on every call): they run inside a compiled backward, without gradients.
_LIB = torch.library.Library("bkcompile", "FRAGMENT")


def record_norms(norms: torch.Tensor, key: int, group: int) -> torch.Tensor:
    """Record a clipping group's per-sample norms (B,) of this backward; its current threshold R_g."""
    return running_state(record_of(key)).record(norms, group)


def loss_scale(like: torch.Tensor, key: int) -> torch.Tensor:
    """The GradScaler's scale S in this backward's gradients (1 without one), like ``like``."""
    return running_state(record_of(key)).loss_scale(like)


def _scalar_like(value: torch.Tensor, key: int, group: int = 0) -> torch.Tensor:
    return value.new_empty(())


for _op, _schema in (
    (record_norms, "(Tensor norms, int key, int group) -> Tensor"),
    (loss_scale, "(Tensor like, int key) -> Tensor"),
):
    _LIB.define(_op.__name__ + _schema, tags=(torch.Tag.pt2_compliant_tag,))
    _LIB.impl(_op.__name__, _op, "CompositeExplicitAutograd")
    torch.library.register_fake(f"bkcompile::{_op.__name__}", _scalar_like, lib=_LIB)


@dataclasses.dataclass(eq=False)
class _Binding:
    """A graph's trainable parameters, as long as its calls pass the same ones, and what is computed once
    from them: the clip that writes them and their ledger entries (read again when the ledger changes)."""

    refs: list[weakref.ref]
    clip: Clip | None
    cached: tuple[StepLedger, int, list[_Entry]] | None = None  # (ledger, its version, the entries)

    def entries_in(self, ledger: StepLedger, params: Sequence[torch.nn.Parameter]) -> list[_Entry]:
        cached = self.cached
        if cached is None or cached[0] is not ledger or cached[1] != ledger.version:
            cached = self.cached = (ledger, ledger.version, [ledger.entries[p] for p in params])
        return cached[2]


@dataclasses.dataclass(eq=False)
class CallRecord:
    """One forward call of a graph with gradients enabled."""

    graph: GraphRecord
    where: str  # the user's call site
    upstream: tuple[torch.nn.Parameter, ...]  # parameters used eagerly to compute the call's inputs
    params: list[torch.nn.Parameter]  # the graph's trainable parameters, in its input order
    binding: _Binding  # what is known of these parameters
    backwards: int = 0
    aliases: tuple[torch.Tensor, ...] = ()  # what the graph receives for them (held, so their identity lasts)
    rows: int = 0  # the batch size of its sample inputs
    spans: tuple[Span, ...] = ()  # the memory of its sample inputs


class _Tap(torch.autograd.Function):
    """Identity on the graph's parameters; its backward hands their clipped gradients to the ledger."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, call: CallRecord) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.call = call
        call.aliases = tuple(p.detach() for p in call.params)
        if call.graph.piece:  # the deferred clip meets the aliases in the backward and asks for the parameters
            for alias, p in zip(call.aliases, call.params):
                alias._bk_parameter = p
        return call.aliases

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[None, None]:
        call = ctx.call
        _WATCH.enter(call)
        call.aliases = ()  # the graph's backward has run: they held this node alive (their grad_fn), in a cycle
        ledger = _LEDGERS[call.params[0]]
        ledger.refuse_upstream(call)
        if ledger.released_by_optimizer():  # the plain path keeps no steps
            ledger.rows.note(current_task(), call.rows, call.spans, call.where)
        if not call.graph.piece:  # a piece's clipped sums are written at the end of the backward
            ledger.write(call, grads)
        return None, None


def parameter_of(tensor: torch.Tensor) -> torch.Tensor:
    """The parameter behind a tensor a piece received for it (itself when it is no tap's alias). Activation
    checkpointing saves an alias detached (a new tensor over the parameter's storage): found by its storage."""
    found = getattr(tensor, "_bk_parameter", None)
    if found is None:
        found = _BY_STORAGE.get(storage_key(tensor))
    return tensor if found is None else found


_BY_STORAGE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # the pieces' parameters by storage


@dataclasses.dataclass(frozen=True)
class _Seen:
    """What the watch keeps of a call: enough to tell two calls apart, nothing that keeps a model alive."""

    graph: weakref.ref[GraphRecord]
    piece: bool
    params: tuple[int, ...]  # the identities of its parameters (alive while their backward runs)
    where: str


class _BackwardWatch:
    """The calls whose clipped gradients the running autograd backward (graph task) has written."""

    def __init__(self) -> None:
        self.task = -1
        self.calls: list[_Seen] = []

    def enter(self, call: CallRecord) -> None:
        if call.backwards:
            raise run_error(
                ClipOnceError,
                f"a second backward runs through the compiled call at {call.where}",
                "each backward would clip the samples of that call again, so one sample could contribute up to 2R "
                "to the step",
                "add the losses and call backward() once (loss = loss1 + loss2; loss.backward())",
            )
        call.backwards += 1
        task = current_task()  # a reentrant recomputation's nested backward counts as the outer one
        if task != self.task:
            self.task, self.calls = task, []
        params = tuple(map(id, call.params))
        if self.calls and not (call.graph.piece and all(c.piece for c in self.calls)):
            first = self.calls[0]
            if first.graph() is call.graph and first.params == params:
                raise run_error(
                    ClipOnceError,
                    f"the compiled model was called twice before one backward: first call at {first.where}, "
                    f"second call at {call.where}",
                    "each call is clipped on its own, so a sample in both could contribute up to 2R to the step",
                    "put every use of the model in one compiled function (compile a module whose forward computes "
                    "both passes and returns the summed per-sample loss); when the calls hold different samples, "
                    "run forward and backward per micro-batch before step()",
                )
            raise run_error(
                ClipOnceError,
                f"two bk_dp graphs ran in one backward (calls at {first.where} and {call.where}), and one of "
                "them was compiled as the whole model",
                "a graph compiled as the whole model clips its own part of each sample's gradient, so a sample in "
                "both could contribute up to 2R to the step",
                "for modules compiled one by one (regional compilation), compile every one of them, stem and head "
                "too, with options={..., 'graphs': 'several'}: the graphs are then clipped together, once per "
                "sample; or compile the model as one graph",
            )
        self.calls.append(_Seen(weakref.ref(call.graph), call.graph.piece, params, call.where))


_WATCH = _BackwardWatch()


class StepLedger:
    """The clip states of one model's graphs and, per parameter, what the clips wrote in this step."""

    def __init__(self) -> None:
        self.entries: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> _Entry
        self.states: list[ClipState] = []
        self.refusal: str | None = None  # the backend's refusal, when dynamo may run the model eagerly instead
        self._pending: list[tuple[tuple, torch.Tensor]] = []  # thresholds restored before the graph compiled
        self.grad_scaler: Any = None  # the GradScaler of the model's DPOptimizer (its scale is in the gradients)
        self.version = 0  # changes whenever a parameter's entry does (bindings cache the entries)
        self.owned = WeakIdKeyDictionary()  # parameter -> True: the parameters a DP optimizer releases
        self.rows = StepRows()  # the rows this step's backwards clipped

    def use_grad_scaler(self, scaler: Any) -> None:
        """Every graph of the model divides its per-sample norms by this scaler's scale (now and later)."""
        self.grad_scaler = scaler
        for state in self.states:
            state.grad_scaler = scaler

    def adopt(self, params: Sequence[torch.nn.Parameter], names: Sequence[str]) -> None:
        """Know these parameters: every eager accumulation into their ``.grad`` is refused from now on."""
        for p, name in zip(params, names):
            entry = self.entries.get(p)
            if entry is None:
                entry = self.entries[p] = _Entry(name)  # a gradient already there was not written by a clip
                self.version += 1
            if not entry.hooked:
                p.register_post_accumulate_grad_hook(_eager_accumulation)
                entry.hooked = True

    def clip_state(self, groups, members, names, initial, device) -> ClipState:
        """The clip state of these groups (created on first use; recompiles share it)."""
        for state in self.states:
            if state.same_groups(groups, members, initial):
                return state
        state = ClipState(groups, members, names, tuple(initial), device)
        state.grad_scaler = self.grad_scaler
        for key, thresholds in self._pending:
            if key == (groups, names, tuple(initial)):
                with unset_fake_temporarily():  # the pass runs under a fake mode; the state holds real tensors
                    state.thresholds.copy_(thresholds)
        self.states.append(state)
        return state

    def restore_thresholds(self, groups, names, initial, thresholds: torch.Tensor) -> None:
        key = (tuple(groups), tuple(map(tuple, names)), tuple(initial))
        for state in self.states:
            if (state.groups, state.names, state.initial) == key:
                state.move_thresholds(thresholds)
                return
        self._pending.append((key, thresholds))

    def last_state(self) -> ClipState | None:
        recorded = [s for s in self.states if s.backwards]
        return max(recorded, key=lambda s: s.task) if recorded else None

    def refuse_upstream(self, call: CallRecord) -> None:
        if call.upstream:
            labels = ", ".join(_label(p) for p in call.upstream)
            raise run_error(
                UnclippedGradientError,
                f"{labels} computed the inputs of the compiled call at {call.where} outside any bk_dp graph",
                "their gradients would not be clipped, so the step would not be private",
                "compile the whole model with backend='bk_dp' (the stem too), or freeze those parameters",
            )

    def write(self, call: CallRecord, grads: Sequence) -> None:
        """Accumulate a call's clipped gradients: into the ledger's sealed sums for the parameters a DP optimizer
        releases, else into ``p.grad`` (what autograd would have done)."""
        held: list[torch.Tensor] = []
        added: list[torch.Tensor] = []
        clip = call.binding.clip
        released = self.released_by_optimizer()  # once per call, not per parameter
        for p, entry, grad in zip(call.params, call.binding.entries_in(self, call.params), grads):
            if grad is not None:
                self._take(p, entry, grad.detach(), held, added, released)
                if clip is not None:
                    entry.clips.add(clip)
        if held:
            torch._foreach_add_(held, added)  # one call for the gradients that are already there
        average_over_ranks(call.params, self.gradients(call.params))  # under DDP: the ranks' average, as DDP's

    def accumulate(self, p: torch.nn.Parameter, grad: torch.Tensor, clip: Clip | None) -> None:
        """Add one clipped gradient (the deferred clip's) and note the clip that wrote it."""
        held: list[torch.Tensor] = []
        added: list[torch.Tensor] = []
        entry = self.entries[p]
        self._take(p, entry, grad.detach(), held, added, self.released_by_optimizer())
        if clip is not None:
            entry.clips.add(clip)
        if held:
            held[0].add_(added[0])

    def gradients(self, params: Sequence[torch.nn.Parameter]) -> Iterator[torch.Tensor | None]:
        """Where each parameter's clipped sum of this step is: sealed in the ledger when a DP optimizer releases
        it, else ``p.grad``. Lazily: a single process never walks them (:func:`average_over_ranks`)."""
        for p in params:
            entry = self.entries.get(p)
            yield entry.sealed if entry is not None and owner_of(p) is not None else p.grad

    def _take(self, p, entry: _Entry, grad: torch.Tensor, held: list, added: list, released: bool) -> None:
        """A clipped gradient for ``p``. A parameter a DP optimizer releases keeps it sealed in its entry,
        divided by the GradScaler's current scale (the scale of this backward: micro-batches of one step may
        be scaled differently); nothing un-noised reaches ``p.grad``. Otherwise it becomes ``p.grad`` when
        there is none, else is added to it (by the caller, from ``held`` and ``added``, in place). ``released``:
        whether a DP optimizer releases parameters of this ledger (:meth:`released_by_optimizer`)."""
        entry.written = True
        if released and owner_of(p) is not None:  # no DP optimizer releases the ledger: it owns none of them
            grad = self._unscaled(grad)
            if entry.sealed is None:
                entry.sealed = grad.clone() if grad._is_view() else grad
            else:
                held.append(entry.sealed)
                added.append(grad)
            return
        if released:
            self._refuse_unreleased(p, entry)
        current = p.grad
        if current is None:
            p.grad = grad.clone() if grad._is_view() else grad
            current = p.grad
        else:
            if current is not entry.grad:
                entry.road = entry.road or _FOREIGN
            held.append(current)
            added.append(grad)
        entry.grad = current

    def _unscaled(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` divided by the GradScaler's scale now (what the graphs read to clip), on the device."""
        scaler = self.grad_scaler
        scale = getattr(scaler, "_scale", None) if scaler is not None and scaler.is_enabled() else None
        if scale is None:
            return grad
        return grad / scale.detach().reshape(()).to(dtype=grad.dtype, device=grad.device)

    def _refuse_unreleased(self, p: torch.nn.Parameter, entry: _Entry) -> None:
        """A clip wrote a parameter no DP optimizer releases, while one releases others of this model (the caller
        checked that one does): its clipped sum would sit un-noised in ``p.grad``, where a plain optimizer (or
        ``p -= lr * p.grad``) would step it. FSDP2's unsharded parameter passes when the optimizer releases its
        shard."""
        shard = entry.shard() if entry.shard is not None else None
        if shard is not None and owner_of(shard) is not None:
            return
        raise release_error(
            f"parameter {_label(p)} was clipped, but the DPOptimizer of its model does not hold it",
            "its clipped sum would sit in p.grad with no noise, where another optimizer or a manual update "
            "would step it (infinite epsilon)",
            "give every trainable parameter of the model to the DPOptimizer (one optimizer, several param_groups "
            "for different settings), or freeze it with p.requires_grad_(False) before compiling",
        )

    def released_by_optimizer(self) -> bool:
        """Whether a live DP optimizer releases parameters of this ledger."""
        if not self.owned:  # the plain path: no walk of the (empty) weak table
            return False
        return any(owner_of(p) is not None for p in self.owned)

    def start_step(self, params: Iterable[torch.nn.Parameter]) -> None:
        """The gradients as they are now (after ``zero_grad``) are the start of a step."""
        for p in params:
            entry = self.entries.get(p)
            if entry is not None:
                entry.grad, entry.road, entry.written, entry.sealed = p.grad, None, False, None
                entry.clips.clear()
                source = self.source_entry(entry)
                if source is not None:  # gradients its unsharded parameter held before zero_grad() are gone too
                    source.grad, source.road, source.written = None, None, False
                    source.clips.clear()
        for state in self.states:
            state.reset_counts()
        self.rows = StepRows()

    def source_entry(self, entry: _Entry) -> _Entry | None:
        """For FSDP2's shard: the entry of the unsharded parameter reduce-scattered into it."""
        unsharded = entry.source() if entry.source is not None else None
        return self.entries.get(unsharded) if unsharded is not None else None

    def road_of(self, p: torch.nn.Parameter) -> str:
        """Why an eager accumulation into ``p.grad`` happened, as far as the ledger can tell."""
        stance = torch._dynamo.eval_frame._stance.stance
        if self.refusal is not None:
            return (
                "dynamo ran the model eagerly after bk_dp refused it (torch._dynamo.config.suppress_errors = True); "
                f"the refusal: {self.refusal}"
            )
        if stance != "default":
            return f"torch.compiler.set_stance({stance!r}) ran the compiled model eagerly"
        return used_eagerly_in_sharded_model(p) or _OUTSIDE


def _eager_accumulation(p: torch.nn.Parameter) -> None:
    """Post-accumulate-grad hook: autograd itself accumulated into ``p.grad``, so no clip wrote it."""
    ledger = _LEDGERS.get(p)
    if ledger is None:
        return
    road = ledger.road_of(p)
    ledger.entries[p].road = road
    raise run_error(
        UnclippedGradientError,
        f"parameter {_label(p)} received a gradient that no bk_dp clip wrote: {road}",
        "an unclipped gradient makes the step not private",
        "run every use of the parameter inside the bk_dp-compiled model (or detach it outside), with dynamo's "
        "default stance and suppress_errors off",
    )


def _reduced_into_shard(p: torch.nn.Parameter) -> None:
    """Post-accumulate-grad hook of an FSDP2 sharded parameter. FSDP2 calls it once its reduce-scatter has
    set or accumulated ``p.grad``: the shard takes over what the clips wrote into its unsharded parameter
    since the last reduce-scatter (their ranks' average), sealed in the ledger when a DP optimizer releases
    the shard (``p.grad`` is then emptied). Called by autograd instead, the shard itself was used eagerly:
    refused."""
    frame = sys._getframe(1)
    if not from_fsdp_reduce(frame):
        _eager_accumulation(p)
        return
    ledger = _LEDGERS[p]
    entry = ledger.entries[p]
    source = ledger.source_entry(entry)
    if fsdp_accumulated(frame) and p.grad is not entry.grad:  # added to a gradient the shard held before
        entry.road = entry.road or _FOREIGN
    if source is None or not source.written:
        entry.road = entry.road or "FSDP2 reduce-scattered into it a gradient no bk_dp clip wrote"
    else:
        entry.road = entry.road or source.road
        entry.clips |= source.clips
        source.grad, source.road, source.written = None, None, False
        source.clips.clear()
    if owner_of(p) is not None and p.grad is not None:
        reduced = ledger._unscaled(p.grad)
        entry.sealed = reduced if entry.sealed is None else entry.sealed + reduced
        entry.written = True
        p.grad = None
    entry.grad = p.grad


def _label(p: torch.nn.Parameter) -> str:
    ledger = _LEDGERS.get(p)
    entry = ledger.entries.get(p) if ledger is not None else None
    if entry is not None:
        return repr(entry.name)
    return f"a parameter of shape {tuple(p.shape)} that no bk_dp graph uses"


def _caller() -> tuple[str, list[torch.nn.Module]]:
    """The user's line that called the compiled model, and the modules whose parameters belong to the call.

    The line is the first frame outside torch and bkcompile after dynamo's entry (``compile_wrapper``),
    else the first outside them. The modules: the one whose compiled forward calls the graph (``self`` of
    dynamo's frame), the module ``torch.compile`` wrapped (``OptimizedModule._orig_mod``: its submodules
    that run eagerly, ``torch.compiler.disable`` ones too), and the user's module whose forward called it, when it
    contains it (the model a
    regionally compiled block belongs to: its stem and head, run eagerly, are then refused too).
    """
    frame = sys._getframe(2)
    first, entered, modules = None, False, []
    while frame is not None:
        file = frame.f_code.co_filename
        ours = is_library(file)
        if frame.f_code in orig_code_map and not entered:
            owner = frame.f_locals.get("self")
            if isinstance(owner, torch.nn.Module):
                modules.append(owner)
        # a frame's locals are a dict built on each read: read them where the code has a ``self`` only (its own, a
        # cell of it or a closure's)
        owner = frame.f_locals.get("self") if ours and _has_self(frame.f_code) else None
        if isinstance(owner, OptimizedModule) and all(m is not owner._orig_mod for m in modules):
            modules.append(owner._orig_mod)  # the module torch.compile wraps: all of it, disabled submodules too
        if is_dynamo_entry(frame):
            entered = True  # dynamo's entry into the compiled function: the caller is the user's call
        elif not ours and not is_generated(file):
            if entered:
                owner = frame.f_locals.get("self")
                if isinstance(owner, torch.nn.Module) and modules and _contains(owner, modules[0]):
                    modules.append(owner)
                return f"{file}:{frame.f_lineno}", modules
            first = first or f"{file}:{frame.f_lineno}"
        frame = frame.f_back
    return first or "<unknown location>", modules


def _has_self(code: types.CodeType) -> bool:
    return "self" in code.co_varnames or "self" in code.co_cellvars or "self" in code.co_freevars


def _contains(root: torch.nn.Module, module: torch.nn.Module) -> bool:
    if root in _MODULES:  # known already: no need to search it again
        return False
    return root is not module and any(m is module for m in root.modules())


def _eager_upstream(inputs: list) -> tuple[torch.nn.Parameter, ...]:
    """Parameters that computed these inputs in eager autograd.

    The walk stops at other bk_dp calls (a node fed by a tap): such a call walked its own inputs and
    refuses what it found in its own backward, which runs whenever a gradient crosses it. So calls of
    blocks compiled one by one walk only the eager code between them, not the whole model before them."""
    tap = _Tap._backward_cls
    roots = [a.grad_fn for a in inputs if isinstance(a, torch.Tensor) and a.grad_fn is not None]
    found: dict[int, torch.nn.Parameter] = {}
    seen: set = set()
    while roots:
        node = roots.pop()
        if node is None or node in seen or isinstance(node, tap):
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.nn.Parameter):
            found[id(variable)] = variable
        following = [next_node for next_node, _ in node.next_functions]
        if not any(isinstance(next_node, tap) for next_node in following):
            roots.extend(following)
    return tuple(found.values())


def _alive(refs: list[weakref.ref], params: Sequence[torch.Tensor]) -> bool:
    return len(refs) == len(params) and all(r() is p for r, p in zip(refs, params))


def _know(params: Sequence[torch.nn.Parameter], names: Sequence[str]) -> None:
    """Adopt parameters no ledger knows yet (a graph dynamo reuses for another model of the same code)."""
    if not all(p in _LEDGERS and p in _LEDGERS[p].entries for p in params):
        ledger_for(params).adopt(params, names)


def know_module(module: torch.nn.Module) -> None:
    """Adopt every trainable parameter of the module, also those its graphs do not use: one used only
    outside them (``cm(x) * cm.temperature``, an eager head after compiled blocks) is then refused in the
    backward too."""
    if module in _MODULES:
        return
    # FSDP2's shards (of blocks not running now) are adopted with their unsharded parameters
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad and not is_dtensor(p)]
    if named:
        names, params = zip(*named)
        _know(params, names)
    _MODULES.add(module)


def _know_shard(unsharded: torch.nn.Parameter, sharded: torch.nn.Parameter, name: str | None) -> None:
    """Adopt FSDP2's sharded parameter, whose gradient FSDP2 reduce-scatters from the unsharded one's."""
    ledger = ledger_for([unsharded, sharded])
    if sharded not in ledger.entries:
        ledger.entries[sharded] = _Entry(name or "a sharded parameter", source=weakref.ref(unsharded))
        ledger.version += 1
        sharded.register_post_accumulate_grad_hook(_reduced_into_shard)
        ledger.entries[sharded].hooked = True
    unsharded_entry = ledger.entries.get(unsharded)
    if unsharded_entry is not None:
        unsharded_entry.shard = weakref.ref(sharded)


def _distinct_ledgers(params: Sequence[torch.nn.Parameter]) -> list[StepLedger]:
    """The ledgers these parameters have, each once, in the parameters' order."""
    found: list[StepLedger] = []
    for p in params:
        ledger = _LEDGERS.get(p)
        if ledger is not None and all(ledger is not f for f in found):
            found.append(ledger)
    return found


def ledger_for(params: Sequence[torch.nn.Parameter]) -> StepLedger:
    """The ledger of these parameters: theirs if they have one (several are merged), else a new one."""
    found = _distinct_ledgers(params)
    ledger = found[0] if found else StepLedger()
    for other in found[1:]:
        _merge(ledger, other)
    for p in params:
        _LEDGERS[p] = ledger
    return ledger


def _merge(into: StepLedger, other: StepLedger) -> None:
    into.version += 1
    other.version += 1
    for p, entry in list(other.entries.items()):
        into.entries[p] = entry
        _LEDGERS[p] = into
    into.states.extend(s for s in other.states if s not in into.states)
    into.refusal = into.refusal or other.refusal
    into.owned.update(other.owned)
    into._pending.extend(other._pending)
    into.use_grad_scaler(into.grad_scaler or other.grad_scaler)


def ledger_of(model_or_param: torch.nn.Module | torch.nn.Parameter) -> StepLedger | None:
    """The ledger of a model (any of its parameters) or of one parameter; None if no bk_dp graph saw it."""
    params = [model_or_param] if isinstance(model_or_param, torch.Tensor) else model_or_param.parameters()
    return next((_LEDGERS[p] for p in params if p in _LEDGERS), None)


def ledger_of_params(params: Sequence[torch.nn.Parameter]) -> StepLedger | None:
    """The ledger of the first of these parameters that has one (an optimizer's parameters share one)."""
    return next((_LEDGERS[p] for p in params if p in _LEDGERS), None)


def live_ledgers() -> list[StepLedger]:
    """The ledgers of the parameters that the live compiled graphs were called with."""
    found: list[StepLedger] = []
    for record in live_records():
        for binding in record.bindings.values():
            params = [p for p in (ref() for ref in binding.refs) if p is not None]
            found += [ledger for ledger in _distinct_ledgers(params) if all(ledger is not f for f in found)]
    return found


def last_per_sample_norms(model: torch.nn.Module | None = None) -> torch.Tensor | None:
    """Per-sample gradient norms of the most recent bk_dp backward, before clipping (None before any).

    With all-layer clipping a (B,) tensor of ||g_i|| over all trainable parameters (the fraction of
    clipped samples is ``(norms > max_grad_norm).float().mean()``); with clipping groups (B, G), one
    column per group. On the model's device, float32 (float64 for a float64 model). With ``model``,
    that model's most recent backward; without, that of the models whose compiled graphs are alive.
    """
    ledgers = live_ledgers() if model is None else [ledger for ledger in [ledger_of(model)] if ledger is not None]
    states = [state for ledger in ledgers if (state := ledger.last_state()) is not None]
    return latest_norms(max(states, key=lambda s: s.task) if states else None)


def owner_of(p: torch.Tensor) -> Any:
    """The live DP optimizer that releases ``p`` (None: the plain path, ``p.grad`` holds the clipped sum)."""
    ref = _OWNERS.get(p)
    return ref() if ref is not None else None


def own(params: Sequence[torch.nn.Parameter], owner: Any) -> None:
    """``owner`` (a DP optimizer) releases these parameters: from now on their clipped sums are sealed in the
    ledger, never written to ``p.grad``, and only the owner's ``step()`` turns them into a noised update."""
    if not params:
        return
    ledger = ledger_for(params)
    for p in params:
        _OWNERS[p] = weakref.ref(owner)
        ledger.owned[p] = True


def _missing(p: torch.nn.Parameter, ledger: StepLedger | None, entry: _Entry | None, index: int) -> str:
    label = repr(entry.name) if entry is not None else f"parameter {index} (shape {tuple(p.shape)})"
    road = ledger.road_of(p) if ledger is not None and ledger.refusal else "the model ran eagerly"
    return (
        f"{label}: no bk_dp graph wrote its gradient since zero_grad() ({road}: not compiled with "
        "backend='bk_dp', run under torch.compiler.set_stance('force_eager'), or p.grad set by hand)"
    )


@dataclasses.dataclass
class Release:
    """What one DP optimizer step may release: per parameter, the sealed clipped sum (None: noise alone)."""

    sums: list[torch.Tensor | None]
    clips: set[Clip]


def take_release(owner: Any, params: Sequence[torch.nn.Parameter], released: WeakIdKeyDictionary) -> Release:
    """The clipped sums a DP optimizer's ``step()`` noises, taken out of the ledger, after proving that they are
    the whole step: every parameter the step holds is released by this optimizer and still trainable, no other
    parameter holds a sealed sum for it, and no ``p.grad`` holds a gradient that neither a clip nor the
    previous ``step()`` (``released``: the noised gradients it wrote) put there."""
    problems: list[str] = []
    sums: list[torch.Tensor | None] = []
    clips: set[Clip] = set()
    held = WeakIdKeyDictionary()
    taken: list[_Entry] = []  # the entries whose sums this step takes
    for index, p in enumerate(params):
        held[p] = True
        ledger = _LEDGERS.get(p)
        entry = ledger.entries.get(p) if ledger is not None else None
        grad = p.grad
        if grad is not None and released.get(p) is not grad:
            if entry is None or not entry.clips:
                problems.append(_missing(p, ledger, entry, index))
            else:
                problems.append(
                    f"{entry.name!r}: p.grad holds a gradient that neither bkcompile nor the last step() wrote (set "
                    "by hand between backward() and step()); the clipped sum of a parameter a DPOptimizer holds "
                    "stays sealed until step(), which alone writes p.grad: leave p.grad alone until after step()"
                )
        if entry is not None and entry.road is not None:
            problems.append(f"{entry.name!r}: {entry.road}")
        if entry is not None and entry.sealed is not None and not p.requires_grad:
            problems.append(
                f"{entry.name!r}: frozen (requires_grad=False) between backward() and step() while it holds a "
                "clipped sum; freeze parameters before the backward of a step, or after step()"
            )
        sums.append(entry.sealed if entry is not None else None)
        if entry is not None and entry.sealed is not None:
            clips |= entry.clips
            taken.append(entry)
    for ledger in _distinct_ledgers(params):
        for p, entry in list(ledger.entries.items()):
            if entry.sealed is not None and p not in held and owner_of(p) is owner:
                problems.append(
                    f"{entry.name!r}: holds a clipped sum of this step but was removed from the optimizer's "
                    "param_groups; put it back, or call zero_grad() to drop the step"
                )
    if problems:
        raise refuse_step(problems)
    for entry in taken:
        entry.sealed = None
    return Release(sums, clips)


def start_step(params: Sequence[torch.nn.Parameter]) -> None:
    """Mark the start of a step for these parameters (``DPOptimizer.zero_grad`` and ``step``)."""
    for ledger in _distinct_ledgers(params):
        ledger.start_step(params)


def refuse_step(problems: list[str]) -> UnclippedGradientError:
    return run_error(
        UnclippedGradientError,
        "the gradients were not produced by a bk_dp backward alone since the last zero_grad():\n  "
        + "\n  ".join(problems),
        "stepping them would not be private",
        "compile the model with backend='bk_dp', use its parameters only inside the compiled call, and call "
        "zero_grad() before each logical batch",
    )
