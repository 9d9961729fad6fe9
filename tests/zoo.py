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


class VectorScore(nn.Module):
    """A vector parameter used as ``h @ v``: one score per position (aten.mv in the graph)."""

    def __init__(self, d: int = 5, length: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.v = nn.Parameter(torch.randn(d) / math.sqrt(d))
        self.head = nn.Linear(length, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)) @ self.v)


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


class ConvNet(nn.Module):
    """Conv2d with stride and padding, GroupNorm, a depthwise-separable pair (dilated depthwise + pointwise),
    a transposed convolution and GroupNorm without affine parameters, on (B, 3, 8, 8)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(4, 8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.pointwise = nn.Conv2d(8, 6, 1, bias=False)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2)
        self.plain_norm = nn.GroupNorm(2, 4, affine=False)
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        x = F.relu(self.norm(self.stem(x)))
        x = F.relu(self.pointwise(self.depthwise(x)))
        x = self.plain_norm(self.up(x))
        return self.head(x.mean(dim=(2, 3)))


class ResBlockGN(nn.Module):
    """A small ResNet: a stem and one residual block of conv-GroupNorm-ReLU, on (B, 3, 8, 8)."""

    def __init__(self, width: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.GroupNorm(2, width), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.GroupNorm(3, width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.GroupNorm(3, width),
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.block(x))
        return self.head(x.mean(dim=(2, 3)))


class ConvGeometries(nn.Module):
    """Stride-1 convolutions of several geometries (3x3 padded, dilated and grouped, 1x1, 1-d), a strided one, on
    (B, 3, 8, 8)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.padded = nn.Conv2d(3, 4, 3, padding=1)
        self.dilated = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, bias=False)
        self.pointwise = nn.Conv2d(4, 4, 1)
        self.strided = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.rows = nn.Conv1d(4, 3, 3, padding=1)
        self.head = nn.Linear(3, classes)

    def forward(self, x):
        x = torch.tanh(self.padded(x))
        x = torch.tanh(self.pointwise(torch.tanh(self.dilated(x))))
        x = torch.tanh(self.strided(x))  # (B, 4, 4, 4)
        x = torch.tanh(self.rows(x.flatten(2)))  # (B, 3, 16)
        return self.head(x.mean(dim=2))


class SeqConv(nn.Module):
    """Conv1d with InstanceNorm1d (affine), then Conv3d, on (B, 2, 10) -> (B, 2, 2, 5) viewed as volumes."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, 4, 3, padding=1, bias=False)  # InstanceNorm cancels a bias
        self.inorm = nn.InstanceNorm1d(4, affine=True)
        self.conv3 = nn.Conv3d(1, 2, (2, 2, 3), padding=(0, 0, 1))
        self.head = nn.Linear(2, classes)

    def forward(self, x):
        x = torch.tanh(self.inorm(self.conv1(x)))  # (B, 4, 10)
        x = self.conv3(x.reshape(x.shape[0], 1, 2, 2, 10))  # (B, 2, 1, 1, 10)
        return self.head(x.mean(dim=(2, 3, 4)))


class BatchNormEval(nn.Module):
    """BatchNorm with frozen statistics (eval mode) between linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.head = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
        self.bn.running_mean.normal_()
        self.bn.running_var.uniform_(0.5, 2.0)
        self.eval()

    def forward(self, x):
        return self.head(torch.tanh(self.bn(self.fc(x))))


class TwiceApplied(nn.Module):
    """One nn.Linear applied twice: its gradient adds two sites, and the norm has their cross term."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


class UnrolledRNN(nn.Module):
    """An Elman cell from raw parameters, unrolled over the T steps of (B, T, d): W_h has T-1 sites."""

    def __init__(self, d: int = 4, hidden: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.w_x = nn.Parameter(torch.randn(d, hidden) / math.sqrt(d))
        self.w_h = nn.Parameter(torch.randn(hidden, hidden) / math.sqrt(hidden))
        self.b = nn.Parameter(torch.zeros(hidden))
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        h = torch.tanh(x[:, 0] @ self.w_x + self.b)
        for t in range(1, x.shape[1]):
            h = torch.tanh(x[:, t] @ self.w_x + h @ self.w_h + self.b)
        return self.head(h)


class PerSampleOps(nn.Module):
    """Ops along per-sample dims that keep samples apart, on (B, T, d): F.glu, a gather by per-sample indices
    (argsort), a sort along T, F.one_hot (with its range checks over the batch), a weight masked by triu (an
    autoregressive layer: its gradient passes through the mask) and an activation masked by tril."""

    def __init__(self, d: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(d, 2 * d)
        self.w = nn.Parameter(torch.randn(d, d) / math.sqrt(d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = F.glu(self.fc(x), dim=-1)
        h = torch.gather(h, -1, torch.argsort(h.detach(), dim=-1)) + torch.sort(h, dim=1).values
        h = h * (1 + F.one_hot(h.argmax(-1), h.shape[-1]).to(h.dtype))
        h = torch.tril(torch.tanh(h @ self.w.triu()), diagonal=1)
        return self.head(h.mean(dim=1))


VOCAB, PAD = 11, 0


def tokens(batch: int, length: int = 6) -> torch.Tensor:
    """Token ids in [1, VOCAB) with a random number of trailing PAD tokens (the first token is never PAD)."""
    ids = torch.randint(1, VOCAB, (batch, length))
    lengths = torch.randint(2, length + 1, (batch,))
    return ids.masked_fill(torch.arange(length) >= lengths[:, None], PAD)


class TextAttention(nn.Module):
    """nn.Embedding with padding_idx, nn.MultiheadAttention with key-padding and causal masks, on token ids."""

    def __init__(self, d: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d, padding_idx=PAD)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        x = self.embed(ids)
        t = ids.shape[1]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        out, _ = self.attn(x, x, x, key_padding_mask=ids == PAD, attn_mask=causal, need_weights=False)
        return self.head(out.mean(dim=1))


class TiedLM(nn.Module):
    """A language model with tied input/output embeddings and an SDPA causal block, returning logits (B, T, V)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(0.1 * torch.randn(6, d))
        self.qkv, self.norm = nn.Linear(d, 3 * d), nn.LayerNorm(d)
        self.out = nn.Linear(d, VOCAB, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        b, t = ids.shape
        x = self.embed(ids) + self.pos[:t]
        q, k, v = self.qkv(x).view(b, t, 3, 2, -1).permute(2, 0, 3, 1, 4)
        x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        return self.out(self.norm(x))


def per_sample_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's summed token loss, averaged over the batch (a per-sample loss, so clipping is exact)."""
    b, t, v = logits.shape
    return F.cross_entropy(logits.reshape(b * t, v), labels.reshape(b * t), reduction="none").view(b, t).sum(1).mean()
