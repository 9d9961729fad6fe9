"""docs/architecture.md and the README's layout section against the code: every name they mention exists."""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text()
LAYOUT = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            found = getattr(found, attribute)
        return found
    raise ModuleNotFoundError(dotted)


NAMES = sorted(set(re.findall(r"`(bkcompile(?:\.\w+)+)`", ARCHITECTURE)))
PATHS = sorted(set(re.findall(r"`((?:passes|bkcompile|tests|docs|benchmarks)/[\w/]+\.\w+)`", ARCHITECTURE)))


@pytest.mark.parametrize("name", NAMES)
def test_every_name_in_the_architecture_page_exists(name: str) -> None:
    _resolve(name)


@pytest.mark.parametrize("path", PATHS)
def test_every_path_in_the_architecture_page_exists(path: str) -> None:
    assert (ROOT / path).exists()


def test_the_pages_name_enough_to_be_checked() -> None:
    assert len(NAMES) > 30 and len(PATHS) > 10


def test_the_readme_layout_names_every_module_and_only_modules_that_exist() -> None:
    named = set(re.findall(r"`([\w/]+\.py)`", LAYOUT))
    files = [
        p.relative_to(ROOT)
        for folder in ("bkcompile", "passes", "tests", "benchmarks")
        for p in (ROOT / folder).rglob("*.py")
    ]
    for module in files:
        if module.parts[0] in ("bkcompile", "passes") and module.name != "__init__.py":
            assert module.as_posix() in named or module.name in named, f"{module} is not in the README layout"
    known = {p.name for p in files} | {p.as_posix() for p in files}
    assert named <= known, named - known
