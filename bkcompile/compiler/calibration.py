"""Kernel throughputs of this machine, with which the cost model turns a strategy's FLOPs and bytes into seconds.

Three rates per device and dtype (the dtype the per-sample norm work runs in: float32, or float64):

- ``mm``: FLOP/s of one large matrix product (what the ordinary backward's weight gradients run as);
- ``bmm``: FLOP/s of many small products, one per sample (per-sample gradients, Gram matrices), at one reference
  shape (16 rows per sample between two 128-wide operands);
- ``small``: the same small products' FLOP/s by their shape, on a grid of (inner, side): a product (m x k)(k x n)
  per sample runs at the rate interpolated at inner = k and side = sqrt(m n) (:meth:`Rates.small_rate`). The shape
  changes the rate several-fold: a ghost Gram matrix (T x width)(width x T) has a long inner dim and runs near the
  large product's rate; a per-sample gradient (p x T)(T x d) of a few rows per sample has a short one and runs far
  below it;
- ``bandwidth``: bytes/s of an elementwise pass over a large tensor (norms, weighted sums, scaling by weights);
- ``fresh``: bytes/s of writing a newly allocated large tensor. On a CPU a large allocation is new pages from the
  operating system, each step again, and writing them runs about ten times slower than ``bandwidth`` (a CUDA
  caching allocator hands back its blocks: about ``bandwidth``). Values held across the whole backward (all-layer
  clipping's per-sample gradients) are written at this rate.

They are measured once per (device name, and for a CPU the threads torch uses; torch version; dtype), in a second
or two, the first time a compile needs
them, and kept in a JSON file: ``$BKCOMPILE_CACHE_DIR/calibration.json``, else
``$XDG_CACHE_HOME/bkcompile/calibration.json``, else ``~/.cache/bkcompile/calibration.json``. :func:`calibrate`
(``python -m bkcompile calibrate``) measures them again; :func:`save` pins given rates for a key (tests do). An
entry of another ``VERSION`` (what was measured changed) is measured again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import platform
import time

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

REPEATS = 5  # timed runs of each kernel, after one warm-up run; the fastest is kept (what the kernel runs at when
# the machine lets it: on a shared CPU a median measured in a busy second can be 5x slower, and it is cached)
# (mm side, bmm samples, bmm side, bmm inner, elementwise values) of the measured kernels, by device type: the
# small products are shaped as per-sample gradients are, (side x inner)(inner x side) with few rows per sample
SHAPES = {"cpu": (512, 64, 128, 16, 1 << 23), "cuda": (4096, 512, 256, 32, 1 << 26)}
# the grid of the small products' rates by shape, by device type: inner dims, sides, the samples of each batch of
# products (fewer where one batch would pass the FLOPs cap) and the FLOPs a timed run repeats the batch up to
GRID = {
    "cpu": ((4, 16, 64, 256, 1024), (16, 64, 256, 768), 16, 1e9, 2e7),
    "cuda": ((16, 64, 256, 1024, 4096), (64, 256, 1024, 4096), 64, 1e11, 1e9),
}
VERSION = 2  # of what is measured: 2 added the small products' grid ("small") and "fresh"


@dataclasses.dataclass(frozen=True)
class Rates:
    mm: float  # FLOP/s of one large matrix product
    bmm: float  # FLOP/s of a batch of small products
    bandwidth: float  # bytes/s of an elementwise pass
    source: str = "measured"  # how they were obtained: "measured <date>", or what pinned them
    small: tuple[tuple[float, float, float], ...] = ()  # (inner, side, FLOP/s) of small products; none: bmm
    fresh: float = 0.0  # bytes/s of writing a newly allocated large tensor; 0: not counted
    version: int = VERSION

    def small_rate(self, rows: float, inner: float, columns: float) -> float:
        """FLOP/s of small products (``rows`` x ``inner``)(``inner`` x ``columns``), one per sample: the grid's
        rates interpolated linearly in the logarithms of inner and side = sqrt(rows columns), and of the rate;
        outside the grid, the nearest edge's. Without a grid, ``bmm``."""
        if not self.small:
            return self.bmm
        inners, sides = sorted({k for k, _, _ in self.small}), sorted({s for _, s, _ in self.small})
        grid = {(k, s): math.log(rate) for k, s, rate in self.small}
        (k0, k1, u), (s0, s1, v) = _bracket(inners, inner), _bracket(sides, math.sqrt(rows * columns))
        low = (1 - u) * grid[k0, s0] + u * grid[k1, s0]
        high = (1 - u) * grid[k0, s1] + u * grid[k1, s1]
        return math.exp((1 - v) * low + v * high)

    def seconds(
        self, rate: str, flops: float, values: float, itemsize: int, shape: tuple[float, float, float] | None = None
    ) -> float:
        """A kernel's time by the roofline: its FLOPs at its rate, or its values read and written at the
        bandwidth, whichever takes longer (a "pass" has no FLOP rate: the bandwidth alone). Small products
        ("bmm") run at the rate of their ``shape`` (rows, inner, columns of each), else at ``bmm``."""
        memory = values * itemsize / self.bandwidth
        if rate == "pass":
            return memory
        if rate == "mm":
            return max(flops / self.mm, memory)
        return max(flops / (self.small_rate(*shape) if shape is not None else self.bmm), memory)


def _bracket(points: list[float], x: float) -> tuple[float, float, float]:
    """(low, high, t): the grid ``points`` around ``x`` and where x lies between their logarithms (0 to 1),
    clamped to the ends."""
    x = min(max(x, points[0]), points[-1])
    high = next((q for q in points if q >= x), points[-1])
    low = max((q for q in points if q <= x), default=points[0])
    if high == low:
        return low, high, 0.0
    return low, high, math.log(x / low) / math.log(high / low)


def cache_path() -> pathlib.Path:
    """The calibration file (see the module's docstring for the order of the directories)."""
    folder = os.environ.get("BKCOMPILE_CACHE_DIR")
    if folder:
        return pathlib.Path(folder) / "calibration.json"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "bkcompile" / "calibration.json"


def device_name(device: torch.device) -> str:
    """The card's name for a CUDA device; for the CPU its model name (``/proc/cpuinfo``), its core count and the
    threads torch runs on (the rates scale with them)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    return f"cpu {model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def key(device: torch.device, dtype: torch.dtype) -> str:
    """What the cache keys rates by: the device's name (a CPU's with its threads), torch's version and the dtype."""
    return f"{device_name(device)} | torch {torch.__version__} | {str(dtype).removeprefix('torch.')}"


def load() -> dict[str, Rates]:
    """Every entry of the calibration file of this ``VERSION`` ({} when there is none, or it cannot be read)."""
    try:
        entries = json.loads(cache_path().read_text())
        return {
            k: Rates(**{**v, "small": tuple(tuple(point) for point in v.get("small", ()))})
            for k, v in entries.items()
            if v.get("version") == VERSION
        }
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def save(entry: str, rates: Rates) -> None:
    """Store ``rates`` under ``entry`` (a :func:`key`) in the calibration file, keeping its other entries."""
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = {k: dataclasses.asdict(v) for k, v in load().items()}
    entries[entry] = dataclasses.asdict(rates)
    scratch = path.with_suffix(f".{os.getpid()}.tmp")
    scratch.write_text(json.dumps(entries, indent=2, sort_keys=True))
    os.replace(scratch, path)  # whole, for another process reading it
    _MEMO[(path, entry)] = rates


def _fastest_seconds(run, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run()
    times = []
    for _ in range(REPEATS):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(device: torch.device, dtype: torch.dtype) -> Rates:
    """Time the kernels on ``device`` in ``dtype``: the three rates and the small products' grid (a second or two
    on a CPU)."""
    with unset_fake_temporarily(), torch.no_grad():  # a compile measures them inside its fake mode
        return _measure(device, dtype)


def _measure(device: torch.device, dtype: torch.dtype) -> Rates:
    side, samples, small, inner, values = SHAPES["cuda" if device.type == "cuda" else "cpu"]
    make = dict(device=device, dtype=dtype)
    a, b = torch.randn(side, side, **make), torch.randn(side, side, **make)
    mm = 2 * side**3 / _fastest_seconds(lambda: torch.mm(a, b), device)
    x, y = torch.randn(samples, small, inner, **make), torch.randn(samples, inner, small, **make)
    bmm = 2 * samples * small**2 * inner / _fastest_seconds(lambda: torch.bmm(x, y), device)
    u, v, out = torch.randn(values, **make), torch.randn(values, **make), torch.empty(values, **make)
    bandwidth = 3 * values * u.element_size() / _fastest_seconds(lambda: torch.mul(u, v, out=out), device)
    small = _measure_small(device, dtype)
    fresh = 2 * values * u.element_size() / _fastest_seconds(lambda: torch.empty(2 * values, **make).fill_(1), device)
    return Rates(mm, bmm, bandwidth, f"measured {time.strftime('%Y-%m-%d %H:%M')}", small, fresh)


def _measure_small(device: torch.device, dtype: torch.dtype) -> tuple[tuple[float, float, float], ...]:
    """The small products' FLOP/s at each (inner, side) of the device's ``GRID``: side x inner by inner x side
    per sample, a batch of samples repeated in one timed run up to the grid's FLOPs (a few microseconds' call
    is not timed alone)."""
    inners, sides, samples, cap, target = GRID["cuda" if device.type == "cuda" else "cpu"]
    points = []
    for inner in inners:
        for side in sides:
            each = 2 * side * side * inner
            count = max(1, min(samples, int(cap // each)))
            x = torch.randn(count, side, inner, device=device, dtype=dtype)
            y = torch.randn(count, inner, side, device=device, dtype=dtype)
            repeats = max(1, int(target // (count * each)))

            def run(x=x, y=y, repeats=repeats) -> None:
                for _ in range(repeats):
                    torch.bmm(x, y)

            points.append((inner, side, repeats * count * each / _fastest_seconds(run, device)))
    return tuple(points)


_MEMO: dict[tuple[pathlib.Path, str], Rates] = {}  # what this process read or measured, by file and key


def rates_for(device: torch.device, dtype: torch.dtype) -> Rates:
    """The rates of ``device`` in ``dtype``: from the calibration file, else measured now and stored there."""
    entry = key(device, dtype)
    memo = (cache_path(), entry)
    if memo not in _MEMO:
        rates = load().get(entry)
        if rates is None:
            rates = measure(device, dtype)
            save(entry, rates)
        _MEMO[memo] = rates
    return _MEMO[memo]


def fingerprint(device: torch.device) -> str:
    """The rates a compile on ``device`` chooses by, in every dtype: the calibration file's entries for it, with what
    this process read or measured first (:func:`rates_for` keeps to that)."""
    prefix, path = f"{device_name(device)} |", cache_path()
    entries = {k: v for k, v in load().items() if k.startswith(prefix)}
    entries.update({k: v for (p, k), v in _MEMO.items() if p == path and k.startswith(prefix)})
    return repr(sorted(entries.items()))


def calibrate(
    device: torch.device | str | None = None, dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)
) -> dict[str, Rates]:
    """Measure the rates again on ``device`` (default: the current CUDA device if there is one, else the CPU) for
    each of ``dtypes``, and store them; returns them by key. Later compiles in this process use them too."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    measured = {}
    for dtype in dtypes:
        entry = key(device, dtype)
        measured[entry] = measure(device, dtype)
        save(entry, measured[entry])
    return measured
