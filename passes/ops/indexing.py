"""Advanced indexing: ``x[i0, i1, ...]`` (``index``) and its gradient (``index_put`` with accumulate); gather and
scatter along one dim.

The index tensors broadcast to one shape S; the indexed dims of ``x`` are replaced by S (in place when the
indexed dims are adjacent, else in front). Per sample when

- the sample axis of ``x`` is not indexed and no index holds per-sample values (a fixed gather along a
  per-sample dim), or
- ``x`` is sample-independent (a table) and the per-sample indices hold their samples on one dim of S (a
  lookup), or
- the sample axis of ``x`` is indexed by **the sample's own index**: ``arange(B)`` placed on one dim of S
  (``x[arange(B), j]``, ``mask[batch_idx, kv_idx]`` with ``batch_idx = arange(B)[:, None, None, None]``), and
  every per-sample index holds its samples on that same dim. Row i of the result then reads only sample i.

The sample's own index is proven from the index value itself (see :func:`sample_index_dim`): it is an
``arange`` over exactly B with start 0 and step 1 (``prims.iota`` once Inductor has decomposed it), carried to
its place by views, unsqueezes, expands and casts that keep its values along one dim.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx
from bkcompile.passes.facts import REDUCED, REPLICATED, Batched, Fact, Reduced, Replicated, same, to_expr
from bkcompile.passes.ops.table import RuleInput, agree, index_on_batch, law, norm_dim, schema_arg

from bkcompile.errors import NotSupportedYetError, SampleMixingError, node_error

aten = torch.ops.aten

_ARANGES = {aten.arange.default, aten.arange.start, aten.arange.start_step}
_IOTA = torch.ops.prims.iota.default  # arange as Inductor's decompositions spell it
_KEEP_DIM = {
    aten._to_copy.default,
    torch.ops.prims.convert_element_type.default,
    aten.alias.default,
    aten.clone.default,
}
_RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}


def _sizes(node: torch.fx.Node) -> list:
    return [to_expr(s) for s in node.meta["val"].shape]


def _only_dim_of_size(node: torch.fx.Node, batch, dim: int) -> bool:
    """``dim`` has size B and every other dim size 1 (the values vary along ``dim`` only)."""
    sizes = _sizes(node)
    return same(sizes[dim], batch) and all(s == 1 for d, s in enumerate(sizes) if d != dim)


def _counts_to(node: torch.fx.Node, start: object, step: object, batch) -> bool:
    """The 1-d ``node`` made with ``start`` and ``step`` holds 0, 1, ..., B - 1."""
    return start == 0 and step == 1 and node.meta["val"].dim() == 1 and same(_sizes(node)[0], batch)


def sample_index_dim(node: object, batch) -> int | None:
    """The dim along which the index value ``node`` is the sample's own index (its element at position i of
    that dim is i, whatever the other coordinates), or None when that cannot be proven."""
    if not isinstance(node, torch.fx.Node) or not isinstance(node.meta.get("val"), torch.Tensor):
        return None
    target = node.target
    if target in _ARANGES:
        start = schema_arg(node, "start", 0) if target != aten.arange.default else 0
        step = schema_arg(node, "step", 1) if target == aten.arange.start_step else 1
        return 0 if _counts_to(node, start, step, batch) else None
    if target is _IOTA:
        return 0 if _counts_to(node, schema_arg(node, "start"), schema_arg(node, "step"), batch) else None
    source = node.args[0] if node.args else None
    inner = sample_index_dim(source, batch)
    if inner is None:
        return None
    if target in _KEEP_DIM:
        return inner
    if target is aten.slice.Tensor and all(same(a, b) for a, b in zip(_sizes(node), _sizes(source))):
        return inner  # a slice that keeps every element (x[:] with a symbolic batch)
    if target is aten.add.Tensor and node.args[1] == 0:
        return inner
    if target is aten.unsqueeze.default:
        at = node.args[1] % node.meta["val"].dim()
        return inner + (at <= inner)
    if target is aten.expand.default:
        dim = inner + node.meta["val"].dim() - source.meta["val"].dim()
        return dim if same(_sizes(node)[dim], batch) else None
    if target in _RESHAPES and _only_dim_of_size(source, batch, inner):
        matches = [d for d in range(node.meta["val"].dim()) if _only_dim_of_size(node, batch, d)]
        return matches[0] if len(matches) == 1 else None
    return None


@dataclasses.dataclass(frozen=True)
class Indexing:
    """The indexed dims of ``x``, the broadcast rank of the index tensors, and where S lands in the result."""

    positions: list[int]  # dims of x that are indexed
    rank: int  # len(S)
    start: int  # the result dim of S's first dim

    def result_dim(self, x_dim: int) -> int:
        """The result dim of a non-indexed dim of x."""
        before = sum(1 for p in self.positions if p < x_dim)
        if self.start == 0 and self.positions[0] != 0:  # S in front: x's remaining dims follow in order
            return self.rank + x_dim - before
        return x_dim - before + (self.rank if x_dim > self.positions[0] else 0)


def _layout(r: RuleInput, indices: list) -> Indexing:
    positions = [p for p, i in enumerate(indices) if i is not None]
    adjacent = positions == list(range(positions[0], positions[-1] + 1))
    rank = max(i.meta["val"].dim() for i in indices if i is not None)
    return Indexing(positions, rank, positions[0] if adjacent else 0)


def _index_dims(r: RuleInput, indices: list, rank: int) -> list[Batched]:
    """The per-sample index tensors' facts on S's dims."""
    batched = []
    for index in indices:
        if index is None:
            continue
        shift = rank - index.meta["val"].dim()
        fact = r.fact(index)
        if index.meta["val"].dtype in (torch.bool, torch.uint8) and not isinstance(fact, Replicated):
            raise node_error(
                NotSupportedYetError,
                r.node,
                "it indexes with a per-sample boolean mask: the result's size depends on the data",
                "multiply by the mask (x * mask[..., None]) or use torch.where instead of boolean indexing",
            )
        if isinstance(fact, Reduced):
            raise r.mixing("it indexes with values summed over the batch", "index with per-sample values")
        if isinstance(fact, Batched):
            batched.append(fact.at(fact.dim + shift))
    return batched


def _cross(r: RuleInput) -> Exception:
    return r.mixing(
        "its per-sample index selects along another axis than the samples' own, so one sample's index picks "
        "values of other samples",
        "index the sample axis with the sample's own index (x[torch.arange(B), j]) or keep the batch out of "
        "the indexed dims",
    )


@law([aten.index.Tensor, aten._unsafe_index.Tensor])
def index(r: RuleInput) -> Fact:
    source, indices = r.arg("self"), list(r.arg("indices"))
    fact = r.fact(source)
    layout = _layout(r, indices)
    batched = _index_dims(r, indices, layout.rank)
    if isinstance(fact, Reduced):
        if batched:
            raise r.mixing("it picks values of a sum over the batch by per-sample indices", "index per-sample values")
        return REDUCED
    if isinstance(fact, Batched) and fact.dim not in layout.positions:
        if batched:
            raise _cross(r)
        return fact.at(layout.result_dim(fact.dim))
    if isinstance(fact, Batched):  # the sample axis is indexed: only by the sample's own index
        sample = indices[fact.dim]
        dim = sample_index_dim(sample, r.batch)
        if dim is None or not (fact.plain or r.batch == 1):
            raise node_error(
                SampleMixingError,
                r.node,
                "it indexes the sample axis with values the pass cannot prove to be each sample's own index, "
                "so one sample's row may read other samples' values",
                "index the sample axis with torch.arange(B) (the sample's own index) or leave it unindexed",
            )
        dim += layout.rank - sample.meta["val"].dim()
        if any(b.dim != dim or not b.plain for b in batched):
            raise _cross(r)
        return Batched(layout.start + dim)
    if not batched:
        return REPLICATED
    lookup = agree(r, batched)
    return lookup.at(layout.start + lookup.dim)


@law([aten.index_put.default, aten._unsafe_index_put.default])
def index_put(r: RuleInput) -> Fact:
    """``self`` with ``values`` written (or added) at the indices: the gradient of ``index``. Per sample when
    ``index`` of the same arguments would be (the rows read are the rows written)."""
    base, indices, values = r.arg("self"), list(r.arg("indices")), r.arg("values")
    layout = _layout(r, indices)
    batched = _index_dims(r, indices, layout.rank)
    facts = [r.fact(base), r.fact(values)]
    if any(isinstance(f, Reduced) for f in facts):
        if batched or any(isinstance(f, Batched) for f in facts):
            raise r.mixing("it writes a sum over the batch into per-sample values", "keep batch sums apart")
        return REDUCED
    base_fact, value_fact = facts
    out: list[Batched] = [base_fact] if isinstance(base_fact, Batched) else []
    own = [(p, sample_index_dim(indices[p], r.batch)) for p in layout.positions]
    own = [(p, d + layout.rank - indices[p].meta["val"].dim()) for p, d in own if d is not None]
    if isinstance(value_fact, Batched) or batched:
        out.append(_written_rows(r, layout, value_fact, batched, own))
    if not out:
        return REPLICATED
    return agree(r, out)


def _written_rows(r: RuleInput, layout: Indexing, value_fact: Fact, batched: list, own: list) -> Batched:
    """The dim of ``self`` whose rows receive sample i's values."""
    values = r.arg("values")
    result_rank = len(r.shape(r.arg("self"))) - len(layout.positions) + layout.rank
    value_dims = []
    if isinstance(value_fact, Batched):
        value_dims.append(value_fact.dim + result_rank - values.meta["val"].dim())
    value_dims += [layout.start + b.dim for b in batched]
    if len({*value_dims}) != 1:
        raise _cross(r)
    (dim,) = set(value_dims)
    s_dim = dim - layout.start
    if 0 <= s_dim < layout.rank:  # the written rows are chosen by the index tensors
        targets = [p for p, d in own if d == s_dim]
        if not targets:
            raise node_error(
                NotSupportedYetError,
                r.node,
                "it adds per-sample values into shared rows chosen by the indices (a sum over samples that is "
                "not a parameter gradient the pass can clip)",
                "use nn.Embedding for lookups into a trainable table, or index the sample axis with torch.arange(B)",
            )
        return Batched(targets[0])
    if batched:
        raise _cross(r)
    for x_dim in range(len(r.shape(r.arg("self")))):
        if x_dim not in layout.positions and layout.result_dim(x_dim) == dim:
            return Batched(x_dim)
    raise _cross(r)


# gather and scatter work along ``dim`` and keep every other coordinate of an element:
# out[i][j] = self[i][index[i][j]] (gather, dim=1); out[i][index[i][j]] = src[i][j] (scatter, dim=1)
_GATHER_SCATTER = {
    aten.gather.default: ("self", "index"),
    aten.scatter_add.default: ("self", "index", "src"),
    aten.scatter.src: ("self", "index", "src"),
    aten.scatter.value: ("self", "index"),
}
_LINEAR = {aten.gather.default: ("self",), aten.scatter_add.default: ("self", "src")}


@law(list(_GATHER_SCATTER))
def gather_scatter(r: RuleInput) -> Fact:
    """Along a sample axis other than ``dim``, row r of the result reads rows r of the operands only: per
    sample when every per-sample operand holds its samples on that axis with the layout and the number of
    rows of the result (so that row r is the same sample in each; an index may be shorter than ``self``
    elsewhere, never on the sample axis). Along the sample axis itself they would move rows between samples.
    A sum over samples may pass only where the op is linear in it (gather's ``self``, scatter_add's
    operands) and nothing per-sample joins it."""
    names = _GATHER_SCATTER[r.node.target]
    operands = [r.arg(name) for name in names]
    facts = [r.fact(value) for value in operands]
    batched = [(value, f) for value, f in zip(operands, facts) if isinstance(f, Batched)]
    reduced = [name for name, f in zip(names, facts) if isinstance(f, Reduced)]
    if reduced:
        if batched or not set(reduced) <= set(_LINEAR.get(r.node.target, ())):
            raise r.mixing(
                "it gathers or scatters a sum over the batch non-linearly or together with per-sample values",
                "keep sums over the batch apart from per-sample values",
            )
        return REDUCED
    if not batched:
        return REPLICATED
    fact = agree(r, [f for _, f in batched])
    if norm_dim(r.arg("dim"), max(len(r.out_shape()), 1)) == fact.dim:
        raise index_on_batch(r)
    if not all(same(r.shape(value)[fact.dim], r.out_shape()[fact.dim]) for value, _ in batched):
        raise r.mixing(
            "an operand has another number of rows on the sample axis than the result, so row r of the "
            "result is not sample r of every operand",
            "give the index and the values as many rows on the batch dim as the tensor they are gathered from",
        )
    return fact
