"""PRV accountant in float64 for Poisson-subsampled Gaussian mechanisms (add/remove-one neighbours).

After Gopi, Lee and Wutschitz 2021, "Numerical composition of differential privacy" (GLW below).

One step at sample rate q and noise multiplier s compares P = (1 - q) N(0, s^2) + q N(1, s^2) with
Q = N(0, s^2). Its privacy loss random variable (PRV) is Y = log(P(X) / Q(X)) with X ~ P:
Y = log(1 - q + q exp((2X - 1) / (2 s^2))), increasing in X. Y <= t holds where
X <= x(t) = s^2 z(t) + 1/2 with z(t) = log((e^t - 1 + q) / q), so its CDF is closed form:
F(t) = (1 - q) Phi(s z + 1/(2s)) + q Phi(s z - 1/(2s)) for t > log(1 - q), else 0.

The steps of the computation (:func:`epsilon_bounds`):

1. Domain [-L, L] (GLW remark 5.6) and mesh h (GLW theorem 5.5), both rounded outwards: L a multiple of h.
2. Each mechanism's PRV truncated to [-L, L] and discretised cell-centred on the nodes i h (GLW algorithm 1):
   node i takes the mass of [i h - h/2, i h + h/2], and all nodes move by the one shift that makes the
   discrete mean equal the continuous (truncated) mean.
3. Composition by FFT (not repeated squaring: one transform per mechanism and one inverse, whatever the
   steps): every mechanism's pmf on one zero-padded circular grid, its transform raised to its steps, the
   mechanisms' transforms multiplied, one inverse transform. The grid spans [-2 L, 2 L] and the delta
   sums run over all of it: composed mass above L counts in delta up to 2 L, and only mass above 2 L
   wraps around (to the low end, where it no longer counts), an event far rarer than delta_error for the
   L of step 1 (whose history epsilon at delta_error / 4 is below L - 3). Without the padding (GLW,
   prv-accountant) mass just above L wraps to -L: at epsilon 20 and more, prv-accountant's epsilon is up
   to 5e-6 below what a wider domain gives.
4. delta(eps) = sum over t > eps of (1 - exp(eps - t)) p(t) on the composed pmf, and epsilon(delta) as
   GLW define its bounds (as prv-accountant computes them): the estimate solves delta(eps) = delta; the
   upper bound is eps_error above the solution of delta(eps) = delta - delta_error, the lower bound
   eps_error below that of delta(eps) = delta + delta_error. Both bounds also allow for what float64
   may have got wrong: delta_error widened by the FFT's rounding, eps_error by the means' quadrature
   error times the steps (together 4e-12 to 3e-7 of epsilon in tests/test_prv.py; outwards, never inwards).

Where a step cannot vouch for its numbers it raises ``ArithmeticError`` (the caller then answers with
another accountant): the mean's quadrature not converged, the discrete mean more than h/2 from the
continuous one (by construction it is within h/2: a larger gap is a numerical error), or float64
rounding over the grid not far below delta_error.

The mean is where prv-accountant goes wrong: its quadrature of the truncated CDF misses the mean privacy
loss by 1e-11 to 4e-5 (at q = 0.125, sigma = 1: 1.9e-3, and it refuses), which moves its epsilon by
steps times that (0.024 above the true epsilon at q = 0.1223, sigma = 1.77, 640 steps, delta 1e-6,
beyond its eps_error). Here the mean is an integral over X of a smooth integrand, to 1e-15.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import fft, integrate, signal, special

History = tuple[tuple[float, float, int], ...]  # ((q, sigma, steps), ...)
EpsilonBound = Callable[[History, float], float]  # (history, delta) -> an upper bound on epsilon

_EPS64 = float(np.finfo(np.float64).eps)
# Float64 rounding must stay this far below delta_error (a factor), or the caller falls back.
_ROUNDING_MARGIN = 10


def _z(t: np.ndarray, q: float) -> np.ndarray:
    """z(t) = log((e^t - 1 + q) / q), -inf at and below t = log(1 - q) (where the loss cannot be)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        low = np.log1p(np.expm1(np.minimum(t, 0.0)) / q)  # t <= 0: no overflow, exact near 0
        high = np.maximum(t, 0.0) - math.log(q) + np.log1p(-(1 - q) * np.exp(-np.maximum(t, 0.0)))  # t > 0
    z = np.where(t > 0, high, low)
    return np.where(np.isnan(z), -np.inf, z)


def _cdf_and_sf(t: np.ndarray, q: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """F(t) = P[Y <= t] and 1 - F(t), each from its own normal tails (no cancellation in either)."""
    z = _z(t, q)
    upper, lower = sigma * z + 1 / (2 * sigma), sigma * z - 1 / (2 * sigma)  # X / s and (X - 1) / s at x(t)
    cdf = (1 - q) * special.ndtr(upper) + q * special.ndtr(lower)
    sf = (1 - q) * special.ndtr(-upper) + q * special.ndtr(-lower)
    return cdf, sf


def _truncated_mean(q: float, sigma: float, low: float, high: float) -> tuple[float, float]:
    """E[Y | low <= Y <= high], integrated over X in closed-form limits by adaptive quadrature, and a bound on
    its error (the quadrature's own estimate)."""
    x_low, x_high = (sigma**2 * _z(np.array([low, high]), q) + 0.5).tolist()
    # Beyond 40 s from the mixture's means the density is below 1e-300.
    x_low, x_high = max(x_low, -40 * sigma), min(x_high, 1 + 40 * sigma)
    log_keep = math.log1p(-q) if q < 1 else -math.inf

    def density(x: float) -> float:
        return ((1 - q) * math.exp(-0.5 * (x / sigma) ** 2) + q * math.exp(-0.5 * ((x - 1) / sigma) ** 2)) / (
            sigma * math.sqrt(2 * math.pi)
        )

    def loss_density(x: float) -> float:
        return np.logaddexp(log_keep, math.log(q) + (2 * x - 1) / (2 * sigma**2)) * density(x)

    def integral(f: Callable[[float], float]) -> tuple[float, float]:
        value, error, _, *warning = integrate.quad(
            f, x_low, x_high, epsabs=1e-14, epsrel=1e-12, limit=500, full_output=True
        )
        if warning:  # quad's message: roundoff, its subdivision limit, a divergence
            raise ArithmeticError(f"the mean privacy loss (q={q}, sigma={sigma}): {warning[0].splitlines()[0]}")
        return value, error

    (mass, mass_error), (first, first_error) = integral(density), integral(loss_density)
    error = (first_error + abs(first) * mass_error / mass) / mass
    if not (mass > 0.5 and error < 1e-11):
        raise ArithmeticError(f"the mean privacy loss did not converge (q={q}, sigma={sigma}: error {error:.2g})")
    return first / mass, error


def _discretise(q: float, sigma: float, half_width: int, mesh: float) -> tuple[np.ndarray, float, float]:
    """The PRV truncated to [-n h, n h] (n = half_width) as masses at the nodes i h, i = -n..n, the shift
    that moves every node so that the discrete mean equals the continuous one (GLW algorithm 1), and a bound
    on the shift's error."""
    nodes = mesh * np.arange(-half_width, half_width + 1)
    edges = np.concatenate([nodes[:1], nodes[:-1] + mesh / 2, nodes[-1:]])  # the end cells are half cells
    cdf, sf = _cdf_and_sf(edges, q, sigma)
    # A cell's mass from whichever tail is smaller at its right edge: the difference of two small numbers.
    mass = np.where(cdf[1:] <= 0.5, np.diff(cdf), -np.diff(sf))
    mass /= 1 - cdf[0] - sf[-1]
    mean, mean_error = _truncated_mean(q, sigma, nodes[0], nodes[-1])
    shift = mean - float(np.dot(nodes, mass))
    if not abs(shift) <= mesh / 2:  # each cell moves its mass by at most h/2: a larger shift is a numerical error
        raise ArithmeticError(
            f"the discrete mean privacy loss is {abs(shift):.3g} from the continuous one (q={q}, sigma={sigma}), "
            f"more than half the mesh {mesh:.3g}"
        )
    return mass, shift, mean_error


def _epsilon_of_delta(loss: np.ndarray, mass: np.ndarray, mesh: float) -> Callable[[float], float]:
    """eps(delta) solving delta = sum_{t > eps} (1 - exp(eps - t)) p(t), for p on evenly spaced losses."""
    above = np.cumsum(mass[::-1])[::-1]  # sum_{j >= i} p_j
    # sum_{j >= i} p_j exp(t_i - t_j), by the recurrence r_i = p_i + exp(-h) r_{i+1} (no overflow at any L).
    discounted = signal.lfilter([1.0], [1.0, -math.exp(-mesh)], mass[::-1])[::-1]
    delta_at_nodes = above - discounted  # delta(t_i): decreasing in i, 0 at the last node

    def epsilon(delta: float) -> float:
        i = int(np.argmax(delta_at_nodes <= delta))
        if i == 0:
            raise ArithmeticError(f"delta {delta:.3g} is reached below the grid's lowest privacy loss {loss[0]:.3g}")
        # On (t_{i-1}, t_i]: delta(eps) = above_i - exp(eps - t_i) discounted_i.
        return float(loss[i] + math.log((above[i] - delta) / discounted[i]))

    return epsilon


def domain_size(history: History, eps_error: float, delta_error: float, epsilon_bound: EpsilonBound) -> float:
    """L of GLW remark 5.6: the largest of eps_error, epsilon of the whole history at delta_error / 4 and
    epsilon of one step of each mechanism at delta_error / (8 * total steps), plus 3.

    The remark needs upper bounds on those epsilons, which ``epsilon_bound`` (an RDP bound) gives: larger
    than the true ones, they make the domain wider than the remark's minimum, never narrower.
    """
    total = sum(steps for _, _, steps in history)
    bounds = [epsilon_bound(history, delta_error / 4), eps_error]
    bounds += [epsilon_bound(((q, sigma, 1),), delta_error / (8 * total)) for q, sigma, _ in history]
    return max(bounds) + 3


def mesh_size(history: History, eps_error: float, delta_error: float) -> float:
    """GLW theorem 5.5's mesh: eps_error / sqrt(total steps / 2 * log(12 / delta_error))."""
    total = sum(steps for _, _, steps in history)
    return eps_error / math.sqrt(total / 2 * math.log(12 / delta_error))


def epsilon_bounds(
    history: History, delta: float, eps_error: float, delta_error: float, half_domain: float
) -> tuple[float, float, float]:
    """(lower, estimate, upper) epsilon at ``delta`` for the composed history (not clamped at 0), on the
    domain [-half_domain, half_domain] (see :func:`domain_size`) and the mesh of :func:`mesh_size`.

    The estimate is within ``eps_error`` of the true epsilon, and the bounds are certified (GLW theorem 5.5)
    for ``delta_error`` and ``eps_error``. Raises ``ArithmeticError`` where float64 cannot vouch for them.
    """
    h = mesh_size(history, eps_error, delta_error)
    half_width = math.ceil(half_domain / h)
    points = 2 * half_width + 1
    if points * _EPS64 * _ROUNDING_MARGIN > delta_error:  # delta sums up to this many rounded probabilities
        raise ArithmeticError(
            f"float64 rounding over {points} points ({points * _EPS64:.2g}) is not far below delta_error "
            f"{delta_error:.2g}"
        )
    size = fft.next_fast_len(2 * points, real=True)  # the domain's points and as many again as padding
    spectrum = np.ones(size // 2 + 1, dtype=np.complex128)
    shift = shift_error = 0.0
    for q, sigma, steps in history:
        mass, mechanism_shift, mechanism_shift_error = _discretise(q, sigma, half_width, h)
        wrapped = np.zeros(size)  # loss i h at index i mod size: a circular sum adds losses
        wrapped[: half_width + 1] = mass[half_width:]
        wrapped[size - half_width :] = mass[:half_width]
        spectrum *= fft.rfft(wrapped) ** steps
        shift += steps * mechanism_shift
        shift_error += steps * mechanism_shift_error
    composed = np.roll(fft.irfft(spectrum, size), size // 2)  # index r holds loss (r - size // 2) h + shift
    loss = h * (np.arange(size) - size // 2) + shift
    # The FFT's rounding is spread evenly over the entries: the true pmf is >= 0, so its most negative entry
    # shows the size of an entry's rounding (at least eps of the largest). Over every entry it may add to
    # delta, it widens delta_error, so that the bounds keep their meaning.
    rounding = size * max(-float(composed.min()), _EPS64 * float(composed.max()))
    if rounding * _ROUNDING_MARGIN > delta_error:
        raise ArithmeticError(f"the FFT's rounding {rounding:.2g} is not far below delta_error {delta_error:.2g}")
    epsilon = _epsilon_of_delta(loss, composed, h)
    # The means' quadrature error moves the whole composed pmf by at most shift_error: the bounds allow for it.
    lower = epsilon(delta + delta_error + rounding) - eps_error - shift_error
    upper = epsilon(delta - delta_error - rounding) + eps_error + shift_error
    return lower, epsilon(delta), upper
