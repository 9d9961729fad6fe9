"""DPOptimizer: wraps a torch.optim optimizer; adds Gaussian noise to the clipped sums once per step."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from bkcompile.accountant import AccountingError, PrivacyAccountant
from bkcompile.data import OneBatchPerStep, PoissonLoader
from bkcompile.errors import BKError, PrivacyError, release_error, run_error
from bkcompile.randomness import shared_generator
from bkcompile.runtime.distributed import (
    like_parameter,
    local,
    local_part,
    sum_of_clipped_sums,
    sum_over_ranks,
)
from bkcompile.runtime.ledger import Clip, ledger_for, ledger_of_params, own, owner_of, start_step, take_release
from bkcompile.runtime.norms import ClipState


@dataclasses.dataclass(frozen=True)
class AdaptiveClipping:
    """Quantile-tracking thresholds (Andrew et al.): after each step every group's threshold moves as
    ``R_g <- R_g * exp(-learning_rate * (b_g - target_quantile))``, where ``b_g`` estimates the fraction of
    the step's samples whose group norm was <= R_g.

    What is released per group is the *centred* noisy count ``c_g = sum_i ([n_ig <= R_g] - 1/2) + N(0,
    count_noise^2)`` (the sum over the step's samples, as TF Privacy's quantile estimator), and
    ``b_g = c_g / expected_batch_size + 1/2``. Adding or removing one sample moves each c_g by exactly 1/2
    (an uncentred count would move by 1), so the G counts have L2 sensitivity sqrt(G) / 2, and the
    gradient noise is raised (:func:`gradient_noise_multiplier`) so that gradient and counts together are
    one Gaussian mechanism with the optimizer's noise_multiplier, which the accountant records.
    ``count_noise`` defaults to expected batch size / 20."""

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise: float | None = None

    def __post_init__(self) -> None:
        if not (0 < self.target_quantile < 1 and self.learning_rate > 0) or (
            self.count_noise is not None and self.count_noise <= 0
        ):
            raise BKError("adaptive clipping needs 0 < target_quantile < 1, learning_rate > 0, count_noise > 0")


def gradient_noise_multiplier(noise_multiplier: float, count_noise: float, groups: int) -> float:
    """sigma_grad with (sigma_grad^-2 + (2 count_noise / sqrt(G))^-2)^(-1/2) = noise_multiplier.

    One sample moves the clipped gradient sum by at most S = sqrt(sum_g R_g^2) (noise sigma_grad S) and
    each of the G centred counts by exactly 1/2 (noise count_noise): in units of the noise the shift has
    norm at most (sigma_grad^-2 + G / (4 count_noise^2))^(1/2) = 1 / noise_multiplier, the sensitivity of
    one Gaussian mechanism with noise_multiplier. Without noise (noise_multiplier 0) the gradient has none.
    """
    if noise_multiplier == 0:
        return 0.0
    budget = noise_multiplier**-2 - (2 * count_noise / math.sqrt(groups)) ** -2
    if budget <= 0:
        raise run_error(
            PrivacyError,
            f"the count noise {count_noise:.3g} of adaptive clipping over {groups} groups spends more than the whole "
            f"noise multiplier {noise_multiplier:.3g}",
            "the counts' noise and the gradients' noise together make one Gaussian mechanism of that noise multiplier; "
            "the counts alone would spend all of it",
            f"raise count_noise above {math.sqrt(groups) * noise_multiplier / 2:.3g}",
        )
    return budget**-0.5


@dataclasses.dataclass(frozen=True)
class StepRelease:
    """What one ``step()`` published besides the update: the noise scales and the adaptive counts."""

    gradient_noise_std: torch.Tensor  # 0-dim: std of the noise on the clipped gradient sum (sigma_grad * sensitivity)
    counts: torch.Tensor | None = None  # (G,) the noisy centred counts of adaptive clipping
    count_noise_std: float | None = None  # std of the noise on each count


def _agree(name: str, given: float | None, loader_value: float) -> float:
    if given is not None and abs(given - loader_value) > 1e-12 * max(1.0, loader_value):
        raise BKError(f"{name}={given} disagrees with the data loader's {loader_value}; leave it out")
    return loader_value


class DPOptimizer(torch.optim.Optimizer):
    """DP-SGD's noise and averaging around any optimizer (SGD, Adam, AdamW, ...).

    A ``torch.optim.Optimizer`` sharing the wrapped optimizer's ``param_groups``, ``state`` and ``defaults``:
    LR schedulers, ``add_param_group`` and step hooks work on it as on the wrapped one.

    The release is sealed: for the parameters it holds, the bk_dp backward keeps the clipped sum
    ``sum_i C_i g_i`` in the model's step ledger (summed over every backward since the last step or
    ``zero_grad``: several micro-batches make one logical batch), never in ``p.grad``. ``step()`` is the only
    way out: once, it sets ``p.grad = (sum + N(0, (noise_multiplier * sensitivity)^2)) / expected_batch_size``
    and steps the wrapped optimizer, so ``p.grad`` is empty between backward and step and holds the noised
    gradient after it; whatever is written into ``p.grad`` in between is refused. Another optimizer stepping a
    parameter this one holds, a parameter frozen or removed from ``param_groups`` between backward and step,
    and a clip into a model parameter this optimizer does not hold are refused (:class:`ReleaseError`).
    The sensitivity is that of the compiled model's clipping, sqrt(sum_g R_g^2)
    over its clipping groups (R = max_grad_norm for all-layer clipping; max_grad_norm until a backward
    has run). A step with no gradient (an empty Poisson batch) adds noise alone. With
    ``adaptive_clipping`` the thresholds follow a target quantile of the norms (:class:`AdaptiveClipping`).

    Mixed precision: give the ``torch.amp.GradScaler`` as ``grad_scaler`` and step through it
    (``scaler.scale(loss).backward(); scaler.step(dp_optimizer); scaler.update()``). The graphs clip the
    unscaled per-sample norms (they read the scaler's scale on the device), each backward's clipped sum is
    unscaled by that backward's scale as the ledger seals it (``scaler.update()`` between micro-batches of
    one step is exact), ``step()`` checks the sums for inf/nan and tells the scaler, and a step found
    non-finite updates nothing but is still
    counted by the accountant: the batch was looked at. Whether a step is skipped depends on the data (an
    overflow) and is not itself noised; GradScaler's own check reads one flag on the host per step.

    Noise comes from ``generator`` when given (reproducible: whoever knows its seed knows the noise),
    else from a generator seeded with OS entropy. It is drawn in float32 (float64 for float64
    parameters), added to the clipped sum and averaged in that precision, and rounded once to the
    parameter's dtype. ``step()`` takes the sums from the model's step ledger (:mod:`bkcompile.runtime.ledger`),
    which holds exactly what bk_dp clips wrote since the last step or ``zero_grad()``. Nothing in the step
    synchronises with the host: thresholds, counts and the noise scale stay on the model's device.

    In a process group (DDP) every rank draws the same noise from rank 0's generator state, and
    the ranks' average of their clipped sums is multiplied back by the world size: the update is the
    single-process one on the union batch, noised once (``bkcompile.runtime.distributed``). Under FSDP2 the
    optimizer holds the sharded parameters: each rank draws the same whole noise and adds its shard's part.

    With ``data_loader`` (a :class:`PoissonLoader`; ``make_private`` passes it) the loader hands out one
    batch per ``step()`` (a second batch before the step is a ``PrivacyError``: see
    :func:`bkcompile.micro_batches` for gradient accumulation), its sample rate and expected batch size
    are the ones used, and each step must clip exactly the rows of the batch drawn for it (a step with no
    batch drawn, or with more or fewer rows clipped, is a :class:`ReleaseError`). Without a loader, the
    backwards of one step must clip disjoint memory (two backwards over one batch are refused), and a
    batch from a :class:`PoissonLoader` at another rate than the accountant's is refused. ``noise_multiplier=0`` is
    allowed only without an accountant (a non-private run).
    ``last_release`` describes what the last step published (:class:`StepRelease`).
    """

    # GradScaler.step(dp_optimizer) calls step() itself (with the attributes grad_scale and found_inf set)
    # instead of skipping it on an overflow: the clipped sums are sealed, so step() checks them itself.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float | None = None,
        sample_rate: float | None = None,
        accountant: PrivacyAccountant | None = None,
        generator: torch.Generator | None = None,
        adaptive_clipping: AdaptiveClipping | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        data_loader: PoissonLoader | None = None,
    ) -> None:
        self._gate: OneBatchPerStep | None = None
        if data_loader is not None:
            sample_rate = _agree("sample_rate", sample_rate, data_loader.sample_rate)
            expected_batch_size = _agree("expected_batch_size", expected_batch_size, data_loader.expected_batch_size)
        if expected_batch_size is None:
            raise BKError("DPOptimizer needs expected_batch_size (or a data_loader to take it from)")
        if noise_multiplier < 0 or max_grad_norm <= 0 or expected_batch_size <= 0:
            raise BKError("noise_multiplier must be >= 0, max_grad_norm and expected_batch_size > 0")
        if accountant is not None and sample_rate is None:
            raise BKError("an accountant needs the sample_rate of each step")
        if accountant is not None and noise_multiplier == 0:
            raise AccountingError(
                "noise_multiplier=0 with an accountant: the steps would release un-noised gradients (epsilon is "
                "infinite). Fix: give a positive noise_multiplier (or target_epsilon), or drop the accountant for a "
                "non-private run"
            )
        # not Optimizer.__init__: param_groups, state and defaults are the wrapped optimizer's own
        for hooks in (
            "_optimizer_step_pre_hooks",
            "_optimizer_step_post_hooks",
            "_optimizer_state_dict_pre_hooks",
            "_optimizer_state_dict_post_hooks",
            "_optimizer_load_state_dict_pre_hooks",
            "_optimizer_load_state_dict_post_hooks",
        ):
            setattr(self, hooks, collections.OrderedDict())
        self._patch_step_function()
        self.optimizer = optimizer
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.sample_rate = sample_rate
        self.accountant = accountant
        self.generator = shared_generator(generator)  # OS entropy by default; in a process group rank 0's state
        self.adaptive_clipping = adaptive_clipping
        self._clip_state: ClipState | None = None  # the clipping of the model whose gradients this steps
        self.last_release: StepRelease | None = None
        self.grad_scaler = grad_scaler
        self._released = WeakIdKeyDictionary()  # parameter -> the noised gradient the last step() wrote
        self._releasing = False  # inside step(): the wrapped optimizer may step the parameters
        ledger = ledger_for(self._params())  # the model's step ledger, shared with its graphs once they compile
        if grad_scaler is not None:
            ledger.use_grad_scaler(grad_scaler)
        own(self._all_params(), self)
        self._start_logical_batch()
        if data_loader is not None:  # last: a refused construction leaves the loader uncoupled
            self._gate = data_loader.couple()

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self) -> dict:
        return self.optimizer.state

    @property
    def defaults(self) -> dict:
        return self.optimizer.defaults

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)
        own(self.param_groups[-1]["params"], self)

    def _all_params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for p in self._all_params() if p.requires_grad]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._start_logical_batch()

    def _start_logical_batch(self) -> None:
        """Gradients and clip counts before this point do not count toward the next step."""
        start_step(self._all_params())

    def _release(self, params: list[torch.nn.Parameter], sums: list[torch.Tensor | None]) -> None:
        """Noise and average the step's clipped sums into ``p.grad`` (the only writer of an update)."""
        sum_of_clipped_sums(params, sums)  # in a process group: the ranks' average of their sums, times W
        std = self._gradient_noise_multiplier() * self._sensitivity_tensor()
        for p, clipped in zip(params, sums):
            dtype = torch.promote_types(p.dtype, torch.float32)  # bf16/fp16 noise drawn and summed in float32
            noise = torch.normal(0.0, 1.0, size=p.shape, generator=self.generator, dtype=dtype).to(p.device)
            noise = local_part(noise * std.to(device=p.device, dtype=dtype), p)  # FSDP2: this rank's shard
            total = noise if clipped is None else local(clipped).to(dtype) + noise
            p.grad = like_parameter((total / self.expected_batch_size).to(p.dtype), p)
            self._released[p] = p.grad
        self.last_release = StepRelease(gradient_noise_std=std)

    @property
    def sensitivity(self) -> float:
        """The L2 sensitivity the noise is scaled to: sqrt(sum_g R_g^2) of the model's clipping groups."""
        return float(self._sensitivity_tensor())

    def _sensitivity_tensor(self) -> torch.Tensor:
        if self._clip_state is None:
            return torch.tensor(self.max_grad_norm, dtype=torch.float64)
        return self._clip_state.sensitivity_tensor()

    def _take_clip_state(self, clips: set[Clip]) -> None:
        """The clip state of this step's clipped sums (one clipping of one model per optimizer)."""
        if len({(clip.state, clip.params) for clip in clips}) > 1:
            raise run_error(
                PrivacyError,
                "gradients from graphs with different clipping groups reached one DP optimizer step (several "
                "models, or blocks compiled one by one)",
                "the step's noise is scaled to one clipping's thresholds",
                "use one optimizer per bk_dp model, compiled as one graph",
            )
        if clips:
            self._clip_state = next(iter(clips)).state

    def _gradient_noise_multiplier(self) -> float:
        if self.adaptive_clipping is None or self._clip_state is None:
            return self.noise_multiplier
        return gradient_noise_multiplier(self.noise_multiplier, self._count_noise(), len(self._clip_state.groups))

    def _count_noise(self) -> float:
        return self.adaptive_clipping.count_noise or self.expected_batch_size / 20

    def _adapt_thresholds(self) -> None:
        """Move each group's threshold toward the target quantile by its privatised, centred count."""
        state, rule = self._clip_state, self.adaptive_clipping
        sum_over_ranks(state.below)  # the counts of the union batch
        sum_over_ranks(state.rows)
        count_noise = self._count_noise()
        noise = torch.normal(0.0, count_noise, size=state.below.shape, generator=self.generator, dtype=torch.float64)
        counts = state.below - state.rows / 2 + noise.to(state.below.device)  # a sample moves each by exactly 1/2
        fraction = counts / self.expected_batch_size + 0.5
        state.thresholds.mul_(torch.exp(-rule.learning_rate * (fraction - rule.target_quantile)))
        self.last_release = dataclasses.replace(self.last_release, counts=counts, count_noise_std=count_noise)

    def _check_rows(self, params: list[torch.nn.Parameter]) -> None:
        """The step's rows are the batch drawn for it from the accounted loader, each once (the backwards
        refused overlaps already); batches from another Poisson loader must be drawn at the accounted rate."""
        ledger = ledger_of_params(params)
        rows = ledger.rows if ledger is not None else None
        for ref in rows.loaders if rows is not None else ():
            loader = ref()
            if loader is None or self._gate is not None and loader.step_gate is self._gate:
                continue
            if self.accountant is not None and loader.sample_rate != self.sample_rate:
                raise release_error(
                    f"this step's batch was drawn by a PoissonLoader at sample rate {loader.sample_rate}, and the "
                    f"accountant records the step at {self.sample_rate}",
                    "epsilon is computed for the rate each step is sampled at; another rate makes it wrong",
                    "pass the loader to the optimizer, DPOptimizer(..., data_loader=loader), which takes its rate "
                    "(make_private does it)",
                )
        if self._gate is None:
            return
        if not self._gate.pending:
            raise release_error(
                "DPOptimizer.step() with no batch drawn since the last step from the PoissonLoader it accounts",
                "the accountant records each step as one Poisson sample of that loader; batches from another "
                "loader (the DataLoader given to make_private, a second pass over a batch) are not that sample",
                "iterate the loader make_private returned (or the one given as data_loader=) and step once per "
                "batch it yields, an empty batch too",
            )
        clipped = rows.total if rows is not None else 0
        if clipped != self._gate.rows:
            raise release_error(
                f"this step clipped {clipped} rows, and the batch drawn for it from the accounted PoissonLoader has "
                f"{self._gate.rows}",
                "a step releases each drawn row's clipped gradient once; more rows clip some twice (or rows not "
                "drawn), fewer leave drawn rows out of the sample the accountant records",
                "run one backward over the whole drawn batch, or over disjoint micro-batches covering it "
                "(bkcompile.micro_batches(batch, max_size)), then step once",
            )

    def _check_scaler(self) -> None:
        """The GradScaler is this optimizer's own, and steps it (so it sees the overflows this step finds)."""
        given = hasattr(self, "grad_scale")
        if self.grad_scaler is None or not self.grad_scaler.is_enabled():
            if given and self.grad_scale is not None:
                raise BKError(
                    "a GradScaler stepped this DPOptimizer, which was not given it: its graphs clipped the scaled "
                    "per-sample norms against R. Pass it once: DPOptimizer(..., grad_scaler=scaler)"
                )
        elif not given:
            raise BKError(
                "this DPOptimizer has a grad_scaler: step it through the scaler, scaler.step(dp_optimizer) then "
                "scaler.update(), so the clipped sums are checked for inf/nan"
            )

    def _overflowed(self, sums: list[torch.Tensor | None]) -> bool:
        """Whether the GradScaler's scale overflowed a clipped sum of this step (inf/nan); told to the scaler,
        whose ``update()`` then lowers the scale. The sums are unscaled already (each backward by its scale)."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return False
        device = scaler._scale.device
        found = torch.zeros(1, dtype=torch.float32, device=device)
        present = [local(s).float().to(device) for s in sums if s is not None]
        if present:
            torch._amp_foreach_non_finite_check_and_unscale_(present, found, torch.ones_like(found))
        scaler._per_optimizer_states[id(self)]["found_inf_per_device"][device] = found
        return bool(found.item())  # GradScaler's own check reads one flag on the host per step too

    def _skip_step(self) -> None:
        """A step the GradScaler found non-finite: nothing is released, but the batch was looked at (counted)."""
        if self._clip_state is not None:
            self._clip_state.reset_counts()
        if self.accountant is not None:
            self.accountant.step(self.sample_rate, self.noise_multiplier)
        if self._gate is not None:
            self._gate.stepped()
        self.last_release = None  # nothing was published
        start_step(self._all_params())

    @contextlib.contextmanager
    def stepping_inner(self) -> Iterator[None]:
        """Let the wrapped optimizer step inside this context (``step()`` itself; loading a sharded optimizer
        state, which steps it once with zero gradients and lr 0 to create its state)."""
        self._releasing = True
        try:
            yield
        finally:
            self._releasing = False

    def step(self, closure: Callable | None = None) -> None:
        """Take the step's clipped sums from the ledger, noise them, adapt the thresholds, record the step with
        the accountant, then step the wrapped optimizer."""
        if closure is not None:
            raise BKError(
                "DPOptimizer.step() takes no closure: the clipped sums come from the bk_dp backward before it"
            )
        self._check_scaler()
        params = self._all_params()
        self._check_rows(params)
        release = take_release(self, params, self._released)  # proves and takes the sums (refused: nothing)
        self._take_clip_state(release.clips)
        trainable = [(p, s) for p, s in zip(params, release.sums) if p.requires_grad]
        params, sums = [p for p, _ in trainable], [s for _, s in trainable]
        if self._overflowed(sums):
            self._skip_step()
            return
        self._release(params, sums)
        if self.adaptive_clipping is not None and self._clip_state is not None:
            self._adapt_thresholds()
        if self._clip_state is not None:
            self._clip_state.reset_counts()
        if self.accountant is not None:  # recorded before the update is applied
            self.accountant.step(self.sample_rate, self.noise_multiplier)
        with self.stepping_inner():
            self.optimizer.step()
        if self._gate is not None:
            self._gate.stepped()
        start_step(self._all_params())  # the noised gradients are released: what follows starts anew

    def state_dict(self, include_secret: bool = True) -> dict:
        """Everything to resume: the wrapped optimizer, noise multiplier, accountant, adaptive thresholds and,
        under ``"secret"``, the noise generator's state.

        The secret part reveals the noise of every future step (and, with the seed, of past ones): keep a
        checkpoint holding it as private as the training data, and share ``state_dict(include_secret=False)``
        (or the model's own ``state_dict()``, which never holds it). Loading a state without it keeps this
        optimizer's own generator.
        """
        state = {
            "optimizer": self.optimizer.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "accountant": self.accountant.state_dict() if self.accountant is not None else None,
            "clip_state": None
            if self._clip_state is None
            else {
                "groups": self._clip_state.groups,
                "params": self._clip_state.names,
                "initial": self._clip_state.initial,
                "thresholds": self._clip_state.thresholds.clone(),
            },
        }
        if include_secret:
            state["secret"] = {"noise_generator": self.generator.get_state()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.noise_multiplier = state["noise_multiplier"]
        if "secret" in state:
            self.generator.set_state(state["secret"]["noise_generator"])
        if self.accountant is not None and state["accountant"] is not None:
            self.accountant.load_state_dict(state["accountant"])
        clip = state.get("clip_state")
        if clip is not None:  # adapted thresholds resume where they were (the graphs read the ledger's state)
            ledger_for(self._params()).restore_thresholds(
                clip["groups"], clip["params"], clip["initial"], clip["thresholds"]
            )


def _refuse_other_optimizers(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """Global step pre-hook of every torch optimizer: only a DP optimizer (and its wrapped optimizer inside its
    ``step()``) steps a parameter a DP optimizer holds. Wrappers that delegate to a DP optimizer
    (``optimizer.optimizer`` chains, as accelerate's) pass."""
    inner: object = optimizer
    while inner is not None:
        if isinstance(inner, DPOptimizer):
            return
        inner = getattr(inner, "optimizer", None)
    for group in optimizer.param_groups:
        for p in group["params"]:
            owner = owner_of(p)
            if owner is not None and not (owner.optimizer is optimizer and owner._releasing):
                raise release_error(
                    f"{type(optimizer).__name__}.step() would update a parameter of shape {tuple(p.shape)} that a "
                    "DPOptimizer holds",
                    "only DPOptimizer.step() releases a clipped sum, once, with its noise; another optimizer over "
                    "the same parameter would update it outside the accounted steps",
                    "step the DPOptimizer alone (one DPOptimizer over every trainable parameter, several "
                    "param_groups for different settings), and drive LR schedulers with it",
                )


register_optimizer_step_pre_hook(_refuse_other_optimizers)
