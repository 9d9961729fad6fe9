"""A private training run that checkpoints after every step (driven by tests/test_checkpoint.py).

python tests/checkpoint_worker.py CHECKPOINT RESULT STEPS [--resume] [--sleep SECONDS]
Prints each finished step; with --resume it starts from CHECKPOINT when there is one. At the end it
saves the parameters, the accountant's history and epsilon to RESULT.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import bkcompile


def build(seed: int = 0):
    fixed = torch.Generator().manual_seed(0)  # the data is the same in every run
    data = torch.utils.data.TensorDataset(
        torch.randn(30, 6, generator=fixed), torch.randint(0, 3, (30,), generator=fixed)
    )
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    compiled, optimizer, loader = bkcompile.make_private(
        model,
        torch.optim.Adam(model.parameters(), lr=0.05),
        torch.utils.data.DataLoader(data, batch_size=6),  # q = 0.2: 5 steps per epoch
        max_grad_norm=1.0,
        target_delta=1e-5,
        noise_multiplier=1.1,
        loss_reduction="mean",  # train's F.cross_entropy
        generator=torch.Generator().manual_seed(seed),
        adaptive_clipping=bkcompile.AdaptiveClipping(count_noise=2.0),
        compiler="aot_eager",
        clipping="layer-wise",
    )
    return model, compiled, optimizer, loader


def train(model, compiled, optimizer, loader, steps: int, step: int, checkpoint: str | None, sleep: float) -> None:
    while step < steps:
        for x, y in loader:
            optimizer.zero_grad()
            if len(x):
                F.cross_entropy(compiled(x), y).backward()
            optimizer.step()
            step += 1
            if checkpoint is not None:
                bkcompile.save_checkpoint(checkpoint, compiled, optimizer, loader, step=step)
            print(step, flush=True)
            time.sleep(sleep)
            if step == steps:
                return


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("result")
    parser.add_argument("steps", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args()
    model, compiled, optimizer, loader = build()
    step = 0
    if args.resume and os.path.exists(args.checkpoint):
        step = bkcompile.load_checkpoint(args.checkpoint, compiled, optimizer, loader)["step"]
        print(f"resumed at {step}", flush=True)
    train(model, compiled, optimizer, loader, args.steps, step, args.checkpoint, args.sleep)
    torch.save(
        {
            "params": model.state_dict(),
            "history": optimizer.accountant.history,
            "epsilon": optimizer.accountant.get_epsilon(1e-5),
        },
        args.result,
    )


if __name__ == "__main__":
    main()
