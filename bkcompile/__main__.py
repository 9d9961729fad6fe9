"""Command line: ``python -m bkcompile explain path/to/file.py:factory --input-shape 8,3,32,32 [options]``.

Builds the model with ``factory()`` (a function or class in a Python file, or in an importable module:
``package.module:factory``), privatizes it for
a random input of the given shape (floats, or token ids below ``--int-input``) and prints the
cost-model report.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import pathlib
import sys

import torch

from bkcompile.report import explain


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bkcompile", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
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
    cmd.add_argument("--markdown", action="store_true", help="print the report as markdown")
    args = parser.parse_args(argv)
    shape = [int(s) for s in args.input_shape.split(",")]
    example = torch.randint(0, args.int_input, shape) if args.int_input else torch.randn(shape)
    report = explain(_factory(args.factory)(), example, **dict(_option(o) for o in args.option))
    print(report.to_markdown() if args.markdown else report)


if __name__ == "__main__":
    main()
