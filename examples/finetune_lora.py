"""Private LoRA fine-tuning of a Llama-style model with the Hugging Face Trainer (bkcompile's DPTrainer).

A tiny Llama config with random weights (nothing is downloaded) learns synthetic sequences of variable length
(a noisy counting pattern, padded per batch); LoRA adapters on every projection are the only
trained parameters. Prints the loss curve and the epsilon spent.

    python examples/finetune_lora.py [--steps 30] [--epsilon 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft
import torch
import transformers

from bkcompile.integrations.transformers import DPTrainer, PrivacyArguments

VOCAB, MAX_LENGTH, PAD = 64, 24, 0


def synthetic_text(count: int, generator: torch.Generator) -> list[dict]:
    """Sequences of lengths 8..MAX_LENGTH counting 1, 2, ..., 8, 1, 2, ... from a random start, with one token in
    ten replaced by a random one (never PAD)."""
    rows = []
    for _ in range(count):
        length = int(torch.randint(8, MAX_LENGTH + 1, (), generator=generator))
        ids = [int(torch.randint(1, 9, (), generator=generator))]
        for _ in range(length - 1):
            noisy = float(torch.rand((), generator=generator)) < 0.1
            ids.append(int(torch.randint(1, VOCAB, (), generator=generator)) if noisy else 1 + ids[-1] % 8)
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def pad_to_max_length(rows: list[dict]) -> dict:
    """One fixed length (MAX_LENGTH) for every batch: the compiled model is traced once."""
    ids = torch.full((len(rows), MAX_LENGTH), PAD)
    labels = torch.full((len(rows), MAX_LENGTH), -100)
    mask = torch.zeros((len(rows), MAX_LENGTH), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(row["input_ids"]), torch.tensor(row["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tiny_llama(width: int) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_LENGTH,
        pad_token_id=PAD,
        use_cache=False,
    )
    model = transformers.LlamaForCausalLM(config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
    return peft.get_peft_model(model, lora)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16, help="micro-batch size")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager"])
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute the layers in the backward")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    data = synthetic_text(args.examples, torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as out:
        trainer = DPTrainer(
            model=tiny_llama(args.width),
            args=transformers.TrainingArguments(
                output_dir=out,
                per_device_train_batch_size=args.batch_size,
                gradient_accumulation_steps=args.accumulation,
                max_steps=args.steps,
                learning_rate=args.lr,
                logging_steps=max(1, args.steps // 10),
                save_strategy="no",
                report_to=[],
                max_grad_norm=0.0,  # each sample is clipped by bk_dp instead
                gradient_checkpointing=args.gradient_checkpointing,
                disable_tqdm=True,
                use_cpu=True,
            ),
            train_dataset=data,
            data_collator=pad_to_max_length,
            privacy=PrivacyArguments(
                target_epsilon=args.epsilon,
                target_delta=1e-5,
                max_grad_norm=1.0,
                seed=0,
                backend_options={"compiler": args.compiler},
            ),
        )
        trainer.train()
    curve = [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log]
    print("step  loss")
    for step, loss in curve:
        print(f"{step:4d}  {loss:.4f}")
    epsilon = trainer.epsilon()
    print(
        f"epsilon = {epsilon:.2f} at delta = 1e-5 after {args.steps} steps "
        f"(noise multiplier {trainer.noise_multiplier:.3f}, sample rate {trainer.sample_rate:.4f})"
    )
    trained = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    return {"curve": curve, "epsilon": epsilon, "trained": trained}


if __name__ == "__main__":
    main()
