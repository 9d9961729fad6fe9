"""Build new nodes in the joint graph with valid ``meta["val"]`` (computed on fake tensors as we go)."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten


_VIEWS = frozenset({aten.reshape.default, aten.view.default, aten.permute.default, aten.expand.default})


def _same_layout(before: torch.Tensor, after: torch.Tensor) -> bool:
    """Whether a view's result has its input's sizes and strides (known without adding a guard on a symbolic size)."""
    return (
        before.dim() == after.dim()
        and all(statically_known_true(a == b) for a, b in zip(before.shape, after.shape, strict=True))
        and all(statically_known_true(a == b) for a, b in zip(before.stride(), after.stride(), strict=True))
    )


def static_shape(value: torch.fx.Node) -> list[int]:
    """The static shape of ``value``'s ``meta["val"]``."""
    return [int(s) for s in value.meta["val"].shape]


class Emitter:
    """Creates call_function nodes at the graph's current insertion point and propagates fake values."""

    def __init__(self, graph: torch.fx.Graph, fake_mode: Any) -> None:
        self.graph = graph
        self.fake_mode = fake_mode

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> torch.fx.Node:
        """A node computing ``target(*args, **kwargs)``; a view that leaves its input as it is emits none and
        returns the input (every node is work for the compiler)."""
        fake_args, fake_kwargs = torch.fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
        with self.fake_mode:
            value = target(*fake_args, **fake_kwargs)
        if target in _VIEWS and _same_layout(fake_args[0], value):
            return args[0]
        node = self.graph.call_function(target, args, kwargs)
        node.meta["val"] = value
        return node

    def trace(self, fn: Callable[..., torch.Tensor], *inputs: torch.fx.Node) -> torch.fx.Node:
        """The aten ops of ``fn`` (a function of tensors written in torch ops) applied to ``inputs``: ``fn`` traced
        on their fake values, its nodes copied in (with their ``meta["val"]``)."""
        with self.fake_mode:
            traced = make_fx(lambda *values: fn(*values), tracing_mode="real")(*[value.meta["val"] for value in inputs])
        placeholders = traced.graph.find_nodes(op="placeholder")
        return self.graph.graph_copy(traced.graph, dict(zip(placeholders, inputs, strict=True)))

    def size(self, value: torch.fx.Node, dim: int) -> int | torch.fx.Node:
        """Size of ``value`` along ``dim``: an int when static, else a ``sym_size`` node."""
        size = value.meta["val"].shape[dim]
        if isinstance(size, int):
            return size
        return self(aten.sym_size.int, value, dim)

    def sizes(self, value: torch.fx.Node) -> list[int | torch.fx.Node]:
        return [self.size(value, d) for d in range(value.meta["val"].dim())]

    def floordiv(self, a: int | torch.fx.Node, b: int | torch.fx.Node) -> int | torch.fx.Node:
        if isinstance(a, int) and isinstance(b, int):
            return a // b
        return self(operator.floordiv, a, b)

    def mul(self, a: int | torch.fx.Node, b: int | torch.fx.Node) -> int | torch.fx.Node:
        if isinstance(a, int) and isinstance(b, int):
            return a * b
        return self(operator.mul, a, b)

    def to_dtype(self, value: torch.fx.Node, dtype: torch.dtype) -> torch.fx.Node:
        if value.meta["val"].dtype == dtype:
            return value
        return self(torch.ops.prims.convert_element_type.default, value, dtype)
