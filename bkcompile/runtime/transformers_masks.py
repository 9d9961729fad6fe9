"""transformers' mask preprocessing under a dynamic batch: the position ids broadcast before the branch.

transformers (4.57 to 5.x) prepares every attention mask in ``masking_utils._preprocess_mask_arguments``. With no
attention mask and no cache (a training step), it looks for packed sequences in the position ids, broadcast over
the batch first::

    batch_size = inputs_embeds.shape[0]
    if batch_size != position_ids.shape[0]:
        position_ids = position_ids.expand(batch_size, -1)

A decoder called with its input ids alone (GPT-2) makes position ids of shape (1, T). With the batch an unbacked
symbol ``u0`` (:func:`bkcompile.mark_batch_dynamic`, the Poisson loader) ``u0 != 1`` is undecidable: dynamo cuts
the graph there and builds the mask eagerly, outside the bk_dp graphs. Both branches give the same position ids,
since expanding a tensor to the rows it already has is the identity: broadcasting them first is exact for every
batch size, 1 included. :func:`substitute_mask_preprocessing` registers that order for dynamo
(``torch._dynamo.substitute_in_graph``): when dynamo meets transformers' function it traces a twin that expands
the position ids under the same condition, then runs transformers' own code, where the comparison reads
``u0 != u0``, decided without a guard. Eager calls run transformers' function unchanged; a traced call computes
the same values on every backend, so the substitution is not limited to bk_dp's compiles. It is registered once
per process, when a dynamic batch is marked while transformers' masking module is loaded (a transformers model
is built before its first batch). A transformers whose function lacks these arguments keeps its own code.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from collections.abc import Callable

import torch

_EMBEDS = ("inputs_embeds", "input_embeds")  # transformers 5, 4.57
_CACHES = ("cache", "past_key_values")


def substitute_mask_preprocessing() -> None:
    """Have dynamo trace transformers' ``_preprocess_mask_arguments`` with its position ids broadcast over the batch
    before it compares their sizes (see the module docstring); a no-op without transformers' masking module."""
    original = getattr(sys.modules.get("transformers.masking_utils"), "_preprocess_mask_arguments", None)
    if original is not None:
        _substitute(original)


@functools.cache
def _substitute(original: Callable) -> None:
    names = tuple(inspect.signature(original).parameters)
    embeds = next((name for name in _EMBEDS if name in names), None)
    cache = next((name for name in _CACHES if name in names), None)
    if embeds is None or cache is None or not {"attention_mask", "position_ids"} <= set(names):
        return
    # the same code as another function object: dynamo inlines it (the original object is the one substituted)
    transformers_own = types.FunctionType(
        original.__code__, original.__globals__, original.__name__, original.__defaults__, original.__closure__
    )
    transformers_own.__kwdefaults__ = original.__kwdefaults__

    @torch._dynamo.substitute_in_graph(original, skip_signature_check=True)
    def broadcast_first(*args, **kwargs):
        arguments = dict(zip(names, args), **kwargs)
        position_ids = arguments.get("position_ids")
        if position_ids is not None and arguments.get("attention_mask") is None and arguments.get(cache) is None:
            arguments["position_ids"] = position_ids.expand(arguments[embeds].shape[0], -1)
        return transformers_own(**arguments)
