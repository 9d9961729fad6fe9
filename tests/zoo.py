"""Small models for the oracle tests: each one exercises a different kind of site or loss."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self, d_in: int = 6, hidden: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.LayerNorm(hidden), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)


class MLPWithLoss(MLP):
    """Returns the loss itself, reduced over the batch by ``reduction``."""

    def __init__(self, reduction: str, kind: str = "cross_entropy") -> None:
        super().__init__()
        self.reduction, self.kind = reduction, kind

    def forward(self, x, y):
        out = self.net(x)
        if self.kind == "cross_entropy":
            return F.cross_entropy(out, y, reduction=self.reduction)
        per_sample = (out - y.unsqueeze(1).to(out.dtype)).pow(2).sum(1)
        return per_sample.mean() if self.reduction == "mean" else per_sample.sum()


class PreNormBlock(nn.Module):
    """A pre-norm transformer block with hand-written softmax attention and a GELU MLP, on (B, T, d)."""

    def __init__(self, d: int = 8, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        attn = scores.softmax(dim=-1) @ v
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(dim=1))


class RawParams(nn.Module):
    """Raw nn.Parameter maths: einsum, @, a bias and an elementwise scale, on (B, T, d)."""

    def __init__(self, d: int = 5, hidden: int = 7, classes: int = 3) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(d, hidden) / math.sqrt(d))
        self.b1 = nn.Parameter(torch.randn(hidden) * 0.1)
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(hidden))
        self.w2 = nn.Parameter(torch.randn(hidden, classes) / math.sqrt(hidden))

    def forward(self, x):
        h = torch.tanh(torch.einsum("btd,dh->bth", x, self.w1) + self.b1) * self.scale
        return (h @ self.w2).sum(dim=1)


class PartlyFrozen(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.net[0].requires_grad_(False)
        self.net[2].weight.requires_grad_(False)


class HandRMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class RMSNormNet(nn.Module):
    """nn.RMSNorm and a hand-written RMSNorm on (B, T, d)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.norm, self.hand, self.head = nn.Linear(5, 6), nn.RMSNorm(6), HandRMSNorm(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.hand(self.norm(self.fc(x)))).mean(dim=1)
