"""The code itself: lint-clean, strictly typed, and dependencies pointing one way."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.database_free  # the PostgreSQL run skips it (conftest)

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fediblog"

# Lower layers never import higher ones (STYLE.md): web -> services -> infrastructure
# -> store -> leaves. app and cli compose everything; nothing imports them.
LAYERS: dict[str, int] = {
    "__init__": 0, "errors": 0, "models": 0,
    "config": 1, "keys": 1, "render": 1, "httpsig": 1, "netguard": 1, "worker": 1,
    "activitystreams": 2,
    "store": 2, "metrics": 2,
    "remote": 3, "delivery": 3, "comments": 3, "notify": 3, "media": 3,
    "actors": 4, "proxy": 4,
    "blog": 5, "inbox": 5, "crawl": 5, "followers": 4, "moderation": 3, "answers": 6,
    "demo": 6, "responses": 6, "preflight": 6, "backup": 6, "schedule": 6, "desk": 6,
    "check": 6,
    "web": 7, "runtime": 7,
    "app": 8, "server": 8, "supervisor": 8, "cli": 9, "__main__": 10,
}  # fmt: skip


def _module_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_modules(tree: ast.AST) -> list[str]:
    """The fediblog modules a file imports, in every spelling: ``from fediblog.x import
    y``, ``from fediblog import x``, ``import fediblog.x``, at any depth (in functions)."""
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "fediblog":  # a submodule, or a name from __init__
                found += [
                    alias.name if _is_module(alias.name) else "__init__" for alias in node.names
                ]
            elif node.module.startswith("fediblog."):
                found.append(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found += [
                alias.name.split(".")[1]
                for alias in node.names
                if alias.name.startswith("fediblog.")
            ]
    return found


def _is_module(name: str) -> bool:
    return (PACKAGE / f"{name}.py").is_file() or (PACKAGE / name).is_dir()


def _problems(source: str, here: str) -> list[str]:
    return [
        f"imports fediblog.{there}"
        for there in _imported_modules(ast.parse(source))
        if there != here and LAYERS[there] >= LAYERS[here]
    ]


def test_dependencies_point_one_way() -> None:
    problems = []
    for path in PACKAGE.rglob("*.py"):
        here = _module_of(path)
        assert here in LAYERS, f"add {here} to LAYERS"
        problems += [f"{path.relative_to(ROOT)} {p}" for p in _problems(path.read_text(), here)]
    assert problems == []


@pytest.mark.parametrize(
    "source",
    [
        "from fediblog.web.cache import PageCache",
        "from fediblog import web",
        "import fediblog.web.cache",
        "def f():\n    from fediblog import app",
    ],
)
def test_the_layer_check_sees_every_import_spelling(source: str) -> None:
    assert _problems(source, "store") != []


# Store methods that change something: the web layer hands every change to a service.
_WRITES = ("save_", "delete_", "set_", "mark_", "record_", "claim_", "prune", "migrate")


def test_web_routes_write_through_services_never_the_store() -> None:
    problems = []
    for path in (PACKAGE / "web").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Attribute | ast.Name)
                and (getattr(node.value, "attr", None) or getattr(node.value, "id", None))
                == "store"
                and node.attr.startswith(_WRITES)
            ):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno} store.{node.attr}")
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


def test_every_package_file_ships_in_the_wheel() -> None:
    """Each non-Python file of the package matches a package-data glob: a wheel install
    (not only `pip install -e`) has its templates, static files and demo posts."""
    import fnmatch
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["fediblog"]
    missing = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*")
        if path.is_file()
        and path.suffix not in (".py", ".pyc")
        and "__pycache__" not in path.parts
        and not any(fnmatch.fnmatch(str(path.relative_to(PACKAGE)), g) for g in globs)
    ]
    assert missing == []
