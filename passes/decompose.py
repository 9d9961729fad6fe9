"""Inline the decomposition of ops the analysis read whole, once the analysis is done."""

from __future__ import annotations

import operator
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx

from bkcompile.errors import NotSupportedYetError, node_error


def inline_decompositions(
    gm: torch.fx.GraphModule, ops: Collection[Any], table: dict[Any, Callable], fake_mode: Any
) -> None:
    """Replace every call of an op in ``ops`` by the graph it traces to under the decompositions ``table``.

    The backend keeps a few ops whole for the analysis (``nll_loss_forward`` carries the loss
    normaliser); Inductor has no lowering for them, so they are decomposed here, after the pass.
    """
    graph = gm.graph
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in ops]:
        flat, spec = torch.utils._pytree.tree_flatten((node.args, node.kwargs))
        inputs = [a for a in flat if isinstance(a, torch.fx.Node)]

        def call(*values: Any, _flat=flat, _spec=spec, _fn=node.target) -> Any:
            it = iter(values)
            args, kwargs = torch.utils._pytree.tree_unflatten(
                [next(it) if isinstance(a, torch.fx.Node) else a for a in _flat], _spec
            )
            return _fn(*args, **kwargs)

        with fake_mode:
            traced = make_fx(call, table, tracing_mode="real")(*[a.meta["val"] for a in inputs])
        before = set(graph.nodes)
        with graph.inserting_before(node):
            result = graph.graph_copy(traced.graph, dict(zip(traced.graph.find_nodes(op="placeholder"), inputs)))
        for new in graph.nodes:
            if new not in before and "stack_trace" in node.meta:
                new.meta.setdefault("stack_trace", node.meta["stack_trace"])
        if isinstance(result, (tuple, list)):
            for user in list(node.users):
                if user.target is not operator.getitem:
                    raise node_error(
                        NotSupportedYetError,
                        user,
                        f"this op reads the whole output tuple of {node.target}, which is replaced by its "
                        "decomposition after the analysis",
                        "read the op's outputs by index, or compile with compiler='aot_eager'",
                    )
                user.replace_all_uses_with(result[user.args[1]])
                graph.erase_node(user)
        else:
            node.replace_all_uses_with(result)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
