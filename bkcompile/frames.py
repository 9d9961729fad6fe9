"""Whose code a frame of the running stack is: the library's (torch's or bkcompile's) or the user's."""

from __future__ import annotations

import functools
import importlib.util
import os
import types

import torch

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_EVAL_FRAME = os.path.join("_dynamo", "eval_frame.py")


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    """torch's, bkcompile's and bkcompile.passes's directories (the passes lie outside the package's directory in
    an editable install); found on first use, when both packages are imported."""
    passes = importlib.util.find_spec("bkcompile.passes").origin
    return (_TORCH_DIR, os.path.dirname(__file__) + os.sep, os.path.dirname(passes) + os.sep)


def is_library(file: str) -> bool:
    """Whether ``file`` is torch's or bkcompile's source."""
    return file.startswith(_library_dirs())


def is_generated(file: str) -> bool:
    """Whether ``file`` names no source file (``<string>``, ``<eval_with_key>``: code made at run time)."""
    return file.startswith("<")


def is_dynamo_entry(frame: types.FrameType) -> bool:
    """Whether ``frame`` is dynamo's entry into a compiled function (``compile_wrapper``)."""
    file = frame.f_code.co_filename
    return frame.f_code.co_name == "compile_wrapper" and file.startswith(_TORCH_DIR) and file.endswith(_EVAL_FRAME)
