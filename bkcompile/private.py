"""make_private: the compiled model, the DP optimizer and the Poisson loader, in the shape Opacus users know."""

from __future__ import annotations

import warnings

import torch
from torch.nn.parallel import DistributedDataParallel

from bkcompile.accountant import PrivacyAccountant, get_noise_multiplier
from bkcompile.data import PoissonLoader
from bkcompile.distributed import DistributedPoissonLoader, world_size
from bkcompile.errors import BKError
from bkcompile.optimizer import AdaptiveClipping, DPOptimizer


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: torch.utils.data.DataLoader,
    *,
    max_grad_norm: float,
    target_delta: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    epochs: float | None = None,
    generator: torch.Generator | None = None,
    adaptive_clipping: AdaptiveClipping | None = None,
    **backend_options,
) -> tuple[torch.nn.Module, DPOptimizer, PoissonLoader]:
    """Compile ``model`` with bk_dp, wrap ``optimizer``, and replace ``data_loader`` by Poisson sampling.

    ``data_loader`` is a DataLoader over a ``TensorDataset``; its ``batch_size`` becomes the expected
    batch size (sample rate q = batch_size / len(dataset)). Under torchrun (an initialised process
    group) every rank passes the whole dataset: ``batch_size`` is the global expected batch, the loader
    is a :class:`DistributedPoissonLoader`, and the model comes back as ``DDP(torch.compile(model))``
    (a model already wrapped in DDP is compiled as it is). Give ``noise_multiplier``, or
    ``target_epsilon`` with ``epochs`` to have sigma found by the accountant. The accountant is
    ``dp_optimizer.accountant``. ``backend_options`` go to the bk_dp backend (``clipping``, ``clip_fn``,
    ``strategy``, ...); ``adaptive_clipping`` to the optimizer.
    """
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise BKError("the model is already compiled; pass the plain nn.Module, make_private compiles it with bk_dp")
    if (noise_multiplier is None) == (target_epsilon is None):
        raise BKError("give exactly one of noise_multiplier and target_epsilon")
    if target_epsilon is not None and epochs is None:
        raise BKError("target_epsilon needs epochs (how long you will train)")
    dataset = data_loader.dataset
    if not isinstance(dataset, torch.utils.data.TensorDataset) or data_loader.batch_size is None:
        raise BKError("make_private needs a DataLoader over a TensorDataset with a batch_size")
    size = len(dataset)
    sample_rate = data_loader.batch_size / size
    if not 0 < sample_rate <= 1:
        raise BKError(f"batch_size / len(dataset) = {sample_rate} is outside (0, 1]")
    if not 0 < target_delta < 1:
        raise BKError(f"target_delta must be in (0, 1), got {target_delta}")
    if target_delta >= 1 / size:
        warnings.warn(
            f"target_delta={target_delta} >= 1/n = {1 / size:.3g}: such a delta allows leaking one "
            "example in full; use delta well below 1/n",
            stacklevel=2,
        )
    if noise_multiplier is None:  # epochs count the loader's steps, so the target holds for them
        noise_multiplier = get_noise_multiplier(target_epsilon, target_delta, sample_rate, epochs=epochs)
    # In a process group each rank yields its part of one global Poisson batch (the same q and epsilon).
    loader_type = DistributedPoissonLoader if world_size() > 1 else PoissonLoader
    loader = loader_type(*dataset.tensors, sample_rate=sample_rate, generator=generator)
    compiled = torch.compile(model, backend="bk_dp", options={"max_grad_norm": max_grad_norm, **backend_options})
    if world_size() > 1 and not isinstance(model, DistributedDataParallel):
        compiled = DistributedDataParallel(compiled)  # starts from rank 0's parameters on every rank
    dp_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=loader.expected_batch_size,
        sample_rate=sample_rate,
        accountant=PrivacyAccountant(),
        generator=generator,
        adaptive_clipping=adaptive_clipping,
    )
    return compiled, dp_optimizer, loader
