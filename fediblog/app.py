"""The composition root: ``create_app(settings)`` wires every piece together.

Nothing here runs at import time. The lifespan owns the long-lived resources:
the database, the templates and the page cache; they are closed when the app stops.
Nothing imports this module except the CLI and the tests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
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

from fediblog.activitystreams import Urls
from fediblog.actors import ActorDirectory
from fediblog.blog import Blog
from fediblog.config import Settings
from fediblog.crawl import Crawler
from fediblog.delivery import PER_HOST, USER_AGENT, Deliverer
from fediblog.desk import Desk
from fediblog.errors import StorageError
from fediblog.httpsig import sign_request
from fediblog.inbox import BatchWriter, Inbox
from fediblog.keys import load_key
from fediblog.media import MediaStore
from fediblog.models import utcnow
from fediblog.notify import Notifier
from fediblog.proxy import MediaProxy
from fediblog.remote import Fetcher, FetchPolicy, build_transport
from fediblog.responses import Responses
from fediblog.schedule import Scheduler
from fediblog.store import Store
from fediblog.web import activitypub, admin, feeds, forms, health, html, wellknown
from fediblog.web import media as media_routes
from fediblog.web import proxy as proxy_routes
from fediblog.web.admin.guard import get_route_path
from fediblog.web.cache import Answer, PageCache
from fediblog.web.deps import Services
from fediblog.web.ratelimit import RateLimit
from fediblog.web.templating import build_templates
from fediblog.worker import ThrottledLog, every

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


def create_app(
    settings: Settings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    run_workers: bool = True,
) -> Starlette:
    """Build the ASGI app for these settings. Resources open in the lifespan.

    ``transport`` replaces the network for every outbound request (tests);
    ``run_workers=False`` leaves the inbox processor, the delivery worker and the
    crawler to the caller, who runs single passes (``process_once`` /
    ``deliver_once`` / ``crawler.run_once``).
    """

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        blog_key = load_key(settings.keys_dir, "blog")
        instance_key = load_key(settings.keys_dir, "instance")
        urls = Urls.of(settings)
        policy = FetchPolicy(
            allow_http=settings.allow_http,
            allow_private_addresses=settings.allow_private_addresses,
        )
        store = await Store.open(settings.database)

        def http_client(max_per_host: int | None = None) -> httpx.AsyncClient:
            return httpx.AsyncClient(
                transport=transport or build_transport(policy, max_per_host=max_per_host),
                headers={"User-Agent": USER_AGENT},
                follow_redirects=False,
            )

        # Two connection pools: GETs (key and actor fetches, which strangers can point at
        # a tarpit) never take the connections that deliveries need, nor the reverse.
        fetch_client, delivery_client = http_client(), http_client(PER_HOST)

        def sign_get(method: str, url: str) -> dict[str, str]:
            return sign_request(
                method,
                url,
                body=None,
                key_id=urls.instance_key_id,
                private_key=instance_key.private_key,
                now=utcnow(),
            )

        fetcher = Fetcher(fetch_client, policy, sign_get)
        actors = ActorDirectory(store, fetcher, allow_http=settings.allow_http)
        deliverer = Deliverer(store, delivery_client, blog_key, urls.key_id)
        writer = BatchWriter(store)
        inbox = Inbox(settings, store, actors, writer, on_queued=deliverer.wake)
        # Remote images readers see are fetched by the blog (a pool of its own).
        proxy_client = http_client()
        media_proxy = await MediaProxy.open(
            store,
            proxy_client,
            policy,
            settings.database.parent / "proxy",
            cache_bytes=settings.proxy_cache_mb * 1_000_000,
            user_agent=USER_AGENT,
        )
        try:
            await media_proxy.sweep()
        except Exception:  # what remote servers sent must never keep the blog from starting
            logging.getLogger("fediblog.proxy").exception("proxying stored images failed")
        responses = Responses(settings, store, actors, fetcher, media_proxy)
        inbox.add_handlers(responses.handlers())
        inbox.sharing = responses  # a batch of replies becomes comments in one commit
        # Each saved reply is crawled for the replies that never reached the inbox.
        crawler = Crawler(settings, store, fetcher, responses, is_blocked=inbox.is_blocked)
        responses.reply_listeners.append(crawler.schedule)
        # The author hears of each new reply (a pool of its own: a slow webhook holds
        # up no delivery); the local form tells it too (web/forms.py).
        notify_client = http_client()
        notifier = Notifier(settings, store, notify_client)
        responses.reply_listeners.append(notifier.response_saved)
        await inbox.load_blocks()
        # FEDIBLOG_AVATAR and FEDIBLOG_HEADER into the media store; an Update of the
        # actor is queued once when they changed (media.py).
        await MediaStore(settings, store).sync_face(blog_key.public_pem)
        tasks = [asyncio.create_task(writer.run(), name="inbox-writer")]
        if run_workers:

            async def prune() -> None:
                await store.prune(utcnow() - timedelta(days=settings.retention_days))
                await store.prune_notifications(utcnow() - timedelta(days=settings.retention_days))
                await media_proxy.sweep()  # avatars changed by profile updates
                await media_proxy.prune()

            tasks.append(asyncio.create_task(inbox.run(), name="inbox-processor"))
            tasks.append(asyncio.create_task(deliverer.run(), name="delivery"))
            tasks.append(asyncio.create_task(crawler.run(), name="crawler"))
            tasks.append(asyncio.create_task(every(3600, prune, "pruning"), name="retention"))
            if notifier.enabled:
                tasks.append(asyncio.create_task(notifier.run(), name="notify"))
            # Scheduled posts go out at their time, even if scheduled while we were down.
            scheduler = Scheduler(Blog(settings, store), on_published=deliverer.wake)
            tasks.append(asyncio.create_task(scheduler.run(), name="schedule"))
        try:
            app.state.tasks = tasks  # /healthz says whether each still runs
            app.state.services = Services(
                settings=settings,
                store=store,
                blog=Blog(settings, store),
                templates=build_templates(),
                pages=PageCache(),
                urls=urls,
                inbox=inbox,
                deliverer=deliverer,
                blog_public_pem=blog_key.public_pem,
                instance_public_pem=instance_key.public_pem,
                created_at=await store.get_created_at(),
                fetcher=fetcher,
                interact_limit=RateLimit(limit=10, window=60),
                comment_limit=RateLimit(limit=5, window=600),
                crawler=crawler,
                notifier=notifier,
                proxy=media_proxy,
                desk=Desk(settings, store),
            )
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await actors.aclose()
            await media_proxy.aclose()
            await proxy_client.aclose()
            await fetcher.aclose()
            await fetch_client.aclose()
            await delivery_client.aclose()
            await notify_client.aclose()
            await store.close()

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
