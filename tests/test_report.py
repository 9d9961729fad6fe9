"""The printed report is for a person: lines fit 120 columns, parameters and modules carry the user's names, source
cells point to the user's code (else to the module), a measured step stands beside the estimate; every column is
in to_markdown() and to_dict(); the command line takes --compiler and --measure."""

from __future__ import annotations

import inspect
import os
import pathlib
import re
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the transformers model is built from a config

import peft
import pytest
import torch
from torch import nn

import bkcompile
from bkcompile.__main__ import main
from bkcompile.compiler.report import WIDTH, _seconds

FAST = {"compiler": "aot_eager"}
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _fits(report: bkcompile.CostReport) -> None:
    lines = str(report).splitlines()
    assert max(len(line) for line in lines) <= WIDTH == 120, max(lines, key=len)


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.enc(x))


FORWARD_LINE = inspect.getsourcelines(Plain.forward)[1] + 1


def test_a_plain_modules_sources_are_its_forward_line() -> None:
    report = bkcompile.explain(Plain(), torch.randn(5, 4), **FAST)
    _fits(report)
    assert [(r.param, r.module, r.module_type) for r in report.rows] == [
        ("enc.0.weight", "enc.0", "Linear"),
        ("enc.0.bias", "enc.0", "Linear"),
        ("head.weight", "head", "Linear"),
        ("head.bias", "head", "Linear"),
    ]
    where = f"test_report.py:{FORWARD_LINE} in forward: return self.head(self.enc(x))"
    assert all(row.source.endswith(where) for row in report.rows)
    text = str(report)
    assert text.count(where) == 1  # one note for the four rows
    assert re.search(r"^enc\.0\.weight +matmul +T=1 p=4 d=4 +ghost \(faster\) .* \[1\]$", text, re.M)
    assert "bkcompile/compiler/report.py" not in text and "bkcompile_explain" not in text


def test_a_sequentials_sources_are_its_modules_not_bkcompiles_code() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    report = bkcompile.explain(model, torch.randn(5, 4), **FAST)
    _fits(report)
    assert [row.source for row in report.rows] == ["module '0' (Linear)"] * 2 + ["module '2' (Linear)"] * 2
    assert [row.module for row in report.rows] == ["0", "0", "2", "2"]
    text = str(report)
    assert "  [1] module '0' (Linear)\n  [2] module '2' (Linear)" in text
    assert "bkcompile/compiler/report.py" not in text + report.to_markdown() and "bkcompile_explain" not in text
    assert re.fullmatch(r"bk_dp graph #\d+", report.graph)  # no frame of the user's ends the graph


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 8), nn.GELU())
        self.query = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.query(self.encoder(x)).mean(1))


def _lora(model: nn.Module, targets: list[str]) -> nn.Module:
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    return peft.get_peft_model(model, config)


def test_peft_names_are_named_parameters_and_named_modules() -> None:
    model = _lora(Net(), ["query"])
    report = bkcompile.explain(model, torch.randn(4, 3, 8), **FAST)
    _fits(report)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert (
        [row.param for row in report.rows]
        == trainable
        == [
            "base_model.model.query.lora_A.default.weight",
            "base_model.model.query.lora_B.default.weight",
        ]
    )
    assert [row.module for row in report.rows] == [
        "base_model.model.query.lora_A.default",
        "base_model.model.query.lora_B.default",
    ]
    assert all(row.module in dict(model.named_modules()) for row in report.rows)
    assert all(row.source.startswith("peft/tuners/lora/layer.py:") for row in report.rows)
    assert "__dict__" not in str(report) + report.to_markdown()
    assert "| base_model.model.query.lora_A.default (Linear) |" in report.to_markdown()


@pytest.mark.slow  # a transformers model
def test_peft_lora_on_bert_fits_and_names_the_attention_modules() -> None:
    import transformers

    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    model = _lora(transformers.BertForSequenceClassification(config), ["query", "value"])
    report = bkcompile.explain(model, torch.randint(0, 50, (4, 8)), **FAST)
    _fits(report)
    prefix = "base_model.model.bert.encoder.layer.0.attention.self."
    assert [row.module for row in report.rows] == [
        prefix + "query.lora_A.default",
        prefix + "query.lora_B.default",
        prefix + "value.lora_A.default",
        prefix + "value.lora_B.default",
    ]
    assert [row.param for row in report.rows] == [n for n, p in model.named_parameters() if p.requires_grad]
    text = str(report)
    # the 80-character names are wrapped after a dot in their column
    assert re.search(r"^base_model\.model\.bert\.encoder\.layer\.0\. +matmul", text, re.M)
    assert re.search(r"^attention\.self\.query\.lora_A\.default\. *$", text, re.M)
    assert "peft/tuners/lora/layer.py:" in text


def test_measure_times_a_private_step_against_a_non_private_one() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    report = bkcompile.explain(model, torch.randn(6, 4), measure=True, **FAST)  # no loss_reduction: the step's
    assert report.loss_scale.startswith("unknown: the loss is computed outside")  # sum is timed, the report kept
    measured = report.measured
    assert measured.compiler == "aot_eager" and measured.steps == 5
    assert measured.private_s > 0 and measured.non_private_s > 0
    assert measured.ratio == measured.private_s / measured.non_private_s
    assert measured.overhead == measured.ratio - 1
    data = report.to_dict()["measured"]
    assert data == {
        "private_s": measured.private_s,
        "non_private_s": measured.non_private_s,
        "steps": 5,
        "compiler": "aot_eager",
        "ratio": measured.ratio,
        "overhead": measured.overhead,
    }
    _fits(report)
    text = " ".join(str(report).split())  # wrapped lines joined
    assert (
        f"measured forward+backward (aot_eager, median of 5): private {_seconds(measured.private_s)}, non-private "
        f"{_seconds(measured.non_private_s)}: {measured.ratio:.2f}x, overhead {100 * measured.overhead:.1f}% "
        f"(predicted {100 * report.overhead:.1f}%: private "
        f"{_seconds(report.non_private_predicted_s + report.predicted_s)}, non-private "
        f"{_seconds(report.non_private_predicted_s)})"
    ) in text
    # the graph privatized last is the timed one (loss_reduction="sum"): the same sites
    assert bkcompile.last_report().rows == report.rows and bkcompile.last_report() is not report
    assert bkcompile.explain(nn.Linear(4, 2), torch.randn(6, 4), **FAST).measured is None


def test_command_line_takes_compiler_and_measure(capsys: pytest.CaptureFixture) -> None:
    factory = f"{ROOT / 'examples' / 'models.py'}:small_cnn"
    argv = ["explain", factory, "--input-shape", "2,3,8,8", "--compiler", "aot_eager"]
    assert main([*argv, "--measure"]) == 0
    out = capsys.readouterr().out
    assert "compiler='aot_eager'" in out and "measured forward+backward (aot_eager, median of 5): private " in out
    assert max(len(line) for line in out.splitlines()) <= 120
    with pytest.raises(SystemExit, match=re.escape("--compiler aot_eager and --option compiler='inductor' disagree")):
        main([*argv, "--option", "compiler='inductor'"])


@pytest.mark.slow  # a fresh interpreter: the README shows the first graph of a process
def test_the_readmes_example_output_is_what_the_command_prints() -> None:
    section = (ROOT / "README.md").read_text().split("## Cost model and report", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"```bash\npython -m bkcompile (explain .*?) \[", section).group(1).split()
    shown = re.search(r"```text\n(.*?)```", section, re.S).group(1).splitlines()
    done = subprocess.run(
        [sys.executable, "-m", "bkcompile", *command], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-2000:]
    printed = done.stdout.splitlines()
    at = 0
    for line in shown:  # in order; "..." stands for lines left out
        if line.strip() != "...":
            assert line in printed[at:], f"the README shows {line!r}; printed:\n{done.stdout}"
            at = printed.index(line, at) + 1
