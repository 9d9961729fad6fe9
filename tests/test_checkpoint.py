"""Checkpoint and resume: the same epsilon, a bit-identical continuation, atomic writes, a SIGKILLed run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_worker import build, train

import bkcompile

WORKER = Path(__file__).with_name("checkpoint_worker.py")


def test_resume_continues_bit_identically_with_the_same_epsilon(tmp_path: Path) -> None:
    # adaptive thresholds included: restored before the resumed model compiles
    model, compiled, optimizer, loader = build()
    train(model, compiled, optimizer, loader, steps=8, step=0, checkpoint=None, sleep=0)
    want = {k: v.clone() for k, v in model.state_dict().items()}

    torch._dynamo.reset()
    model, compiled, optimizer, loader = build()
    train(model, compiled, optimizer, loader, steps=3, step=0, checkpoint=None, sleep=0)  # mid-epoch
    path = tmp_path / "run.pt"
    bkcompile.save_checkpoint(path, compiled, optimizer, loader, step=3)
    epsilon = optimizer.accountant.get_epsilon(1e-5)

    torch._dynamo.reset()
    model, compiled, optimizer, loader = build(seed=1)  # other weights and generators: all overwritten
    assert bkcompile.load_checkpoint(path, compiled, optimizer, loader) == {"step": 3}
    assert optimizer.accountant.history == [[0.2, 1.1, 3]]
    assert optimizer.accountant.get_epsilon(1e-5) == epsilon
    train(model, compiled, optimizer, loader, steps=8, step=3, checkpoint=None, sleep=0)
    for name, value in model.state_dict().items():
        assert torch.equal(value, want[name]), name
    assert optimizer.accountant.history == [[0.2, 1.1, 8]]


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    model, compiled, optimizer, loader = build()
    path = tmp_path / "run.pt"
    bkcompile.save_checkpoint(path, compiled, optimizer, loader, step=0)
    before = path.read_bytes()

    def crash(obj, file, *args, **kwargs):
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        bkcompile.save_checkpoint(path, compiled, optimizer, loader, step=1)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]  # no temporary file left behind


def test_a_checkpoint_between_batch_and_step_is_refused(tmp_path: Path) -> None:
    model, compiled, optimizer, loader = build()
    next(iter(loader))
    with pytest.raises(bkcompile.BKError, match="take it after the step"):
        bkcompile.save_checkpoint(tmp_path / "run.pt", compiled, optimizer, loader, step=0)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(bkcompile.BKError, match="not a bkcompile checkpoint"):
        bkcompile.load_checkpoint(tmp_path / "other.pt", compiled, optimizer, loader)


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_with_nothing_lost_or_counted_twice(tmp_path: Path) -> None:
    steps = 12
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent)}
    reference = tmp_path / "reference.pt"
    subprocess.run(
        [sys.executable, WORKER, tmp_path / "unused.pt", reference, str(steps)], check=True, env=env, timeout=300
    )
    checkpoint, result = tmp_path / "run.pt", tmp_path / "result.pt"
    run = subprocess.Popen(
        [sys.executable, WORKER, checkpoint, result, str(steps), "--resume", "--sleep", "0.2"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    for line in run.stdout:
        if int(line) >= 7:  # mid-run, mid-epoch (5 steps per epoch)
            break
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=60)
    assert run.returncode == -signal.SIGKILL and not result.exists()
    resumed = subprocess.run(
        [sys.executable, WORKER, checkpoint, result, str(steps), "--resume"],
        check=True,
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
    )
    start = int(resumed.stdout.splitlines()[0].removeprefix("resumed at "))
    assert 7 <= start < steps
    want, got = torch.load(reference), torch.load(result)
    assert got["history"] == want["history"] == [[0.2, 1.1, steps]]  # every step counted once
    assert got["epsilon"] == want["epsilon"]
    for name, value in want["params"].items():
        assert torch.equal(got["params"][name], value), name


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_state_resumes_mid_epoch_despite_prefetching_workers(workers: int) -> None:
    data = torch.utils.data.TensorDataset(torch.arange(20))

    def loader() -> bkcompile.PoissonLoader:
        return bkcompile.PoissonLoader(
            data, sample_rate=0.2, generator=torch.Generator().manual_seed(0), num_workers=workers
        )

    first = loader()
    batches = iter(first)
    for _ in range(2):
        next(batches)  # workers have drawn further batches by now
    state = first.state_dict()
    want = [b.tolist() for (b,) in batches] + [b.tolist() for (b,) in first]
    resumed = loader()
    resumed.load_state_dict(state)
    got = [b.tolist() for (b,) in resumed] + [b.tolist() for (b,) in resumed]
    assert state["position"] == 2 and len(want) == 3 + 5
    assert got == want
