"""The package's error types: one per kind of failure, each message says what, where, why and the fix."""

from __future__ import annotations

import dataclasses
import re
from typing import TypeVar

import torch.fx

from bkcompile.frames import is_library
from bkcompile.names import user_path


class BKError(Exception):
    """Base class of every error bkcompile raises. One raised inside a pass names it (:meth:`in_pass`)."""

    pass_name: str | None = None

    def in_pass(self, name: str) -> None:
        """Name the pass the error comes from (once: the innermost pass wins)."""
        if self.pass_name is None:
            self.pass_name = name
            self.args = (f"{self.args[0] if self.args else ''}\n  pass: {name}", *self.args[1:])


class OptionError(BKError, ValueError):
    """An option passed to the ``bk_dp`` backend is unknown, of the wrong type or out of range."""


class SamplingError(BKError, ValueError):
    """A data-loading argument that Poisson sampling cannot honour (a sampler, shuffling, dropped batches): the
    accountant's epsilon assumes each example joins each batch independently with probability q."""


class PrivacyError(BKError):
    """The graph cannot be privatized exactly; training it would not be differentially private.

    Raised by the passes through :func:`node_error` (the op, the user's source line, why, the fix); the
    pass driver adds the name of the pass (:meth:`BKError.in_pass`).
    """


class UnsupportedOpError(PrivacyError):
    """An op has no batch-axis rule, so the pass cannot prove that it keeps samples apart."""


class SampleMixingError(PrivacyError):
    """An op combines values of different samples (batch-norm statistics, a mean over the batch)."""


class NotSupportedYetError(PrivacyError):
    """A construct that keeps samples apart but that the pass cannot clip yet (a parameter reaching its
    gradient through an op with no per-sample form, a sample axis of symbolic sizes on both sides)."""


class LossReductionError(PrivacyError):
    """The loss's reduction over the batch is unknown, ambiguous, or disagrees with ``loss_reduction``, or the loss
    is computed outside the compiled model and ``loss_reduction`` is not given (``bkcompile.passes.loss``)."""

    report: object | None = None  # the graph's cost report, when the only refusal is a loss_reduction not given


class UnclippedGradientError(PrivacyError):
    """A parameter's gradient holds something no bk_dp clip wrote (eager use, eager fallback, eager stem)."""


class ClipOnceError(PrivacyError):
    """Samples would be clipped more than once in one step (two calls or two backwards through one forward)."""


class ReleaseError(PrivacyError):
    """What an optimizer step would release is not what the accountant records: a clipped sum that would leave
    un-noised (another optimizer, a frozen or removed parameter), rows clipped twice or not drawn by the
    accounted loader, a release the accountant would not count."""


E = TypeVar("E", bound=BKError)


def find_error(error: BaseException, error_type: type[E] = BKError) -> E | None:
    """The ``error_type`` (by default any bkcompile error) inside ``error``, or None. Dynamo wraps what a backend
    raises in its ``BackendCompilerFailed`` (and Inductor in its own errors): this follows the wrapped, cause and
    context chain to the bkcompile error, so ``except Exception as e: find_error(e, SampleMixingError)`` reaches it.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, error_type):
            return error
        seen.add(id(error))
        error = getattr(error, "inner_exception", None) or error.__cause__ or error.__context__
    return None


def run_error(cls: type[E], what: str, why: str, fix: str) -> E:
    """The one builder of run-time errors (no graph node: a call, a backward, a step): what happened, why it is
    refused, the fix; the twin of :func:`node_error` for what the passes refuse."""
    return cls(f"{what}\n  why: {why}\n  fix: {fix}")


def release_error(what: str, why: str, fix: str) -> ReleaseError:
    """A release refusal (:class:`ReleaseError`) through :func:`run_error`."""
    return run_error(ReleaseError, what, why, fix)


class InternalError(PrivacyError):
    """A pass failed with an exception of its own code or of torch (a bug of bkcompile: please report it). The
    pass driver wraps it, naming the pass and the op the pass was at; the graph is refused, never run unclipped."""


class PassInvariantError(BKError):
    """A pass left the graph in a state the next one cannot trust (a bug of bkcompile: please report it)."""


def module_path(node: torch.fx.Node) -> tuple[str, str] | None:
    """(the user's dotted path, the class name) of the innermost module ``node`` was traced in
    (``node.meta["nn_module_stack"]``; the path is "" for the root module), or None outside any module."""
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    return user_path(str(path)), getattr(cls, "__name__", str(cls))


def module_of(node: torch.fx.Node) -> str | None:
    """``module 'encoder.layer.0.attention.query' (Linear)``: the module ``node`` was traced in, as errors name it."""
    found = module_path(node)
    if found is None:
        return None
    path, name = found
    return f"module '{path}' ({name})" if path else f"module {name}"


@dataclasses.dataclass(frozen=True)
class Frame:
    """One frame of a node's ``meta["stack_trace"]``: file, line number, function and the line's code."""

    file: str
    line: int
    function: str
    code: str


_FRAME = re.compile(r'File "(.*)", line (\d+), in (.*)$')


def user_frame(node: torch.fx.Node) -> Frame | None:
    """The innermost frame of ``node``'s stack trace in the user's code: torch's and bkcompile's frames (the entry
    of ``bkcompile.explain``, ``nn.Sequential``'s forward) are no place to fix a model. None when there is none."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    lines = [line for line in trace.strip().splitlines() if line.strip()]
    found = None
    for i, line in enumerate(lines):
        match = _FRAME.match(line.strip())
        if match is not None and not is_library(match.group(1)):
            code = lines[i + 1].strip() if i + 1 < len(lines) and not _FRAME.match(lines[i + 1].strip()) else ""
            found = Frame(match.group(1), int(match.group(2)), match.group(3), code)
    return found


def source_line(node: torch.fx.Node) -> str | None:
    """``File "model.py", line 12, in forward: return self.fc(x)``: the user's line ``node`` comes from, or None."""
    frame = user_frame(node)
    if frame is None:
        return None
    where = f'File "{frame.file}", line {frame.line}, in {frame.function}'
    return f"{where}: {frame.code}" if frame.code else where


def user_location(node: torch.fx.Node | None) -> str:
    """Where ``node`` comes from in the user's code: the source line (``meta["stack_trace"]``) and module."""
    if node is None:
        return "<unknown location>"
    parts = [p for p in (source_line(node), module_of(node)) if p]
    if len(parts) == 2:
        return f"{parts[0]} (in {parts[1]})"
    return f"{parts[0]}" if parts else "<no source line recorded>"


def op_name(node: torch.fx.Node) -> str:
    target = node.target
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))


def node_error(cls: type[PrivacyError], node: torch.fx.Node | None, why: str, fix: str) -> PrivacyError:
    """The one builder of pass errors: the op, the user's source line, the reason and the fix (the pass
    driver adds the pass). ``node`` None: the error is about the whole compiled function."""
    what = "the compiled function" if node is None else f"{op_name(node)} at {user_location(node)}"
    return cls(f"{what}\n  why: {why}\n  fix: {fix}")


def unset_loss_reduction(what: str) -> LossReductionError:
    """The refusal of a loss computed outside the compiled graphs with ``loss_reduction`` not given; ``what``
    says which graphs return no loss."""
    return run_error(
        LossReductionError,
        f"{what}: the loss is computed outside, and the option loss_reduction is not given",
        "each sample's gradient of its own loss depends on how the loss reduces over the batch, and a sum and a mean "
        "are indistinguishable from the backward (a sum of per-sample losses and a mean of B times them send it the "
        "same gradient); a wrong guess scales every per-sample norm by B and makes each clipped gradient depend on "
        "the batch size, which breaks the per-sample bound R the privacy accounting relies on",
        "say how your loss reduces over the batch, loss_reduction='mean' (F.cross_entropy's default, loss.mean()) or "
        "'sum' (reduction='sum', loss.sum()): bkcompile.compile(model, ..., loss_reduction='mean'), "
        "options={'loss_reduction': 'mean', ...} or make_private(..., loss_reduction='mean'); or return the loss "
        "from the compiled model",
    )
