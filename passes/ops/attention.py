"""Fused attention (F.scaled_dot_product_attention's kernels): the CPU one, and on CUDA flash, memory-efficient
and cuDNN. Attention mixes positions within a sample only, so output, log-sum-exp and the gradients of q, k and
v are per-sample. Their other outputs are sample-independent: cumulative sequence lengths and maxima (unused
for dense inputs), the dropout RNG's seed and offset (one for the whole batch; each sample's mask still depends
on no other sample)."""

from __future__ import annotations

import torch
from bkcompile.passes.facts import REPLICATED, Batched, Fact
from bkcompile.passes.ops.table import RuleInput, agree, law

from bkcompile.errors import NotSupportedYetError, node_error

aten = torch.ops.aten


def _attention_fact(r: RuleInput, values: list) -> Fact:
    batched = [r.fact(v) for v in values if isinstance(r.fact(v), Batched)]
    if not batched:
        return REPLICATED
    fact = agree(r, batched)
    if fact.dim != 0:
        raise r.mixing("the attention's heads or positions hold samples", "keep the batch on dim 0 of q, k and v")
    return fact


@law(aten._scaled_dot_product_flash_attention_for_cpu.default)
def sdpa_cpu(r: RuleInput) -> tuple:
    fact = _attention_fact(r, r.tensor_args())
    return (fact, fact)


@law([aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_cudnn_attention.default])
def sdpa_flash_or_cudnn(r: RuleInput) -> tuple:
    """Outputs: attention, log-sum-exp, sequence bookkeeping (4), RNG seed and offset, the debug mask (B, H, T, T)
    when asked for (else empty)."""
    fact = _attention_fact(r, r.tensor_args())
    debug_mask = r.node.meta["val"][8]
    asked = isinstance(debug_mask, torch.Tensor) and debug_mask.dim() == 4
    return (fact, fact) + (REPLICATED,) * 6 + (fact if asked else REPLICATED,)


@law(aten._scaled_dot_product_efficient_attention.default)
def sdpa_efficient(r: RuleInput) -> tuple:
    fact = _attention_fact(r, r.tensor_args())
    return (fact, fact, REPLICATED, REPLICATED)


@law(
    [
        aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
        aten._scaled_dot_product_flash_attention_backward.default,
        aten._scaled_dot_product_cudnn_attention_backward.default,
    ]
)
def sdpa_backward(r: RuleInput) -> tuple:
    fact = _attention_fact(r, r.tensor_args())
    return (fact, fact, fact)


@law(aten._scaled_dot_product_efficient_attention_backward.default)
def sdpa_efficient_backward(r: RuleInput) -> tuple:
    fact = _attention_fact(r, r.tensor_args())
    if not r.arg("grad_input_mask")[3]:  # no bias gradient
        return (fact, fact, fact, REPLICATED)
    if not isinstance(r.fact(r.arg("attn_bias")), Batched):
        raise node_error(
            NotSupportedYetError,
            r.node,
            "the attention bias is shared by the samples and needs a gradient: the fused kernel sums it "
            "over the samples, with no per-sample norm",
            "add the bias to the scores outside scaled_dot_product_attention, or freeze it",
        )
    return (fact, fact, fact, fact)
