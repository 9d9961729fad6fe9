"""Clipping groups: which parameters share a per-sample norm and a threshold (``options.clipping``)."""

from __future__ import annotations

import dataclasses
import fnmatch
import math

from bkcompile.errors import OptionError, PassInvariantError
from bkcompile.options import BKOptions


@dataclasses.dataclass(frozen=True)
class Grouping:
    names: tuple[str, ...]  # one per group
    members: tuple[tuple[str, ...], ...]  # the parameters of each group
    thresholds: tuple[float, ...]  # the initial R_g
    shared: tuple[bool, ...] = ()  # per group: its threshold is a share of max_grad_norm (none of its own)

    def group_of(self, param: str) -> int:
        """The group of the clipped parameter ``param``."""
        for g, members in enumerate(self.members):
            if param in members:
                return g
        raise PassInvariantError(f"parameter {param!r} is in no clipping group of {self.members} (a bkcompile bug)")


def _selects(selector, name: str) -> bool:
    if callable(selector):
        return bool(selector(name))
    patterns = (selector,) if isinstance(selector, str) else selector
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _by_key(params: list[str], key) -> tuple[list[str], list[list[str]]]:
    names, members = [], []
    for param in params:
        group = key(param)
        if group not in names:
            names.append(group)
            members.append([])
        members[names.index(group)].append(param)
    return names, members


def clip_groups(params: list[str], devices: dict[str, str], options: BKOptions) -> Grouping:
    """Group the clipped parameters (in graph order) by ``options.clipping``; thresholds R_g."""
    style, radius = options.clipping, options.max_grad_norm
    if style == "all-layer" or not params:  # a graph without trainable parameters has one empty group
        return Grouping(("all",), (tuple(params),), (radius,), (True,))
    if isinstance(style, str):
        key = {
            "layer-wise": lambda p: p.rpartition(".")[0] or "<root>",
            "param-wise": lambda p: p,
            "per-device": lambda p: devices[p],
        }[style]
        names, members = _by_key(params, key)
        share = radius / math.sqrt(len(names))
        return Grouping(tuple(names), tuple(map(tuple, members)), (share,) * len(names), (True,) * len(names))
    members: list[list[str]] = [[] for _ in style]
    for param in params:
        group = next((g for g, (selector, _) in enumerate(style) if _selects(selector, param)), None)
        if group is None:
            raise OptionError(
                f"parameter {param!r} is in no clipping group; add a group that selects it (e.g. a last group '*')"
            )
        members[group].append(param)
    kept = [g for g, m in enumerate(members) if m]  # a group that selects no clipped parameter is dropped
    unset = sum(1 for g in kept if style[g][1] is None)
    share = radius / math.sqrt(unset) if unset else radius
    names = tuple(
        s if isinstance(s, str) else ",".join(s) if isinstance(s, tuple) else getattr(s, "__name__", "group")
        for s, _ in style
    )
    return Grouping(
        tuple(names[g] for g in kept),
        tuple(tuple(members[g]) for g in kept),
        tuple(style[g][1] if style[g][1] is not None else share for g in kept),
        tuple(style[g][1] is None for g in kept),
    )
