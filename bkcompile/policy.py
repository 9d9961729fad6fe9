"""The clipping policy, written once: which parameters share a per-sample norm, the thresholds, the clip factor.

Both clips read it: the clipping pass traces :meth:`ClipPolicy.factor` into the graph (``passes/clip.py``), and
the clip at the end of a backward of several graphs calls it on the norms (``bkcompile.runtime.deferred``). This module
imports neither side.

- **Groups.** A clipping style (``options.clipping``) puts each trainable parameter in a group by its name (as
  ``named_parameters()`` gives it) and its device: :data:`STYLES` holds one :class:`Style` per named style; a
  list of groups selects by name patterns (:func:`selects`), in the list's order.
- **Thresholds.** A group has its own R_g (a group of the option's list with ``max_grad_norm``) or a share of
  ``max_grad_norm``: R / sqrt(G) over the G groups without one (:func:`thresholds`), so that the sensitivity
  sqrt(sum_g R_g^2) of the summed clipped gradient stays R.
- **Clip factor.** ``C_ig = f(n_ig, R_g)`` for the per-sample norm n_ig of sample i's gradient in group g:
  :data:`CLIP_FUNCTIONS` holds one function of torch ops per ``clip_fn`` option value. Each is elementwise in
  the norms (the pass traces it once and emits its ops for every group, whatever the batch size).

A new clip function is one entry of :data:`CLIP_FUNCTIONS` and its value in ``options.ClipFn``; a new clipping
style is one entry of :data:`STYLES`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

EPS = 1e-6  # keeps min(1, R / n) finite for a zero norm


def _abadi(norms: torch.Tensor, threshold: torch.Tensor, gamma: float) -> torch.Tensor:
    """C = min(1, R / (n + EPS)) (Abadi et al. 2016): a sample's gradient is scaled down to norm R at most."""
    return (threshold / (norms + EPS)).clamp_max(1.0)


def _automatic(norms: torch.Tensor, threshold: torch.Tensor, gamma: float) -> torch.Tensor:
    """C = R / (n + gamma) (automatic clipping, Bu et al. 2023): every gradient normalised to about R."""
    return threshold / (norms + gamma)


# clip_fn option value -> C(norms, R, gamma)
CLIP_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "abadi": _abadi,
    "automatic": _automatic,
}


@dataclasses.dataclass(frozen=True)
class Style:
    """A named clipping style: the group of a parameter, and how groups of several graphs of one model meet."""

    group: Callable[[str, str], str]  # (parameter name, device) -> the name of its group in one graph
    # the group names are names relative to the compiled module (a module path, a parameter name): graphs
    # compiled one by one (graphs="several") name their parameters from themselves, so their groups stay apart
    relative: bool = False
    own: bool = False  # each parameter is its own group: groups of several graphs meet by the parameter itself


def _module(name: str) -> str:
    return name.rpartition(".")[0] or "<root>"


STYLES: dict[str, Style] = {
    "all-layer": Style(lambda name, device: "all"),
    "layer-wise": Style(lambda name, device: _module(name), relative=True),
    "param-wise": Style(lambda name, device: name, relative=True, own=True),
    "per-device": Style(lambda name, device: device),
}


def selects(selector: Any, name: str) -> bool:
    """Whether a group of the option's list (a name pattern, a tuple of patterns, a callable) selects ``name``."""
    if callable(selector):
        return bool(selector(name))
    patterns = (selector,) if isinstance(selector, str) else selector
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def selector_name(selector: Any) -> str:
    """How the report and messages name a group of the option's list."""
    if isinstance(selector, str):
        return selector
    if isinstance(selector, tuple):
        return ",".join(selector)
    return getattr(selector, "__name__", "group")


@dataclasses.dataclass(frozen=True)
class ClipPolicy:
    """How a graph clips, from its options (the fields are named as the options are)."""

    max_grad_norm: float  # R
    clipping: str | tuple  # a name of STYLES, or a tuple of groups (selector, its own R_g or None)
    clip_fn: str  # a key of CLIP_FUNCTIONS
    clip_gamma: float  # the stabiliser of automatic clipping

    @classmethod
    def of(cls, options: Any) -> ClipPolicy:
        return cls(options.max_grad_norm, options.clipping, options.clip_fn, options.clip_gamma)

    def differs(self, other: ClipPolicy) -> str | None:
        """The first field on which two policies differ, as ``name=value``; None when they agree."""
        for field in dataclasses.fields(self):
            if getattr(self, field.name) != getattr(other, field.name):
                return f"{field.name}={getattr(self, field.name)!r} against {getattr(other, field.name)!r}"
        return None

    def group_key(self, name: str, device: str) -> tuple[Hashable, str, float | None] | None:
        """(key, group name, its own threshold or None) of a parameter: the key joins the groups of several
        graphs (a group of the option's list is its position in the list); None when a list selects it in no
        group."""
        if isinstance(self.clipping, str):
            group = STYLES[self.clipping].group(name, device)
            return group, group, None
        for index, (selector, threshold) in enumerate(self.clipping):
            if selects(selector, name):
                return index, selector_name(selector), threshold
        return None

    @property
    def style(self) -> Style | None:
        """The named style (None for a list of groups)."""
        return STYLES[self.clipping] if isinstance(self.clipping, str) else None

    def thresholds(self, own: Sequence[float | None]) -> tuple[float, ...]:
        """Each group's R_g: its own, else R / sqrt(G) for the G groups without one."""
        shared = sum(1 for threshold in own if threshold is None)
        share = self.max_grad_norm / math.sqrt(shared) if shared else self.max_grad_norm
        return tuple(share if threshold is None else threshold for threshold in own)

    def factor(self, norms: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """The clip factors C_ig of a group's per-sample norms (B,) under its threshold R_g (0-dim)."""
        return CLIP_FUNCTIONS[self.clip_fn](norms, threshold, self.clip_gamma)
