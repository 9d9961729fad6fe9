"""The oldest transformers release bkcompile supports, checked when bk_dp compiles code of transformers.

bkcompile's transformers tests pass on 4.57.6, 5.24 and 5.25. Before 4.52, transformers builds GPT-2's sdpa causal
mask under ``torch.compile`` with ``modeling_attn_mask_utils._prepare_4d_causal_attention_mask_for_sdpa``, which
puts ``finfo(float64).min`` in a float32 tensor: a float64 model overflows inside transformers under any backend
(``aot_eager`` too). 4.52.4 fixes that, but its ``Trainer`` has no ``current_gradient_accumulation_steps``, which
``DPTrainer`` reads; 4.53 to 4.56 are not tested. A graph holding transformers code on a release before
:data:`OLDEST` is refused with the version and the fix, instead of an error from inside transformers or a support
nobody tested.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch.fx

from bkcompile.errors import NotSupportedYetError, run_error

OLDEST = (4, 57)


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a transformers version string."""
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def refuse_old_transformers(gm: torch.fx.GraphModule) -> None:
    """Raise :class:`NotSupportedYetError` when ``gm`` runs code of a transformers release older than
    :data:`OLDEST`."""
    module = sys.modules.get("transformers")
    if module is None or release(module.__version__) >= OLDEST:
        return
    code = re.compile(rf'File "{re.escape(str(Path(module.__file__).parent))}/(\S+)", line (\d+)')
    sites = [site for n in gm.graph.nodes for site in code.findall(n.meta.get("stack_trace") or "")]
    if not sites:
        return
    oldest = ".".join(map(str, OLDEST))
    raise run_error(
        NotSupportedYetError,
        f"transformers {module.__version__} is older than {oldest}, the oldest release bkcompile supports; the "
        f"graph runs its code (transformers/{sites[0][0]}:{sites[0][1]})",
        "before 4.52 transformers builds GPT-2's sdpa causal mask under torch.compile with finfo(float64).min in a "
        "float32 tensor (modeling_attn_mask_utils), which overflows inside transformers under any backend; 4.52's "
        f"Trainer lacks what DPTrainer reads; bkcompile's transformers tests pass from {oldest} on",
        f"upgrade transformers: pip install -U 'transformers>={oldest}'",
    )
