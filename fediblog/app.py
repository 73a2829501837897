"""The composition root: ``create_app(settings)`` wires every piece together.

Nothing here runs at import time. The lifespan owns the long-lived resources:
the database, the templates and the page cache; they are closed when the app stops.
Nothing imports this module except the CLI and the tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fediblog.blog import Blog
from fediblog.config import Settings
from fediblog.store import Store
from fediblog.web import feeds, html
from fediblog.web.cache import PageCache
from fediblog.web.deps import Services
from fediblog.web.templating import build_templates

# Pages carry no script at all; images may come from the commenters' servers.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' https: data:; style-src 'self'; script-src 'none'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self' https:"
)
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"strict-origin-when-cross-origin"),
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
]


class SecurityHeaders:
    """Adds the same few headers to every response (plain ASGI: no per-request cost)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return await html.not_found(request, exc)
    return PlainTextResponse(f"{exc.status_code}: {exc.detail}", status_code=exc.status_code)


def create_app(settings: Settings) -> Starlette:
    """Build the ASGI app for these settings. Resources open in the lifespan."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store = await Store.open(settings.database)
        try:
            app.state.services = Services(
                settings=settings,
                store=store,
                blog=Blog(settings, store),
                templates=build_templates(),
                pages=PageCache(),
            )
            yield
        finally:
            await store.close()

    static_dir = Path(str(files("fediblog") / "static"))
    app = Starlette(
        routes=[
            *html.routes,
            *feeds.routes,
            Mount("/static", StaticFiles(directory=static_dir), name="static"),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.add_middleware(SecurityHeaders)
    return app
