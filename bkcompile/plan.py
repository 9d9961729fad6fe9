"""The compile -> run contract: what the privatizing pass decided about one graph, for its run time.

:func:`bkcompile.passes.privatize` returns a :class:`GraphPlan`; the backend hands it to the graph's run-time
record (:class:`bkcompile.runtime.ledger.GraphRecord`), which owns it for as long as the compiled graph lives. The graph
itself names its record by an integer (``key``) in its calls of the run-time ops (``bkcompile::record_norms``,
``bkcompile::loss_scale``, ``bkcompile::defer_grads``): a custom op takes no Python objects.

Parameters are named by their position among the graph's inputs (the record's ``indices``), never by name: a
graph dynamo reuses for another instance of the model receives other parameters at the same positions. Names
are labels for messages and the report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable

import torch.fx

from bkcompile.errors import PassInvariantError
from bkcompile.policy import ClipPolicy


@dataclasses.dataclass(frozen=True)
class ClipGroup:
    """One clipping group of a graph: its parameters share a per-sample norm and a threshold."""

    name: str  # for messages and the report (a module path, "all", a device, a pattern)
    key: Hashable  # joins the groups of several graphs of one model (ClipPolicy.group_key)
    members: tuple[int, ...]  # the graph inputs of its parameters
    threshold: float  # the initial R_g
    shared: bool  # its threshold is a share of max_grad_norm (none of its own)


@dataclasses.dataclass(frozen=True)
class Grouping:
    """The clipping groups of a graph's trainable parameters (by ``policy``), in graph order."""

    groups: tuple[ClipGroup, ...]

    def group_of(self, member: int) -> int:
        """The group of the parameter at graph input ``member``."""
        for g, group in enumerate(self.groups):
            if member in group.members:
                return g
        raise PassInvariantError(f"graph input {member} is in no clipping group of {self.groups} (a bkcompile bug)")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(group.name for group in self.groups)

    @property
    def thresholds(self) -> tuple[float, ...]:
        return tuple(group.threshold for group in self.groups)


@dataclasses.dataclass(frozen=True)
class KeptGraphs:
    """A ghost parameter of a piece: the graphs that turn its site's operands (handed over at run time) and its
    clip weights into the clipped sum or the per-sample gradients."""

    operands: int  # how many operands the piece hands over for it
    reduce: torch.fx.GraphModule  # (operands..., w) -> sum_i w_i G_i
    per_sample: torch.fx.GraphModule  # (operands..., w) -> (B, n); w gives B only


@dataclasses.dataclass(frozen=True)
class PieceSpec:
    """A graph that is one piece of the model: what its ``defer_grads`` call hands over, and how to read it."""

    inputs: tuple[int, ...]  # the graph inputs of the parameters handed over, in the call's order
    names: tuple[str, ...]  # their names, for messages
    loss: str  # how its loss share reduces over the batch: "sum" | "mean" | "weight"
    from_loss: bool  # the scale comes from a loss computed in this graph (not from the loss_reduction option)
    reduction_unset: bool  # loss_reduction "auto": a loss computed outside the graphs is refused
    relative_names: bool  # compiled on its own (graphs="several"): its parameter names are relative to it
    kept: tuple[KeptGraphs, ...] = ()  # the last len(kept) parameters: ghost norms and site operands


@dataclasses.dataclass(frozen=True)
class GraphPlan:
    """What the pass decided for one graph, read at run time."""

    label: str  # e.g. "bk_dp graph #2, resumed after a graph break, ending at model.py:14 (...)"
    policy: ClipPolicy
    grouping: Grouping  # empty for a graph with nothing to clip
    piece: PieceSpec | None = None  # None: the whole model, clipped in the graph
    # its bkcompile.compiler.report.CostReport (the compile side's type: the run time only hands it back); None: no
    # site to report (a batch of one, no trainable parameter)
    report: object | None = None
