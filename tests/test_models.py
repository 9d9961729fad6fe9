"""Real model families (transformers GPT-2, ViT, BERT; peft LoRA; torch RNNs; the README's small CNN) built from tiny
configs with random weights: bk_dp's compiled gradients equal the torch.func oracle (per-sample gradients, clipped and
summed), and on the default path (Inductor, a dynamic batch) too."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: every model is built from a config

import peft  # transformers and peft: the test extra
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from helpers import TOL, assert_matches_model, check_default_path, raises_bk
from oracle import clipped_sum, compiled_grads, looped_clipped_sum

import bkcompile
from bkcompile.runtime.ledger import ledger_of

pytestmark = pytest.mark.slow  # real transformers models: seconds each

BATCH, LENGTH, VOCAB = 4, 8, 50
F64 = torch.float64


def check_matches_oracle(
    model: nn.Module, inputs: tuple, targets: tuple, loss, dtype=F64, options=None, oracle=clipped_sum, tol=None
):
    """Compile ``model`` with bk_dp (aot_eager), R = the median per-sample norm; compare with the oracle (to
    ``tol``, by default the dtype's: a model that computes part of its maths in float32 even when float64,
    as RoPE does, needs a looser one)."""
    model = model.to(dtype)
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
    _, norms = oracle(model, loss, inputs, targets, max_grad_norm=float("inf"))
    radius = norms.quantile(0.5).item() if len(norms) > 1 else norms[0].item() / 2  # one sample: clipped
    want, norms = oracle(model, loss, inputs, targets, max_grad_norm=radius)
    if len(norms) > 1:
        assert (norms > radius).any() and (norms < radius).any()  # some samples are clipped and some are not
    options = {"max_grad_norm": radius, "compiler": "aot_eager", "loss_reduction": _reduction(loss), **(options or {})}
    got, compiled = compiled_grads(model, inputs, loss, targets, options)
    # one bk_dp backward ran (not an eager fallback of dynamo's) and recorded the oracle's per-sample norms
    ledger = ledger_of(compiled)
    assert ledger is not None and ledger.last_state().backwards == 1, "no bk_dp backward ran: dynamo ran it eagerly"
    recorded = bkcompile.last_per_sample_norms(compiled)
    torch.testing.assert_close(recorded.to(dtype), norms, rtol=tol or TOL[dtype], atol=0)
    assert_matches_model(got, want, dtype, tol)
    return compiled


def returned_loss(out, *targets):
    return out


def _reduction(loss) -> str:
    """The loss_reduction option of ``loss``: the losses these tests compute outside the model are means over the
    batch; a loss the model returns (``returned_loss``) is recognised."""
    return "auto" if loss is returned_loss else "mean"


def per_sample_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy summed over each sample's tokens, averaged over the batch."""
    b, t, v = logits.shape
    return F.cross_entropy(logits.reshape(b * t, v), labels.reshape(b * t), reduction="none").view(b, t).sum(1).mean()


def token_ids(batch: int = BATCH, length: int = LENGTH) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length))


def padding_mask(batch: int = BATCH, length: int = LENGTH) -> torch.Tensor:
    """1 for real tokens, 0 for trailing padding; sample 0 has none, sample 1 has three padded positions."""
    lengths = torch.tensor([length, length - 3] + [int(n) for n in torch.randint(2, length + 1, (batch - 2,))])
    return (torch.arange(length) < lengths[:, None]).long()


# --- wrappers: the compiled function and the oracle call the same module ---------------------------------------


class Logits(nn.Module):
    """Calls a transformers model with positional tensors bound to ``names``; returns ``.logits``."""

    def __init__(self, model: nn.Module, *names: str) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors):
        return self.model(**dict(zip(self.names, tensors))).logits


class Loss(Logits):
    """The same call with ``labels=`` last: the transformers model computes the loss itself."""

    def forward(self, *tensors):
        return self.model(**dict(zip(self.names, tensors))).loss


# --- configs ---------------------------------------------------------------------------------------------------


def tiny_gpt2(attn: str = "eager") -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=16,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
    )
    config._attn_implementation = attn
    return transformers.GPT2LMHeadModel(config).train()


def tiny_vit(attn: str = "eager") -> nn.Module:
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config._attn_implementation = attn
    return transformers.ViTForImageClassification(config).train()


def tiny_bert(attn: str = "eager") -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
    )
    config._attn_implementation = attn
    return transformers.BertForSequenceClassification(config).train()


# --- 1. GPT-2 language model, loss outside ------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gpt2_lm_per_sample_token_loss(attn: str) -> None:
    model = tiny_gpt2(attn)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied embeddings
    ids = token_ids()
    check_matches_oracle(Logits(model, "input_ids"), (ids,), (torch.roll(ids, -1, dims=1),), per_sample_token_loss)


# --- 2. ViT image classifier ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_vit_image_classification(attn: str, dtype: torch.dtype) -> None:
    pixels = torch.randn(BATCH, 3, 8, 8)
    check_matches_oracle(
        Logits(tiny_vit(attn), "pixel_values"),
        (pixels,),
        (torch.randint(0, 3, (BATCH,)),),
        F.cross_entropy,
        dtype=dtype,
    )


# --- 3. BERT sequence classifier with padding ------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bert_sequence_classification_with_padding(attn: str) -> None:
    inputs = (token_ids(), padding_mask())
    check_matches_oracle(
        Logits(tiny_bert(attn), "input_ids", "attention_mask"),
        inputs,
        (torch.randint(0, 3, (BATCH,)),),
        F.cross_entropy,
        oracle=looped_clipped_sum,  # vmap refuses the padding mask's data-dependent checks (torch.all, .item())
    )


# --- 4. the loss computed inside the transformers model (labels=) -------------------------------------------------


def test_bert_loss_inside_is_a_per_sample_mean() -> None:
    inputs = (token_ids(), padding_mask(), torch.randint(0, 3, (BATCH,)))
    check_matches_oracle(
        Loss(tiny_bert(), "input_ids", "attention_mask", "labels"), inputs, (), returned_loss, oracle=looped_clipped_sum
    )


def test_gpt2_loss_inside_token_mean_over_the_batch_is_refused() -> None:
    gpt2 = tiny_gpt2()
    # GPT2LMHeadModel has no loss_type, so its loss_function logs a warning_once that dynamo breaks the graph on;
    # name the loss it falls back to, ForCausalLMLoss, to trace the loss into the graph of the model.
    gpt2.loss_type = "ForCausalLM"
    model = Loss(gpt2, "input_ids", "labels").double()
    ids = token_ids()
    compiled = torch.compile(model, backend="bk_dp", options={"max_grad_norm": 1.0, "compiler": "aot_eager"})
    with raises_bk(bkcompile.LossReductionError):
        compiled(ids, ids).backward()


# --- 5. LoRA adapters (peft) on a frozen base -------------------------------------------------------------------


def lora_gpt2(attn: str) -> nn.Module:
    config = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["c_attn", "c_proj"],
        lora_dropout=0.0,
        fan_in_fan_out=True,
        init_lora_weights=False,
    )  # random B: A's gradient is not 0
    return peft.get_peft_model(tiny_gpt2(attn), config)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_lora_gpt2_adapters_only(attn: str) -> None:
    model = lora_gpt2(attn)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in k for k in trainable)
    ids = token_ids()
    compiled = check_matches_oracle(
        Logits(model, "input_ids"), (ids,), (torch.roll(ids, -1, dims=1),), per_sample_token_loss
    )
    assert all(p.grad is None for p in compiled._orig_mod.parameters() if not p.requires_grad)


def test_lora_bert_adapters_only() -> None:
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.0, init_lora_weights=False
    )
    model = peft.get_peft_model(tiny_bert(), config)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in k for k in trainable)
    inputs = (token_ids(), padding_mask())
    compiled = check_matches_oracle(
        Logits(model, "input_ids", "attention_mask"),
        inputs,
        (torch.randint(0, 3, (BATCH,)),),
        F.cross_entropy,
        oracle=looped_clipped_sum,
    )
    assert all(p.grad is None for p in compiled._orig_mod.parameters() if not p.requires_grad)


# --- 6. torch recurrent layers ----------------------------------------------------------------------------------


class Recurrent(nn.Module):
    def __init__(self, kind: type) -> None:
        super().__init__()
        self.rnn, self.head = kind(4, 5, num_layers=1, batch_first=True), nn.Linear(5, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


RECURRENT = pytest.mark.parametrize("kind", [nn.RNN, nn.GRU, nn.LSTM], ids=["rnn", "gru", "lstm"])


def recurrent_case(kind: type):
    x = torch.randn(BATCH, 6, 4)
    # torch.func.vmap cannot batch nn.RNN/GRU/LSTM (an in-place broadcast fails), so the oracle loops over samples
    return (Recurrent(kind), (x,), (torch.randint(0, 3, (BATCH,)),), F.cross_entropy), {"oracle": looped_clipped_sum}


@RECURRENT
def test_recurrent_layers_match_the_oracle(kind: type) -> None:
    # importing bkcompile sets dynamo's allow_rnn: without it dynamo would skip the frame and run it eagerly,
    # never calling the backend (unclipped gradients)
    assert torch._dynamo.config.allow_rnn
    args, kwargs = recurrent_case(kind)
    check_matches_oracle(*args, **kwargs)


# --- 7. the default path: Inductor, a dynamic batch -------------------------------------------------------------


def test_bert_with_padding_on_the_default_path() -> None:
    """Inductor's decompositions run before the pass: the padding mask's ``padding_mask[batch_idx, kv_idx]`` reads
    ``batch_idx = arange(B)`` as ``prims.iota``, and the pooler's ``h[:, 0]`` puts its gradient back by a
    ``slice_scatter`` over the whole (symbolic) batch dim."""
    check_default_path(
        Logits(tiny_bert("sdpa"), "input_ids", "attention_mask"),
        lambda b: ((token_ids(b), padding_mask(b)), (torch.randint(0, 3, (b,)),)),
        F.cross_entropy,
        oracle=looped_clipped_sum,  # vmap refuses the padding mask's data-dependent checks
        options={"loss_reduction": "mean"},
    )


def small_cnn() -> nn.Module:
    """The README's small CNN (``examples/models.py``): convolutions, GroupNorm, MaxPool2d, adaptive pooling."""
    path = Path(__file__).parents[1] / "examples" / "models.py"
    spec = importlib.util.spec_from_file_location("example_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.small_cnn(classes=3)


def test_small_cnn_with_max_pool_on_the_default_path() -> None:
    """Inductor's max pooling is ``prims._low_memory_max_pool_with_offsets`` and its offsets turned into indices,
    its gradient a ``scatter_add`` along each (sample, channel) plane; the per-sample convolution weight gradients
    (the cost model's choice at these sizes) are one grouped convolution with the symbolic batch as groups."""
    check_default_path(
        small_cnn(),
        lambda b: ((torch.randn(b, 3, 8, 8),), (torch.randint(0, 3, (b,)),)),
        F.cross_entropy,
        options={"loss_reduction": "mean"},
    )


def test_recurrent_last_step_on_the_default_path() -> None:
    """An RNN's ``out[:, -1]`` (a ``slice_scatter`` over the whole batch in its gradient); the gradient of its
    ``unbind`` over the time steps, decomposed into a ``cat`` of (B, d) blocks along the batch dim, (T*B, d) with
    the samples inside each block; the weight gradients then read that sequence-first layout. A GroupNorm of the
    last step, (B, 5): 5 values per group, whose one-value check (``5 * u0 != 1``, odd: the shape environment cannot
    decide it) ``bkcompile.passes.tracing`` answers."""
    model = Recurrent(nn.GRU)
    model.head = nn.Sequential(nn.GroupNorm(1, 5), model.head)
    check_default_path(
        model,
        lambda b: ((torch.randn(b, 6, 4),), (torch.randint(0, 3, (b,)),)),
        F.cross_entropy,
        oracle=looped_clipped_sum,  # vmap cannot batch nn.GRU
        options={"loss_reduction": "mean"},
    )


def test_lora_bert_on_the_default_path() -> None:
    """peft LoRA (adapters only, the frozen base's weights in the graph) on BERT with padded batches, under Inductor
    with a dynamic batch: the adapters' per-sample gradients next to the frozen attention and the padding mask."""
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.0, init_lora_weights=False
    )  # random B: A's gradient is not 0
    model = peft.get_peft_model(tiny_bert("sdpa"), config)
    assert all("lora_" in k for k, p in model.named_parameters() if p.requires_grad)
    check_default_path(
        Logits(model, "input_ids", "attention_mask"),
        lambda b: ((token_ids(b), padding_mask(b)), (torch.randint(0, 3, (b,)),)),
        F.cross_entropy,
        oracle=looped_clipped_sum,  # vmap refuses the padding mask's data-dependent checks
        options={"loss_reduction": "mean"},
    )


TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5
PACKED_MASK = "transformers 4 builds the packed-sequence mask under torch.vmap: refused under a dynamic batch"


@pytest.mark.skipif(TRANSFORMERS_4, reason=PACKED_MASK)
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gpt2_sdpa_on_the_default_path(lora: bool) -> None:
    """GPT-2 with SDPA attention (and peft LoRA on it), its position ids given per sample, (B, T), marked with the
    batch: transformers' mask preprocessing finds their size equal to the batch's by the shared batch symbol. One
    graph for both batch sizes, causal SDPA with no mask (the ids alone: below)."""
    model = lora_gpt2("sdpa") if lora else tiny_gpt2("sdpa")
    check_default_path(
        Logits(model, "input_ids", "position_ids"),
        lambda b: ((token_ids(b), torch.arange(LENGTH).expand(b, LENGTH).contiguous()), (token_ids(b),)),
        per_sample_token_loss,
        oracle=looped_clipped_sum,  # vmap refuses the packed-sequence check on the position ids (.all())
        options={"loss_reduction": "mean"},
    )


@pytest.mark.skipif(TRANSFORMERS_4, reason=PACKED_MASK)
def test_gpt2_input_ids_alone_on_the_default_path() -> None:
    """GPT-2 called with its input ids alone makes position ids of shape (1, T), and transformers' mask preprocessing
    asks ``batch_size != position_ids.shape[0]``: with the batch an unbacked symbol, dynamo meets that comparison
    after the position ids are broadcast over the batch (``bkcompile.runtime.transformers_masks``), decided without a
    guard. One graph for both batch sizes, no graph break."""
    check_default_path(
        Logits(tiny_gpt2("sdpa"), "input_ids"),
        lambda b: ((token_ids(b),), (token_ids(b),)),
        per_sample_token_loss,
        oracle=looped_clipped_sum,  # vmap refuses the packed-sequence check on the position ids (.all())
        options={"loss_reduction": "mean"},
    )
