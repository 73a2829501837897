"""Signing in to the desk (/admin) in tests, as a browser does or straight through the
service. Pages of the desk added later sign in with ``sign_in`` and post their forms
with the token it returns."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import httpx
from argon2 import PasswordHasher

from fediblog.config import Settings
from fediblog.models import utcnow
from fediblog.web.admin.guard import cookie_name
from fediblog.web.deps import Services
from tests import dbpeek

PASSWORD = "correct horse battery staple"
_CSRF = re.compile(r'<input type="hidden" name="csrf" value="([0-9a-f]+)">')


def csrf_of(html: str) -> str:
    """The CSRF token in a desk page's forms."""
    found = _CSRF.search(html)
    assert found is not None, "no CSRF field on the page"
    return found.group(1)


@functools.cache
def password_hash() -> str:
    """PASSWORD's hash as `fediblog admin password` stores it (argon2id, the library's
    defaults, as desk.py makes it), made once a test process: each hash takes ~0.2 s,
    and the tests that only need a signed-in author are many. test_admin_auth.py sets
    passwords through the desk itself."""
    return PasswordHasher().hash(PASSWORD)


async def sign_in(client: httpx.AsyncClient, services: Services) -> str:
    """Store the password if none is set, sign in through the form (the client keeps
    the cookie; the desk checks the password against its hash, as for anyone) and
    return the session's CSRF token, as the dashboard's forms carry it."""
    if not await services.desk.has_password():
        await services.store.save_desk_password(password_hash(), utcnow())
    response = await client.post(
        "/admin/login",
        data={"username": services.settings.handle, "password": PASSWORD, "next": "/admin"},
    )
    assert response.status_code == 303, response.text
    page = await client.get("/admin")
    assert page.status_code == 200
    return csrf_of(page.text)


async def new_session(services: Services, ip: str = "192.0.2.1") -> str:
    """A session made by the service, as a sign-in makes it (no HTTP, and no argon2
    check: tests make many): its cookie value."""
    signed = await services.desk.start_session(ip=ip, user_agent="tests")
    return signed.token


def cookie(services: Services, token: str) -> dict[str, str]:
    """The Cookie header a browser holding this session sends."""
    return {"cookie": f"{cookie_name(services.settings)}={token}"}


def table_names(database: Settings) -> list[str]:
    """Every table of the blog's database, read from the backend's own catalog: a table
    added later is in it without a test knowing its name."""
    if isinstance(dbpeek.where(database), Path):
        sql = (
            "SELECT name FROM sqlite_master WHERE type = 'table'"
            " AND name NOT LIKE 'sqlite_%' ORDER BY name"
        )
    else:
        sql = (
            "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE'"
            " AND table_schema = current_schema() ORDER BY table_name"
        )
    return [str(found[0]) for found in dbpeek.rows(database, sql)]


def stored_bytes(database: Settings) -> bytes:
    """What the database holds, to look for a secret in: on SQLite every byte of its
    file and WAL (what was freed too); on PostgreSQL, whose files are the server's, every
    row of every table, as text."""
    location = dbpeek.where(database)
    if isinstance(location, Path):
        return b"".join(
            path.read_bytes()
            for path in location.parent.iterdir()
            if path.name.startswith(location.name)
        )
    tables = {
        table: dbpeek.rows(database, f"SELECT * FROM {table}")  # noqa: S608 (the schema's names)
        for table in table_names(database)
    }
    return repr(tables).encode()
