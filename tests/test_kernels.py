"""The kernel grouping of bk_dp's CPU graphs (bkcompile.compiler.kernels): runs of kernel nodes between extern
calls joined when no node between them is in the way and the estimated peak is no higher; end to end, an MLP's
privatized backward builds as many C++ kernels as its non-private one, with the oracle's clipped sums."""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_matches
from oracle import clipped_sum
from torch._inductor.utils import run_and_get_code

from bkcompile.compiler.kernels import group_kernels, kernel_runs


class Node:
    """A stand-in for an Inductor scheduler node: a kernel node or an extern call, after its predecessors."""

    def __init__(self, name: str, extern: bool = False, after: tuple[Node, ...] = ()) -> None:
        self.name, self.extern = name, extern
        self.mpi_node = SimpleNamespace(pred_nodes=set(after))

    def is_extern(self) -> bool:
        return self.extern

    def is_template(self) -> bool:
        return False

    def __repr__(self) -> str:
        return self.name


def mlp_backward() -> list[Node]:
    """The order of an MLP's privatized backward: the last layer's norms, the loss scale, the backward's matrix
    products and ReLU, the other norms, record_norms, the weighted bias sums and weighted operands, the products."""
    norms3 = Node("norms3")
    scale = Node("loss_scale", True, (norms3,))
    mm1 = Node("mm1", True)
    relu = Node("relu'", False, (mm1,))
    mm2 = Node("mm2", True, (relu,))
    norms = Node("norms21", False, (mm2, scale))
    record = Node("record_norms", True, (norms,))
    sums = Node("sums", False, (record,))
    mm3 = Node("mm3", True, (sums,))
    weighted = Node("weighted", False, (record,))
    mm4 = Node("mm4", True, (weighted,))
    return [norms3, scale, mm1, relu, mm2, norms, record, sums, mm3, weighted, mm4]


def test_runs_between_extern_calls_are_joined() -> None:
    order = mlp_backward()
    assert kernel_runs(order) == 5
    grouped = group_kernels(order, peak_of=lambda _: 0)
    assert [n.name for n in grouped] == [
        "mm1", "norms3", "relu'", "loss_scale", "mm2", "norms21", "record_norms", "sums", "weighted", "mm3", "mm4"
    ]  # fmt: skip
    assert kernel_runs(grouped) == 3


def test_a_join_that_raises_the_estimated_peak_is_not_made() -> None:
    order = mlp_backward()
    assert group_kernels(order, peak_of=lambda o: 0 if o == order else 1) == order  # every other order: higher


@pytest.mark.slow
def test_inductor_mlp_backward_builds_as_many_kernels_as_non_private() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="bk_dp", options={"max_grad_norm": 0.1, "loss_reduction": "mean"})
    x, y = torch.randn(64, 128), torch.randint(0, 10, (64,))
    _, (forward, backward) = run_and_get_code(lambda: F.cross_entropy(compiled(x), y).backward())
    want, _ = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=0.1)
    assert_matches({k: p.grad for k, p in twin.named_parameters()}, want, torch.float32, tol=1e-4)
    kernels = re.compile(r"^cpp_fused_\w+ = async_compile\.cpp_pybinding", re.MULTILINE)
    # non-private: the two ReLU backwards with their bias sums, and the last bias's sum; bk_dp: the norms up to
    # the first ReLU backward, the other norms, and the clip factors with the weighted sums and operands (5 in
    # Inductor's order). At these sizes every join keeps the estimated peak; with B = 8 and widths 16-32, two do not
    assert len(kernels.findall(backward)) == 3
