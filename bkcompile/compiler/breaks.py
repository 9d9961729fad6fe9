"""Graph breaks where torch's own code branches on the batch size.

Some torch functions return early on an empty input (``F.local_response_norm`` and train-mode ``F.dropout2d``
test ``input.numel() == 0``). With a dynamic batch (``bkcompile.mark_batch_dynamic``: any size, 0 included)
dynamo cannot decide that test: it cuts the graph there and runs the function eagerly, outside the bk_dp graphs,
where nothing proves that it keeps samples apart. :func:`refuse_batch_size_branch` names the function and the
fix when the graph before the break compiles, instead of the later graph refusing an input it cannot trace back.
A branch on the batch size in the user's own code is left alone: dynamo resumes the frame in a new graph. One
library branch is named too: transformers' mask preprocessing, whose eager mask the attention graph after it
cannot take.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.fx

from bkcompile.errors import NotSupportedYetError, run_error

_BRANCH = re.compile(r"Could not guard on data-dependent expression (?P<expr>.+?) \(unhinted")
# dynamo's "Caused by: <line>  # <user file>:<line> in <function> (<torch file>:<line> in <torch function>)"
_CAUSE = re.compile(r"Caused by: .*?# (?P<user>\S+:\d+) in \S+ \((?P<file>\S+):(?P<line>\d+) in (?P<fn>\w+)\)")
_TORCH = Path(torch.__file__).parent
# transformers broadcasts the (1, T) position ids a decoder (GPT-2) makes: ``if batch_size != position_ids.shape[0]``
_HF_MASK = re.compile(r"# (?P<user>transformers/masking_utils\.py:\d+) in _preprocess_mask_arguments ")


def _batch_symbols(gm: torch.fx.GraphModule, batched: Sequence[bool], dim: int) -> set[str]:
    symbols = set()
    for node, is_batched in zip(gm.graph.find_nodes(op="placeholder"), batched):
        value = node.meta.get("example_value")
        if is_batched and isinstance(value, torch.Tensor) and value.dim() > dim:
            size = value.shape[dim]
            if isinstance(size, torch.SymInt):
                symbols.add(str(size.node.expr))
    return symbols


def refuse_batch_size_branch(gm: torch.fx.GraphModule, batched: Sequence[bool], dim: int) -> None:
    """Raise :class:`NotSupportedYetError` when dynamo cut ``gm`` because a torch function branches on the batch
    size (a symbol of the inputs whose ``batched`` flag is set, on ``dim``)."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not reason.graph_break:
        return
    branch, cause = _BRANCH.search(reason.reason), _CAUSE.search(reason.reason)
    if branch is None or cause is None:
        return
    on_batch = any(re.search(rf"\b{symbol}\b", branch["expr"]) for symbol in _batch_symbols(gm, batched, dim))
    mask = _HF_MASK.search(reason.reason)
    if mask is not None and on_batch:
        raise run_error(
            NotSupportedYetError,
            f"transformers' _preprocess_mask_arguments ({mask['user']}) compares the batch size with the position "
            f"ids' ({branch['expr']}): the model made position ids of shape (1, T) and no attention mask was given",
            "with a dynamic batch (bkcompile.mark_batch_dynamic, the Poisson loader) dynamo cannot decide it, so it "
            "cuts the graph there and builds the attention mask eagerly, outside the bk_dp graphs: the attention "
            "graph after it takes a batch nothing proves per-sample, or recompiles for each batch size",
            "pass position_ids of shape (B, T) with the batch (torch.arange(T).expand(B, T), marked by "
            "mark_batch_dynamic with the input ids) or an attention_mask, or compile with a static batch size",
        )
    if cause["file"].startswith("_dynamo/") or not (_TORCH / cause["file"]).is_file():
        return  # not torch's code (a branch of the user's own code, evaluated by dynamo)
    if not on_batch:
        return
    raise run_error(
        NotSupportedYetError,
        f"torch's {cause['fn']} (torch/{cause['file']}:{cause['line']}) at {cause['user']}: it branches on the "
        f"batch size ({branch['expr']}, {'a batch of one' if branch['expr'].endswith(', 1)') else 'an empty batch'})",
        "with a dynamic batch (bkcompile.mark_batch_dynamic, the Poisson loader: any size, 0 included) dynamo "
        "cannot decide the branch, so it cuts the graph there and runs the function eagerly, outside the bk_dp "
        "graphs, where nothing proves that it keeps samples apart",
        f"compile with a static batch size (leave out mark_batch_dynamic), or replace {cause['fn']} by ops that do "
        "not test the batch size",
    )
