"""Random models for the never-silent fuzzer: a small program of pieces over (B, T, d) values.

Every value is (B, T, d) with one width d. A piece reads earlier values and makes a new one; the values no
piece reads are added, averaged over T and sent through a linear head. Families: linear layers (new or
shared with an earlier piece), a convolution over T, LayerNorm / RMSNorm / GroupNorm, SDPA and hand-written
softmax attention, elementwise maps and products, an elementwise scale parameter, reshapes, reductions over
T, an embedding input; and ops that mix samples (``flip(0)``, ``roll`` over the batch, a batch mean or sum,
training-mode BatchNorm, a cross-sample matmul), which bk_dp must refuse. ``repr`` prints the program.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

VOCAB, CLASSES = 11, 3


@dataclasses.dataclass(frozen=True)
class Piece:
    op: str
    inputs: tuple[int, ...]  # indices of the values it reads (0: the input)
    flag: bool = False  # per family: a bias, an affine norm, causal attention
    shares: int = -1  # "shared": the piece whose linear layer it reuses


@dataclasses.dataclass(frozen=True)
class Family:
    arity: int
    apply: Callable  # (module or None, piece, *values) -> value
    make: Callable[[int, Piece], nn.Module] | None = None  # (width, piece) -> the piece's parameters
    mixes: bool = False  # mixes samples: bk_dp must refuse it (with more than one sample)


def _channels_last(fn: Callable) -> Callable:
    """Apply a (B, C, T) module to a (B, T, C) value."""
    return lambda m, p, x: fn(m, p, x.transpose(1, 2)).transpose(1, 2)


class Scale(nn.Module):
    """An elementwise scale parameter (d,)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.5 * torch.randn(d))


def _cross_sample(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1)
    return ((flat @ flat.T) @ flat).reshape(x.shape) / flat.shape[1]


def _linear(m: nn.Module, p: Piece, x: torch.Tensor) -> torch.Tensor:
    return m(x)


FAMILIES: dict[str, Family] = {
    "linear": Family(1, _linear, lambda d, p: nn.Linear(d, d, bias=p.flag)),
    "shared": Family(1, _linear),
    "conv": Family(1, _channels_last(lambda m, p, x: m(x)), lambda d, p: nn.Conv1d(d, d, 3, padding=1, bias=p.flag)),
    "layernorm": Family(1, _linear, lambda d, p: nn.LayerNorm(d, elementwise_affine=p.flag)),
    "rmsnorm": Family(1, _linear, lambda d, p: nn.RMSNorm(d, eps=1e-6)),
    "groupnorm": Family(1, _channels_last(lambda m, p, x: m(x)), lambda d, p: nn.GroupNorm(2, d, affine=p.flag)),
    "sdpa": Family(1, lambda m, p, x: F.scaled_dot_product_attention(x, x, x, is_causal=p.flag)),
    "softmax_attention": Family(1, lambda m, p, x: (x @ x.transpose(1, 2) / math.sqrt(x.shape[2])).softmax(-1) @ x),
    "tanh": Family(1, lambda m, p, x: torch.tanh(x)),
    "gelu": Family(1, lambda m, p, x: F.gelu(x)),
    "relu": Family(1, lambda m, p, x: F.relu(x)),
    "add": Family(2, lambda m, p, x, y: x + y),
    "mul": Family(2, lambda m, p, x, y: x * y),
    "scale": Family(1, lambda m, p, x: x * m.weight, lambda d, p: Scale(d)),
    "reshape": Family(1, lambda m, p, x: x.reshape(*x.shape[:2], 2, -1).transpose(2, 3).reshape(x.shape)),
    "mean_t": Family(1, lambda m, p, x: x - x.mean(1, keepdim=True)),
    "cumsum_t": Family(1, lambda m, p, x: x.cumsum(1) / x.shape[1]),
    # ops that mix samples
    "flip": Family(1, lambda m, p, x: x.flip(0), mixes=True),
    "roll": Family(1, lambda m, p, x: x.roll(1, 0), mixes=True),
    "batch_mean": Family(1, lambda m, p, x: x - x.mean(0, keepdim=True), mixes=True),
    "batch_sum": Family(1, lambda m, p, x: x + x.sum(0), mixes=True),
    "batchnorm": Family(
        1, _channels_last(lambda m, p, x: m(x)), lambda d, p: nn.BatchNorm1d(d, track_running_stats=False), mixes=True
    ),
    "cross_matmul": Family(1, lambda m, p, x: _cross_sample(x), mixes=True),
}
PER_SAMPLE = sorted(op for op, f in FAMILIES.items() if not f.mixes and op != "shared")
MIXING = sorted(op for op, f in FAMILIES.items() if f.mixes)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    width: int
    length: int
    embed: bool  # the input is token ids through an Embedding
    pieces: tuple[Piece, ...]

    def outputs(self) -> list[int]:
        """The values no piece reads: they are summed into the head."""
        read = {i for p in self.pieces for i in p.inputs}
        return [i for i in range(len(self.pieces) + 1) if i not in read]

    def __repr__(self) -> str:
        source = f"embedding(ids (B, {self.length}), {VOCAB} -> {self.width})" if self.embed else "x"
        lines = [f"v0 = {source}  # (B, {self.length}, {self.width})"]
        for i, p in enumerate(self.pieces, 1):
            extra = f", shares=p{p.shares}" if p.op == "shared" else f", flag={p.flag}"
            lines.append(f"v{i} = {p.op}({', '.join(f'v{j}' for j in p.inputs)}{extra})")
        lines.append(f"out = head(({' + '.join(f'v{i}' for i in self.outputs())}).mean(1))")
        return "\n" + "\n".join(lines)


class FuzzNet(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(VOCAB, spec.width) if spec.embed else None
        self.layers = nn.ModuleDict()
        for i, piece in enumerate(spec.pieces, 1):
            make = FAMILIES[piece.op].make
            if make is not None:
                self.layers[f"p{i}"] = make(spec.width, piece)
        self.head = nn.Linear(spec.width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = [self.embed(x) if self.embed is not None else x]
        for i, piece in enumerate(self.spec.pieces, 1):
            owner = f"p{piece.shares}" if piece.op == "shared" else f"p{i}"
            module = self.layers[owner] if owner in self.layers else None
            values.append(FAMILIES[piece.op].apply(module, piece, *(values[j] for j in piece.inputs)))
        out = values[self.spec.outputs()[0]]
        for i in self.spec.outputs()[1:]:
            out = out + values[i]
        return self.head(out.mean(1))


@st.composite
def model_specs(draw: st.DrawFn, max_pieces: int = 5) -> ModelSpec:
    """A random program; about one piece in eight mixes samples."""
    pieces: list[Piece] = []
    for i in range(draw(st.integers(1, max_pieces))):
        linears = [j for j, p in enumerate(pieces, 1) if p.op == "linear"]
        kinds = MIXING if draw(st.integers(0, 7)) == 0 else PER_SAMPLE + (["shared"] if linears else [])
        op = draw(st.sampled_from(kinds))
        inputs = tuple(draw(st.integers(0, i)) for _ in range(FAMILIES[op].arity))
        shares = draw(st.sampled_from(linears)) if op == "shared" else -1
        pieces.append(Piece(op, inputs, draw(st.booleans()), shares))
    return ModelSpec(draw(st.sampled_from([2, 4, 6])), draw(st.integers(2, 4)), draw(st.booleans()), tuple(pieces))
