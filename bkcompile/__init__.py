"""bkcompile: differentially private training of any PyTorch model through ``torch.compile``.

``bkcompile.compile(model, max_grad_norm=1.0, loss_reduction="mean")`` (``torch.compile(model, backend="bk_dp",
options={...})`` with the options checked first) makes ``loss.backward()`` produce the sum of per-sample-clipped
gradients (DP-SGD's clipping, book-keeping style); ``loss_reduction`` says how a loss computed outside the model
reduces over the batch.
"""

import torch
from torch._dynamo.backends import registry as _registry

from bkcompile.accountant import AccountingError, PrivacyAccountant, get_noise_multiplier
from bkcompile.checkpoint import load_checkpoint, save_checkpoint
from bkcompile.compiler import rules
from bkcompile.compiler.backend import bk_dp, compile
from bkcompile.compiler.calibration import calibrate
from bkcompile.compiler.options import BKOptions
from bkcompile.compiler.report import CostReport, explain, last_report
from bkcompile.data import DistributedPoissonLoader, PoissonLoader
from bkcompile.errors import (
    BKError,
    ClipOnceError,
    InternalError,
    LossReductionError,
    NotSupportedYetError,
    OptionError,
    PrivacyError,
    ReleaseError,
    SampleMixingError,
    SamplingError,
    UnclippedGradientError,
    UnsupportedOpError,
)
from bkcompile.optimizer import AdaptiveClipping, DPOptimizer, StepRelease
from bkcompile.passes.ops import register_batch_rule
from bkcompile.private import make_private
from bkcompile.runtime.batch import mark_batch_dynamic, micro_batches
from bkcompile.runtime.deferred import last_clip_spans
from bkcompile.runtime.ledger import last_per_sample_norms

# Dynamo skips a frame that calls nn.RNN/GRU/LSTM unless allow_rnn is set, running it eagerly: bk_dp would
# never see it and its gradients would not be clipped. Trace them (their ops are then privatized or refused).
torch._dynamo.config.allow_rnn = True
# Past its recompile limit dynamo would also run a frame eagerly (unclipped): make it an error instead.
torch._dynamo.config.fail_on_recompile_limit_hit = True
# Under DDP dynamo would split the graph at DDP's bucket boundaries (to overlap the all-reduce with the
# backward); all-layer clipping needs every norm before any clipped sum, so a split gains no overlap and
# each piece would clip alone (refused). One graph, with DDP's reducer all-reducing its gradients.
torch._dynamo.config.optimize_ddp = False
# A Python side effect inside torch.utils.checkpoint breaks the graph there unless dynamo may skip replaying it in
# the backward's recompute: the checkpointed layers then run eagerly between the graphs (refused, their rows
# unproven). transformers >= 5.25 sets and resets a module global in every attention forward (the `kernels`
# package's use_kernelized_func), so HF gradient checkpointing needs this. The recompute is the compiled graph's
# own, so the gradients are those of the forward traced once; only a Python side effect is not applied again.
torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True

# The torch_dynamo_backends entry point registers bk_dp when torch.compile first looks it up; register
# here only when that has not happened (a plain ``import bkcompile`` before any lookup).
if "bk_dp" not in _registry._BACKENDS:
    _registry.register_backend(bk_dp, name="bk_dp")

__all__ = [
    "AccountingError",
    "AdaptiveClipping",
    "DPOptimizer",
    "DistributedPoissonLoader",
    "PoissonLoader",
    "PrivacyAccountant",
    "StepRelease",
    "get_noise_multiplier",
    "make_private",
    "BKError",
    "BKOptions",
    "ClipOnceError",
    "CostReport",
    "InternalError",
    "LossReductionError",
    "NotSupportedYetError",
    "OptionError",
    "PrivacyError",
    "SampleMixingError",
    "ReleaseError",
    "SamplingError",
    "UnclippedGradientError",
    "UnsupportedOpError",
    "bk_dp",
    "calibrate",
    "compile",
    "explain",
    "last_report",
    "last_per_sample_norms",
    "last_clip_spans",
    "mark_batch_dynamic",
    "micro_batches",
    "load_checkpoint",
    "save_checkpoint",
    "register_batch_rule",
    "rules",
]
