"""The composition root: ``create_app(settings)`` wires every piece together.

Nothing here runs at import time. The lifespan owns the long-lived resources: the
blog's running parts (runtime.py builds them, as it does for ``fediblog worker``),
the templates and the page cache; they are closed when the app stops.
Nothing imports this module except the CLI and the tests.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib.resources import files
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fediblog.activitystreams import ACTIVITY_JSON
from fediblog.blog import Blog
from fediblog.config import Settings
from fediblog.desk import FAILURES_OVERALL, FAILURES_PER_ADDRESS, Desk, FailureLimit
from fediblog.errors import StorageError
from fediblog.media import MediaStore
from fediblog.models import utcnow
from fediblog.runtime import ROLES, Runtime
from fediblog.web import activitypub, admin, feeds, forms, health, html, wellknown
from fediblog.web import media as media_routes
from fediblog.web import proxy as proxy_routes
from fediblog.web.admin.guard import get_route_path
from fediblog.web.cache import Answer, PageCache
from fediblog.web.deps import Services
from fediblog.web.ratelimit import RateLimit
from fediblog.web.templating import build_templates
from fediblog.worker import ThrottledLog

# Pages carry no script at all; images are ours, the commenters' ones through the media
# proxy (proxy.py), so no reader's browser contacts a commenter's server.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'none'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self' https:"
)
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"strict-origin-when-cross-origin"),
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
]


def with_security_headers(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A response's headers and the security headers it did not set itself (the media
    proxy's stricter CSP stays)."""
    own = {name.lower() for name, _ in headers}
    return [*headers, *(header for header in SECURITY_HEADERS if header[0] not in own)]


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
                message["headers"] = with_security_headers(message.get("headers", []))
            await send(message)

        await self.app(scope, receive, send_with_headers)


_CACHED_ANSWER = "fediblog.cached_answer"
_fast_path_trouble = ThrottledLog(logging.getLogger("fediblog.web"))


async def _send_cached_answer(scope: Scope, receive: Receive, send: Send) -> None:
    """Send the answer ``App`` found in the page cache, as starlette's Response would."""
    answer: Answer = scope.pop(_CACHED_ANSWER)
    status, headers, body = answer
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": with_security_headers(headers),
        }
    )
    await send({"type": "http.response.body", "body": body})  # uvicorn drops it for HEAD


class App(Starlette):
    """Starlette, with the two busiest requests answered before the middleware and the
    router, which they need nothing from (five wrappers, the route matches, a Response
    built per request):

    * every POST to an inbox: the one strangers flood. The inbox endpoint adds the
      security headers itself, never raises (so never a 500), and is not under /admin;
      the access log, when on, still wraps it (``create_app``).
    * a GET or HEAD of a post page the page cache holds fresh for every reader
      (``html.post_page_from_cache``): its ready bytes, with the security headers.
      Anything else (not cached, stale, a query string, a remembered reader, a server
      asking for the object, an error) goes the usual way, which answers it as before.
      The access log, when installed as middleware, wraps these answers too.
    """

    inbox: ASGIApp | None = None
    cached_pages = True  # False: post pages through the middleware and router (tests compare)
    _cached_page_sender: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method = scope["method"]
            if method == "POST" and self.inbox is not None:
                params = activitypub.inbox_path_params(get_route_path(scope))
                if params is not None:
                    scope["app"] = self
                    scope["path_params"] = params
                    await self.inbox(scope, receive, send)
                    return
            elif (method == "GET" or method == "HEAD") and self.cached_pages:
                slug = html.post_path_slug(get_route_path(scope))
                if slug is not None and await self._answer_from_cache(scope, slug):
                    await self._sender()(scope, receive, send)
                    return
        await super().__call__(scope, receive, send)

    async def _answer_from_cache(self, scope: Scope, slug: str) -> bool:
        ctx: Services | None = getattr(self.state, "services", None)
        if ctx is None:  # no lifespan (yet): the usual way says so
            return False
        try:
            found = await html.post_page_from_cache(ctx, Request(scope), slug)
        except StorageError:
            return False  # the usual way answers it: a 503 the reader can act on
        except Exception as error:
            # The usual way runs it all again and answers for it (a 500 for a bug);
            # said here too, or a fault of this path alone would pass unseen.
            _fast_path_trouble.error("fast path", f"a cached page failed: {error!r}")
            return False
        if found is None:
            return False
        scope[_CACHED_ANSWER] = found
        return True

    def _sender(self) -> ASGIApp:
        if self._cached_page_sender is None:
            sender: ASGIApp = _send_cached_answer
            # The access log observes every request, these too; the other middleware
            # (errors, security headers, the admin guard) have nothing to add to them.
            installed: list[object] = [middleware.cls for middleware in self.user_middleware]
            if health.AccessLog in installed:
                sender = health.AccessLog(sender)
            self._cached_page_sender = sender
        return self._cached_page_sender


# Routes readers' browsers open or post to: their refusals are pages of the blog.
# The routes servers call (ActivityPub, WebFinger, feeds, media) answer in plain text.
_READER_ROUTES = frozenset(route.endpoint for route in [*html.routes, *forms.routes])


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404 or request.scope.get("endpoint") in _READER_ROUTES:
        return await html.error_page(request, exc)
    return PlainTextResponse(
        f"{exc.status_code}: {exc.detail}", status_code=exc.status_code, headers=exc.headers
    )


_storage_trouble = ThrottledLog(logging.getLogger("fediblog.web"))


async def storage_error(request: Request, exc: Exception) -> Response:
    """The database cannot serve this request (full, locked, read-only, gone): a 503
    the reader can act on, one log line a minute, and never a traceback."""
    _storage_trouble.error("storage", f"{request.method} {request.url.path}: {exc}")
    return PlainTextResponse(
        "503: the blog cannot save or read this right now; please try again in a minute",
        status_code=503,
        headers={"Retry-After": "60"},
    )


def _share(limit: int, processes: int) -> int:
    """One process's part of a limit all ``processes`` share (at least 1)."""
    return max(1, limit // processes)


def create_app(
    settings: Settings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    run_workers: bool = True,
    web_only: bool = False,
    processes: int = 1,
) -> Starlette:
    """Build the ASGI app for these settings. Resources open in the lifespan (runtime.py).

    ``transport`` replaces the network for every outbound request (tests);
    ``run_workers=False`` leaves the inbox processor, the delivery worker and the
    crawler to the caller, who runs single passes (``process_once`` /
    ``deliver_once`` / ``crawler.run_once``). ``web_only`` runs no background work
    either, and expects ``fediblog worker`` processes to: /healthz checks their
    heartbeats (``serve --web-only``). ``processes`` is how many web processes serve the
    blog together (``serve --workers N``): the limits each one keeps in memory (sign-in
    failures, comments and follows per address) are divided among them, so that all of
    them together allow no more than one process would (at least one each, though: with
    more processes than a limit, one per process).
    """

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with Runtime.open(settings, transport=transport) as rt:
            store = rt.store
            try:
                await rt.media_proxy.sweep()
            except Exception:  # what remote servers sent must never keep the blog from starting
                logging.getLogger("fediblog.proxy").exception("proxying stored images failed")
            # FEDIBLOG_AVATAR and FEDIBLOG_HEADER into the media store; an Update of the
            # actor is queued once when they changed (media.py).
            await MediaStore(settings, store).sync_face(rt.blog_key.public_pem)
            rt.start_writer()
            if web_only:
                rt.start_block_reload()  # the inbox role, elsewhere, rereads them too
            elif run_workers:
                rt.start_background()
            app.state.tasks = rt.tasks  # /healthz says whether each still runs
            # Roles this process leaves to worker processes: /healthz reads their heartbeats.
            app.state.elsewhere = health.Elsewhere(ROLES if web_only else (), since=utcnow())
            app.state.services = Services(
                settings=settings,
                store=store,
                blog=Blog(settings, store),
                templates=build_templates(),
                pages=PageCache(),
                urls=rt.urls,
                inbox=rt.inbox,
                deliverer=rt.deliverer,
                blog_public_pem=rt.blog_key.public_pem,
                instance_public_pem=rt.instance_key.public_pem,
                created_at=await store.get_created_at(),
                fetcher=rt.fetcher,
                interact_limit=RateLimit(limit=_share(10, processes), window=60),
                comment_limit=RateLimit(limit=_share(5, processes), window=600),
                crawler=rt.crawler,
                notifier=rt.notifier,
                proxy=rt.media_proxy,
                desk=Desk(
                    settings,
                    store,
                    limit=FailureLimit(
                        per_address=_share(FAILURES_PER_ADDRESS, processes),
                        overall=_share(FAILURES_OVERALL, processes),
                    ),
                ),
            )
            yield

    static_dir = Path(str(files("fediblog") / "static"))
    app = App(
        routes=[
            *html.routes,
            *feeds.routes,
            *wellknown.routes,
            *forms.routes,
            *activitypub.routes,
            *health.routes,
            *proxy_routes.routes,
            *media_routes.routes,
            *admin.routes,
            Mount("/static", StaticFiles(directory=static_dir), name="static"),
        ],
        exception_handlers={HTTPException: http_error, StorageError: storage_error},
        lifespan=lifespan,
    )
    # Every request under /admin passes the desk's guard: a session, the CSRF token,
    # no-store and the admin CSP (web/admin/guard.py). Added first: it runs inside
    # SecurityHeaders, which then keeps the admin CSP.
    app.add_middleware(admin.Guard)
    app.add_middleware(SecurityHeaders)
    inbox: ASGIApp = activitypub.InboxEndpoint(SECURITY_HEADERS)
    if settings.access_log:
        app.add_middleware(health.AccessLog)
        inbox = health.AccessLog(inbox)
    app.inbox = inbox
    return app


async def rehearse(settings: Settings) -> None:
    """Start an app for ``settings``, ask it for the pages readers and other servers
    ask for most (as they ask: gzip, HTML or ActivityPub), and stop it.

    `serve --worker-process` does this before it forks its worker. CPython 3.11 writes
    to a function's code the first times it runs it (it specializes it), and to every
    object it takes a reference to: run for the first time after the fork, by the web
    process, that code would be written in pages the two processes share, each such
    page then held twice. Run once here, much of it stays shared (tests/bench/README.md,
    idle memory). The app is one of its own, with no access log: nothing it serves is
    anyone's request; what the start-up does (the avatar compared with the database's,
    proxied images swept) is done again, finding nothing more to do, by the real one.
    """
    app = create_app(replace(settings, access_log=False), web_only=True)
    async with app.router.lifespan_context(app):
        services: Services = app.state.services
        pages = [
            ("/", "text/html"),
            ("/about", "text/html"),
            ("/tags", "text/html"),
            ("/feed.xml", "application/atom+xml"),
            (f"/users/{settings.handle}", ACTIVITY_JSON),
            (f"/users/{settings.handle}/outbox", ACTIVITY_JSON),
            (f"/.well-known/webfinger?resource=acct:{settings.acct}", "application/jrd+json"),
            ("/.well-known/nodeinfo", "application/json"),
        ]
        for post in await services.store.list_posts(limit=1):
            pages += [(f"/posts/{post.slug}", "text/html"), (f"/posts/{post.slug}", ACTIVITY_JSON)]
        # A page that fails here fails again, and is reported, when it is really asked for.
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url=settings.base_url) as client:
            for path, accept in pages:
                await client.get(path, headers={"Accept": accept, "Accept-Encoding": "gzip"})
