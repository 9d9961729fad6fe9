"""Differentially private fine-tuning with the Hugging Face ``Trainer``: :class:`DPTrainer`.

It is a ``transformers.Trainer`` that

- compiles the model with ``bk_dp`` (per-sample clipping in the backward),
- samples each optimizer step's batch by Poisson sampling (each example in with probability q = logical batch
  size / dataset size) and splits it into ``gradient_accumulation_steps`` micro-batches, so accumulation stays
  one sampled batch, one clip per sample and one noise draw per step,
- wraps the optimizer in :class:`bkcompile.DPOptimizer` (noise, division by the expected batch size) with a
  PRV accountant, and logs epsilon with the other metrics,
- computes a per-sample loss outside the model (each sample's mean token loss), since the models' own loss
  (a token mean over the whole batch) is not a per-sample loss.

A user's script changes its ``Trainer`` to ``DPTrainer`` and passes :class:`PrivacyArguments`. The Trainer's
own gradient clipping (``max_grad_norm``) is turned off: clipping the summed gradient before the noise would
not be private, and every sample is clipped already (a warning says so when the user set ``max_grad_norm``,
i.e. it is not the ``TrainingArguments`` default).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
import transformers

from bkcompile.accountant import PrivacyAccountant, get_noise_multiplier, steps_per_epoch
from bkcompile.compiler.options import parse_options
from bkcompile.errors import BKError, OptionError
from bkcompile.optimizer import DPOptimizer
from bkcompile.runtime.batch import mark_batch_dynamic

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class PrivacyArguments:
    """The privacy side of training: (target_epsilon or noise_multiplier), target_delta, max_grad_norm.

    ``target_epsilon`` calibrates the noise for the Trainer's ``num_train_epochs`` (or ``max_steps``).
    ``seed`` seeds sampling and noise (None: OS entropy). ``backend_options`` go to ``bk_dp``
    (``clipping``, ``strategy``, ...), checked here (a bad one is an :class:`~bkcompile.OptionError`). They do not
    set ``loss_reduction``: :class:`DPTrainer` computes the loss itself, a mean of per-sample losses, and says so.
    """

    target_delta: float
    max_grad_norm: float = 1.0
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    seed: int | None = None
    backend_options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise BKError("PrivacyArguments needs exactly one of target_epsilon and noise_multiplier")
        if not 0 < self.target_delta < 1 or self.max_grad_norm <= 0:
            raise BKError("PrivacyArguments needs 0 < target_delta < 1 and max_grad_norm > 0")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise BKError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        parse_options({"max_grad_norm": self.max_grad_norm, **self.backend_options})
        if self.backend_options.get("loss_reduction", "mean") != "mean":
            raise OptionError(
                f"backend_options loss_reduction={self.backend_options['loss_reduction']!r}: DPTrainer computes the "
                "loss itself, a mean over the batch of per-sample losses (loss_fn), and sets loss_reduction='mean'. "
                "Fix: leave loss_reduction out"
            )


def _default(args: transformers.TrainingArguments, name: str) -> Any:
    """The default of one of the training arguments (of the class the user's arguments are)."""
    return next(field.default for field in dataclasses.fields(args) if field.name == name)


class PoissonBatchSampler(torch.utils.data.Sampler):
    """Index lists of micro-batches: per step, a Poisson batch (each index in with probability ``sample_rate``)
    split into ``micro_batches`` consecutive parts (some possibly empty). ``len`` counts micro-batches."""

    def __init__(
        self, size: int, sample_rate: float, steps: int, micro_batches: int, generator: torch.Generator
    ) -> None:
        self.size, self.sample_rate, self.steps = size, sample_rate, steps
        self.micro_batches, self.generator = micro_batches, generator

    def __len__(self) -> int:
        return self.steps * self.micro_batches

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            chosen = (torch.rand(self.size, generator=self.generator) < self.sample_rate).nonzero().squeeze(1)
            for part in torch.tensor_split(chosen, self.micro_batches):
                yield part.tolist()


def _collate_with(collate: Callable) -> Callable:
    """``collate``, with an empty micro-batch as ``{}`` and the batch dim of every tensor marked dynamic."""

    def collate_batch(samples: list) -> dict:
        if not samples:
            return {}
        batch = collate(samples)
        mark_batch_dynamic(*[v for v in batch.values() if isinstance(v, torch.Tensor)])
        return batch

    return collate_batch


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) losses: a causal LM's mean next-token loss over each sample's labelled tokens (labels (B, T)),
    or a classifier's cross entropy (labels (B,))."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the loss in float32 at least
    if labels.dim() == 1:
        return F.cross_entropy(logits, labels, reduction="none")
    logits, labels = logits[:, :-1], labels[:, 1:]
    tokens = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    counts = (labels != IGNORE_INDEX).sum(1).clamp(min=1)
    return tokens.sum(1) / counts


class _Logits(torch.nn.Module):
    """The model called with keyword tensors, returning its logits (what bk_dp compiles)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs).logits


def _reaches(optimizer: Any, target: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is ``target`` or wraps it (accelerate's ``AcceleratedOptimizer.optimizer``)."""
    while optimizer is not None:
        if optimizer is target:
            return True
        optimizer = getattr(optimizer, "optimizer", None)
    return False


class DPTrainer(transformers.Trainer):
    """``transformers.Trainer`` with DP-SGD: see the module docstring. ``loss_fn(logits, labels) -> (B,)`` gives
    each sample's loss (default :func:`per_sample_loss`)."""

    def __init__(
        self,
        *args: Any,
        privacy: PrivacyArguments,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = per_sample_loss,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.args.max_grad_norm:
            if self.args.max_grad_norm != _default(self.args, "max_grad_norm"):  # set by the user: say so
                warnings.warn(
                    f"DPTrainer turns off the Trainer's max_grad_norm={self.args.max_grad_norm}: each sample is "
                    f"clipped to PrivacyArguments.max_grad_norm={privacy.max_grad_norm} instead",
                    stacklevel=2,
                )
            self.args.max_grad_norm = 0.0
        self.privacy, self.loss_fn = privacy, loss_fn
        self.generator = torch.Generator()
        if privacy.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(privacy.seed)
        size = len(self.train_dataset)
        self.micro_batches = self.args.gradient_accumulation_steps
        self.expected_batch_size = float(self.args.per_device_train_batch_size * self.micro_batches)
        self.sample_rate = min(1.0, self.expected_batch_size / size)
        self.steps_per_epoch = steps_per_epoch(self.sample_rate)
        self.noise_multiplier = (
            privacy.noise_multiplier
            if privacy.noise_multiplier is not None
            else get_noise_multiplier(
                privacy.target_epsilon, privacy.target_delta, self.sample_rate, steps=self._planned_steps()
            )
        )
        # no noise, no privacy: nothing to account (epsilon is infinite)
        self.accountant = PrivacyAccountant() if self.noise_multiplier > 0 else None
        self.dp_optimizer: DPOptimizer | None = None
        self._compiled: dict[int, torch.nn.Module] = {}

    def _planned_steps(self) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        return math.ceil(self.args.num_train_epochs * self.steps_per_epoch)

    # --- data: Poisson batches split into micro-batches --------------------------------------------------------

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        dataset = self.train_dataset
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise BKError("DPTrainer samples examples by index: give a map-style train_dataset (with len)")
        self._set_signature_columns_if_needed()
        if "labels" not in self._signature_columns:  # the loss is computed here, not by the model
            self._signature_columns.append("labels")
        collate = self._get_collator_with_removed_columns(self.data_collator, description="training")
        if hasattr(dataset, "column_names"):  # a datasets.Dataset: drop the columns the model does not take
            dataset = self._remove_unused_columns(dataset, description="training")
        sampler = PoissonBatchSampler(
            len(dataset), self.sample_rate, self.steps_per_epoch, self.micro_batches, self.generator
        )
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=_collate_with(collate))

    # --- optimizer: DPOptimizer around the Trainer's own --------------------------------------------------------

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:  # transformers 5 adds a model argument
        inner = super().create_optimizer(*args, **kwargs)  # from a second train() on: accelerate's wrapper of ours
        if self.dp_optimizer is not None and _reaches(inner, self.dp_optimizer):
            return inner
        if self.dp_optimizer is None or inner is not self.dp_optimizer.optimizer:
            self.dp_optimizer = DPOptimizer(
                inner,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.privacy.max_grad_norm,
                expected_batch_size=self.expected_batch_size,
                sample_rate=self.sample_rate,
                accountant=self.accountant,
                generator=self.generator,
            )
        self.optimizer = self.dp_optimizer  # a torch.optim.Optimizer: the Trainer and its scheduler step it
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        if self.dp_optimizer is None:
            self.create_optimizer()
        return super().create_scheduler(num_training_steps, optimizer=self.dp_optimizer)

    # --- the step: a per-sample loss through the bk_dp-compiled model -------------------------------------------

    def _compiled_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if id(model) not in self._compiled:
            options = {
                "max_grad_norm": self.privacy.max_grad_norm,
                "expected_batch_size": self.expected_batch_size,
                **self.privacy.backend_options,
                "loss_reduction": "mean",  # compute_loss: a mean over the batch of per-sample losses
            }
            self._compiled[id(model)] = torch.compile(_Logits(model), backend="bk_dp", options=options)
        return self._compiled[id(model)]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ARG002
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        logits = self._compiled_model(model)(**inputs)
        loss = self.loss_fn(logits, labels).mean()  # a mean of per-sample losses (bk_dp's loss_reduction)
        return (loss, logits) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: ARG002
        """One micro-batch: forward, per-sample loss, bk_dp backward (its clipped sum adds to p.grad). An empty
        micro-batch adds nothing; the step still adds noise."""
        model.train()
        if not inputs:
            return torch.zeros((), device=self.args.device)
        loss = self.compute_loss(model, self._prepare_inputs(inputs))
        loss.backward()
        return loss.detach() / self.current_gradient_accumulation_steps

    # --- logging ---------------------------------------------------------------------------------------------

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> None:  # noqa: ARG002
        """Not logged: the norm of the clipped sum before the noise would release un-noised data."""
        return None

    def epsilon(self) -> float:
        """The epsilon spent so far at ``target_delta`` (0 before the first step; infinite without noise)."""
        if self.accountant is None:
            return math.inf
        if not self.accountant.history:
            return 0.0
        return self.accountant.get_epsilon(self.privacy.target_delta)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        super().log({**logs, "epsilon": self.epsilon()}, *args, **kwargs)
