"""The Hugging Face Trainer integration (bkcompile.integrations.transformers): Poisson batches split into
micro-batches, one clip per sample and one noise draw per optimizer step, epsilon logged; the example."""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import pathlib
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from helpers import assert_matches
from oracle import clipped_sum
from transformers.modeling_outputs import SequenceClassifierOutput

import bkcompile
from bkcompile.errors import BKError
from bkcompile.integrations.transformers import DPTrainer, PoissonBatchSampler, PrivacyArguments, _reaches

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(20, 8), nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        pooled = (self.embed(input_ids) * attention_mask[..., None]).sum(1)
        return SequenceClassifierOutput(logits=self.head(torch.tanh(pooled)))


def dataset(size: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(size):
        length = 2 + i % 4
        rows.append({"input_ids": torch.randint(0, 20, (length,), generator=g).tolist(), "labels": i % 3})
    return rows


def collate(rows: list[dict]) -> dict:
    ids = torch.zeros(len(rows), 5, dtype=torch.long)
    mask = torch.zeros(len(rows), 5, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        mask[i, : len(row["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([r["labels"] for r in rows])}


def test_poisson_batches_are_split_into_micro_batches() -> None:
    sampler = PoissonBatchSampler(100, 0.2, steps=3, micro_batches=4, generator=torch.Generator().manual_seed(0))
    parts = list(sampler)
    assert len(parts) == len(sampler) == 12
    g = torch.Generator().manual_seed(0)
    for step in range(3):  # the union of a step's micro-batches is that step's Poisson draw, in order
        drawn = (torch.rand(100, generator=g) < 0.2).nonzero().squeeze(1).tolist()
        assert sum(parts[4 * step : 4 * step + 4], []) == drawn


def _trainer(model: nn.Module, data: list[dict], out: str, lr: float, radius: float, **args) -> DPTrainer:
    """A DPTrainer over ``data``: SGD at a constant ``lr``, batches of 4 in 3 micro-batches, no noise, one step."""
    settings = {"max_steps": 1, "lr_scheduler_type": "constant", **args}
    return DPTrainer(
        model=model,
        args=transformers.TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=3,
            learning_rate=lr,
            optim="sgd",
            weight_decay=0.0,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=True,
            **settings,
        ),
        train_dataset=data,
        data_collator=collate,
        privacy=PrivacyArguments(
            noise_multiplier=0.0,
            target_delta=1e-5,
            max_grad_norm=radius,
            seed=3,  # the default compiler (Inductor), the batches marked dynamic
        ),
    )


def test_one_step_with_accumulation_is_the_clipped_sum_of_the_poisson_batch() -> None:
    """noise 0, SGD: the update is -lr * (sum_i C_i g_i) / E over the whole Poisson batch of the step,
    whatever its split into micro-batches (some of which may be empty)."""
    model, data, lr, radius = Classifier().double(), dataset(40), 0.5, 0.05
    before = copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as out:
        trainer = _trainer(model, data, out, lr, radius)
        trainer.train()
    assert trainer.args.max_grad_norm == 0.0  # the Trainer's own clipping of the sum is off
    assert trainer.expected_batch_size == 12 and trainer.sample_rate == pytest.approx(12 / 40)
    drawn = (torch.rand(40, generator=torch.Generator().manual_seed(3)) < 0.3).nonzero().squeeze(1).tolist()
    batch = collate([data[i] for i in drawn])

    class Logits(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, ids, mask):
            return self.inner(ids, mask).logits

    want, norms = clipped_sum(
        Logits(before), F.cross_entropy, (batch["input_ids"], batch["attention_mask"]), (batch["labels"],), radius
    )
    assert (norms > radius).any()
    moved = {k: (before_p - p).detach() * trainer.expected_batch_size / lr for (k, before_p), p in
             zip(before.named_parameters(), model.parameters())}  # fmt: skip
    assert_matches(moved, {k.removeprefix("inner."): v for k, v in want.items()}, torch.float64, tol=1e-8)
    assert trainer.epsilon() == math.inf  # no noise: no privacy, reported as such


def test_train_twice_steps_the_same_dp_optimizer_under_the_trainers_scheduler() -> None:
    """The DPOptimizer is a torch.optim.Optimizer: the Trainer's scheduler drives it directly, accelerate wraps
    it, and a second train() reuses it (no DP optimizer around a DP optimizer)."""
    model, data = Classifier().double(), dataset(40)
    with tempfile.TemporaryDirectory() as out:
        trainer = _trainer(model, data, out, 0.5, 0.05)
        trainer.train()
        optimizer = trainer.dp_optimizer
        assert trainer.lr_scheduler.optimizer is optimizer and isinstance(optimizer, torch.optim.Optimizer)
        assert _reaches(trainer.optimizer, optimizer)
        before = [p.detach().clone() for p in model.parameters()]
        trainer.args.max_steps = 2
        trainer.train()
        assert trainer.dp_optimizer is optimizer and _reaches(trainer.optimizer, optimizer)
        assert trainer.state.global_step == 2
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("given", [{}, {"max_grad_norm": 0.0}, {"max_grad_norm": 0.5}])
def test_turning_off_the_trainers_clipping_warns_only_when_the_user_set_it(given: dict) -> None:
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = DPTrainer(
            model=Classifier(),
            args=transformers.TrainingArguments(output_dir=out, report_to=[], use_cpu=True, **given),
            train_dataset=dataset(8),
            data_collator=collate,
            privacy=PrivacyArguments(noise_multiplier=1.0, target_delta=1e-5, max_grad_norm=0.3),
        )
    ours = [str(w.message) for w in caught if "max_grad_norm" in str(w.message)]
    assert trainer.args.max_grad_norm == 0.0
    if given.get("max_grad_norm"):
        assert ours == [
            "DPTrainer turns off the Trainer's max_grad_norm=0.5: each sample is clipped to "
            "PrivacyArguments.max_grad_norm=0.3 instead"
        ]
    else:  # the Trainer's default (1.0), or clipping already off: nothing to say
        assert ours == []


def test_privacy_arguments_need_one_noise_setting() -> None:
    with pytest.raises(BKError, match="exactly one of target_epsilon and noise_multiplier"):
        PrivacyArguments(target_delta=1e-5)


def test_privacy_arguments_check_the_backend_options() -> None:
    with pytest.raises(bkcompile.OptionError) as info:
        PrivacyArguments(target_delta=1e-5, noise_multiplier=1.0, backend_options={"stratgy": "ghost"})
    assert str(info.value).startswith("unknown option 'stratgy' for backend 'bk_dp' (did you mean 'strategy'?)")


def _example():
    spec = importlib.util.spec_from_file_location("finetune_lora", ROOT / "examples" / "finetune_lora.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_finetune_lora_example_runs() -> None:
    """The README's example, tiny: LoRA on a random Llama, padded variable-length text, epsilon printed."""
    result = _example().main(["--steps", "3", "--examples", "48", "--batch-size", "4", "--width", "16"])
    assert len(result["curve"]) == 3 and all(math.isfinite(loss) for _, loss in result["curve"])
    assert 0 < result["epsilon"] < 8.0


@pytest.mark.slow
def test_gradient_checkpointing_trains_as_without_it() -> None:
    """TrainingArguments(gradient_checkpointing=True): the layers are recomputed in the backward, in graphs cut by
    the checkpointing code; the clipped, noised steps are those of the same seeds without checkpointing (which
    the other tests check against the oracle)."""
    # aot_eager: with against without checkpointing, compiled twice in a fraction of Inductor's time
    args = ["--steps", "2", "--examples", "24", "--batch-size", "3", "--width", "8", "--compiler", "aot_eager"]
    plain = _example().main(args)
    checkpointed = _example().main([*args, "--gradient-checkpointing"])
    assert [loss for _, loss in checkpointed["curve"]] == [loss for _, loss in plain["curve"]]
    assert_matches(checkpointed["trained"], plain["trained"], torch.float32)
