"""Fine-tuning workloads: padded LLM batches, sequence classification, T5, and the constructs real training
scripts use (label smoothing, F.normalize, weight norm, weight standardisation, EmbeddingBag, a
data-independent loss term, a multitask loss, gradient checkpointing). Each against the torch.func oracle
(per-sample gradients clipped and summed), at B = 1 and at B = 5 with a different padding per sample."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: every model is built from a config

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
import zoo
from helpers import assert_matches, raises_bk
from oracle import clipped_sum, looped_clipped_sum
from test_models import (
    Logits,
    check_default_path,
    check_matches_oracle,
    per_sample_token_loss,
    returned_loss,
)
from torch._dynamo.utils import counters

import bkcompile

VOCAB, LENGTH = 50, 8
SIZES = pytest.mark.parametrize("batch", [1, 5])
# Llama-family models compute RoPE in float32 whatever the model's dtype: their float64 gradients agree with
# the oracle to a few 1e-8 (float32 rounding of cos/sin, computed differently in the graph), not to 1e-10.
ROPE_TOL = 1e-6


def padded_batch(batch: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask (B, T): sample i has its own length (trailing padding with ``pad_id``)."""
    lengths = torch.tensor([LENGTH, 5, 3, 6, 2][:batch])
    mask = (torch.arange(LENGTH) < lengths[:, None]).long()
    ids = torch.randint(1, VOCAB, (batch, LENGTH)) * mask + pad_id * (1 - mask)
    return ids, mask


def llm_config(kind: str, attn: str, **extra) -> transformers.PretrainedConfig:
    config_class = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
    }[kind]
    config = config_class(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        use_cache=False,
        **extra,
    )
    config._attn_implementation = attn
    return config


CAUSAL_LM = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


# --- LLMs with a padding attention mask ---------------------------------------------------------------------


@SIZES
@pytest.mark.parametrize("kind,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("mistral", "sdpa")])
def test_causal_lm_with_padding_mask(kind: str, attn: str, batch: int) -> None:
    """transformers builds the padding mask with ``padding_mask[batch_idx, kv_idx]``, batch_idx an arange over
    the batch: each sample reads its own mask row."""
    model = getattr(transformers, CAUSAL_LM[kind])(llm_config(kind, attn)).train()
    ids, mask = padded_batch(batch)
    check_matches_oracle(
        Logits(model, "input_ids", "attention_mask"),
        (ids, mask),
        (torch.roll(ids, -1, dims=1),),
        per_sample_token_loss,
        oracle=looped_clipped_sum,
        tol=ROPE_TOL,
    )


@SIZES
def test_llama_sequence_classification(batch: int) -> None:
    """The pooled logits are ``logits[arange(B), last_non_pad_token]``: each sample's own last token."""
    config = llm_config("llama", "sdpa", num_labels=3, pad_token_id=0)
    model = transformers.LlamaForSequenceClassification(config).train()
    ids, mask = padded_batch(batch)
    check_matches_oracle(
        Logits(model, "input_ids", "attention_mask"),
        (ids, mask),
        (torch.randint(0, 3, (batch,)),),
        F.cross_entropy,
        oracle=looped_clipped_sum,
        tol=ROPE_TOL,
    )


TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5
VMAP_MASKS = "transformers 4 builds the padding mask under torch.vmap: refused under a dynamic batch (below)"


@pytest.mark.slow
@pytest.mark.skipif(TRANSFORMERS_4, reason=VMAP_MASKS)
def test_llama_sequence_classification_on_the_default_path() -> None:
    """Under Inductor both ``arange(B)`` (the padding mask's batch index, the pooling's sample index) arrive as
    ``prims.iota``: each sample still reads its own mask row and its own last token."""
    config = llm_config("llama", "sdpa", num_labels=3, pad_token_id=0)
    check_default_path(
        Logits(transformers.LlamaForSequenceClassification(config).train(), "input_ids", "attention_mask"),
        lambda b: (padded_batch(b), (torch.randint(0, 3, (b,)),)),
        F.cross_entropy,
        oracle=looped_clipped_sum,
        options={"loss_reduction": "mean"},
    )


@pytest.mark.skipif(not TRANSFORMERS_4, reason="transformers 5 builds the padding mask by broadcasting")
def test_padding_mask_under_a_dynamic_batch_on_transformers_4_is_refused() -> None:
    """4.57's sdpa mask indexes the padding mask under torch.vmap, whose rule tests the batch size: the refusal names
    the version, transformers' function and the fix."""
    config = llm_config("llama", "sdpa", num_labels=3, pad_token_id=0)
    model = Logits(transformers.LlamaForSequenceClassification(config).train(), "input_ids", "attention_mask")
    options = {"max_grad_norm": 1.0, "compiler": "aot_eager", "loss_reduction": "mean"}
    compiled = torch.compile(model, backend="bk_dp", options=options)
    ids, mask = padded_batch(4)
    bkcompile.mark_batch_dynamic(ids, mask)
    with raises_bk(
        bkcompile.NotSupportedYetError,
        f"transformers {transformers.__version__}'s sdpa_mask_recent_torch",
        "under torch.vmap",
        "transformers>=5.24",
    ):
        F.cross_entropy(compiled(ids, mask), torch.randint(0, 3, (4,))).backward()


# --- ops along per-sample dims (F.glu, gather, F.one_hot, sort and argsort, triu and tril) -------------------------


def test_per_sample_ops_along_non_batch_dims() -> None:
    """Each keeps the samples apart along a per-sample dim; their gradients are views, scatters into zeros
    (sort, gather) and the mask itself (triu of the weight's gradient, a linear map of the clipped sum)."""
    x, y = torch.randn(5, 4, 6), torch.randint(0, 3, (5,))
    # vmap refuses F.one_hot's range checks (data-dependent assertions): the oracle loops over the samples
    check_matches_oracle(zoo.PerSampleOps(), (x,), (y,), F.cross_entropy, oracle=looped_clipped_sum)


@pytest.mark.slow
def test_per_sample_ops_on_the_default_path() -> None:
    """Under Inductor F.one_hot's check all(ids >= 0) is not(any(not(ids >= 0))), still read by an assertion
    alone; sort's and gather's gradients are scatters into zeros."""
    check_default_path(
        zoo.PerSampleOps(),
        lambda b: ((torch.randn(b, 4, 6),), (torch.randint(0, 3, (b,)),)),
        F.cross_entropy,
        oracle=looped_clipped_sum,
        options={"loss_reduction": "mean"},
    )


class Seq2Seq(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids, mask, decoder_ids):
        return self.model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits


@SIZES
@pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5, reason="T5 has sdpa attention from transformers 5 on"
)
def test_t5_sdpa(batch: int) -> None:
    """T5 with sdpa: a learned position bias added to the causal mask (where/_safe_softmax). T5's layer norm
    computes its variance in float32 whatever the model's dtype, hence float32-level agreement."""
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        use_cache=False,
    )
    config._attn_implementation = "sdpa"
    ids, mask = padded_batch(batch)
    decoder_ids = torch.randint(1, VOCAB, (batch, 6))
    check_matches_oracle(
        Seq2Seq(transformers.T5ForConditionalGeneration(config).train()),
        (ids, mask, decoder_ids),
        (torch.roll(decoder_ids, -1, dims=1),),
        per_sample_token_loss,
        oracle=looped_clipped_sum,
        tol=1e-6,
    )


@pytest.mark.parametrize("use_cache", [False, True], ids=["no_cache", "cache"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing(reentrant: bool, use_cache: bool) -> None:
    """HF gradient checkpointing (both torch.utils.checkpoint kinds). Without ``use_cache=False`` transformers'
    warning_once breaks the graph: the layers then run in a graph dynamo compiles on its own, called from the
    code it skipped, which is one of several graphs (clipped with the others at the end of the backward). The
    oracle runs the same weights without checkpointing (the maths is the same; the reentrant kind refuses
    torch.autograd.grad)."""
    model = transformers.LlamaForCausalLM(llm_config("llama", "sdpa")).train().double()
    plain = Logits(copy.deepcopy(model), "input_ids", "attention_mask")
    model.config.use_cache = use_cache
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids, mask = padded_batch(5)
    check_matches_oracle(
        Logits(model, "input_ids", "attention_mask"),
        (ids, mask),
        (torch.roll(ids, -1, dims=1),),
        per_sample_token_loss,
        oracle=lambda _, *args, **kwargs: looped_clipped_sum(plain, *args, **kwargs),
        tol=ROPE_TOL,
    )
    spans = bkcompile.last_clip_spans()
    if use_cache:  # the graph break: the model ran in several graphs, clipped together
        assert len(spans) == 1 and len(spans[0].graphs) == 2


class Mark:
    block: nn.Module | None = None


MARK = Mark()


class Marked(nn.Sequential):
    """A block that sets a module-global mark while it runs and resets it after: a Python side effect inside the
    checkpoint, as transformers >= 5.25 has in every attention forward (the ``kernels`` package's
    ``use_kernelized_func``)."""

    def forward(self, x):
        previous, MARK.block = MARK.block, self
        try:
            return super().forward(x)
        finally:
            MARK.block = previous


class CheckpointedBlocks(nn.Module):
    """Blocks run through torch.utils.checkpoint inside a model compiled whole: dynamo traces the checkpoint."""

    def __init__(self, reentrant: bool, marked: bool = False) -> None:
        super().__init__()
        self.stem, self.head, self.reentrant, self.checkpointed = nn.Linear(4, 6), nn.Linear(6, 3), reentrant, True
        block = Marked if marked else nn.Sequential
        self.blocks = nn.ModuleList([block(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 6)) for _ in range(2)])

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            if self.checkpointed:
                h = h + torch.utils.checkpoint.checkpoint(block, h, use_reentrant=self.reentrant)
            else:
                h = h + block(h)
        return self.head(h)


@pytest.mark.parametrize("marked", [False, True], ids=["pure", "side_effect"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpoint_inside_a_model_compiled_whole(reentrant: bool, marked: bool) -> None:
    """With a Python side effect in the checkpointed block dynamo still traces the checkpoint into the graph
    (bkcompile lets it skip replaying the side effect in the recompute) instead of breaking the graph there."""
    torch.manual_seed(4)
    model = CheckpointedBlocks(reentrant, marked)
    plain = copy.deepcopy(model).double()
    plain.checkpointed = False  # the oracle: the same maths without checkpointing (vmap refuses the reentrant kind)
    inputs, targets = (torch.randn(5, 4),), (torch.randint(0, 3, (5,)),)
    counters.clear()
    check_matches_oracle(
        model,
        inputs,
        targets,
        F.cross_entropy,
        options={"loss_reduction": "mean"},
        oracle=lambda _, *args, **kwargs: clipped_sum(plain, *args, **kwargs),
    )
    assert counters["stats"]["unique_graphs"] == 1  # one graph: no break at the checkpoint


# --- losses -------------------------------------------------------------------------------------------------


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)))


class SmoothedLoss(Classifier):
    def forward(self, x, y):
        return F.cross_entropy(super().forward(x), y, label_smoothing=0.1)


@SIZES
def test_label_smoothing_loss_outside(batch: int) -> None:
    loss = lambda out, y: F.cross_entropy(out, y, label_smoothing=0.1)  # noqa: E731
    check_matches_oracle(Classifier(), (torch.randn(batch, 4),), (torch.randint(0, 3, (batch,)),), loss)


@SIZES
def test_label_smoothing_loss_inside(batch: int) -> None:
    """The smoothing term is divided by the count of non-ignored labels, the cross entropy's own normaliser."""
    inputs = (torch.randn(batch, 4), torch.randint(0, 3, (batch,)))
    check_matches_oracle(SmoothedLoss(), inputs, (), returned_loss)


class Multitask(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.regress = nn.Linear(4, 1)

    def forward(self, x, y, z):
        return F.cross_entropy(super().forward(x), y, label_smoothing=0.1) + F.mse_loss(self.regress(x)[:, 0], z)


@SIZES
def test_multitask_loss_returned_by_the_model(batch: int) -> None:
    inputs = (torch.randn(batch, 4), torch.randint(0, 3, (batch,)), torch.randn(batch))
    check_matches_oracle(Multitask(), inputs, (), returned_loss)


def test_multitask_loss_with_ignored_labels_is_refused() -> None:
    """With an ignored label the classification mean divides by 4 and the regression mean by 5: no per-sample
    loss exists."""
    y = torch.tensor([0, -100, 2, 1, 0])
    compiled = torch.compile(Multitask(), backend="bk_dp", options={"max_grad_norm": 1.0, "compiler": "aot_eager"})
    with raises_bk(bkcompile.LossReductionError, "4 non-ignored labels of a batch of 5", "reduction='none'"):
        compiled(torch.randn(5, 4), y, torch.randn(5)).backward()


class Regularised(Classifier):
    def forward(self, x, y):
        penalty = sum(p.pow(2).sum() for p in self.parameters())
        return F.cross_entropy(super().forward(x), y) + 1e-2 * penalty


@SIZES
@pytest.mark.parametrize("strategy", ["ghost", "explicit"])
def test_data_independent_loss_term(batch: int, strategy: str) -> None:
    """``ce + wd * sum(p^2)``: the penalty's gradient has no sensitivity; it is neither clipped nor noised but
    multiplied by the expected batch size E, so that after the optimizer's division by E it is 2 wd p."""
    model = Regularised().double()
    x, y = torch.randn(batch, 4, dtype=torch.float64), torch.randint(0, 3, (batch,))
    expected = 7.0
    twin = copy.deepcopy(model)
    options = {"max_grad_norm": 0.3, "compiler": "aot_eager", "expected_batch_size": expected, "strategy": strategy}
    torch.compile(twin, backend="bk_dp", options=options)(x, y).backward()
    plain = Classifier().double()  # the same parameters without the penalty
    plain.load_state_dict(model.state_dict())
    clipped, norms = clipped_sum(plain, F.cross_entropy, (x,), (y,), max_grad_norm=0.3)
    assert (norms > 0.3).any()
    want = {k: clipped[k] + expected * 2e-2 * p.detach() for k, p in model.named_parameters()}
    assert_matches({k: p.grad for k, p in twin.named_parameters()}, want, torch.float64)


def test_data_independent_loss_term_needs_the_expected_batch_size() -> None:
    compiled = torch.compile(Regularised(), backend="bk_dp", options={"max_grad_norm": 1.0, "compiler": "aot_eager"})
    with raises_bk(bkcompile.OptionError, "data-independent term", "'fc.weight'", "expected_batch_size"):
        compiled(torch.randn(4, 4), torch.randint(0, 3, (4,))).backward()


def test_data_independent_loss_term_in_several_graphs_is_refused() -> None:
    options = {"max_grad_norm": 1.0, "compiler": "aot_eager", "expected_batch_size": 4.0, "graphs": "several"}
    compiled = torch.compile(Regularised(), backend="bk_dp", options=options)
    with raises_bk(bkcompile.NotSupportedYetError, "data-independent term", "'fc.weight'", "several graphs"):
        compiled(torch.randn(4, 4), torch.randint(0, 3, (4,))).backward()


# --- layers -------------------------------------------------------------------------------------------------


class Normalized(Classifier):
    def forward(self, x):
        return self.head(F.normalize(self.fc(x), dim=-1))


class WeightNormed(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.utils.parametrizations.weight_norm(nn.Linear(4, 6))


class StandardisedConv(nn.Conv2d):
    """Weight standardisation: the kernel normalised by its own mean and standard deviation per output channel."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias)


class StandardisedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = StandardisedConv(2, 3, 3), nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


class Bag(nn.Module):
    def __init__(self, mode: str, padding_idx: int | None) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(20, 6, mode=mode, padding_idx=padding_idx)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.bag(ids)))


LAYERS = {
    "normalize": (Normalized, lambda b: torch.randn(b, 4)),
    "weight_norm": (WeightNormed, lambda b: torch.randn(b, 4)),
    "weight_standardisation": (StandardisedNet, lambda b: torch.randn(b, 2, 6, 6)),
    "embedding_bag_mean": (lambda: Bag("mean", None), lambda b: torch.randint(0, 20, (b, 4))),
    "embedding_bag_sum_padding": (lambda: Bag("sum", 0), lambda b: padded_batch(b)[0][:, :4] % 20),
}


@SIZES
@pytest.mark.parametrize("layer", list(LAYERS))
def test_layers(layer: str, batch: int) -> None:
    """Weight norm and standardisation: the raw weight's per-sample gradient through the transform's Jacobian."""
    make, inputs = LAYERS[layer]
    check_matches_oracle(make(), (inputs(batch),), (torch.randint(0, 3, (batch,)),), F.cross_entropy)


def test_embedding_bag_with_inductor() -> None:
    """The decomposition (lookup, padding mask, per-bag mean) and its runtime check of the offsets under Inductor."""
    ids = padded_batch(5)[0][:, :4] % 20
    check_matches_oracle(
        Bag("mean", 0), (ids,), (torch.randint(0, 3, (5,)),), F.cross_entropy, options={"compiler": "inductor"}
    )


def test_embedding_bag_with_irregular_offsets_is_refused_when_run() -> None:
    """Bags of unequal length (flat indices with offsets) are not decomposed per sample: the run stops with the
    package's error at the EmbeddingBag call."""

    class FlatBag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bag = nn.EmbeddingBag(20, 6)
            self.register_buffer("offsets", torch.tensor([0, 1, 4]))

        def forward(self, ids):
            return self.bag(ids.flatten(), self.offsets)

    options = {"max_grad_norm": 1.0, "compiler": "aot_eager", "loss_reduction": "sum"}
    compiled = torch.compile(FlatBag(), backend="bk_dp", options=options)
    with pytest.raises(bkcompile.NotSupportedYetError, match="unequal length") as info:
        compiled(torch.randint(0, 20, (3, 2))).sum().backward()
    assert "test_finetune.py" in str(info.value) and "fix: pass the indices as a 2-D (B, L) tensor" in str(info.value)
