"""make_private: the compiled model, the DP optimizer and the Poisson loader, in the shape Opacus users know."""

from __future__ import annotations

import warnings

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

from bkcompile.accountant import PrivacyAccountant, get_noise_multiplier
from bkcompile.compiler.options import LossReduction, parse_options
from bkcompile.data import DistributedPoissonLoader, PoissonLoader
from bkcompile.errors import BKError, SamplingError, run_error
from bkcompile.optimizer import AdaptiveClipping, DPOptimizer
from bkcompile.randomness import child_generators
from bkcompile.runtime.distributed import is_fully_sharded, world_size
from bkcompile.runtime.ledger import know_module


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: torch.utils.data.DataLoader,
    *,
    max_grad_norm: float,
    target_delta: float,
    loss_reduction: LossReduction = "auto",
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    epochs: float | None = None,
    generator: torch.Generator | None = None,
    adaptive_clipping: AdaptiveClipping | None = None,
    **backend_options,
) -> tuple[torch.nn.Module, DPOptimizer, PoissonLoader]:
    """Compile ``model`` with bk_dp, wrap ``optimizer``, and replace ``data_loader`` by Poisson sampling.

    ``data_loader`` is a DataLoader over any map-style Dataset (``__getitem__`` and ``__len__``: a
    ``TensorDataset``, a Hugging Face dataset, your own); its ``batch_size`` becomes the expected batch
    size (sample rate q = batch_size / len(dataset)), and its ``collate_fn``, ``num_workers``,
    ``pin_memory`` and worker options carry over. Its sampling is replaced: a ``sampler`` or
    ``batch_sampler`` of your own is refused (subset the dataset instead), ``shuffle`` and ``drop_last`` do
    not apply. Batches and noise are drawn from two generators seeded from ``generator`` or, by default,
    from OS entropy (secret); a seeded ``generator`` reproduces a run, with or without workers, and reveals
    its batches and noise to whoever knows the seed.
    The returned loader and optimizer are coupled: one batch per ``optimizer.step()``.

    ``loss_reduction`` is how your loss reduces over the batch, "mean" (``F.cross_entropy``'s default) or "sum":
    required when you compute the loss outside the model (``F.cross_entropy(model(x), y)``), where bk_dp cannot
    see it. Left "auto", such a model is refused (:class:`~bkcompile.LossReductionError`) when it compiles, at its
    first forward (a model dynamo cuts into pieces: at the end of its first backward), never guessed: Opacus's
    default "mean" would guess. A loss the model returns is recognised from its own reduction.

    Give ``noise_multiplier``, or ``target_epsilon`` with ``epochs`` to have sigma found by the
    accountant. The accountant is ``dp_optimizer.accountant``. ``backend_options`` go to the bk_dp
    backend (``clipping``, ``clip_fn``, ``strategy``, ``mode``, ...), checked before anything else (a bad
    one is an :class:`~bkcompile.OptionError` here); ``adaptive_clipping`` goes to the optimizer.

    Under torchrun (an initialised process group) every rank passes the whole dataset: ``batch_size`` is
    the global expected batch, the loader is a :class:`DistributedPoissonLoader` (each rank's part of
    one global Poisson batch: the same q and epsilon as one process), and the model comes back as
    ``DDP(torch.compile(model))`` (a model already wrapped in DDP is compiled as it is).
    """
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise BKError("the model is already compiled; pass the plain nn.Module, make_private compiles it with bk_dp")
    options = {"max_grad_norm": max_grad_norm, "loss_reduction": loss_reduction, **backend_options}
    parse_options(options)  # here, not at the first forward
    if (noise_multiplier is None) == (target_epsilon is None):
        raise BKError("give exactly one of noise_multiplier and target_epsilon")
    if target_epsilon is not None and epochs is None:
        raise BKError("target_epsilon needs epochs (how long you will train)")
    _check_sampling(data_loader, generator)
    dataset = data_loader.dataset
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
    sampling, noise = child_generators(generator, 2)
    loader_type = DistributedPoissonLoader if world_size() > 1 else PoissonLoader
    loader = loader_type(
        dataset,
        sample_rate=sample_rate,
        generator=sampling,
        collate_fn=data_loader.collate_fn,
        worker_generator=data_loader.generator,
        **_worker_options(data_loader),
    )
    know_module(model.module if isinstance(model, DistributedDataParallel) else model)  # eager runs are refused
    compiled = torch.compile(model, backend="bk_dp", options=options)
    if world_size() > 1 and not isinstance(model, DistributedDataParallel) and not is_fully_sharded(model):
        compiled = DistributedDataParallel(compiled)  # starts from rank 0's parameters on every rank
    dp_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        accountant=PrivacyAccountant(),
        generator=noise,
        adaptive_clipping=adaptive_clipping,
        data_loader=loader,
    )
    return compiled, dp_optimizer, loader


def _check_sampling(data_loader: torch.utils.data.DataLoader, generator: torch.Generator | None) -> None:
    """Refuse the DataLoader sampling choices that Poisson sampling cannot honour (never drop them silently)."""
    if isinstance(data_loader.dataset, torch.utils.data.IterableDataset):
        raise BKError(
            "make_private needs a DataLoader over a map-style Dataset (__getitem__ and __len__), got an "
            f"IterableDataset ({type(data_loader.dataset).__name__}); Poisson sampling picks examples by index"
        )
    if data_loader.batch_size is None:
        raise run_error(
            SamplingError,
            "make_private needs a DataLoader with a batch_size (the expected batch size of Poisson sampling); "
            "a batch_sampler cannot be honoured",
            "Poisson sampling forms the batches",
            "build the DataLoader with batch_size=... instead",
        )
    sampler = data_loader.sampler
    default = type(sampler) is SequentialSampler or (
        type(sampler) is RandomSampler and not sampler.replacement and sampler._num_samples is None
    )
    if not default:
        raise run_error(
            SamplingError,
            f"the DataLoader's sampler {type(sampler).__name__} cannot be honoured",
            "Poisson sampling draws every example of the dataset with probability batch_size / len(dataset)",
            "to train on a subset, pass torch.utils.data.Subset(dataset, indices) as the dataset and drop the "
            "sampler; weighted or repeated sampling has no Poisson accounting here",
        )
    if type(data_loader.batch_sampler) is not BatchSampler or data_loader.batch_sampler.sampler is not sampler:
        raise run_error(
            SamplingError,
            f"the DataLoader's batch_sampler {type(data_loader.batch_sampler).__name__} cannot be honoured",
            "Poisson sampling forms the batches",
            "build the DataLoader with batch_size=... and no batch_sampler",
        )
    if data_loader.generator is not None and generator is None:
        raise run_error(
            BKError,
            "the DataLoader has a generator, and make_private samples batches from a secret OS-entropy generator "
            "unless given one",
            "the DataLoader's generator would not choose the batches, so a seed set there would not reproduce them",
            "drop the DataLoader's generator (secret sampling, the private choice), or pass generator=... to "
            "make_private to reproduce a run (whoever knows its seed knows every batch)",
        )


def _worker_options(data_loader: torch.utils.data.DataLoader) -> dict:
    """The DataLoader's options that do not choose samples (workers, pinning), to carry over."""
    options = {
        "num_workers": data_loader.num_workers,
        "pin_memory": data_loader.pin_memory,
        "timeout": data_loader.timeout,
        "worker_init_fn": data_loader.worker_init_fn,
        "multiprocessing_context": data_loader.multiprocessing_context,
        "persistent_workers": data_loader.persistent_workers,
        "pin_memory_device": data_loader.pin_memory_device,
        "in_order": data_loader.in_order,
    }
    if data_loader.num_workers > 0:
        options["prefetch_factor"] = data_loader.prefetch_factor
    return options
