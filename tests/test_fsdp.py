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
    _checkpoint_and_resume,
    _expected_update,
    _local,
    _max_relative_error,
    _union_batch,
    adaptive_steps,
    check_adaptive_counts,
    check_resumed,
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
    graphs of a model sharded per block are pieces of one clip, with the default ``graphs="auto"``)."""
    mesh = init_device_mesh("cpu", (WORLD,))
    policy = policy or MixedPrecisionPolicy()
    if wrapping != "root":
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


def _blocks_compiled_as_several(rank: int) -> dict:
    """``graphs="several"`` given explicitly: the same clip as the default finds."""
    model = Tower().double()
    x, y = _union_batch(torch.float64)
    want, _ = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=0.5)
    sharded = _shard(
        model,
        "blocks, compiled whole",
        {"max_grad_norm": 0.5, "compiler": "aot_eager", "loss_reduction": "mean", "graphs": "several"},
    )
    F.cross_entropy(sharded(*_local(rank, x)), *_local(rank, y)).backward()
    got = {n: WORLD * p.grad.full_tensor() for n, p in model.named_parameters()}
    return {"error": _max_relative_error(got, want), "graphs": len(bkcompile.last_clip_spans()[0].graphs)}


def test_blocks_sharded_one_by_one_are_pieces_of_one_clip(ranks) -> None:
    for result in ranks.run(_blocks_compiled_as_several):
        assert result["error"] <= 1e-8 and result["graphs"] == 3  # two blocks and the head, clipped together


def _fsdp_grads(rank: int, wrapping: str, dtype: torch.dtype, clipping: str) -> dict:
    model = Tower().to(dtype)
    x, y = _union_batch(dtype)
    _, norms = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=math.inf)
    radius = norms.median().item()  # half the samples are clipped
    groups = _layer_groups(model, radius) if clipping == "layer-wise" else None
    want, _ = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=radius, groups=groups)
    options = {"max_grad_norm": radius, "compiler": "aot_eager", "loss_reduction": "mean", "clipping": clipping}
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


def _dp_sgd(model: nn.Module, sigma: float, radius: float, batch: float, seed: int) -> bkcompile.DPOptimizer:
    return bkcompile.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5),
        noise_multiplier=sigma,
        max_grad_norm=radius,
        expected_batch_size=batch,
        generator=torch.Generator().manual_seed(seed),
    )


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().full_tensor() for p in model.parameters()]


def _fsdp_steps(
    rank: int,
    wrapping: str,
    divide_factor: float | None,
    micro: int,
    steps: int,
    compiler: str = "aot_eager",
    at_the_root: bool = False,
) -> dict:
    """Noised steps of the sharded model against the single-process update of a copy kept in step; with
    ``divide_factor`` FSDP2's reduce-scatter divides the ranks' sum by it instead of averaging; each rank's
    batch in ``micro`` micro-batches (a backward each, one step); ``at_the_root``: the head in the root's own
    parameter group (:class:`RootHeldHead`)."""
    sigma, radius, batch = 1.3, 0.7, WORLD * PER_RANK
    kind = RootHeldHead if at_the_root else Tower
    model = kind().double()
    reference_model = kind().double()
    reference_model.load_state_dict(model.state_dict())
    x, y = _union_batch(torch.float64)
    options = {"max_grad_norm": radius, "compiler": compiler, "loss_reduction": "mean"}
    if at_the_root:
        sharded = _shard_with_parameters_at_the_root(model, wrapping == "blocks, compiled each", options)
    else:
        sharded = _shard(model, wrapping, options)
    if divide_factor is not None:
        model.set_gradient_divide_factor(divide_factor)
    optimizer = _dp_sgd(model, sigma, radius, batch, 5 if rank == 0 else 99)  # rank 0's state is the one used
    reference = torch.Generator().manual_seed(5)
    errors, snapshots = [], []
    for _ in range(steps):
        want = _expected_update(reference_model, x, y, radius, sigma, reference, batch)
        optimizer.zero_grad()
        for xb, yb in zip(*(t.chunk(micro) for t in _local(rank, x, y))):
            F.cross_entropy(sharded(xb), yb).backward()
        optimizer.step()
        errors.append(_max_relative_error({n: p.grad.full_tensor() for n, p in model.named_parameters()}, want))
        snapshots.append(_full(model))
        with torch.no_grad():
            for p, q in zip(snapshots[-1], reference_model.parameters()):
                q.copy_(p)
    return {"errors": errors, "params": snapshots}


STEP_CASES = [*((w, None, 1) for w in WRAPPINGS), ("root", 1.0, 1), ("blocks, compiled each", None, 2)]


@pytest.mark.parametrize("wrapping, divide_factor, micro", STEP_CASES)
def test_noise_is_drawn_once_per_shard_and_the_update_is_the_single_process_one(
    ranks, wrapping, divide_factor, micro
) -> None:
    first, second = ranks.run(_fsdp_steps, wrapping, divide_factor, micro, 2)
    for result in (first, second):
        assert max(result["errors"]) <= 1e-8
    for mine, theirs in zip(first["params"], second["params"]):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))  # the full parameters, bit-identical


@pytest.mark.slow
def test_inductor_steps_per_block_sharded_model(ranks) -> None:
    first, second = ranks.run(_fsdp_steps, "blocks, compiled whole", None, 1, 1, "inductor")
    assert max(first["errors"] + second["errors"]) <= 1e-8
    assert all(torch.equal(a, b) for a, b in zip(first["params"][0], second["params"][0]))


def _noise_only(rank: int) -> dict:
    sigma, radius, batch = 2.0, 1.5, 16.0
    model = Wide()
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    options = {"max_grad_norm": radius, "compiler": "aot_eager", "loss_reduction": "sum"}
    compiled = torch.compile(model, backend="bk_dp", options=options)
    optimizer = _dp_sgd(model, sigma, radius, batch, 3)
    x = torch.zeros(0, 512)  # an empty local batch on every rank: the update is the noise alone
    bkcompile.mark_batch_dynamic(x)
    optimizer.zero_grad()
    compiled(x).sum().backward()
    optimizer.step()
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
        sharded = _shard(model, "root", {"max_grad_norm": 1.0, "compiler": "aot_eager", "loss_reduction": "mean"})
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
        elif road == "shard's gradient set by hand":
            model.head.linear.weight.grad = model.head.linear.weight.detach() * 0 + 1  # sharded as the weight
            F.cross_entropy(sharded(x), y).backward()  # FSDP2 adds the clipped sums to it
            optimizer.step()
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
        ("shard's gradient set by hand", "'head.linear.weight': p.grad already held a gradient no bk_dp graph wrote"),
        ("never compiled", "not produced by a bk_dp backward"),
    ],
)
def test_unclipped_gradients_into_the_shards_are_refused(ranks, road, message) -> None:
    for text in ranks.run(_unclipped, road):
        assert message in text, text


def _sharded_on_each_rank_alone(rank: int) -> str:
    """fully_shard over a mesh of one rank: nothing combines the ranks' gradients."""
    model = Tower().double()
    own = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("ranks", "shard"))["shard"]
    fully_shard(model, mesh=own)
    compiled = torch.compile(
        model, backend="bk_dp", options={"max_grad_norm": 1.0, "compiler": "aot_eager", "loss_reduction": "mean"}
    )
    optimizer = _dp_sgd(model, 1.0, 1.0, 8, 0)
    x, y = _local(rank, *_union_batch(torch.float64))
    F.cross_entropy(compiled(x), y).backward()
    with pytest.raises(bkcompile.NotSupportedYetError) as info:
        optimizer.step()
    return str(info.value)


def test_a_mesh_of_some_ranks_is_refused(ranks) -> None:
    for message in ranks.run(_sharded_on_each_rank_alone):
        assert "on a device mesh of 1 of the 2 ranks" in message and "init_device_mesh" in message


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
    compiled = torch.compile(
        model, backend="bk_dp", options={"max_grad_norm": radius, "compiler": "aot_eager", "loss_reduction": "mean"}
    )
    optimizer = _dp_sgd(model, sigma, radius, batch, 5)
    want = _expected_update(reference_model, x, y, radius, sigma, torch.Generator().manual_seed(5), batch)
    before = _full(model)
    optimizer.zero_grad()
    F.cross_entropy(compiled(*_local(rank, x)), *_local(rank, y)).backward()
    optimizer.step()
    grad_dtypes = {p.grad.dtype for p in model.parameters()}  # the released (noised) gradients
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


def test_checkpoint_of_a_sharded_run_resumes_it(ranks, tmp_path) -> None:
    check_resumed(ranks.run(_checkpoint_and_resume, str(tmp_path / "checkpoint.pt"), True))


def _fsdp_adaptive_steps(rank: int, wrapping: str) -> dict:
    return adaptive_steps(rank, Tower().double(), lambda model, options: _shard(model, wrapping, options))


@pytest.mark.parametrize("wrapping", ["root", "blocks, compiled each"])
def test_adaptive_clipping_counts_the_union_batch(ranks, wrapping) -> None:
    check_adaptive_counts(*ranks.run(_fsdp_adaptive_steps, wrapping))


class RootHeld(nn.Module):
    """Blocks sharded one by one, and a final norm and head that the root's forward runs itself, held by the
    root's own parameter group."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(8), Block(8)])
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.out(self.norm(x))


class NormHead(nn.Module):
    """A final norm and an output layer in a module of the user's own code (dynamo compiles its forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


class RootHeldHead(nn.Module):
    """Blocks sharded one by one, and a head the root's own parameter group holds (no fully_shard of its own)."""

    def __init__(self, flip_gradient: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(8), Block(8)])
        self.head = NormHead()
        self.flip_gradient = flip_gradient  # a gradient hook of the user's beside FSDP2's on the blocks' output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.flip_gradient:
            x.register_hook(lambda grad: grad.flip(0))
        return self.head(x)


def _shard_with_parameters_at_the_root(model: nn.Module, compiled_each: bool, options: dict) -> nn.Module:
    """``fully_shard`` per block, then at the root, which keeps the other parameters in its own group; compiled
    whole, or each block and the root's own modules on their own."""
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
        if compiled_each:
            block.compile(backend="bk_dp", options=options)
    fully_shard(model, mesh=mesh)
    if not compiled_each:
        return torch.compile(model, backend="bk_dp", options=options)
    for name, module in model.named_children():
        if name != "blocks":
            module.compile(backend="bk_dp", options=options)
    return model


def _root_holds_parameters(rank: int, compiled_each: bool, compiler: str = "aot_eager") -> dict:
    model = RootHeldHead().double()
    x, y = _union_batch(torch.float64)
    _, norms = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=math.inf)
    radius = norms.median().item()  # half the samples are clipped
    want, _ = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=radius)
    options = {"max_grad_norm": radius, "compiler": compiler, "loss_reduction": "mean"}
    sharded = _shard_with_parameters_at_the_root(model, compiled_each, options)
    F.cross_entropy(sharded(*_local(rank, x)), *_local(rank, y)).backward()
    got = {n: WORLD * p.grad.full_tensor() for n, p in model.named_parameters()}
    return {"error": _max_relative_error(got, want), "graphs": len(bkcompile.last_clip_spans()[0].graphs)}


@pytest.mark.parametrize("compiled_each", [False, True], ids=["compiled whole", "compiled each"])
def test_blocks_sharded_one_by_one_with_parameters_at_the_root(ranks, compiled_each: bool) -> None:
    """The head's input carries FSDP2's pre-backward hook (the last block's output): it returns the gradient as
    it is, so the head's graph is a piece of the blocks' clip."""
    for result in ranks.run(_root_holds_parameters, compiled_each):
        assert result["error"] <= TOL[torch.float64] and result["graphs"] == 3, result


def _hook_beside_fsdp2s(rank: int) -> str:
    model = RootHeldHead(flip_gradient=True).double()
    x, _ = _local(rank, *_union_batch(torch.float64))
    sharded = _shard_with_parameters_at_the_root(
        model, False, {"max_grad_norm": 1.0, "compiler": "aot_eager", "loss_reduction": "mean"}
    )
    with pytest.raises(bkcompile.PrivacyError) as info:
        sharded(x)
    return str(info.value)


def test_a_gradient_hook_beside_fsdp2s_is_refused(ranks) -> None:
    """Only FSDP2's own pre-backward hook passes between the graphs: another hook on that tensor is refused."""
    for message in ranks.run(_hook_beside_fsdp2s):
        assert "with a gradient hook (Tensor.register_hook)" in message, message


@pytest.mark.parametrize("wrapping, micro", [("blocks, compiled whole", 1), ("blocks, compiled each", 2)])
def test_noised_steps_with_parameters_at_the_root(ranks, wrapping: str, micro: int) -> None:
    first, second = ranks.run(_fsdp_steps, wrapping, None, micro, 2, "aot_eager", True)
    for result in (first, second):
        assert max(result["errors"]) <= 1e-8
    for mine, theirs in zip(first["params"], second["params"]):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))  # the full parameters, bit-identical


@pytest.mark.slow
def test_inductor_with_parameters_at_the_root(ranks) -> None:
    for result in ranks.run(_root_holds_parameters, False, "inductor"):
        assert result["error"] <= TOL[torch.float64] and result["graphs"] == 3, result


def _layers_the_root_runs_itself(rank: int, compiled_each: bool) -> str:
    model = RootHeld().double()
    x, y = _local(rank, *_union_batch(torch.float64))
    sharded = _shard_with_parameters_at_the_root(
        model, compiled_each, {"max_grad_norm": 1.0, "compiler": "aot_eager", "loss_reduction": "mean"}
    )
    with pytest.raises(bkcompile.UnclippedGradientError) as info:
        F.cross_entropy(sharded(x), y).backward()
    return str(info.value)


@pytest.mark.parametrize("compiled_each", [False, True], ids=["compiled whole", "compiled each"])
def test_layers_the_root_runs_itself_are_refused_with_the_cause(ranks, compiled_each: bool) -> None:
    """The root's forward calls the sharded blocks in a loop: dynamo skips it whole (FSDP2's hooks are graph
    breaks), so its own norm and head (torch modules, whose frames dynamo never compiles) run eagerly."""
    for message in ranks.run(_layers_the_root_runs_itself, compiled_each):
        assert "'out.bias' received a gradient that no bk_dp clip wrote: no bk_dp graph received it" in message
        assert "FSDP2 holds it in RootHeld's own parameter group" in message and "(Linear 'out') ran eagerly" in message
        assert "a graph break in a loop" in message and "Linear is torch's own module" in message
        assert "Move those layers into a module of your own code" in message
