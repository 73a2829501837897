"""Shared fixtures: settings in a temporary folder, the real app, a client for it.

With a fake fediverse (tests/fediverse.py) as the network: ``fediverse``, ``fed_app``,
``ctx`` (its services), ``web`` (a client for it) and ``deliver`` (a signed POST to
the shared inbox, then one processing pass).

The database backend: SQLite files under each test's tmp_path, or, when
``FEDIBLOG_TEST_POSTGRES`` names a PostgreSQL server (``python -m tests.pgcluster
pytest`` starts a throwaway one), an empty database there for each test folder
(``database_for``), emptied after the test for a later one. ``BACKEND`` (and the
``backend`` fixture) says which; ``@pytest.mark.sqlite_only("why")`` skips a test
about SQLite's files themselves on PostgreSQL, and ``database_free`` one that uses no
database at all (lint, packaging, signatures): it would only run the same code a
second time.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from fediblog.config import Settings, load_settings
from fediblog.keys import ensure_keys
from fediblog.web.deps import Services
from tests.fediverse import Fediverse, RemoteActor, signed_headers
from tests.helpers import running

# In tests.pgcluster, not here: pytest imports this file as `conftest` and the tests
# import it as `tests.conftest`, two modules, which must share one set of databases.
from tests.pgcluster import BACKEND as BACKEND  # re-exported: tests.conftest.BACKEND
from tests.pgcluster import POSTGRES
from tests.pgcluster import database_for as database_for

BASE_URL = "https://blog.example"


@pytest.fixture(autouse=True)
def _take_back_test_databases() -> Iterator[None]:
    """Against PostgreSQL, the databases a test used are emptied after it for the next
    tests (or dropped; autouse: set up first, so torn down after the app fixtures
    closed their connections)."""
    if POSTGRES is None:
        yield
        return
    used_before = len(POSTGRES.live)
    yield
    POSTGRES.take_back_since(used_before)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if POSTGRES is not None:
        POSTGRES.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The long tests first (a stable sort: the rest keep their order): started last,
    # one would run alone at the end while the other cores idle.
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
    if BACKEND == "sqlite":
        return
    for item in items:
        marker = item.get_closest_marker("sqlite_only")
        if marker is not None:
            why = f" ({marker.args[0]})" if marker.args else ""
            reason = f"about SQLite itself{why}: this run is against PostgreSQL"
            item.add_marker(pytest.mark.skip(reason=reason))
        elif item.get_closest_marker("database_free") is not None:
            reason = "uses no database: the SQLite run ran it, the same on any backend"
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def backend() -> str:
    """The database backend of this run: "sqlite" or "postgresql"."""
    return BACKEND


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for a test: everything under tmp_path, no fediblog.toml, no env; the
    database is tmp_path's own (``database_for``) unless ``database=`` says otherwise."""
    values: dict[str, Any] = {
        "base_url": BASE_URL,
        "keys_dir": tmp_path / "keys",
        "title": "Test Blog",
        "author": "Tess Author",
    }
    values.update(overrides)
    if "database" not in values:
        values["database"] = database_for(tmp_path)
    return load_settings({"FEDIBLOG_CONFIG": str(tmp_path / "absent.toml")}, **values)


@pytest.fixture
def blog_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory for CLI tests: no FEDIBLOG_* from outside, https base URL;
    against PostgreSQL, FEDIBLOG_DATABASE names the folder's own database."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("FEDIBLOG_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FEDIBLOG_BASE_URL", BASE_URL)
    if POSTGRES is not None:
        monkeypatch.setenv("FEDIBLOG_DATABASE", POSTGRES.for_folder(tmp_path))
    return tmp_path


@pytest.fixture(scope="session")
def blog_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The blog's key pairs, made once for the session: the app only reads them, and
    RSA key generation would otherwise be most of every app's start-up."""
    keys = tmp_path_factory.mktemp("keys")
    ensure_keys(keys)
    return keys


@pytest.fixture
def settings(tmp_path: Path, blog_keys: Path) -> Settings:
    return make_settings(tmp_path, keys_dir=blog_keys)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Starlette]:
    async with running(settings) as application:
        yield application


@pytest.fixture
def services(app: Starlette) -> Services:
    found: Services = app.state.services
    return found


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
        yield http


# ---- the app with a fake fediverse as its network ----------------------------------------


@pytest.fixture
def fediverse() -> Fediverse:
    return Fediverse()


@pytest.fixture
async def fed_app(settings: Settings, fediverse: Fediverse) -> AsyncIterator[Starlette]:
    async with running(settings, transport=fediverse.transport(), run_workers=False) as app:
        yield app


@pytest.fixture
def ctx(fed_app: Starlette) -> Services:
    found: Services = fed_app.state.services
    return found


@pytest.fixture
async def web(fed_app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=fed_app), base_url=BASE_URL
    ) as client:
        yield client


async def deliver(
    web: httpx.AsyncClient,
    ctx: Services,
    actor: RemoteActor,
    activity: dict[str, object],
    *,
    process: bool = True,
) -> httpx.Response:
    """POST an activity to the shared inbox, signed by its actor, then process it."""
    body = json.dumps(activity).encode()
    headers = signed_headers(actor.key_id, actor.key, BASE_URL + "/inbox", body)
    response = await web.post("/inbox", content=body, headers=headers)
    if process:
        await ctx.inbox.process_once()
    return response
