"""Small models for the examples and the cost-model command line (``python -m bkcompile explain``)."""

from __future__ import annotations

from torch import nn


def small_cnn(classes: int = 10) -> nn.Module:
    """A conv net with GroupNorm for 3x32x32 images (BatchNorm would mix samples)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.GroupNorm(4, 32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, classes),
    )


def token_mlp(vocab: int = 1000, width: int = 64, classes: int = 2) -> nn.Module:
    """Token embeddings, a per-token MLP and mean pooling, for (B, T) token ids."""
    return nn.Sequential(
        nn.Embedding(vocab, width),
        nn.Linear(width, width),
        nn.GELU(),
        nn.LayerNorm(width),
        _MeanOverTokens(),
        nn.Linear(width, classes),
    )


class _MeanOverTokens(nn.Module):
    def forward(self, x):
        return x.mean(dim=1)
