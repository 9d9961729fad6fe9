"""Recurrent layers traced step by step, so that their weight gradients are sums the pass can see.

``nn.LSTM`` on CPU in float32 (or bfloat16) is traced by torch's decomposition of ``aten.lstm`` into oneDNN's
fused ``aten.mkldnn_rnn_layer`` whenever the layer's input needs no gradient (the first layer of every model):
its backward, ``mkldnn_rnn_layer_backward``, sums the weight gradients over time steps and samples inside one
kernel, from a workspace the pass cannot read, so no per-sample gradient or norm can be formed from it. The
same decomposition without oneDNN is one ``mm`` per time step and a ``mm`` over all steps for the input
weights: matmul sites, as for ``nn.GRU`` and ``nn.RNN`` (which have no fused path).

:func:`unfuse_recurrent` makes every ``torch.lstm`` call of dynamo's graph trace that way: the call runs with
oneDNN disabled for its own duration only (a process-wide flag, read by the decomposition while the joint
graph is traced, and by Inductor's own oneDNN passes, which therefore must not see it changed).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx


def _lstm_unfused(*args: Any, **kwargs: Any) -> Any:
    """``torch.lstm``, decomposed without oneDNN's fused layer (same values; per-step ops)."""
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return torch.lstm(*args, **kwargs)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


def unfuse_recurrent(gm: torch.fx.GraphModule) -> None:
    """Point every ``torch.lstm`` call of dynamo's graph ``gm`` at :func:`_lstm_unfused` (in place)."""
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.lstm]
    for node in calls:
        node.target = _lstm_unfused
    if calls:
        gm.recompile()
