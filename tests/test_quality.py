"""The code itself: lint-clean, strictly typed, and dependencies pointing one way."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fediblog"

# Lower layers never import higher ones (STYLE.md): web -> services -> infrastructure
# -> store -> leaves. app and cli compose everything; nothing imports them.
LAYERS: dict[str, int] = {
    "__init__": 0, "errors": 0, "models": 0,
    "config": 1, "keys": 1, "render": 1, "httpsig": 1, "netguard": 1,
    "activitystreams": 2,
    "store": 2,
    "remote": 3, "delivery": 3, "comments": 3,
    "actors": 4,
    "blog": 5, "inbox": 5, "followers": 4, "moderation": 3,
    "demo": 6, "responses": 6,
    "web": 7,
    "app": 8, "cli": 9, "__main__": 10,
}  # fmt: skip


def _module_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def test_dependencies_point_one_way() -> None:
    problems = []
    for path in PACKAGE.rglob("*.py"):
        here = _module_of(path)
        assert here in LAYERS, f"add {here} to LAYERS"
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("fediblog.")
            ):
                there = node.module.split(".")[1]
                if there != here and LAYERS[there] >= LAYERS[here]:
                    problems.append(f"{path.relative_to(ROOT)} imports fediblog.{there}")
    assert problems == []


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is in the [test] extra")
def test_ruff_is_clean() -> None:
    result = subprocess.run(
        ["ruff", "check", "--no-cache", "fediblog", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "fediblog"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
