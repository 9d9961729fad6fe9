"""Place what the clipping pass appended at the end of the backward as early as its inputs allow.

The clipping pass emits the clip factors and the weighted reductions before the graph's output: all-layer
clipping needs every norm before any factor. A clipping group's factors need its own norms only, so with
several groups (layer-wise, param-wise, custom groups) each group's factors, its weighted sums ``sum_i w_i G_i``
and its ghost sites re-emitted with weighted operands can run as soon as the backward has reached the group::

    before:  G1 = per-sample grads of layer 2; n1 = ||G1||;  G2 = ... of layer 1; n2 = ||G2||;
             w1 = clip(n1); sum_i w1_i G1_i;  w2 = clip(n2); sum_i w2_i G2_i     (G1 and G2 live together)
    after:   G1 = ...; n1 = ||G1||; w1 = clip(n1); sum_i w1_i G1_i;               (G1 freed)
             G2 = ...; n2 = ||G2||; w2 = clip(n2); sum_i w2_i G2_i

so no more than one group's per-sample gradients (B x the group's parameters) are live at once, and a ghost
site's operands are freed at its group. With one group (all-layer clipping) the clip waits for every norm and
nothing is moved: moving the weighted sums before the rest of the backward would only hold their results longer.
The order is data order only: each moved node goes right after the latest of its inputs (never before the first
node of the backward, so the forward graph is unchanged), moved nodes keep their relative order, and nothing
else moves.
"""

from __future__ import annotations

import torch.fx
from bkcompile.passes.batch_axis import backward_nodes
from bkcompile.passes.joint import JointGraph


def appended(graph: torch.fx.Graph, before: set[torch.fx.Node]) -> list[torch.fx.Node]:
    """The nodes right before the output that are not in ``before`` (the graph's nodes before a pass ran)."""
    tail = []
    node = graph.output_node().prev
    while node.op != "root" and node not in before:
        tail.append(node)
        node = node.prev
    return tail[::-1]


def place_early(joint: JointGraph, tail: list[torch.fx.Node]) -> None:
    """Move each node of ``tail`` (the end of the graph, in order) right after the latest of its inputs."""
    graph = joint.gm.graph
    backward = backward_nodes(joint)
    moving = set(tail)
    position = {}
    for index, node in enumerate(graph.nodes):
        if node not in moving:
            position[node] = index
    floor = min((position[n] for n in backward if n in position and n.op == "call_function"), default=None)
    if floor is None:
        return
    anchors = {index: node for node, index in position.items()}
    last_in_slot: dict[int, torch.fx.Node] = {}  # slot (an unmoved node's position) -> the last node placed there
    for node in tail:
        slot = max([floor, *(position[a] for a in node.all_input_nodes)])
        (last_in_slot.get(slot) or anchors[slot]).append(node)
        last_in_slot[slot] = node
        position[node] = slot
