"""The throughput benchmark's workloads: a model returning logits, one fixed batch, and the per-sample loss.

Every model is built from a config with random weights (nothing is downloaded). transformers is imported by the
builders that need it (the bench extra), so the MLP and the ResNet run without it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]  # (model inputs, targets)


@dataclass(frozen=True)
class Workload:
    """A model family at one size: ``build()`` makes the model, ``batch(device)`` the batch it trains on."""

    description: str
    batch_size: int
    build: Callable[[], nn.Module]
    batch: Callable[[torch.device], Batch]


class PerSampleCrossEntropy(nn.Module):
    """Cross entropy per sample (summed over a sequence's tokens for (B, T, V) logits), averaged over the batch.

    ``reduction`` is an attribute because Opacus's ghost-clipping criterion wrapper sets it to "none" to read the
    per-sample losses; otherwise it is "mean".
    """

    reduction = "mean"

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        tokens = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none")
        per_sample = tokens.view(len(targets), -1).sum(1)
        return per_sample if self.reduction == "none" else per_sample.mean()


class ImageLogits(nn.Module):
    """A transformers image classifier's logits for pixel values (B, C, H, W)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).logits


class LMLogits(nn.Module):
    """A transformers causal LM's logits for token ids (B, T), with the position ids passed as a (B, T) tensor:
    Opacus's per-sample gradient hooks need the position embedding's input batched (GPT-2's default ids are
    (1, T), and opacus-hooks then fails: "stack expects each tensor to be equal size")."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return self.model(input_ids=ids, position_ids=positions).logits


class BasicBlockGN(nn.Module):
    """Two 3x3 conv-GroupNorm layers with a residual (a 1x1 conv-GroupNorm shortcut when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.GroupNorm(groups, c_out),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.GroupNorm(groups, c_out),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.GroupNorm(groups, c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class ResNetGN(nn.Module):
    """A small ResNet with GroupNorm for 32x32 images: a 3x3 stem, one basic block per width (stride 2 after the
    first), global average pooling and a linear classifier."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), groups: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.GroupNorm(groups, widths[0]), nn.ReLU()
        )
        self.blocks = nn.Sequential(
            *(
                BasicBlockGN(c_in, c_out, 1 if i == 0 else 2, groups)
                for i, (c_in, c_out) in enumerate(zip((widths[0],) + widths[:-1], widths))
            )
        )
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def mlp(d_in: int, hidden: int, layers: int, classes: int, batch: int) -> Workload:
    """An MLP (Linear-ReLU ``layers`` times, then a linear classifier) on random features."""

    def build() -> nn.Module:
        widths = [d_in] + [hidden] * layers
        body = [m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
        return nn.Sequential(*body, nn.Linear(hidden, classes))

    return Workload(
        f"MLP {d_in}-{'-'.join([str(hidden)] * layers)}-{classes}, ReLU",
        batch,
        build,
        _classification_batch((d_in,), classes, batch),
    )


def resnet_gn(widths: tuple[int, ...], image: int, batch: int) -> Workload:
    """ResNetGN on random ``image`` x ``image`` RGB images, 10 classes."""
    return Workload(
        f"ResNet, GroupNorm, widths {'/'.join(map(str, widths))}, {image}x{image} images",
        batch,
        lambda: ResNetGN(widths),
        _classification_batch((3, image, image), 10, batch),
    )


def vit(image: int, patch: int, width: int, layers: int, heads: int, batch: int) -> Workload:
    """transformers ViTForImageClassification (SDPA attention, no dropout), 10 classes, random images."""

    def build() -> nn.Module:
        import transformers

        config = transformers.ViTConfig(
            image_size=image,
            patch_size=patch,
            num_channels=3,
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * width,
            num_labels=10,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            attn_implementation="sdpa",
        )
        return ImageLogits(transformers.ViTForImageClassification(config))

    return Workload(
        f"ViT {image}x{image} images, patch {patch}, width {width}, {layers} layers, {heads} heads",
        batch,
        build,
        _classification_batch((3, image, image), 10, batch),
    )


def gpt2(layers: int, width: int, heads: int, vocab: int, seq_len: int, batch: int) -> Workload:
    """transformers GPT2LMHeadModel (tied input and output embeddings, SDPA attention, no dropout) on random tokens;
    the targets are the inputs shifted by one and the loss sums each sequence's token losses."""

    def build() -> nn.Module:
        import transformers

        config = transformers.GPT2Config(
            n_layer=layers,
            n_embd=width,
            n_head=heads,
            vocab_size=vocab,
            n_positions=seq_len,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            use_cache=False,
            attn_implementation="sdpa",
        )
        return LMLogits(transformers.GPT2LMHeadModel(config))

    def make_batch(device: torch.device) -> Batch:
        ids = torch.randint(0, vocab, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
        return (ids[:, :-1].to(device),), ids[:, 1:].to(device)

    return Workload(
        f"GPT-2 LM, {layers} layers, width {width}, {heads} heads, vocab {vocab}, T={seq_len}", batch, build, make_batch
    )


def _classification_batch(shape: tuple[int, ...], classes: int, batch: int) -> Callable[[torch.device], Batch]:
    """A maker of one batch of standard-normal inputs of ``shape`` and random labels."""

    def make_batch(device: torch.device) -> Batch:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn((batch, *shape), generator=generator)
        y = torch.randint(0, classes, (batch,), generator=generator)
        return (x.to(device),), y.to(device)

    return make_batch
