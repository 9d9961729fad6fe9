"""Batch-axis analysis: give every value of the joint graph a fact by running the rule table forward.

Forward nodes are analysed first; the fact of each tangent is then the fact of the forward output it
belongs to (a loss's tangent is replicated), and the backward nodes follow. A value computed only from
replicated values is replicated whatever the op; every other op needs a rule, or it is refused.

Default-deny: whatever its rule says, an op that reads a sum over samples (a ``Reduced`` operand) and
gives per-sample values is refused, as every sample's output would then depend on all samples (e.g. an
embedding table built from the batch, ``F.embedding(y, onehot(y).T @ x)``). Only a rule marked with
``rules.reads_batch_sums`` (it proves the sum harmless, like the loss's own normaliser) is exempt.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from bkcompile.passes.facts import REPLICATED, Batched, Fact, Reduced, Replicated
from bkcompile.passes.joint import JointGraph
from bkcompile.passes.ops import FactOut, Rule, RuleInput, rule_for

from bkcompile.errors import PrivacyError, SampleMixingError, UnsupportedOpError, node_error


def _is_tensor_valued(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return True
    return isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val)


def backward_nodes(joint: JointGraph) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set(joint.tangents)
    for node in joint.gm.graph.nodes:
        if node.op == "call_function" and any(a in seen for a in node.all_input_nodes):
            seen.add(node)
    return seen


def _fact_of(
    joint: JointGraph, facts: dict[torch.fx.Node, FactOut], node: torch.fx.Node, backward: bool = False
) -> FactOut:
    if node.op != "call_function":
        raise node_error(
            PrivacyError,
            node,
            f"the joint graph holds a {node.op} node, which the batch-axis analysis does not know",
            "compile the model with torch.compile(model, backend='bk_dp') so that the graph comes from aot_autograd",
        )
    if node.target is operator.getitem:
        source, index = node.args
        fact = facts[source]
        return fact[index] if isinstance(fact, tuple) else fact
    if not _is_tensor_valued(node):
        return REPLICATED  # sizes and other scalars are not sample data
    inputs = node.all_input_nodes
    rule = rule_for(node.target)
    if all(isinstance(facts[a], Replicated) for a in inputs) and rule is None:
        return REPLICATED  # a function of sample-independent values is sample-independent
    if rule is None:
        raise node_error(
            UnsupportedOpError,
            node,
            "the op has no batch-axis rule, so the pass cannot prove that it keeps samples apart",
            "express it with supported ops, or register a rule: "
            "@bkcompile.register_batch_rule(op) def rule(r): ... (see bkcompile.compiler.rules for combinators)",
        )
    out = rule(RuleInput(node=node, batch=joint.batch, facts=facts, backward=backward))
    _deny_batch_sums(facts, node, rule, out)
    return out


def _flat(fact: FactOut) -> list[Fact]:
    return [f for item in fact for f in _flat(item)] if isinstance(fact, tuple) else [fact]


def _deny_batch_sums(facts: dict[torch.fx.Node, FactOut], node: torch.fx.Node, rule: Rule, out: FactOut) -> None:
    """Refuse a sum over samples reaching a per-sample output, unless the rule proves it harmless."""
    if getattr(rule, "reads_batch_sums", False) or not any(isinstance(f, Batched) for f in _flat(out)):
        return
    sums = [a for a in node.all_input_nodes if any(isinstance(f, Reduced) for f in _flat(facts[a]))]
    if sums:
        raise node_error(
            SampleMixingError,
            node,
            f"its operand {sums[0].name} is a sum over the samples of the batch and its result holds per-sample "
            "values, so every sample's output would depend on all samples (e.g. a table or statistic built "
            "from the whole batch)",
            "compute per-sample values from that sample's rows and parameters only; a custom op whose rule "
            "proves such a sum harmless marks the rule with bkcompile.compiler.rules.reads_batch_sums",
        )


def differentiable_outputs(joint: JointGraph) -> list:
    out = []
    for value in joint.forward_outputs:
        val = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
        if isinstance(val, torch.Tensor) and (val.is_floating_point() or val.is_complex()):
            out.append(value)
    return out


def _tangent_facts(joint: JointGraph, facts: dict[torch.fx.Node, FactOut]) -> None:
    outputs = differentiable_outputs(joint)
    tangents = joint.tangents
    if len(outputs) != len(tangents):
        raise node_error(
            PrivacyError,
            joint.gm.graph.output_node(),
            f"cannot pair the {len(tangents)} output gradients of the graph with its {len(outputs)} floating "
            "outputs (outputs that alias inputs or mutate them are not supported)",
            "return fresh tensors from the compiled function",
        )
    for output, tangent in zip(outputs, tangents):
        fact = facts[output]
        if isinstance(fact, Reduced):
            facts[tangent] = REPLICATED  # d(loss): one scalar for the whole batch
        elif isinstance(fact, Batched):
            facts[tangent] = fact
        elif tangent.users:
            raise node_error(
                PrivacyError,
                output,
                "the compiled function returns a value that does not depend on the batch but needs a gradient; "
                "its gradient comes from code outside the graph and cannot be clipped per sample",
                "return only per-sample outputs (or the loss) from the compiled model, or detach this output",
            )
        else:
            facts[tangent] = REPLICATED


def analyze(joint: JointGraph) -> dict[torch.fx.Node, FactOut]:
    """The fact of every node (pass 1 of the pipeline): the primals' from their inputs, the rest by the rules."""
    facts: dict[torch.fx.Node, FactOut] = {}
    for node, graph_input in zip(joint.primals, joint.inputs, strict=True):
        facts[node] = graph_input.fact
    for node in joint.gm.graph.find_nodes(op="get_attr"):
        facts[node] = REPLICATED  # constants the trace lifted (e.g. torch.tensor(0.0) in the model)
    backward = backward_nodes(joint)
    nodes = [n for n in joint.gm.graph.nodes if n.op == "call_function"]
    for node in nodes:
        if node not in backward:
            facts[node] = _fact_of(joint, facts, node)
    _tangent_facts(joint, facts)
    for node in nodes:
        if node in backward:
            facts[node] = _fact_of(joint, facts, node, backward=True)
    return facts
