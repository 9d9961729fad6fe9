"""A private training step timed against a non-private one (``bkcompile.explain(..., measure=True)``).

The cost model counts FLOPs and bytes, not kernel efficiency (B small products run slower than one large one):
its estimate can be far below what a step costs. ``explain`` therefore also times the step: the privatized copy
of the model against a second copy compiled by plain ``torch.compile`` with the same compiler, on the same batch,
in one process. Each step is a forward and a backward from zeroed gradients (what the estimate covers; the
optimizer's noise and update are the same work for any model of that size). The first steps compile and warm
the caches; then the two steps alternate, and the report keeps the median of each.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from bkcompile.compiler.options import BKOptions
from bkcompile.errors import BKError

WARM_STEPS = 2  # each: the first compiles the backward
TIMED_STEPS = 5  # each, alternating


def loss_of(output: Any) -> torch.Tensor:
    """What a step differentiates: the output's first 0-dim floating tensor (a loss the model returns), else the
    sum of its floating tensors (``.loss`` of a Hugging Face output comes first, when the model computed one)."""
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad]
    scalars = [t for t in leaves if t.dim() == 0]
    if scalars:
        return scalars[0]
    if not leaves:
        raise BKError("measure=True: the model's output holds no tensor that requires grad, so a step has no backward")
    return sum(t.sum() for t in leaves)


def training_step(compiled: Callable, model: torch.nn.Module, inputs: tuple) -> Callable[[], None]:
    """One forward and backward of ``compiled(model, *inputs)``, from gradients set to None."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        with torch.enable_grad():
            loss_of(compiled(model, *inputs)).backward()

    return step


def non_private_compile(options: BKOptions) -> dict[str, Any]:
    """``torch.compile``'s arguments for the non-private copy: the same compiler, Inductor's mode and entries."""
    if options.compiler == "aot_eager":
        return {"backend": "aot_eager"}
    from torch._inductor import list_mode_options

    config = {**list_mode_options(options.mode), **dict(options.inductor)}
    return {"backend": "inductor", "options": config or None}


def time_steps(private: Callable[[], None], plain: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """Median seconds of a private and of a non-private step, after warm-up, the two alternating."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(WARM_STEPS):
        private()
        plain()
    times: dict[Callable, list[float]] = {private: [], plain: []}
    for _ in range(TIMED_STEPS):
        for step in (private, plain):
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[step].append(time.perf_counter() - start)
    return statistics.median(times[private]), statistics.median(times[plain])
