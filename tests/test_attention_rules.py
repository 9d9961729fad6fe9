"""Batch-axis rules of the CUDA attention kernels (flash, memory-efficient, cuDNN), checked on meta tensors: this
machine has no GPU, so the kernels never run; the shapes and the rules are those the pass meets on CUDA."""

from __future__ import annotations

import operator

import pytest
import sympy
import torch
import torch.fx
from bkcompile.passes.facts import REPLICATED, Batched
from bkcompile.passes.ops import RuleInput, rule_for

from bkcompile import NotSupportedYetError, SampleMixingError

aten = torch.ops.aten
B, H, T, D = 2, 4, 8, 16
PER_SAMPLE = Batched(0)


class Graph:
    """An FX graph of meta tensors with a fact for every node, to which ops are added one rule at a time."""

    def __init__(self) -> None:
        self.graph = torch.fx.Graph()
        self.facts: dict[torch.fx.Node, object] = {}

    def input(self, name: str, shape: tuple[int, ...], fact) -> torch.fx.Node:
        node = self.graph.placeholder(name)
        node.meta["val"] = torch.empty(shape, device="meta")
        self.facts[node] = fact
        return node

    def call(self, op, *args) -> tuple:
        """Add ``op``, apply its rule, and return (its facts, a getitem node per output)."""
        node = self.graph.call_function(op, args)
        values = torch.fx.node.map_arg(args, lambda n: n.meta["val"])
        node.meta["val"] = op(*values)
        facts = rule_for(op)(RuleInput(node=node, batch=sympy.Integer(B), facts=self.facts))
        assert len(facts) == len(node.meta["val"])
        outputs = []
        for index, (value, fact) in enumerate(zip(node.meta["val"], facts)):
            item = self.graph.call_function(operator.getitem, (node, index))
            item.meta["val"] = value
            self.facts[item] = fact
            outputs.append(item)
        return facts, outputs


def _qkv(graph: Graph, fact=PER_SAMPLE) -> list[torch.fx.Node]:
    return [graph.input(name, (B, H, T, D), fact) for name in ("q", "k", "v")]


def test_flash_attention_and_its_backward_are_per_sample() -> None:
    graph = Graph()
    q, k, v = _qkv(graph)
    facts, out = graph.call(aten._scaled_dot_product_flash_attention.default, q, k, v)
    # output, logsumexp per sample; sequence bookkeeping and the RNG state (shape (2,): seed, offset) are not
    assert facts == (PER_SAMPLE, PER_SAMPLE) + (REPLICATED,) * 7
    grad = graph.input("grad", (B, H, T, D), PER_SAMPLE)
    facts, _ = graph.call(
        aten._scaled_dot_product_flash_attention_backward.default,
        grad,
        q,
        k,
        v,
        out[0],
        out[1],
        out[2],
        out[3],
        out[4],
        out[5],
        0.0,
        False,
        out[6],
        out[7],
    )
    assert facts == (PER_SAMPLE,) * 3


def test_flash_attention_debug_mask_is_per_sample_when_asked_for() -> None:
    graph = Graph()
    q, k, v = _qkv(graph)
    facts, _ = graph.call(aten._scaled_dot_product_flash_attention.default, q, k, v, 0.0, False, True)
    assert facts == (PER_SAMPLE, PER_SAMPLE) + (REPLICATED,) * 6 + (PER_SAMPLE,)


@pytest.mark.parametrize("with_bias", [False, True])
def test_efficient_attention_and_its_backward_are_per_sample(with_bias: bool) -> None:
    graph = Graph()
    q, k, v = _qkv(graph)
    bias = graph.input("bias", (B, H, T, T), PER_SAMPLE) if with_bias else None
    facts, out = graph.call(aten._scaled_dot_product_efficient_attention.default, q, k, v, bias, True)
    assert facts == (PER_SAMPLE, PER_SAMPLE, REPLICATED, REPLICATED)
    grad = graph.input("grad", (B, H, T, D), PER_SAMPLE)
    facts, _ = graph.call(
        aten._scaled_dot_product_efficient_attention_backward.default,
        grad,
        q,
        k,
        v,
        bias,
        out[0],
        out[1],
        out[2],
        out[3],
        0.0,
        [True, True, True, with_bias],
    )
    assert facts == (PER_SAMPLE,) * 3 + ((PER_SAMPLE,) if with_bias else (REPLICATED,))


def test_efficient_attention_refuses_a_shared_bias_that_needs_a_gradient() -> None:
    graph = Graph()
    q, k, v = _qkv(graph)
    bias = graph.input("bias", (1, H, T, T), REPLICATED)
    _, out = graph.call(aten._scaled_dot_product_efficient_attention.default, q, k, v, bias, True)
    grad = graph.input("grad", (B, H, T, D), PER_SAMPLE)
    with pytest.raises(NotSupportedYetError, match="shared by the samples"):
        graph.call(
            aten._scaled_dot_product_efficient_attention_backward.default,
            grad,
            q,
            k,
            v,
            bias,
            out[0],
            out[1],
            out[2],
            out[3],
            0.0,
            [True, True, True, True],
        )


def test_cudnn_attention_and_its_backward_are_per_sample() -> None:
    graph = Graph()
    q, k, v = _qkv(graph)
    facts, out = graph.call(aten._scaled_dot_product_cudnn_attention.default, q, k, v, None, True)
    assert facts == (PER_SAMPLE, PER_SAMPLE) + (REPLICATED,) * 7
    grad = graph.input("grad", (B, H, T, D), PER_SAMPLE)
    facts, _ = graph.call(
        aten._scaled_dot_product_cudnn_attention_backward.default,
        grad,
        q,
        k,
        v,
        out[0],
        out[1],
        out[6],
        out[7],
        None,
        out[2],
        out[3],
        out[4],
        out[5],
        0.0,
        False,
    )
    assert facts == (PER_SAMPLE,) * 3


@pytest.mark.parametrize(
    "op",
    [
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_cudnn_attention.default,
    ],
)
def test_attention_over_a_batch_on_the_heads_dim_is_refused(op) -> None:
    graph = Graph()
    q, k, v = _qkv(graph, Batched(1))
    args = (q, k, v) if op == aten._scaled_dot_product_flash_attention.default else (q, k, v, None, True)
    with pytest.raises(SampleMixingError, match="heads or positions hold samples"):
        graph.call(op, *args)
