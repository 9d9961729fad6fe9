"""Dynamo's source strings become the user's dotted names (what ``named_modules()``/``named_parameters()`` say), and
the errors name modules that way: under peft, in a container, in ``nn.Sequential``."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import peft
import pytest
import torch
from helpers import raises_bk
from torch import nn

import bkcompile
from bkcompile.names import user_path

OPTIONS = {"max_grad_norm": 1.0, "compiler": "aot_eager", "loss_reduction": "sum"}  # _train_step's loss

# what torch 2.13's dynamo writes: parameters' sources (grapharg.source.name) and nn_module_stack paths
SOURCES = [
    ("L['self']._modules['fc']._parameters['weight']", "fc.weight"),
    ("L['self']._modules['layers']._modules['0']._parameters['bias']", "layers.0.bias"),
    ("L['self']._modules['heads']._modules['b-c']._parameters['weight']", "heads.b-c.weight"),
    ("L['self']._modules['emb']._buffers['position_ids']", "emb.position_ids"),
    ("L['self']._parameters['scale']", "scale"),
    ("L['self'].encoder.layer.0.attention", "encoder.layer.0.attention"),
    ("L['self'].heads.b-c", "heads.b-c"),
    ("L['fn'].0", "0"),  # torch.compile(nn.Sequential(...))
    ("L['model']", ""),  # the root module
    # peft reaches its wrapped model through its __getattr__, which dynamo reads in the instance dictionary
    (
        "L['model'].__dict__['_modules']['base_model'].__dict__['_modules']['model'].bert.encoder.layer.0"
        ".attention.self.query.lora_A.default",
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default",
    ),
    (
        "G['pm'].__dict__['_modules']['base_model'].__dict__['_modules']['model']._modules['classifier']"
        "._parameters['weight']",
        "base_model.model.classifier.weight",
    ),
    # a model passed in a container: the names are the model's own
    ("L['ms'][0].model", "model"),
    ("L['args'][0]._modules['fc']._parameters['weight']", "fc.weight"),
    ("G['d']['m']._modules['md']._modules['k']._parameters['weight']", "md.k.weight"),
    # dynamo's function forms of an attribute that is no identifier, and of an item
    ("getattr(getattr(L['self'], 'a-b'), 'c d').w", "a-b.c d.w"),
    ("object.__getattribute__(L['self'], 'fc').weight", "fc.weight"),
    ("list.__getitem__(L['self'].layers, 2).fc", "layers.2.fc"),
    ("dict.__getitem__(L['self'].heads, 'x').w", "heads.x.w"),
    ("encoder.layer.0", "encoder.layer.0"),  # a dotted name already
    ("weird(thing)", "weird(thing)"),  # no form it knows: unchanged
]


@pytest.mark.parametrize(("source", "name"), SOURCES)
def test_source_strings_become_the_users_names(source: str, name: str) -> None:
    assert user_path(source) == name


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.bn(self.fc(x)))


def _train_step(fn, *args) -> None:
    compiled = torch.compile(fn, backend="bk_dp", options=OPTIONS)
    compiled(*args).sum().backward()


def test_errors_name_a_module_under_peft_as_named_modules_does() -> None:
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["fc"]))
    assert "base_model.model.bn" in dict(model.named_modules())
    with raises_bk(
        bkcompile.PrivacyError,
        "(in module 'base_model.model.bn' (BatchNorm1d))",
        "it writes the buffer 'base_model.model.bn.running_mean' from the batch",
    ):
        _train_step(model, torch.randn(8, 4))


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))

    def forward(self, x):
        return self.model(x)


def test_errors_name_a_module_of_a_model_passed_in_a_list() -> None:
    with raises_bk(bkcompile.PrivacyError, "(in module 'model.1' (BatchNorm1d))", "buffer 'model.1.running_mean'"):
        _train_step(lambda models, x: models[0](x), [Wrapper()], torch.randn(8, 4))
