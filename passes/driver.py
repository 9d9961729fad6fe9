"""The pass driver: runs named passes in order, checks the invariants between them, dumps the graph.

A :class:`Pass` is a name and a function ``state -> state`` that returns the state with what the pass
produces. After each pass the driver

- names the pass in any bkcompile error it raised (``pass: <name>``), and wraps any other exception (a
  ``KeyError`` of a bkcompile bug, a torch error) in an :class:`~bkcompile.errors.InternalError` naming the
  pass and the op the pass was at, the original chained: no foreign exception reaches a user from a pass;
- with ``check``: checks the invariants every later pass relies on (the graph lints, every placeholder
  and call that returns something has a ``meta["val"]`` of a known type, no graph output aliases an input
  or another output that it did not alias before, no mutating op was added), or raises
  :class:`PassInvariantError`;
- with ``dump``: writes the graph to ``<dump>/<n>-<label>/<i>-<pass>.txt`` (``00-input.txt`` first). Not
  torch's ``GraphTransformObserver``: it draws dot graphs (pydot, graphviz) into Inductor's process-wide
  ``trace.log_url_for_graph_xform``, where this is readable text per compiled graph, chosen by an option.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

import torch
import torch.fx
from torch.multiprocessing.reductions import StorageWeakRef

from bkcompile.errors import BKError, InternalError, PassInvariantError, node_error, op_name

State = TypeVar("State")


@dataclasses.dataclass(frozen=True)
class Pass(Generic[State]):
    name: str
    run: Callable[[State], State]


def run_passes(
    passes: Sequence[Pass[State]],
    state: State,
    gm: torch.fx.GraphModule,
    *,
    check: bool = False,
    dump: str | None = None,
    label: str = "graph",
) -> State:
    """Run ``passes`` on ``state`` (whose graph is ``gm``, rewritten in place) and return the final state."""
    folder = _dump_folder(dump, label) if dump else None
    if folder is not None:
        _write(folder, 0, "input", gm)
    for index, step in enumerate(passes, 1):
        before = _Snapshot.of(gm.graph) if check else None
        with named(step.name):
            state = step.run(state)
        if before is not None:
            check_invariants(gm.graph, step.name, before)
        if folder is not None:
            _write(folder, index, step.name, gm)
    return state


@contextlib.contextmanager
def named(pass_name: str) -> Iterator[None]:
    """Name ``pass_name`` in a bkcompile error raised inside (for checks run outside ``run_passes`` too); any
    other exception becomes an :class:`InternalError` naming the pass and the op it was at."""
    try:
        yield
    except BKError as error:
        error.in_pass(pass_name)
        raise
    except Exception as error:
        internal = node_error(
            InternalError,
            _node_at(error.__traceback__),
            f"bkcompile's pass failed with {type(error).__name__}: {error} (a bug of bkcompile; the graph is "
            "refused, not trained unclipped)",
            "please report it with this message and the model; until then, compute that line with other ops",
        )
        internal.in_pass(pass_name)
        raise internal from error


def _node_at(traceback: types.TracebackType | None) -> torch.fx.Node | None:
    """The fx node the innermost bkcompile frame of a failed pass was working on: a local ``node``, else any local
    node (torch's frames below it work on graphs of their own)."""
    found = None
    while traceback is not None:
        frame = traceback.tb_frame
        if frame.f_globals.get("__name__", "").startswith("bkcompile."):
            node = frame.f_locals.get("node")
            if not isinstance(node, torch.fx.Node):
                node = next((v for v in frame.f_locals.values() if isinstance(v, torch.fx.Node)), None)
            found = node if node is not None else found
        traceback = traceback.tb_next
    return found


# --- invariants ----------------------------------------------------------------------------------------

_VALUE_TYPES = (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)


def _valid_value(value: object) -> bool:
    if isinstance(value, (tuple, list)):
        return all(v is None or _valid_value(v) for v in value)
    return isinstance(value, _VALUE_TYPES)


def _storage(value: object) -> StorageWeakRef | None:
    if isinstance(value, torch.Tensor):
        return StorageWeakRef(value.untyped_storage())
    return None


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    """What a pass may not add: aliasing between graph inputs and outputs, and mutating ops."""

    aliases: frozenset[tuple[str, str]]  # (output i, input j or output k) sharing a storage
    mutating: frozenset[torch.fx.Node]

    @classmethod
    def of(cls, graph: torch.fx.Graph) -> _Snapshot:
        owners: dict[StorageWeakRef, list[str]] = {}
        for position, node in enumerate(graph.find_nodes(op="placeholder")):
            storage = _storage(node.meta.get("val"))
            if storage is not None:
                owners.setdefault(storage, []).append(f"input {position}")
        pairs = set()
        for position, value in enumerate(graph.output_node().args[0]):
            storage = _storage(value.meta.get("val")) if isinstance(value, torch.fx.Node) else None
            if storage is None:
                continue
            name = f"output {position}"
            pairs.update((name, other) for other in owners.get(storage, []))
            owners.setdefault(storage, []).append(name)
        mutating = {
            n
            for n in graph.nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
        }
        return cls(frozenset(pairs), frozenset(mutating))


def check_invariants(graph: torch.fx.Graph, pass_name: str, before: _Snapshot) -> None:
    """Raise :class:`PassInvariantError` naming ``pass_name`` when the graph breaks an invariant."""

    def broken(what: str) -> PassInvariantError:
        return PassInvariantError(f"after pass {pass_name!r}: {what} (a bkcompile bug; please report it)")

    try:
        graph.lint()
    except RuntimeError as error:
        raise broken(f"the graph does not lint: {error}") from error
    for node in graph.nodes:
        returns_nothing = isinstance(node.target, torch._ops.OpOverload) and not node.target._schema.returns
        if (
            node.op in ("placeholder", "call_function")
            and not returns_nothing
            and not _valid_value(node.meta.get("val"))
        ):
            raise broken(f"node {node.name} ({op_name(node)}) has no valid meta['val']: {node.meta.get('val')!r}")
    after = _Snapshot.of(graph)
    new_aliases = sorted(after.aliases - before.aliases)
    if new_aliases:
        raise broken(f"new aliasing between graph inputs and outputs: {new_aliases}")
    new_mutations = [n.name for n in graph.nodes if n in after.mutating - before.mutating]
    if new_mutations:
        raise broken(f"new mutating ops: {new_mutations}")


# --- dumps ---------------------------------------------------------------------------------------------


def _dump_folder(root: str, label: str) -> pathlib.Path:
    base = pathlib.Path(root)
    base.mkdir(parents=True, exist_ok=True)
    number = sum(1 for _ in base.iterdir())
    folder = base / f"{number:03d}-{label}"
    folder.mkdir()
    return folder


def _write(folder: pathlib.Path, index: int, name: str, gm: torch.fx.GraphModule) -> None:
    text = gm.print_readable(print_output=False, include_stride=False, include_device=False)
    (folder / f"{index:02d}-{name}.txt").write_text(text)
