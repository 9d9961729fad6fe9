"""Fewer C++ builds per compiled graph: an Inductor scheduler pass that groups kernels between extern calls.

On CPU, Inductor's C++ backend writes the fused nodes it schedules one after another into one C++ kernel, and
closes that kernel at every extern call (an ATen matrix product or convolution, a fallback op, bk_dp's run-time
ops). Each kernel is one C++ build, compiled and linked apart (about a second each on a loaded 2-core CPU, nearly
whatever its size; kernels of the same source are built once), so a cold compile pays about a second per *run* of
kernel nodes between two extern calls. A privatized backward interleaves its norms, clip factors and weighted
operands with the backward's matrix products; the MLP's, in Inductor's order and after this pass (``|``: an extern
call)::

    before:  norms3 | loss_scale mm | relu' | mm | norms21 | record_norms | w * sums | mm | w * g | mm mm
    after:   mm | norms3, relu' | loss_scale mm | norms21 | record_norms | w * sums, w * g | mm mm mm

(5 C++ kernels before, 3 after: as many as its non-private backward, whose ReLU backwards fuse with the bias sums).

The pass (Inductor's ``_post_fusion_custom_pass``: it moves fused nodes, never fuses or splits them) takes the
order Inductor's peak-memory planning would choose (``reorder_for_peak_memory``) and joins adjacent runs, left to
right: the nodes between two runs that do not depend on the first go before it, those that do after the second,
when the second depends on none of these. A join is kept when Inductor's estimate of the order's peak memory is no
higher than that of the order it started from; Inductor's planning, which runs after the pass, compares the result
with its own orders and keeps it on a tie. Dependencies are those the planning orders by (each node's
``mpi_node.pred_nodes``, mutations included), so the order is one Inductor could have chosen itself.

Only for CPU graphs: on GPUs each fused node is a kernel of its own wherever it sits.
"""

from __future__ import annotations

import logging
from typing import Any

from torch._inductor import config
from torch._inductor.custom_graph_pass import CustomSchedulerPass
from torch._inductor.memory import estimate_peak_memory, prepare_planning_info, reorder_for_peak_memory
from torch._inductor.scheduler import BaseSchedulerNode, NopKernelSchedulerNode
from torch._inductor.virtualized import V

from bkcompile.compiler.warm import source_hash

log = logging.getLogger(__name__)


def closes_kernel(node: BaseSchedulerNode) -> bool:
    """Whether Inductor's code generation closes the running C++ kernel at ``node`` (an extern call)."""
    return node.is_extern() or node.is_template()


def _runs(order: list[BaseSchedulerNode]) -> list[tuple[int, int]]:
    """The index ranges [start, end) of ``order``'s runs: maximal spans of nodes that close no kernel, with at
    least one kernel node (a no-op node, a view or alias, generates no code: no-ops alone between two extern calls
    are no run)."""
    runs, start = [], None
    for index, node in enumerate([*order, None]):
        if node is None or closes_kernel(node):
            if start is not None:
                runs.append((start, index))
            start = None
        elif start is None and not isinstance(node, NopKernelSchedulerNode):
            start = index
    return runs


def kernel_runs(order: list[BaseSchedulerNode]) -> int:
    """The C++ kernels ``order`` generates on CPU: its runs of kernel nodes between extern calls."""
    return len(_runs(order))


def _joined(order: list[BaseSchedulerNode], first: tuple[int, int], second: tuple[int, int]):
    """``order`` with the runs ``first`` and ``second`` made one: the nodes between them that do not depend on
    ``first`` go before it, those that do after ``second``; ``None`` when ``second`` depends on one of the
    latter."""
    after = set(order[first[0] : first[1]])
    before, moved = [], []
    for node in order[first[1] : second[0]]:
        if any(pred in after for pred in node.mpi_node.pred_nodes):
            after.add(node)
            moved.append(node)
        else:
            before.append(node)
    run, held = order[second[0] : second[1]], set(moved)
    if any(pred in held for node in run for pred in node.mpi_node.pred_nodes):
        return None
    return [*order[: first[0]], *before, *order[first[0] : first[1]], *run, *moved, *order[second[1] :]]


def group_kernels(order: list[BaseSchedulerNode], peak_of) -> list[BaseSchedulerNode]:
    """``order`` with adjacent runs joined, left to right, while the estimated peak (``peak_of``) is no higher
    than ``order``'s."""
    limit = peak_of(order)
    index = 0
    while index + 1 < len(runs := _runs(order)):
        joined = _joined(order, runs[index], runs[index + 1])
        if joined is not None and peak_of(joined) <= limit:
            order = joined  # the joined run may join the next one too
        else:
            index += 1
    return order


class KernelGrouping(CustomSchedulerPass):
    """bk_dp's ``_post_fusion_custom_pass`` for CPU graphs: Inductor's order with its kernels grouped between
    extern calls, when that makes fewer C++ kernels at no more estimated peak memory (the module's docstring)."""

    def __call__(self, nodes: list[BaseSchedulerNode]) -> list[BaseSchedulerNode]:
        try:
            return self._grouped(nodes)
        except Exception:  # an optimisation of compile time only: Inductor's own order is as correct
            log.warning("bk_dp's kernel grouping failed; Inductor's order is kept", exc_info=True)
            return nodes

    def _grouped(self, nodes: list[BaseSchedulerNode]) -> list[BaseSchedulerNode]:
        graph = V.graph
        name_to_buf = {buf.get_name(): buf for node in nodes for buf in node.get_outputs()}
        name_to_fused_node = {part.get_name(): node for node in nodes for part in node.get_nodes()}
        inputs, outputs = set(graph.graph_inputs), set(graph.get_output_names())
        planning: tuple[Any, ...] = (name_to_buf, name_to_fused_node, inputs, outputs)
        base = reorder_for_peak_memory(nodes, *planning) if config.reorder_for_peak_memory else nodes
        _, freeable = prepare_planning_info(base, *planning)
        return group_kernels(base, lambda order: estimate_peak_memory(order, freeable, outputs)[0])

    def uuid(self) -> str:
        """The FX graph cache's key part for the pass: it changes with bkcompile's source, this module's included."""
        return source_hash()
