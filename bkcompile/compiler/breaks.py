"""Graph breaks where torch's own code branches on the batch size.

Some torch functions return early on an empty input (``F.local_response_norm`` and train-mode ``F.dropout2d``
test ``input.numel() == 0``). With a dynamic batch (``bkcompile.mark_batch_dynamic``: any size, 0 included)
dynamo cannot decide that test: it cuts the graph there and runs the function eagerly, outside the bk_dp graphs,
where nothing proves that it keeps samples apart. :func:`refuse_batch_size_branch` names the function and the
fix when the graph before the break compiles, instead of the later graph refusing an input it cannot trace back.
A branch on the batch size in the user's own code is left alone: dynamo resumes the frame in a new graph. One
library branch is named too: transformers 4's attention masks, built under ``torch.vmap`` whose indexing rule
tests the batch size (transformers 5 builds them by broadcasting; its mask preprocessing's own branch on the batch
size is taken before dynamo sees it, :mod:`bkcompile.runtime.transformers_masks`).
"""

from __future__ import annotations

import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.fx

from bkcompile.compiler.transformers_version import release
from bkcompile.errors import NotSupportedYetError, run_error

_BRANCH = re.compile(r"Could not guard on data-dependent expression (?P<expr>.+?) \(unhinted")
# dynamo's "Caused by: <line>  # <user file>:<line> in <function> (<torch file>:<line> in <torch function>)"
_CAUSE = re.compile(r"Caused by: .*?# (?P<user>\S+:\d+) in \S+ \((?P<file>\S+):(?P<line>\d+) in (?P<fn>\w+)\)")
_TORCH = Path(torch.__file__).parent
_HF_MASKS = "transformers/masking_utils.py"


def _batch_symbols(gm: torch.fx.GraphModule, batched: Sequence[bool], dim: int) -> set[str]:
    symbols = set()
    for node, is_batched in zip(gm.graph.find_nodes(op="placeholder"), batched):
        value = node.meta.get("example_value")
        if is_batched and isinstance(value, torch.Tensor) and value.dim() > dim:
            size = value.shape[dim]
            if isinstance(size, torch.SymInt):
                symbols.add(str(size.node.expr))
    return symbols


def _vmapped_mask(stack: list[traceback.FrameSummary]) -> traceback.FrameSummary | None:
    """The frame of transformers' mask builder that called ``torch.vmap`` in ``stack`` (outermost first), or None."""
    for frame, callee in zip(stack, stack[1:]):
        if frame.filename.endswith(_HF_MASKS) and "torch/_functorch/" in callee.filename:
            return frame
    return None


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
    if cause["file"].startswith("_dynamo/") or not (_TORCH / cause["file"]).is_file():
        return  # not torch's code (a branch of the user's own code, evaluated by dynamo)
    if not on_batch:
        return
    mask = _vmapped_mask(reason.user_stack or [])
    if mask is not None:
        version = sys.modules["transformers"].__version__
        upgrade = (  # transformers 5 vmaps only the mask functions a model adds of its own (and_mask_function)
            "upgrade transformers (pip install -U 'transformers>=5.24': it builds the mask by broadcasting), or "
            if release(version) < (5, 0)
            else ""
        )
        raise run_error(
            NotSupportedYetError,
            f"transformers {version}'s {mask.name} "
            f"(transformers/masking_utils.py:{mask.lineno}) builds the attention mask under torch.vmap, "
            f"whose indexing tests the batch size ({branch['expr']})",
            "with a dynamic batch (bkcompile.mark_batch_dynamic, the Poisson loader) dynamo cannot decide it, so it "
            "cuts the graph there and builds the mask eagerly, outside the bk_dp graphs, where nothing proves that "
            "the attention after it keeps samples apart",
            f"{upgrade}compile with a static batch size (leave out mark_batch_dynamic)",
        )
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
