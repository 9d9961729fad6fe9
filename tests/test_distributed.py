"""Data-parallel training on two gloo ranks (CPU) against the single-process oracle on the union batch.

Each rank holds 4 of the 8 samples; DDP averages the ranks' clipped sums, so W times a rank's
gradient is the union batch's clipped sum. DPOptimizer adds one noise draw for all ranks (the same
draw on every rank from rank 0's generator state) and the replicas stay bit-identical.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from oracle import clipped_sum
from ranks import Ranks
from torch.nn.parallel import DistributedDataParallel as DDP

import bkcompile

WORLD, PER_RANK = 2, 4
TOL = {torch.float64: 1e-8, torch.float32: 1e-4}


@pytest.fixture(scope="module")
def ranks():
    group = Ranks(WORLD)
    yield group
    group.close()


class Net(nn.Module):
    """Three linear layers; ``width`` 384 in float64 (544 in float32) puts more than DDP's 1 MB first bucket in one
    layer."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.inp, self.hidden, self.out = nn.Linear(8, width), nn.Linear(width, width), nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))


def _union_batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD * PER_RANK, 8, dtype=dtype, generator=generator)
    return x, torch.randint(0, 3, (WORLD * PER_RANK,), generator=generator)


def _local(rank: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t[rank * PER_RANK : (rank + 1) * PER_RANK] for t in tensors)


def _wrap(model: nn.Module, order: str, options: dict, caps: list[float] | None = None) -> nn.Module:
    if order == "compile(DDP)":
        return torch.compile(DDP(model, bucket_cap_mb_list=caps), backend="bk_dp", options=options)
    return DDP(torch.compile(model, backend="bk_dp", options=options), bucket_cap_mb_list=caps)


def _max_relative_error(got: dict, want: dict) -> float:
    return max(((got[k] - want[k]).abs().max() / want[k].abs().max()).item() for k in want)


def _ddp_grads(rank: int, order: str, several: bool, dtype: torch.dtype, optimize_ddp: bool, clipping: str) -> dict:
    """With ``several`` buckets and ``optimize_ddp`` dynamo splits the graph at DDP's buckets (a layer over DDP's
    1 MB first bucket); without ``optimize_ddp`` DDP's reducer all-reduces several buckets of one graph."""
    torch._dynamo.config.optimize_ddp = optimize_ddp
    try:
        wide = 384 if dtype == torch.float64 else 544  # a layer over DDP's 1 MB first bucket
        model = Net(wide if several and optimize_ddp else 8).to(dtype)
        x, y = _union_batch(dtype)
        _, norms = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=math.inf)
        radius = norms.median().item()  # half the samples are clipped
        names = [n for n, _ in model.named_parameters()]
        groups = None
        if clipping == "layer-wise":
            layers = ["inp", "hidden", "out"]
            groups = [([n for n in names if n.startswith(layer)], radius / math.sqrt(3)) for layer in layers]
        elif clipping == "param-wise":
            groups = [([n], radius / math.sqrt(len(names))) for n in names]
        want, _ = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=radius, groups=groups)
        options = {"max_grad_norm": radius, "compiler": "aot_eager", "loss_reduction": "mean", "clipping": clipping}
        caps = [1e-4] * 6 if several and not optimize_ddp else None  # buckets of 100 bytes
        wrapped = _wrap(model, order, options, caps)
        F.cross_entropy(wrapped(*_local(rank, x)), *_local(rank, y)).backward()
        got = {n: WORLD * p.grad for n, p in model.named_parameters()}  # DDP averages the ranks' sums
        ddp = wrapped if isinstance(wrapped, DDP) else wrapped._orig_mod
        spans = bkcompile.last_clip_spans() if several and optimize_ddp else None
        return {
            "error": _max_relative_error(got, want),
            "buckets": len(ddp._get_ddp_logging_data()["bucket_sizes"].split(",")),
            "graphs": len({graph for span in spans for graph in span.graphs}) if spans else 1,
        }
    finally:
        torch._dynamo.config.optimize_ddp = False


CASES = [  # (order, several DDP buckets, dtype, optimize_ddp, clipping)
    *[
        (order, several, torch.float64, optimize_ddp, "all-layer")
        for order, several, optimize_ddp in itertools.product(("compile(DDP)", "DDP(compile)"), *[(False, True)] * 2)
    ],
    ("DDP(compile)", False, torch.float32, False, "all-layer"),
    ("compile(DDP)", True, torch.float32, True, "all-layer"),
    ("compile(DDP)", False, torch.float64, False, "layer-wise"),
    ("DDP(compile)", True, torch.float64, False, "param-wise"),
    ("DDP(compile)", True, torch.float64, True, "layer-wise"),
]


@pytest.mark.parametrize("order, several, dtype, optimize_ddp, clipping", CASES)
def test_ddp_gradients_match_the_union_batch_oracle(ranks, order, several, dtype, optimize_ddp, clipping) -> None:
    results = ranks.run(_ddp_grads, order, several, dtype, optimize_ddp, clipping)
    for result in results:
        assert result["error"] <= TOL[dtype], results
        if several and optimize_ddp:  # dynamo's DDPOptimizer split the graph: clipped once over the pieces
            assert result["graphs"] > 1
        else:
            assert (result["buckets"] > 1) == several


def test_importing_bkcompile_keeps_ddp_graphs_whole() -> None:
    assert torch._dynamo.config.optimize_ddp is False  # the fast path: one graph, norms fused in its backward


def _expected_update(model: nn.Module, x, y, radius: float, sigma: float, reference, batch: float) -> dict:
    """The single-process update on the union batch: (clipped sum + one draw from ``reference``) / batch."""
    want, _ = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=radius)
    for name, p in model.named_parameters():  # one draw per coordinate, in the optimizer's order
        noise = torch.normal(0.0, sigma * radius, size=p.shape, generator=reference, dtype=p.dtype)
        want[name] = (want[name] + noise) / batch
    return want


def _noisy_steps(rank: int, steps: int) -> dict:
    sigma, radius = 1.3, 0.7
    model = Net().double()
    x, y = _union_batch(torch.float64)
    wrapped = _wrap(model, "compile(DDP)", {"max_grad_norm": radius, "compiler": "aot_eager", "loss_reduction": "mean"})
    batch = WORLD * PER_RANK
    generator = torch.Generator().manual_seed(5 if rank == 0 else 99)  # rank 0's state is the one used
    optimizer = bkcompile.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5),
        noise_multiplier=sigma,
        max_grad_norm=radius,
        expected_batch_size=batch,
        generator=generator,
    )
    reference = torch.Generator().manual_seed(5)
    errors, snapshots = [], []
    for _ in range(steps):
        want = _expected_update(model, x, y, radius, sigma, reference, batch)
        optimizer.zero_grad()
        F.cross_entropy(wrapped(*_local(rank, x)), *_local(rank, y)).backward()
        optimizer.step()
        errors.append(_max_relative_error({n: p.grad for n, p in model.named_parameters()}, want))
        snapshots.append([p.detach().clone() for p in model.parameters()])
    return {"errors": errors, "params": snapshots}


def test_noise_is_drawn_once_and_replicas_stay_identical(ranks) -> None:
    first, second = ranks.run(_noisy_steps, 3)
    for result in (first, second):
        assert max(result["errors"]) <= 1e-8
    for mine, theirs in zip(first["params"], second["params"]):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))  # bit-identical after every step


def _noise_only(rank: int) -> dict:
    sigma, radius, batch = 2.0, 1.5, 16.0
    model = nn.Linear(512, 200)  # 102,600 coordinates
    options = {"max_grad_norm": radius, "compiler": "aot_eager", "loss_reduction": "sum"}
    wrapped = DDP(torch.compile(model, backend="bk_dp", options=options))
    optimizer = bkcompile.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=sigma,
        max_grad_norm=radius,
        expected_batch_size=batch,
    )
    x = torch.zeros(0, 512)  # an empty local batch on every rank: the update is the noise alone
    bkcompile.mark_batch_dynamic(x)
    optimizer.zero_grad()
    wrapped(x).sum().backward()
    optimizer.step()
    update = torch.cat([p.grad.flatten() for p in model.parameters()])
    return {"std": update.std().item(), "expected": sigma * radius / batch, "update": update}


def test_noise_std_is_sigma_r_over_the_global_batch(ranks) -> None:
    first, second = ranks.run(_noise_only)
    assert first["update"].numel() >= 100_000
    assert torch.equal(first["update"], second["update"])  # one draw: the same on every rank, not W draws
    assert first["std"] == pytest.approx(first["expected"], rel=0.03)


def _without_ddp(rank: int) -> str:
    model = Net().double()
    compiled = torch.compile(
        model, backend="bk_dp", options={"max_grad_norm": 1.0, "compiler": "aot_eager", "loss_reduction": "mean"}
    )
    x, y = _local(rank, *_union_batch(torch.float64))
    optimizer = bkcompile.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8
    )
    F.cross_entropy(compiled(x), y).backward()
    with pytest.raises(bkcompile.PrivacyError) as info:
        optimizer.step()
    return str(info.value)


def test_gradients_no_all_reduce_combined_are_refused(ranks) -> None:
    for message in ranks.run(_without_ddp):
        assert "differ between ranks" in message and "DistributedDataParallel" in message


def _sequential_in_compiled_ddp(rank: int) -> str:
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    wrapped = _wrap(model, "compile(DDP)", {"max_grad_norm": 1.0, "compiler": "aot_eager", "loss_reduction": "mean"})
    x, y = _local(rank, *_union_batch(torch.float64))
    optimizer = bkcompile.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8
    )
    F.cross_entropy(wrapped(x), y).backward()  # dynamo skips nn.Sequential's frame inside DDP: eager, unclipped
    with pytest.raises(bkcompile.PrivacyError) as info:
        optimizer.step()
    return str(info.value)


def test_sequential_run_eagerly_inside_compiled_ddp_is_refused(ranks) -> None:
    for message in ranks.run(_sequential_in_compiled_ddp):
        assert "not produced by a bk_dp backward" in message


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


def _loader_batches(rank: int, seed: int) -> list[torch.Tensor]:
    rows = torch.arange(40)
    loader = bkcompile.DistributedPoissonLoader(
        rows, sample_rate=0.1, steps=30, generator=torch.Generator().manual_seed(seed + rank)
    )
    assert loader.expected_batch_size == pytest.approx(4.0)  # q * N over all ranks
    return [batch for (batch,) in loader]


def test_distributed_loader_splits_one_global_poisson_batch(ranks) -> None:
    first, second = ranks.run(_loader_batches, 7)
    single = bkcompile.PoissonLoader(
        torch.arange(40), sample_rate=0.1, steps=30, generator=torch.Generator().manual_seed(7)
    )
    sizes = []
    for mine, theirs, (whole,) in zip(first, second, single):
        assert torch.equal(torch.sort(torch.cat([mine, theirs])).values, whole)  # rank 0's draw, split
        assert abs(len(mine) - len(theirs)) <= 1
        sizes.append(len(theirs))
    assert 0 in sizes  # empty local batches happen at q * N / W = 2


def _make_private_steps(rank: int) -> dict:
    torch.manual_seed(rank)  # different initialisations: DDP starts every rank from rank 0's
    model = Net().double()
    x, y = _union_batch(torch.float64)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.repeat(4, 1), y.repeat(4)), batch_size=2)
    private, optimizer, loader = bkcompile.make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.5),
        data,
        max_grad_norm=1.0,
        noise_multiplier=1.0,
        target_delta=1e-3,
        loss_reduction="mean",
        compiler="aot_eager",
    )
    from torch._dynamo.utils import counters

    counters.clear()
    sizes = []
    for xb, yb in loader:  # ceil(1 / q) = 16 steps; every rank runs its backward, empty local batches too
        sizes.append(len(xb))
        optimizer.zero_grad()
        F.cross_entropy(private(xb), yb).backward()
        optimizer.step()
    return {
        "sizes": sizes,
        "graphs": counters["stats"]["unique_graphs"],
        "ddp": isinstance(private, DDP),
        "loader": type(loader).__name__,
        "expected": optimizer.expected_batch_size,
        "history": optimizer.accountant.history,
        "params": [p.detach().clone() for p in model.parameters()],
    }


def test_make_private_under_a_process_group(ranks) -> None:
    results = ranks.run(_make_private_steps)
    for result in results:
        assert result["ddp"] and result["loader"] == "DistributedPoissonLoader"
        assert result["expected"] == 2  # the global q * N
        assert result["history"] == [[2 / 32, 1.0, 16]]  # the global sample rate, one record per step
        assert result["graphs"] == 1  # one compile for every local batch size
    sizes = [size for result in results for size in result["sizes"]]
    assert 0 in sizes and len(set(sizes)) > 1  # empty local batches among non-empty ones
    assert all(torch.equal(a, b) for a, b in zip(results[0]["params"], results[1]["params"]))


def _private_training(rank: int, seed: int, checkpoint: str, steps: int, resume: bool, sharded: bool) -> tuple:
    """``steps`` steps of make_private's training from seed ``seed`` (or from ``checkpoint``), under DDP or, when
    ``sharded``, FSDP2 at the root; when not resuming, the model, optimizer and loader are saved after the first
    two steps (by rank 0 under DDP, by every rank under FSDP2)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = Net().double()
    if sharded:
        fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    x, y = _union_batch(torch.float64)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.repeat(4, 1), y.repeat(4)), batch_size=8)
    private, optimizer, loader = bkcompile.make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
        data,
        max_grad_norm=1.0,
        noise_multiplier=1.0,
        target_delta=1e-3,
        loss_reduction="mean",
        compiler="aot_eager",
    )
    if resume:
        bkcompile.load_checkpoint(checkpoint, model, optimizer, loader)
    batches = iter(loader)
    for step in range(steps):
        xb, yb = next(batches)
        optimizer.zero_grad()
        F.cross_entropy(private(xb), yb).backward()
        optimizer.step()
        if step == 1 and not resume and (sharded or rank == 0):
            bkcompile.save_checkpoint(checkpoint, model, optimizer, loader)
    torch.distributed.barrier()  # the checkpoint is written before any rank reads it
    params = [p.detach().full_tensor() if sharded else p.detach().clone() for p in model.parameters()]
    return params, optimizer.accountant.history, optimizer.accountant.get_epsilon(1e-3)


def _checkpoint_and_resume(rank: int, checkpoint: str, sharded: bool) -> dict:
    whole = _private_training(rank, 0, checkpoint, steps=4, resume=False, sharded=sharded)
    torch._dynamo.reset()
    resumed = _private_training(rank, 1 + rank, checkpoint, 2, resume=True, sharded=sharded)  # other seeds
    return {"whole": whole, "resumed": resumed}


def check_resumed(results: list[dict]) -> None:
    """The resumed run's last two steps are the whole run's, and so is its epsilon; the replicas agree."""
    for result in results:
        (whole, whole_history, whole_epsilon), (resumed, resumed_history, resumed_epsilon) = result.values()
        assert all(torch.equal(a, b) for a, b in zip(whole, resumed))  # the same batches, noise and momentum
        assert whole_history == resumed_history == [[0.25, 1.0, 4]]
        assert whole_epsilon == resumed_epsilon
    assert all(torch.equal(a, b) for a, b in zip(results[0]["whole"][0], results[1]["whole"][0]))


def test_checkpoint_resumes_the_same_run(ranks, tmp_path) -> None:
    check_resumed(ranks.run(_checkpoint_and_resume, str(tmp_path / "checkpoint.pt"), False))


def adaptive_steps(rank: int, model: nn.Module, wrap) -> dict:
    """Two adaptive-clipping steps of ``wrap(model, options)`` on this rank's half of the union batch, at the
    smallest threshold at which the two halves count different numbers of samples under it."""
    x, y = _union_batch(torch.float64)
    _, norms = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=math.inf)
    halves = norms.view(WORLD, PER_RANK)
    radius = next(r for r in norms.sort().values.tolist() if len({int((h <= r).sum()) for h in halves}) > 1)
    wrapped = wrap(model, {"max_grad_norm": radius, "compiler": "aot_eager", "loss_reduction": "mean"})
    optimizer = bkcompile.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=radius,
        expected_batch_size=WORLD * PER_RANK,
        adaptive_clipping=bkcompile.AdaptiveClipping(target_quantile=0.5, learning_rate=0.5, count_noise=2.0),
    )
    local = (norms[rank * PER_RANK : (rank + 1) * PER_RANK] <= radius).sum().item()
    thresholds = []
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(wrapped(*_local(rank, x)), *_local(rank, y)).backward()
        optimizer.step()
        thresholds.append(optimizer._clip_state.thresholds.clone())
    return {"thresholds": thresholds, "local count": local, "radius": radius}


def check_adaptive_counts(first: dict, second: dict) -> None:
    assert first["local count"] != second["local count"]  # local counts would move the ranks apart
    assert all(torch.equal(a, b) for a, b in zip(first["thresholds"], second["thresholds"]))
    assert float(first["thresholds"][0][0]) != first["radius"]  # the threshold moved


def _ddp_adaptive_steps(rank: int) -> dict:
    return adaptive_steps(rank, Net().double(), lambda model, options: _wrap(model, "DDP(compile)", options))


def test_adaptive_clipping_counts_the_union_batch(ranks) -> None:
    check_adaptive_counts(*ranks.run(_ddp_adaptive_steps))
