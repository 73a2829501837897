"""Signing in to the desk (/admin) in tests, as a browser does or straight through the
service. Pages of the desk added later sign in with ``sign_in`` and post their forms
with the token it returns."""

from __future__ import annotations

import re

import httpx

from fediblog.web.admin.guard import cookie_name
from fediblog.web.deps import Services

PASSWORD = "correct horse battery staple"
_CSRF = re.compile(r'<input type="hidden" name="csrf" value="([0-9a-f]+)">')


def csrf_of(html: str) -> str:
    """The CSRF token in a desk page's forms."""
    found = _CSRF.search(html)
    assert found is not None, "no CSRF field on the page"
    return found.group(1)


async def sign_in(client: httpx.AsyncClient, services: Services) -> str:
    """Set the password if none is set, sign in through the form (the client keeps the
    cookie) and return the session's CSRF token, as the dashboard's forms carry it."""
    if not await services.desk.has_password():
        await services.desk.set_password(PASSWORD)
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
