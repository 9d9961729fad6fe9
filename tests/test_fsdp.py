"""FSDP2 (``fully_shard``) on two gloo ranks (CPU) against the single-process oracle on the union batch.

Each rank holds 4 of the 8 samples. FSDP2 reduce-scatters the ranks' average of their clipped sums into
sharded (DTensor) gradients, so W times a gradient's ``full_tensor()`` is the union batch's clipped sum.
DPOptimizer steps the shards: each gets its part of one noise draw, and the update is the single-process one.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from oracle import clipped_sum
from ranks import Ranks
from test_distributed import (
    PER_RANK,
    TOL,
    WORLD,
    Block,
    Net,
    _expected_update,
    _local,
    _max_relative_error,
    _union_batch,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import bkcompile

WRAPPINGS = ("root", "blocks, compiled whole", "blocks, compiled each")


@pytest.fixture(scope="module")
def ranks():
    group = Ranks(WORLD)
    yield group
    group.close()


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(512, 200)  # 102,600 coordinates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class Tower(nn.Module):
    """Two blocks and a head, each a module of its own (for ``fully_shard`` per block)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(8), Block(8)])
        self.head = Head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _shard(model: Tower, wrapping: str, options: dict, policy: MixedPrecisionPolicy | None = None) -> nn.Module:
    """``fully_shard`` at the root only, or per block and head too, compiled whole or block by block (the
    blocks are then pieces of one clip: ``graphs="several"``)."""
    mesh = init_device_mesh("cpu", (WORLD,))
    policy = policy or MixedPrecisionPolicy()
    if wrapping != "root":
        options = {**options, "graphs": "several"}
        for module in (*model.blocks, model.head):
            fully_shard(module, mesh=mesh, mp_policy=policy)
            if wrapping == "blocks, compiled each":
                module.compile(backend="bk_dp", options=options)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if wrapping == "blocks, compiled each":
        return model  # the root's forward only calls the compiled blocks
    return torch.compile(model, backend="bk_dp", options=options)


def _layer_groups(model: nn.Module, radius: float) -> list:
    layers = ["blocks.0.linear", "blocks.1.linear", "head.linear"]
    names = [n for n, _ in model.named_parameters()]
    return [([n for n in names if n.startswith(layer)], radius / math.sqrt(len(layers))) for layer in layers]


def _fsdp_grads(rank: int, wrapping: str, dtype: torch.dtype, clipping: str) -> dict:
    model = Tower().to(dtype)
    x, y = _union_batch(dtype)
    _, norms = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=math.inf)
    radius = norms.median().item()  # half the samples are clipped
    groups = _layer_groups(model, radius) if clipping == "layer-wise" else None
    want, _ = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=radius, groups=groups)
    options = {"max_grad_norm": radius, "compiler": "aot_eager", "clipping": clipping}
    sharded = _shard(model, wrapping, options)
    F.cross_entropy(sharded(*_local(rank, x)), *_local(rank, y)).backward()
    got = {n: WORLD * p.grad.full_tensor() for n, p in model.named_parameters()}
    return {
        "error": _max_relative_error(got, want),
        "sharded": all(isinstance(p.grad, torch.distributed.tensor.DTensor) for p in model.parameters()),
    }


GRAD_CASES = [
    ("root", torch.float64, "all-layer"),
    ("root", torch.float32, "layer-wise"),
    ("blocks, compiled whole", torch.float64, "layer-wise"),
    ("blocks, compiled whole", torch.float32, "all-layer"),
    ("blocks, compiled each", torch.float64, "all-layer"),
    ("blocks, compiled each", torch.float64, "layer-wise"),
]


@pytest.mark.parametrize("wrapping, dtype, clipping", GRAD_CASES)
def test_sharded_gradients_match_the_union_batch_oracle(ranks, wrapping, dtype, clipping) -> None:
    for result in ranks.run(_fsdp_grads, wrapping, dtype, clipping):
        assert result["sharded"] and result["error"] <= TOL[dtype], result


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().full_tensor() for p in model.parameters()]


def _fsdp_steps(rank: int, wrapping: str, steps: int) -> dict:
    """Noised steps of the sharded model against the single-process update of a copy kept in step."""
    sigma, radius, batch = 1.3, 0.7, WORLD * PER_RANK
    model = Tower().double()
    reference_model = Tower().double()
    reference_model.load_state_dict(model.state_dict())
    x, y = _union_batch(torch.float64)
    sharded = _shard(model, wrapping, {"max_grad_norm": radius, "compiler": "aot_eager"})
    optimizer = bkcompile.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5),
        noise_multiplier=sigma,
        max_grad_norm=radius,
        expected_batch_size=batch,
        generator=torch.Generator().manual_seed(5 if rank == 0 else 99),  # rank 0's state is the one used
    )
    reference = torch.Generator().manual_seed(5)
    errors, snapshots = [], []
    for _ in range(steps):
        want = _expected_update(reference_model, x, y, radius, sigma, reference, batch)
        optimizer.zero_grad()
        F.cross_entropy(sharded(*_local(rank, x)), *_local(rank, y)).backward()
        optimizer.add_noise()
        errors.append(_max_relative_error({n: p.grad.full_tensor() for n, p in model.named_parameters()}, want))
        optimizer.optimizer.step()
        snapshots.append(_full(model))
        with torch.no_grad():
            for p, q in zip(snapshots[-1], reference_model.parameters()):
                q.copy_(p)
    return {"errors": errors, "params": snapshots}


@pytest.mark.parametrize("wrapping", WRAPPINGS)
def test_noise_is_drawn_once_per_shard_and_the_update_is_the_single_process_one(ranks, wrapping) -> None:
    first, second = ranks.run(_fsdp_steps, wrapping, 2)
    for result in (first, second):
        assert max(result["errors"]) <= 1e-8
    for mine, theirs in zip(first["params"], second["params"]):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))  # the full parameters, bit-identical


def _noise_only(rank: int) -> dict:
    sigma, radius, batch = 2.0, 1.5, 16.0
    model = Wide()
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    options = {"max_grad_norm": radius, "compiler": "aot_eager", "loss_reduction": "sum"}
    compiled = torch.compile(model, backend="bk_dp", options=options)
    optimizer = bkcompile.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=sigma,
        max_grad_norm=radius,
        expected_batch_size=batch,
        generator=torch.Generator().manual_seed(3),
    )
    x = torch.zeros(0, 512)  # an empty local batch on every rank: the update is the noise alone
    bkcompile.mark_batch_dynamic(x)
    optimizer.zero_grad()
    compiled(x).sum().backward()
    optimizer.add_noise()
    reference = torch.Generator().manual_seed(3)
    want = [torch.normal(0.0, sigma * radius, size=p.shape, generator=reference) / batch for p in model.parameters()]
    update = torch.cat([p.grad.full_tensor().flatten() for p in model.parameters()])
    return {
        "std": update.std().item(),
        "expected": sigma * radius / batch,
        "update": update,
        "local": sum(p.grad.to_local().numel() for p in model.parameters()),
        "single process": torch.cat([w.flatten() for w in want]),
    }


def test_noise_std_is_sigma_r_over_the_global_batch(ranks) -> None:
    first, second = ranks.run(_noise_only)
    assert first["update"].numel() >= 100_000
    assert first["local"] + second["local"] == first["update"].numel()  # each rank noised its shard
    assert torch.equal(first["update"], second["update"])
    assert torch.allclose(first["update"], first["single process"], rtol=1e-6, atol=1e-9)  # one draw per coordinate
    assert first["std"] == pytest.approx(first["expected"], rel=0.03)


def _unclipped(rank: int, road: str) -> str:
    model = Tower().double()
    x, y = _local(rank, *_union_batch(torch.float64))
    if road == "never compiled":
        fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
        sharded = model
    else:
        sharded = _shard(model, "root", {"max_grad_norm": 1.0, "compiler": "aot_eager"})
    optimizer = bkcompile.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8
    )
    F.cross_entropy(sharded(x), y).backward()
    if road != "never compiled":
        optimizer.step()  # a private step first: the ledger knows the shards
        optimizer.zero_grad()
    try:
        if road == "force_eager":
            with torch.compiler.set_stance("force_eager"):
                F.cross_entropy(sharded(x), y).backward()
        elif road == "shard used eagerly":
            penalty = model.head.linear.weight.full_tensor().pow(2).sum()  # the shard, outside the model
            (F.cross_entropy(sharded(x), y) + penalty).backward()
        else:
            optimizer.step()
    except bkcompile.PrivacyError as error:
        return str(error)
    return "no error"


@pytest.mark.parametrize(
    "road, message",
    [
        ("force_eager", "set_stance('force_eager') ran the compiled model eagerly"),
        ("shard used eagerly", "'head.linear.weight' received a gradient that no bk_dp clip wrote"),
        ("never compiled", "not produced by a bk_dp backward"),
    ],
)
def test_unclipped_gradients_into_the_shards_are_refused(ranks, road, message) -> None:
    for text in ranks.run(_unclipped, road):
        assert message in text, text


def _mixed_precision_step(rank: int) -> dict:
    sigma, batch = 1.0, WORLD * PER_RANK
    model = Net()
    reference_model = Net()
    reference_model.load_state_dict(model.state_dict())
    x, y = _union_batch(torch.float32)
    _, norms = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=math.inf)
    radius = norms.median().item()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)), mp_policy=policy)
    compiled = torch.compile(model, backend="bk_dp", options={"max_grad_norm": radius, "compiler": "aot_eager"})
    optimizer = bkcompile.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5),
        noise_multiplier=sigma,
        max_grad_norm=radius,
        expected_batch_size=batch,
        generator=torch.Generator().manual_seed(5),
    )
    want = _expected_update(reference_model, x, y, radius, sigma, torch.Generator().manual_seed(5), batch)
    before = _full(model)
    optimizer.zero_grad()
    F.cross_entropy(compiled(*_local(rank, x)), *_local(rank, y)).backward()
    grad_dtypes = {p.grad.dtype for p in model.parameters()}
    optimizer.step()
    got = {n: (b - a) / 0.5 for (n, _), a, b in zip(model.named_parameters(), _full(model), before)}
    return {
        "error": _max_relative_error(got, want),
        "grad dtypes": grad_dtypes,
        "param dtypes": {p.dtype for p in model.parameters()},
        "norm dtype": bkcompile.last_report().norm_dtype,
        "params": _full(model),
    }


def test_bf16_mixed_precision_steps_through_the_dp_optimizer(ranks) -> None:
    first, second = ranks.run(_mixed_precision_step)
    for result in (first, second):
        assert result["grad dtypes"] == result["param dtypes"] == {torch.float32}  # fp32 reduce, fp32 shards
        assert result["norm dtype"] == "float32"
        assert result["error"] <= 2e-2  # bf16 forward and backward against the float32 oracle
    assert all(torch.equal(a, b) for a, b in zip(first["params"], second["params"]))


def _private_training(rank: int, checkpoint: str, steps: int, resume: bool) -> tuple:
    """``steps`` steps of make_private on a sharded model (or from ``checkpoint``); when not resuming, every
    rank takes part in saving after the first two steps."""
    torch.manual_seed(0 if not resume else 1 + rank)  # resumed: other initial values, replaced by the checkpoint
    model = Net().double()
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
        compiler="aot_eager",
    )
    if resume:
        bkcompile.load_checkpoint(checkpoint, private, optimizer, loader)
    batches = iter(loader)
    for step in range(steps):
        xb, yb = next(batches)
        optimizer.zero_grad()
        F.cross_entropy(private(xb), yb).backward()
        optimizer.step()
        if step == 1 and not resume:
            bkcompile.save_checkpoint(checkpoint, private, optimizer, loader)  # on every rank
    return _full(model), optimizer.accountant.history, optimizer.accountant.get_epsilon(1e-3)


def _checkpoint_and_resume(rank: int, checkpoint: str) -> dict:
    whole = _private_training(rank, checkpoint, steps=4, resume=False)
    torch._dynamo.reset()
    resumed = _private_training(rank, checkpoint, steps=2, resume=True)
    return {"whole": whole, "resumed": resumed}


def test_checkpoint_of_a_sharded_run_resumes_it(ranks, tmp_path) -> None:
    results = ranks.run(_checkpoint_and_resume, str(tmp_path / "checkpoint.pt"))
    for result in results:
        (whole, whole_history, whole_epsilon), (resumed, resumed_history, resumed_epsilon) = (
            result["whole"],
            result["resumed"],
        )
        assert all(torch.equal(a, b) for a, b in zip(whole, resumed))  # the same batches, noise and momentum
        assert whole_history == resumed_history == [[0.25, 1.0, 4]]
        assert whole_epsilon == resumed_epsilon
    assert all(torch.equal(a, b) for a, b in zip(results[0]["whole"][0], results[1]["whole"][0]))
