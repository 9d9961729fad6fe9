"""Poisson sampling: secret by default, any map-style Dataset through the DataLoader's own options, one batch
per optimizer step, micro-batches for accumulation."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from oracle import clipped_sum

import bkcompile

OPTIONS = {"compiler": "aot_eager"}


class Sentences(torch.utils.data.Dataset):
    """Token sequences of lengths 1..6 with a label and a text: the shape of a tokenised text dataset."""

    def __init__(self, n: int = 30, vocab: int = 12) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = [
            torch.randint(1, vocab, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g) for _ in range(n)
        ]
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"ids": self.ids[i], "label": int(self.labels[i]), "text": f"sentence {i}"}


def pad(samples: list[dict]) -> dict:
    """Pad to the longest sequence of the batch; the mask marks real tokens."""
    length = max(len(s["ids"]) for s in samples)
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    mask = torch.zeros(len(samples), length, dtype=torch.float64)
    for row, sample in enumerate(samples):
        ids[row, : len(sample["ids"])] = sample["ids"]
        mask[row, : len(sample["ids"])] = 1
    return {
        "ids": ids,
        "mask": mask,
        "label": torch.tensor([s["label"] for s in samples]),
        "text": [s["text"] for s in samples],
    }


class BagOfWords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooled = (self.embed(ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled)


def test_batches_are_secret_by_default() -> None:
    x = torch.arange(200.0)[:, None]
    batches = []
    for _ in range(2):
        torch.manual_seed(0)  # what the quickstart does: it must not decide the batches
        batches.append([b[0].flatten().tolist() for b in bkcompile.PoissonLoader(x, sample_rate=0.2, steps=3)])
    assert batches[0] != batches[1]
    torch.manual_seed(0)
    list(bkcompile.PoissonLoader(x, sample_rate=0.2, steps=3))
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))  # the global generator is neither read nor advanced
    model = nn.Linear(1, 1)
    loaders = []
    for _ in range(2):
        torch.manual_seed(0)
        _, _, loader = bkcompile.make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=40),
            max_grad_norm=1.0,
            target_delta=1e-5,
            noise_multiplier=1.0,
            **OPTIONS,
        )
        loaders.append(next(iter(loader))[0].flatten().tolist())
    assert loaders[0] != loaders[1]


def test_a_seeded_generator_reproduces_the_batches() -> None:
    x = torch.arange(100.0)
    runs = [
        [
            b[0].tolist()
            for b in bkcompile.PoissonLoader(x, sample_rate=0.1, steps=4, generator=torch.Generator().manual_seed(5))
        ]
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("seed", range(5))
def test_inclusions_and_batch_sizes_pass_chi_square(seed: int) -> None:
    stats = pytest.importorskip("scipy.stats")
    n, q, steps = 40, 0.25, 400
    loader = bkcompile.PoissonLoader(
        torch.arange(n), sample_rate=q, steps=steps, generator=torch.Generator().manual_seed(seed)
    )
    counts = torch.zeros(n)
    sizes = torch.zeros(n + 1)
    for (batch,) in loader:
        counts[batch] += 1
        sizes[len(batch)] += 1
    # each example is in Binomial(steps, q) batches, independently of the others
    chi2 = ((counts - steps * q) ** 2 / (steps * q * (1 - q))).sum().item()
    assert stats.chi2.sf(chi2, n) > 1e-3
    # batch sizes are Binomial(n, q): pool the sizes with expected count >= 5
    expected = torch.tensor(stats.binom.pmf(range(n + 1), n, q)) * steps
    keep = expected >= 5
    observed = torch.cat([sizes[keep], sizes[~keep].sum()[None]])
    wanted = torch.cat([expected[keep], expected[~keep].sum()[None]])
    assert stats.chisquare(observed, wanted * observed.sum() / wanted.sum()).pvalue > 1e-3


def test_empty_batches_keep_the_collated_shapes_and_dtypes() -> None:
    loader = bkcompile.PoissonLoader(
        Sentences(), sample_rate=0.01, steps=20, collate_fn=pad, generator=torch.Generator().manual_seed(0)
    )
    empty = [b for b in loader if len(b["label"]) == 0][0]
    first = len(Sentences()[0]["ids"])
    assert empty["ids"].shape == (0, first) and empty["ids"].dtype == torch.long
    assert empty["mask"].shape == (0, first) and empty["mask"].dtype == torch.float64
    assert empty["label"].shape == (0,) and empty["label"].dtype == torch.long
    assert empty["text"] == []
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    tensors = bkcompile.PoissonLoader(x, y, sample_rate=0.01, steps=20, generator=torch.Generator().manual_seed(0))
    ex, ey = [b for b in tensors if len(b[1]) == 0][0]
    assert (ex.shape, ex.dtype, ey.shape, ey.dtype) == ((0, 5), torch.float64, (0,), torch.long)


def test_a_tensor_dataset_fetched_a_batch_at_a_time_gives_the_per_sample_batches() -> None:
    """Under the default collate_fn a TensorDataset's batch is each tensor indexed once; the batches (an empty one
    too) are those of collating the samples one by one, value for value, dtype and shape."""
    from torch.utils.data import default_collate

    x, y = torch.randn(40, 3, 2, dtype=torch.float64), torch.randint(0, 5, (40,))
    batched, per_sample = (
        bkcompile.PoissonLoader(x, y, sample_rate=0.05, steps=30, generator=torch.Generator().manual_seed(2), **kw)
        for kw in ({}, {"collate_fn": lambda samples: default_collate(samples)})
    )
    assert type(batched._loader.dataset).__name__ == "_TensorRows"  # the batched fetch is the one tested
    assert type(per_sample._loader.dataset) is torch.utils.data.TensorDataset
    pairs = list(zip(batched, per_sample, strict=True))
    assert any(len(b[1]) == 0 for b, _ in pairs) and any(len(b[1]) > 1 for b, _ in pairs)
    for fast, slow in pairs:
        assert isinstance(fast, list) and len(fast) == len(slow) == 2
        for a, b in zip(fast, slow):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_map_style_dataset_with_a_padding_collate_fn_trains_as_eager_dp_sgd() -> None:
    torch.manual_seed(0)
    model = BagOfWords().double()
    reference = copy.deepcopy(model)
    lr, expected = 0.5, 6.0
    compiled, optimizer, loader = bkcompile.make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=lr),
        torch.utils.data.DataLoader(Sentences(), batch_size=6, collate_fn=pad),
        max_grad_norm=0.3,
        target_delta=1e-5,
        noise_multiplier=1e-12,  # noise far below the tolerance: the clipped sums are compared
        generator=torch.Generator().manual_seed(2),
        loss_reduction="mean",
        **OPTIONS,
    )
    reference_opt = torch.optim.SGD(reference.parameters(), lr=lr)
    sizes = []
    for batch in loader:
        sizes.append(len(batch["label"]))
        optimizer.zero_grad()
        if sizes[-1]:
            F.cross_entropy(compiled(batch["ids"], batch["mask"]), batch["label"]).backward()
        optimizer.step()
        reference_opt.zero_grad()
        if sizes[-1]:
            summed, _ = clipped_sum(
                reference, F.cross_entropy, (batch["ids"], batch["mask"]), (batch["label"],), max_grad_norm=0.3
            )
            for name, p in reference.named_parameters():
                p.grad = summed[name] / expected
            reference_opt.step()
    assert len(set(sizes)) >= 3  # batch sizes (and padded lengths) vary
    for (name, p), r in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-9, atol=1e-9, msg=name)
    assert optimizer.accountant.history == [[6 / 30, 1e-12, len(loader)]]


def test_workers_and_pinning_carry_over_and_sample_the_same_batches() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(12.0))
    seen = []
    for workers, pin in ((0, False), (2, True)):
        model = nn.Linear(1, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pin_memory without an accelerator warns
            compiled, optimizer, loader = bkcompile.make_private(
                model,
                torch.optim.SGD(model.parameters(), lr=0.1),
                torch.utils.data.DataLoader(data, batch_size=1, num_workers=workers, pin_memory=pin),
                max_grad_norm=1.0,
                target_delta=1e-5,
                noise_multiplier=1.0,
                generator=torch.Generator().manual_seed(4),
                loss_reduction="sum",
                **OPTIONS,
            )
            assert (loader.num_workers, loader.pin_memory) == (workers, pin)
            batches = []
            for (batch,) in loader:
                batches.append(batch.tolist())
                optimizer.zero_grad()
                if len(batch):  # every drawn row is clipped once before the step
                    compiled(batch[:, None]).sum().backward()
                optimizer.step()
        seen.append(batches)
    assert seen[0] == seen[1] and [] in seen[0]


def _make_private(loader: torch.utils.data.DataLoader, **kwargs):
    model = nn.Linear(1, 1)
    return bkcompile.make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        loader,
        max_grad_norm=1.0,
        target_delta=1e-5,
        noise_multiplier=1.0,
        loss_reduction="sum",  # the tests' loss: compiled(batch).sum()
        **OPTIONS,
        **kwargs,
    )


def test_samplers_it_cannot_honour_are_refused_with_the_fix() -> None:
    data = torch.utils.data.TensorDataset(torch.randn(1000, 1))
    subset = torch.utils.data.SubsetRandomSampler(range(200))
    subset_fix = r"(?s)sampler SubsetRandomSampler cannot be honoured.*fix: .*Subset\(dataset"
    with pytest.raises(bkcompile.BKError, match=subset_fix):
        _make_private(torch.utils.data.DataLoader(data, batch_size=10, sampler=subset))
    batches = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(data), 10, drop_last=False)
    with pytest.raises(bkcompile.BKError, match="a batch_sampler cannot be honoured"):
        _make_private(torch.utils.data.DataLoader(data, batch_sampler=batches))
    weighted = torch.utils.data.RandomSampler(data, replacement=True)
    with pytest.raises(bkcompile.BKError, match="RandomSampler cannot be honoured"):
        _make_private(torch.utils.data.DataLoader(data, batch_size=10, sampler=weighted))
    seeded = torch.utils.data.DataLoader(data, batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(0))
    with pytest.raises(bkcompile.BKError, match="(?s)DataLoader has a generator.*fix: drop the DataLoader's generator"):
        _make_private(seeded)
    _make_private(seeded, generator=torch.Generator().manual_seed(0))  # explicit: accepted

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from range(3)

    with pytest.raises(bkcompile.BKError, match="map-style Dataset"):
        _make_private(torch.utils.data.DataLoader(Stream(), batch_size=1))
    with pytest.raises(bkcompile.SamplingError, match="takes one of sample_rate"):
        bkcompile.PoissonLoader(data, sample_rate=0.1, batch_size=10)


def test_it_is_a_dataloader_where_that_is_meaningful() -> None:
    """dataset, batch_size (the expected batch size) and len, as a DataLoader's."""
    data = torch.utils.data.TensorDataset(torch.arange(100.0)[:, None])
    loader = bkcompile.PoissonLoader(data, batch_size=8, generator=torch.Generator().manual_seed(0))
    assert loader.dataset is data
    assert (loader.batch_size, loader.expected_batch_size, loader.sample_rate) == (8.0, 8.0, 0.08)
    batches = [b[0].flatten().tolist() for b in loader]
    assert len(loader) == len(batches) == 13  # ceil(1 / q), as len(DataLoader(data, batch_size=8))
    by_rate = bkcompile.PoissonLoader(data, sample_rate=0.08, generator=torch.Generator().manual_seed(0))
    assert [b[0].flatten().tolist() for b in by_rate] == batches  # the same sampling, given by its rate
    assert bkcompile.PoissonLoader(data, sample_rate=0.25).batch_size == 25.0


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        (
            {"shuffle": True},
            "PoissonLoader cannot take shuffle=True\n"
            "  why: Poisson sampling draws every batch afresh (each example joins it with probability q, in the "
            "dataset's order), so there is no order to shuffle or keep; that draw is what the accountant's epsilon "
            "assumes\n"
            "  fix: leave shuffle out: the batches are random already (drawn from `generator`)",
        ),
        (
            {"sampler": torch.utils.data.SubsetRandomSampler(range(5))},
            "PoissonLoader cannot take sampler=<SubsetRandomSampler>\n"
            "  why: a sampler chooses the examples, and Poisson sampling must choose them (each with probability q) "
            "for the accountant's epsilon to hold\n"
            "  fix: leave sampler out; to train on part of the data pass torch.utils.data.Subset(dataset, indices) "
            "(weighted or repeated sampling has no Poisson accounting here)",
        ),
        (
            {"batch_sampler": torch.utils.data.BatchSampler(range(10), 2, drop_last=False)},
            "PoissonLoader cannot take batch_sampler=<BatchSampler>\n"
            "  why: a batch sampler forms the batches, and Poisson sampling forms them (each example joins each "
            "batch with probability q)\n"
            "  fix: leave batch_sampler out; give the expected batch size as batch_size=... (or sample_rate=q)",
        ),
        (
            {"drop_last": True},
            "PoissonLoader cannot take drop_last=True\n"
            "  why: Poisson batches vary in size by design (Binomial(len(dataset), q), sometimes empty); dropping "
            "or trimming one would change the sampling the accountant assumes\n"
            "  fix: leave drop_last out; step on every batch (an empty one too: optimizer.step() adds its noise) "
            "and bound the memory of a large one with bkcompile.micro_batches(batch, max_size)",
        ),
    ],
)
def test_dataloader_arguments_that_break_poisson_sampling_are_refused_with_the_fix(argument, message) -> None:
    data = torch.utils.data.TensorDataset(torch.randn(10, 1))
    with pytest.raises(bkcompile.SamplingError) as info:
        bkcompile.PoissonLoader(data, batch_size=2, **argument)
    assert str(info.value) == message
    # their DataLoader defaults ask for nothing Poisson sampling does not do
    defaults = {"shuffle": None, "sampler": None, "batch_sampler": None, "drop_last": False}
    assert len(bkcompile.PoissonLoader(data, batch_size=2, **defaults)) == 5


@pytest.mark.parametrize(
    ("rates", "message"),
    [
        ({}, "PoissonLoader takes one of sample_rate (q) and batch_size (the expected batch size, q * len(dataset)); "
             "got sample_rate=None, batch_size=None"),
        ({"batch_size": 11}, "batch_size (the expected batch size) must be in (0, len(dataset)] = (0, 10], got 11"),
        ({"batch_size": "4"}, "batch_size (the expected batch size) must be in (0, len(dataset)] = (0, 10], got '4'"),
    ],
)  # fmt: skip
def test_the_expected_batch_size_is_checked(rates: dict, message: str) -> None:
    with pytest.raises(bkcompile.SamplingError) as info:
        bkcompile.PoissonLoader(torch.randn(10, 1), **rates)
    assert str(info.value) == message


def test_a_second_batch_before_step_is_refused_with_the_fix() -> None:
    compiled, optimizer, loader = _make_private(
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(50, 1)), batch_size=5)
    )

    def train(batch: torch.Tensor) -> None:
        optimizer.zero_grad()
        if len(batch):  # every drawn row is clipped once before the step
            compiled(batch).sum().backward()
        optimizer.step()

    batches = iter(loader)
    (first,) = next(batches)
    with pytest.raises(bkcompile.PrivacyError, match=r"(?s)second batch.*why: .*2q.*fix: .*bkcompile.micro_batches"):
        next(batches)
    batches = iter(loader)  # after the step, a batch per step is fine, across epochs too
    train(first)
    for _ in range(2):
        for (batch,) in loader:
            train(batch)
    assert optimizer.accountant.history == [[0.1, 1.0, 1 + 2 * len(loader)]]


def test_micro_batches_accumulate_one_batch_exactly() -> None:
    torch.manual_seed(3)
    data = torch.utils.data.TensorDataset(torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,)))
    grads = []
    for max_size in (None, 3):
        torch.manual_seed(4)
        model = nn.Linear(5, 3).double()
        loader = bkcompile.PoissonLoader(data, sample_rate=0.3, steps=1, generator=torch.Generator().manual_seed(1))
        compiled = torch.compile(
            model, backend="bk_dp", options={"max_grad_norm": 0.2, "loss_reduction": "mean", **OPTIONS}
        )
        optimizer = bkcompile.DPOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=0.2, data_loader=loader
        )
        for x, y in loader:
            optimizer.zero_grad()
            chunks = [(x, y)] if max_size is None else list(bkcompile.micro_batches((x, y), max_size))
            assert max_size is None or (len(chunks) == -(-len(x) // 3) and sum(len(c[0]) for c in chunks) == len(x))
            for xs, ys in chunks:
                F.cross_entropy(compiled(xs), ys).backward()
            optimizer.step()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert list(bkcompile.micro_batches((torch.zeros(0, 5), torch.zeros(0)), 3)) == []
    text = {"ids": torch.arange(5), "text": list("abcde")}
    assert [c["text"] for c in bkcompile.micro_batches(text, 2)] == [["a", "b"], ["c", "d"], ["e"]]
    with pytest.raises(bkcompile.BKError, match="cannot tell the number of rows"):
        list(bkcompile.micro_batches((torch.zeros(4), torch.zeros(3)), 2))


def test_coupling_takes_the_loaders_rates_and_refuses_disagreement() -> None:
    model = nn.Linear(1, 1)
    loader = bkcompile.PoissonLoader(torch.zeros(20, 1), sample_rate=0.25)

    def optimizer(**kwargs) -> bkcompile.DPOptimizer:
        return bkcompile.DPOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0, **kwargs
        )

    with pytest.raises(bkcompile.BKError, match="sample_rate=0.5 disagrees with the data loader's 0.25"):
        optimizer(data_loader=loader, sample_rate=0.5, accountant=bkcompile.PrivacyAccountant())
    with pytest.raises(bkcompile.BKError, match="needs expected_batch_size"):
        optimizer()
    coupled = optimizer(data_loader=loader, accountant=bkcompile.PrivacyAccountant())
    assert (coupled.sample_rate, coupled.expected_batch_size) == (0.25, 5.0)
    with pytest.raises(bkcompile.BKError, match="already feeds a DP optimizer"):
        optimizer(data_loader=loader)
