"""Poisson sampling: each example joins a batch independently with probability q (what accountants assume)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from bkcompile.accountant import steps_per_epoch
from bkcompile.batch import mark_batch_dynamic
from bkcompile.errors import BKError


class PoissonLoader:
    """Batches of tensors ``(x[idx], y[idx], ...)`` where each row is in with probability ``sample_rate``.

    Batch sizes vary and may be 0; by default ``len(loader)`` = ``steps_per_epoch(q)`` = ceil(1/q) steps.
    Every batch is marked dynamic on dim 0, so the compiled model is traced once for all sizes.
    """

    def __init__(
        self,
        *tensors: torch.Tensor,
        sample_rate: float,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if not tensors or any(t.shape[0] != tensors[0].shape[0] for t in tensors):
            raise BKError("PoissonLoader needs tensors with the same number of rows")
        if not 0 < sample_rate <= 1:
            raise BKError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.tensors = tensors
        self.sample_rate = sample_rate
        self.steps = steps if steps is not None else steps_per_epoch(sample_rate)
        self.generator = generator

    @property
    def dataset_size(self) -> int:
        return self.tensors[0].shape[0]

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.dataset_size

    def __len__(self) -> int:
        return self.steps

    def sample_indices(self) -> torch.Tensor:
        """The rows of one batch: each row in with probability ``sample_rate``."""
        mask = torch.rand(self.dataset_size, generator=self.generator) < self.sample_rate
        return mask.nonzero().squeeze(1)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for _ in range(self.steps):
            index = self.sample_indices()
            batch = tuple(t[index] for t in self.tensors)
            mark_batch_dynamic(*batch)
            yield batch
