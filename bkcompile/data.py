"""Poisson sampling over any map-style Dataset: each example joins a batch independently with probability q.

``PoissonLoader`` is a ``torch.utils.data.DataLoader`` whose batch sampler draws Poisson batches (what the
accountant assumes) from a secret generator; everything else is the DataLoader's own machinery, so a
``collate_fn`` (tokenisation, padding), ``num_workers``, ``pin_memory`` and the other DataLoader options
work as usual. Batches vary in size and may be empty: an empty batch still goes through ``collate_fn``
(it collates two copies of example 0 and keeps zero rows of each per-sample leaf, so shapes past dim 0
and dtypes are right). Coupled to a ``DPOptimizer`` (``make_private`` does it), the loader refuses to hand
out a batch before ``step()`` consumed the previous one: each step is one Poisson sample at rate q.

Poisson sampling of the union of the ranks' data (``DistributedPoissonLoader``): every rank draws the same
global mask from a shared generator and keeps every W-th selected row, so the global batch is exactly the
single-process one and the local batches differ in size by at most one (they may be empty; the batch axis is
dynamic, so an empty local batch runs the compiled graph without a recompile, and every rank still runs its
backward, which DDP's all-reduce needs). The accountant sees the global sample rate.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, IterableDataset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from bkcompile.accountant import steps_per_epoch
from bkcompile.errors import BKError, PrivacyError, SamplingError, run_error
from bkcompile.randomness import secret_generator, shared_generator
from bkcompile.runtime.batch import map_rows, mark_rows_dynamic
from bkcompile.runtime.distributed import world_size
from bkcompile.runtime.draws import note_draw

# DataLoader arguments that choose the samples, which Poisson sampling replaces: (why, fix) of their refusal. Their
# DataLoader defaults (None, and False: no sampler, no batch sampler, no shuffling asked for, no batch dropped)
# describe what Poisson sampling does, and are accepted.
_REFUSED_ARGS = {
    "shuffle": (
        "Poisson sampling draws every batch afresh (each example joins it with probability q, in the dataset's "
        "order), so there is no order to shuffle or keep; that draw is what the accountant's epsilon assumes",
        "leave shuffle out: the batches are random already (drawn from `generator`)",
    ),
    "sampler": (
        "a sampler chooses the examples, and Poisson sampling must choose them (each with probability q) for "
        "the accountant's epsilon to hold",
        "leave sampler out; to train on part of the data pass torch.utils.data.Subset(dataset, indices) (weighted "
        "or repeated sampling has no Poisson accounting here)",
    ),
    "batch_sampler": (
        "a batch sampler forms the batches, and Poisson sampling forms them (each example joins each batch with "
        "probability q)",
        "leave batch_sampler out; give the expected batch size as batch_size=... (or sample_rate=q)",
    ),
    "drop_last": (
        "Poisson batches vary in size by design (Binomial(len(dataset), q), sometimes empty); dropping or "
        "trimming one would change the sampling the accountant assumes",
        "leave drop_last out; step on every batch (an empty one too: optimizer.step() adds its noise) and bound "
        "the memory of a large one with bkcompile.micro_batches(batch, max_size)",
    ),
}


class OneBatchPerStep:
    """The link between a Poisson loader and the DP optimizer that steps its batches.

    The accountant records one Poisson-subsampled step at rate q per ``step()``; two loader batches
    before one step would be a sample of rate about 2q, recorded as q. So a batch may only be drawn
    once the previous one has been stepped.
    """

    def __init__(self) -> None:
        self.pending = False  # a batch was handed out and no step() has consumed it yet
        self.rows = 0  # the rows of that batch

    def draw(self, rows: int) -> None:
        if self.pending:
            raise run_error(
                PrivacyError,
                "a second batch was drawn from the Poisson loader before optimizer.step() consumed the first",
                "the accountant records one step at the loader's sample rate q per step(), and two batches per "
                "step are a sample of rate about 2q",
                "call optimizer.step() once per loader batch (an empty batch too: it adds noise); to accumulate "
                "gradients, split ONE batch with bkcompile.micro_batches(batch, max_size) and run a backward per "
                "micro-batch before the step (to evaluate on the training data, iterate your original DataLoader)",
            )
        self.pending, self.rows = True, rows

    def stepped(self) -> None:
        self.pending = False


class PoissonBatchSampler:
    """Index lists, each index in independently with probability ``sample_rate``; ``steps`` lists per epoch.

    An epoch may start ``skip`` lists in (a resumed run). After each draw the generator's state is queued
    in ``states_after``: data-loader workers prefetch, so the generator runs ahead of the batches handed
    out, and a checkpoint needs the state right after the last batch handed out.
    """

    def __init__(self, size: int, sample_rate: float, steps: int, generator: torch.Generator) -> None:
        self.size, self.sample_rate, self.steps, self.generator = size, sample_rate, steps, generator
        self.part = slice(None)  # which of the drawn indices this loader yields (a rank's share under DDP)
        self.skip = 0
        self.states_after: collections.deque[torch.Tensor] = collections.deque()

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        self.states_after.clear()
        count, self.skip = self.steps - self.skip, 0
        for _ in range(count):
            mask = torch.rand(self.size, generator=self.generator) < self.sample_rate
            self.states_after.append(self.generator.get_state())
            yield mask.nonzero().squeeze(1)[self.part].tolist()


class _Rows(list):
    """A batch a :class:`_TensorRows` collated already: its tensors' rows."""


class _TensorRows(Dataset):
    """A ``TensorDataset`` fetched a batch at a time: each tensor indexed once with the batch's indices, which is
    what ``default_collate`` of the batch's samples gives (their rows stacked), without a Python call per sample."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> _Rows:
        rows = torch.tensor(indices, dtype=torch.long)
        return _Rows(tensor[rows] for tensor in self.dataset.tensors)


class _CollateWithEmpty:
    """``collate_fn`` that also collates an empty batch (zero rows of the collated [example 0, example 0]);
    returns (rows, batch) so that the loader knows each batch's size whatever its structure."""

    def __init__(self, collate_fn: Callable[[list], Any], dataset: Dataset) -> None:
        self.collate_fn, self.dataset = collate_fn, dataset

    def __call__(self, samples: list) -> tuple[int, Any]:
        if isinstance(samples, _Rows):
            return len(samples[0]), list(samples)
        if samples:
            return len(samples), self.collate_fn(samples)
        example = self.dataset[0]
        return 0, map_rows(self.collate_fn([example, example]), 2, lambda leaf: leaf[:0])


class PoissonLoader:
    """Poisson batches over ``dataset`` (any map-style Dataset), or over tensors given directly.

    ``PoissonLoader(dataset, batch_size=B)``, ``PoissonLoader(dataset, sample_rate=q)`` or
    ``PoissonLoader(x, y, sample_rate=q)`` (a ``TensorDataset``). Each example is in each batch with
    probability ``sample_rate`` q = ``batch_size`` / len(dataset), so ``batch_size`` is the *expected* batch
    size: a batch holds Binomial(len(dataset), q) examples, sometimes none. As for a DataLoader, ``dataset``,
    ``batch_size`` (here the expected size, a float) and ``len(loader)`` are there: by default ``len(loader)``
    = ``steps_per_epoch(q)`` = ceil(1/q) batches per epoch. The DataLoader arguments that choose samples
    (``shuffle``, ``sampler``, ``batch_sampler``, ``drop_last``) are refused with a :class:`SamplingError`
    unless they have their DataLoader default (None, False), which asks for nothing Poisson sampling does not do.
    The indices come from ``generator``, or, when none is given, from a generator seeded with OS entropy: the
    batches are secret, as privacy amplification by subsampling assumes, and ``torch.manual_seed`` does not
    touch them. Pass a seeded generator only to reproduce a run (then the seed reveals every batch).
    ``collate_fn`` and ``loader_options`` (``num_workers``, ``pin_memory``, ``worker_init_fn``,
    ``prefetch_factor``, ``persistent_workers``, ``timeout``, ...) go to the underlying DataLoader;
    ``worker_generator`` seeds its workers (not the sampling). Every per-sample tensor of a batch is marked
    dynamic on dim 0, so the compiled model is traced once for all batch sizes.
    """

    def __init__(
        self,
        *data: Dataset | torch.Tensor,
        sample_rate: float | None = None,
        batch_size: float | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        collate_fn: Callable[[list], Any] | None = None,
        worker_generator: torch.Generator | None = None,
        **loader_options: Any,
    ) -> None:
        self.dataset = _as_dataset(data)
        for name, (why, fix) in _REFUSED_ARGS.items():
            value = loader_options.pop(name, None)
            if value is not None and value is not False:
                shown = repr(value) if isinstance(value, (bool, int, float, str)) else f"<{type(value).__name__}>"
                raise run_error(SamplingError, f"PoissonLoader cannot take {name}={shown}", why, fix)
        if (sample_rate is None) == (batch_size is None):
            raise SamplingError(
                "PoissonLoader takes one of sample_rate (q) and batch_size (the expected batch size, "
                f"q * len(dataset)); got sample_rate={sample_rate!r}, batch_size={batch_size!r}"
            )
        if batch_size is not None:
            if (
                isinstance(batch_size, bool)
                or not isinstance(batch_size, (int, float))
                or not 0 < batch_size <= self.dataset_size
            ):
                raise SamplingError(
                    f"batch_size (the expected batch size) must be in (0, len(dataset)] = (0, {self.dataset_size}], "
                    f"got {batch_size!r}"
                )
            sample_rate = batch_size / self.dataset_size
        if not 0 < sample_rate <= 1:
            raise SamplingError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.sample_rate = sample_rate
        self._batch_size = None if batch_size is None else float(batch_size)
        self.steps = steps if steps is not None else steps_per_epoch(sample_rate)
        self.generator = generator if generator is not None else secret_generator()
        self.collate_fn = collate_fn if collate_fn is not None else default_collate
        self.batch_sampler = PoissonBatchSampler(self.dataset_size, sample_rate, self.steps, self.generator)
        # a TensorDataset under the default collate_fn is fetched a batch at a time (the same batches)
        fast = type(self.dataset) is TensorDataset and self.collate_fn is default_collate
        self._loader = torch.utils.data.DataLoader(
            _TensorRows(self.dataset) if fast else self.dataset,
            batch_sampler=self.batch_sampler,
            collate_fn=_CollateWithEmpty(self.collate_fn, self.dataset),
            generator=worker_generator if worker_generator is not None else secret_generator(),
            **loader_options,
        )
        self.step_gate: OneBatchPerStep | None = None
        self._position = 0  # batches handed out in the current epoch
        self._resume_state: torch.Tensor | None = None  # the generator's state after the last batch handed out

    @property
    def dataset_size(self) -> int:
        return len(self.dataset)

    @property
    def expected_batch_size(self) -> float:
        """q * len(dataset): the ``batch_size`` given, or ``sample_rate`` times the dataset's size."""
        return self._batch_size if self._batch_size is not None else self.sample_rate * self.dataset_size

    @property
    def batch_size(self) -> float:
        """The expected batch size (as a DataLoader's ``batch_size``, though each batch's size varies)."""
        return self.expected_batch_size

    @property
    def num_workers(self) -> int:
        return self._loader.num_workers

    @property
    def pin_memory(self) -> bool:
        return self._loader.pin_memory

    def couple(self) -> OneBatchPerStep:
        """The gate a DP optimizer shares with this loader (one batch per step); a loader couples once."""
        if self.step_gate is not None:
            raise BKError("this PoissonLoader already feeds a DP optimizer; make one loader per optimizer")
        self.step_gate = OneBatchPerStep()
        return self.step_gate

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        self._position = self.batch_sampler.skip  # the sampler skips them when the DataLoader starts it
        self._resume_state = self.generator.get_state()
        for rows, batch in self._loader:
            if self.step_gate is not None:
                self.step_gate.draw(rows)
            self._position += 1
            self._resume_state = self.batch_sampler.states_after.popleft()
            note_draw(_tensor_rows(batch, rows), self)
            yield mark_rows_dynamic(batch, rows)
        self._position = 0

    def state_dict(self) -> dict:
        """Where sampling stands: the batches handed out in this epoch and, under ``"secret"``, the sampling
        generator's state right after the last of them (it reveals the coming batches: keep it private)."""
        if self.step_gate is not None and self.step_gate.pending:
            raise BKError(
                "the loader's state was taken between drawing a batch and optimizer.step(); take it after the step "
                "(a checkpoint then holds whole steps)"
            )
        state = self._resume_state if self._position else self.generator.get_state()
        return {"position": self._position, "steps": self.steps, "secret": {"sampling_generator": state.clone()}}

    def load_state_dict(self, state: dict) -> None:
        """Resume sampling: the next iteration yields the rest of the saved epoch, then whole epochs."""
        if state["steps"] != self.steps:
            raise BKError(f"the saved loader took {state['steps']} batches per epoch, this one {self.steps}")
        self.generator.set_state(state["secret"]["sampling_generator"])
        self.batch_sampler.skip = state["position"]
        self._position, self._resume_state = 0, None


def _tensor_rows(batch: Any, rows: int) -> list[torch.Tensor]:
    """The per-sample tensors of a batch."""
    leaves: list[torch.Tensor] = []
    map_rows(batch, rows, lambda leaf: leaves.append(leaf) if isinstance(leaf, torch.Tensor) else None)
    return leaves


def _as_dataset(data: Sequence[Dataset | torch.Tensor]) -> Dataset:
    if len(data) == 1 and isinstance(data[0], Dataset):
        dataset = data[0]
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise BKError(
                f"Poisson sampling needs a map-style Dataset (__getitem__ and __len__), got {type(dataset).__name__}; "
                "fix: load the data into a map-style Dataset (e.g. a Hugging Face Dataset, not an IterableDataset)"
            )
    elif data and all(isinstance(t, torch.Tensor) for t in data):
        if any(t.dim() == 0 or t.shape[0] != data[0].shape[0] for t in data):
            raise BKError("PoissonLoader needs tensors with the same number of rows")
        dataset = TensorDataset(*data)
    else:
        raise BKError("PoissonLoader takes one map-style Dataset, or tensors with the same number of rows")
    if len(dataset) == 0:
        raise BKError("PoissonLoader needs a non-empty dataset")
    return dataset


class DistributedPoissonLoader(PoissonLoader):
    """Poisson sampling of the union of the ranks' data: each rank yields its part of one global batch.

    Every rank passes the same whole dataset (and the same options as to :class:`PoissonLoader`). Each
    step draws one global mask (each of the N examples in with probability ``sample_rate``) from a
    generator shared by all ranks, and rank r keeps the selected examples ``r, r + W, r + 2W, ...``.
    ``expected_batch_size`` is the global ``q * N``; ``state_dict`` (the shared generator and the
    position in the epoch) is the same on every rank.
    """

    def __init__(self, *data: Any, generator: torch.Generator | None = None, **options: Any) -> None:
        super().__init__(*data, generator=shared_generator(generator), **options)  # sample_rate, steps, ...
        if world_size() > 1:
            self.batch_sampler.part = slice(dist.get_rank(), None, world_size())
