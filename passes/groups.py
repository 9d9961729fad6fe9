"""Clipping groups: which parameters share a per-sample norm and a threshold (``options.clipping``, by the policy
of ``bkcompile.policy``)."""

from __future__ import annotations

from bkcompile.errors import OptionError
from bkcompile.plan import ClipGroup, Grouping
from bkcompile.policy import ClipPolicy


def clip_groups(params: list[tuple[int, str, str]], policy: ClipPolicy) -> Grouping:
    """Group the clipped parameters (graph input, name, device; in graph order) by the policy's style; each
    group's initial threshold R_g."""
    if not params:  # a graph without trainable parameters has one empty group
        return Grouping((ClipGroup("all", "all", (), policy.max_grad_norm, True),))
    keys: list = []
    found: dict = {}  # key -> (name, members, own threshold)
    for member, name, device in params:
        grouped = policy.group_key(name, device)
        if grouped is None:
            raise OptionError(
                f"parameter {name!r} is in no clipping group; add a group that selects it (e.g. a last group '*')"
            )
        key, group, threshold = grouped
        if key not in found:
            keys.append(key)
            found[key] = (group, [], threshold)
        found[key][1].append(member)
    if not isinstance(policy.clipping, str):
        keys.sort()  # the option's list order: a group that selects no clipped parameter is dropped
    thresholds = policy.thresholds([found[key][2] for key in keys])
    return Grouping(
        tuple(
            ClipGroup(found[key][0], key, tuple(found[key][1]), threshold, found[key][2] is None)
            for key, threshold in zip(keys, thresholds)
        )
    )
