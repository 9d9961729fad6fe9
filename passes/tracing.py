"""Tracing kernels for ops whose native kernels guard on the batch size.

``mark_batch_dynamic`` makes the batch an unbacked symbol: no guard may decide anything about it while dynamo and
aot_autograd trace. A few native kernels do (a C++ composite's check that a tensor is empty, an autograd formula's
special case of zero repeats): dynamo then breaks the graph and runs the layer eagerly, outside the pass, or the
joint graph fails to trace. While tracing (the Python dispatcher is on only then; eager runs keep the native
kernels) those ops are written out here with the same values, where a batch size is symbolic; everywhere else the
native kernel runs as before.

One such check is Python, not a kernel: ``F.group_norm`` (and train-mode ``F.batch_norm``) first refuse an input of
one value per channel, ``_verify_batch_size``'s ``B * C // G * H * ... == 1``. Dynamo puts ``F.group_norm`` in its
graph whole and runs that Python on fake tensors, where the product is ``c * u0`` of the unbacked batch ``u0``: the
shape environment decides ``Eq(c*u0, 1)`` only for an even ``c`` (by parity), so a GroupNorm on a (B, C) input, or
any whose ``C // G * H * ...`` is odd, cut the graph. :func:`verify_batch_size` (installed in
``torch.nn.functional``) answers it for a multiple ``c * u0`` with ``c >= 2``, which is never 1; any other size goes
to torch's own check, as before (one value per group, ``c == 1``, stays a branch on the batch size, refused by
``bkcompile.compiler.breaks`` under a dynamic batch).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

aten = torch.ops.aten


def _symbolic(*sizes: object) -> bool:
    return any(isinstance(size, torch.SymInt) for size in sizes)


@aten.instance_norm.default.py_impl(torch._C.DispatchKey.CompositeImplicitAutograd)
def instance_norm(input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn_enabled):
    """nn.InstanceNorm on its input's statistics: the native composite views the input as (1, B*C, ...) for
    batch_norm, whose checks guard on B*C*H*W == 0. Written out: each sample's and channel's own mean and
    variance over the spatial dims."""
    if not use_input_stats or running_mean is not None or running_var is not None or not _symbolic(input.shape[0]):
        with torch._C._DisablePythonDispatcher():  # the native composite, as without this kernel
            return aten.instance_norm.default(
                input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn_enabled
            )
    spatial = list(range(2, input.dim()))
    var, mean = torch.var_mean(input, spatial, correction=0, keepdim=True)
    return _affine((input - mean) * torch.rsqrt(var + eps), weight, bias)


@aten.batch_norm.default.py_impl(torch._C.DispatchKey.CompositeImplicitAutograd)
def batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled):
    """nn.BatchNorm in eval mode (``F.batch_norm`` on running statistics): the native composite's checks guard on
    the input being empty (``Eq(8*u0, 0)``). Written out: the input less the running mean, over the running
    standard deviation, each channel's along dim 1."""
    if training or running_mean is None or running_var is None or not _symbolic(input.shape[0]):
        with torch._C._DisablePythonDispatcher():  # the native composite, as without this kernel
            return aten.batch_norm.default(
                input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled
            )
    shape = [1, -1] + [1] * (input.dim() - 2)
    return _affine((input - running_mean.view(shape)) * torch.rsqrt(running_var.view(shape) + eps), weight, bias)


def _affine(normed, weight, bias):
    """A norm's per-channel scale and shift, each channel's along dim 1."""
    shape = [1, -1] + [1] * (normed.dim() - 2)
    if weight is not None:
        normed = normed * weight.view(shape)
    if bias is not None:
        normed = normed + bias.view(shape)
    return normed


@aten.repeat.default.py_impl(torch._C.DispatchKey.Autograd)
def repeat(self, repeats):
    """``x.repeat(...)`` by a symbolic count (nn.MultiheadAttention's ``bias_k.repeat(1, B, 1)``): the native
    backward special-cases zero repeats (a guard on B == 0). Written out: each dim (s) viewed as (1, s), expanded
    to (r, s) and flattened, whose backward is a sum over the expanded dims."""
    if not _symbolic(*repeats):
        with torch._C._DisablePythonDispatcher():  # the native kernel, as without this one
            return aten.repeat.default(self, repeats)
    shape = [1] * (len(repeats) - self.dim()) + list(self.shape)
    pairs = self.reshape([v for size in shape for v in (1, size)])
    grown = pairs.expand([v for count, size in zip(repeats, shape) for v in (count, size)])
    return grown.reshape([count * size for count, size in zip(repeats, shape)])


_native_verify_batch_size = F._verify_batch_size


def verify_batch_size(size: list) -> None:
    """torch's ``_verify_batch_size`` (more than one value per channel), passed at once for a symbolic multiple of
    an integer >= 2."""
    values = math.prod(size[2:], start=size[0])
    if _symbolic(values):
        factor, rest = values.node.expr.as_coeff_Mul()
        if rest.is_Symbol and factor.is_Integer and factor >= 2:
            return None
    return _native_verify_batch_size(size)


F._verify_batch_size = verify_batch_size
