"""Command line of bkcompile.

``python -m bkcompile explain path/to/file.py:factory --input-shape 8,3,32,32 [options]`` builds the model
with ``factory()`` (a function or class in a Python file, or in an importable module:
``package.module:factory``), privatizes it for a random input of the given shape (floats, or token ids
below ``--int-input``) as training would (``--compiler``, a dynamic batch unless ``--static-batch``) and prints
the cost-model report (``--measure``: with a private step timed against a non-private one), or the refusal
training would meet (exit status 1).

``python -m bkcompile calibrate [--device cuda] [--dtype float32 ...]`` measures the kernel rates the cost model
predicts time with (:mod:`bkcompile.compiler.calibration`) again, stores them in the calibration file and prints
them.

``python -m bkcompile audit --noise-multiplier S --steps T --canaries M --seed K [--sample-rate Q]`` plays
the canary game of :mod:`bkcompile.audit` (a progress bar on stderr) and prints, last,
``empirical epsilon lower bound X <= epsilon Y``.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import pathlib
import sys
from collections.abc import Callable

import torch

from bkcompile.audit import AuditResult, CanaryGame, run_canary_game
from bkcompile.compiler.calibration import cache_path, calibrate
from bkcompile.compiler.report import explain
from bkcompile.errors import BKError

BAR_WIDTH = 30


def _factory(spec: str):
    source, _, name = spec.rpartition(":")
    if not source:
        raise SystemExit(f"expected path/to/file.py:factory or module:factory, got {spec!r}")
    if source.endswith(".py"):
        loaded = importlib.util.spec_from_file_location(pathlib.Path(source).stem, source)
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
    else:
        sys.path.insert(0, ".")
        module = importlib.import_module(source)
    return getattr(module, name)


def _option(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _explain_parser(commands) -> None:
    cmd = commands.add_parser("explain", help="print the cost-model report of a model")
    cmd.add_argument(
        "factory", help="file.py:factory or module:factory returning the model, e.g. examples/models.py:small_cnn"
    )
    cmd.add_argument("--input-shape", required=True, help="shape of the example batch, e.g. 8,3,32,32")
    cmd.add_argument("--int-input", type=int, metavar="HIGH", help="token ids in [0, HIGH) instead of floats")
    cmd.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a bk_dp option, e.g. strategy=explicit (repeatable)",
    )
    cmd.add_argument(
        "--compiler",
        choices=("inductor", "aot_eager"),
        help="the inner compiler (default: training's, inductor); the same as --option compiler=...",
    )
    cmd.add_argument(
        "--measure", action="store_true", help="also time a private step against a non-private one (same compiler)"
    )
    cmd.add_argument(
        "--static-batch",
        action="store_true",
        help="compile for the example's batch size (default: a dynamic batch, as bkcompile.PoissonLoader gives)",
    )
    cmd.add_argument("--markdown", action="store_true", help="print the report as markdown")


def _explain(args: argparse.Namespace) -> int:
    shape = [int(s) for s in args.input_shape.split(",")]
    example = torch.randint(0, args.int_input, shape) if args.int_input else torch.randn(shape)
    options = dict(_option(o) for o in args.option)
    if args.compiler is not None:
        if options.get("compiler", args.compiler) != args.compiler:
            raise SystemExit(f"--compiler {args.compiler} and --option compiler={options['compiler']!r} disagree")
        options["compiler"] = args.compiler
    try:
        report = explain(
            _factory(args.factory)(), example, measure=args.measure, dynamic_batch=not args.static_batch, **options
        )
    except BKError as error:  # the refusal training would meet: what, where, why, the fix
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(report.to_markdown() if args.markdown else report)
    return 0


def _calibrate_parser(commands) -> None:
    cmd = commands.add_parser("calibrate", help="measure the kernel rates of the cost model again, and store them")
    cmd.add_argument("--device", help="e.g. cpu, cuda:0 (default: the current CUDA device if there is one, else cpu)")
    cmd.add_argument(
        "--dtype",
        action="append",
        choices=("float32", "float64"),
        help="a dtype of the per-sample norm work (repeatable; default: both)",
    )


def _calibrate(args: argparse.Namespace) -> int:
    dtypes = tuple(getattr(torch, name) for name in args.dtype or ("float32", "float64"))
    for key, rates in calibrate(args.device, dtypes).items():
        print(
            f"{key}: mm {rates.mm / 1e9:.3g} GFLOP/s, bmm {rates.bmm / 1e9:.3g} GFLOP/s (by shape "
            f"{min(r for _, _, r in rates.small) / 1e9:.3g} to {max(r for _, _, r in rates.small) / 1e9:.3g}), "
            f"bandwidth {rates.bandwidth / 1e9:.3g} GB/s"
        )
    print(f"stored in {cache_path()}")
    return 0


def _audit_parser(commands) -> None:
    cmd = commands.add_parser("audit", help="an empirical lower bound on epsilon from a canary game")
    cmd.add_argument("--noise-multiplier", type=float, required=True, metavar="S", help="sigma (0: no noise)")
    cmd.add_argument("--steps", type=int, required=True, metavar="T", help="DP-SGD steps")
    cmd.add_argument("--canaries", type=int, required=True, metavar="M", help="Dirac canaries, each in w.p. 1/2")
    cmd.add_argument("--seed", type=int, default=0, metavar="K", help="seed of the whole game (default 0)")
    cmd.add_argument("--sample-rate", type=float, default=1.0, metavar="Q", help="Poisson sample rate (default 1)")
    cmd.add_argument("--delta", type=float, default=1e-5, help="delta of both epsilons (default 1e-5)")
    cmd.add_argument("--significance", type=float, default=0.05, help="of the lower bounds (default 0.05)")
    cmd.add_argument("--max-grad-norm", type=float, default=1.0, metavar="R", help="clipping threshold (default 1)")
    cmd.add_argument("--compiler", choices=("aot_eager", "inductor"), default="aot_eager", help="inner compiler")


def _progress_bar(total: int) -> Callable[[int], None]:
    def show(step: int) -> None:
        done = BAR_WIDTH * step // total
        end = "\n" if step == total else ""
        print(f"\raudit [{'#' * done}{'.' * (BAR_WIDTH - done)}] {step}/{total} steps", end=end, file=sys.stderr)
        sys.stderr.flush()

    return show


def audit_summary(game: CanaryGame, result: AuditResult) -> str:
    """The audit's printed lines; the last one compares the lower bound with the accountant's epsilon."""
    holds = result.epsilon_lower_bound <= result.epsilon
    verdict = "<=" if holds else ">"
    last = f"empirical epsilon lower bound {result.epsilon_lower_bound:.2f} {verdict} epsilon {result.epsilon:.2f}"
    return "\n".join(
        [
            f"canaries {game.canaries} ({int(result.included.sum())} in), steps {game.steps}, noise multiplier "
            f"{game.noise_multiplier:g}, sample rate {game.sample_rate:g}, delta {game.delta:g}, "
            f"significance {game.significance:g}",
            f"guesses {result.guesses}, correct {result.correct}; Gaussian-DP fit: epsilon >= "
            f"{result.gdp_lower_bound:.2f}",
            last if holds else f"{last} (the claimed epsilon is falsified)",
        ]
    )


def _audit(args: argparse.Namespace) -> int:
    game = CanaryGame(
        noise_multiplier=args.noise_multiplier,
        steps=args.steps,
        canaries=args.canaries,
        seed=args.seed,
        sample_rate=args.sample_rate,
        max_grad_norm=args.max_grad_norm,
        delta=args.delta,
        significance=args.significance,
        compiler=args.compiler,
    )
    progress = _progress_bar(game.steps)
    progress(0)
    result = run_canary_game(game, progress)
    print(audit_summary(game, result))
    return 0 if result.epsilon_lower_bound <= result.epsilon else 1


def main(argv: list[str] | None = None) -> int:
    """Run a command; the exit status is 1 when explain meets a refusal or an audit falsifies the claimed epsilon."""
    parser = argparse.ArgumentParser(prog="python -m bkcompile", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _explain_parser(commands)
    _calibrate_parser(commands)
    _audit_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "explain":
        return _explain(args)
    if args.command == "calibrate":
        return _calibrate(args)
    try:
        return _audit(args)
    except BKError as error:
        parser.error(str(error))


if __name__ == "__main__":
    sys.exit(main())
