"""The guard every request under /admin passes through, whatever route it reaches.

It is an ASGI middleware on the whole app (app.py), matching by path, so a route added
under /admin later is guarded without anyone remembering to: no decorator to forget.
For every path that is /admin or under /admin/:

* **a session**: the session cookie must name a live session (desk.py); without one a
  GET or HEAD is sent to ``/admin/login?next=…`` and any other method gets a 403. Only
  the sign-in form (``PUBLIC_PATHS``) is reachable without a session; its POST must not
  come from another site (``Origin``), so no web page can make its visitors' browsers
  guess the password for it.
* **a CSRF token** on every unsafe method (anything but GET and HEAD): the form field
  ``csrf`` (or the ``X-CSRF-Token`` header), compared in constant time with the token
  of this very session. The guard reads the body to find it (at most ``MAX_BODY``
  bytes) and hands the same bytes on to the route, which reads its form as usual.
* **time**: a signed-in author's request body may take the server's upload deadline to
  arrive (``UPLOAD_DEADLINE``), not only the body deadline every other request has.
* **headers** on every response, the sign-in form's and errors' included:
  ``Cache-Control: no-store`` (no browser or proxy keeps an admin page; admin pages
  never go through the public page cache of web/cache.py either) and a strict CSP: no
  script or inline style, forms posting only to the blog, no framing.

A route reads its session with ``signed_in(request)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fediblog.config import Settings
from fediblog.desk import ABSOLUTE_TIMEOUT
from fediblog.errors import StorageError
from fediblog.models import DeskSession
from fediblog.web.deps import Services

PREFIX = "/admin"
LOGIN_PATH = "/admin/login"
HOME = "/admin"
PUBLIC_PATHS = frozenset({LOGIN_PATH})  # reachable without a session: the sign-in form only
SAFE_METHODS = frozenset({"GET", "HEAD"})
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
MAX_BODY = 32 * 1024 * 1024  # an upload of the largest image the media store takes, and more
# No script at all yet: a page that adds one for enhancement serves it from /static
# and changes script-src to 'self' (never 'unsafe-inline').
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self'; script-src 'none'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)
_HEADERS = {
    b"cache-control": b"no-store",
    b"content-security-policy": CONTENT_SECURITY_POLICY.encode(),
    b"referrer-policy": b"same-origin",
    b"x-frame-options": b"DENY",
    b"x-robots-tag": b"noindex, nofollow",
}
# Validators would invite a cache to keep what no-store forbids.
_DROPPED = frozenset({*_HEADERS, b"etag", b"last-modified", b"expires"})
_SCOPE_KEY = "fediblog.desk"
# Set by the server (server.py BodyDeadline): called, it gives this request's body the
# longer deadline of uploads. The guard calls it for a signed-in author's request only.
UPLOAD_DEADLINE = "fediblog.upload_deadline"
_ERROR = "500: something went wrong on the blog's side; the server's log says what"


@dataclass(frozen=True, slots=True)
class SignedIn:
    """The request's session, as the guard found it."""

    session: DeskSession
    token: str  # the session id from the cookie (sign out needs it)
    csrf: str  # what every form of the page carries in its hidden ``csrf`` field


def signed_in(request: Request) -> SignedIn:
    """The session of a request the guard let through (every admin route but sign-in)."""
    found = request.scope.get(_SCOPE_KEY)
    if not isinstance(found, SignedIn):
        raise HTTPException(403, "sign in first")
    return found


def get_route_path(scope: Scope) -> str:
    """The path the app routes on: the request's, without a ``root_path`` prefix."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root + "/") else path


def is_admin_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def cookie_secure(settings: Settings) -> bool:
    """Secure everywhere but a plain-http blog (FEDIBLOG_ALLOW_HTTP, local use)."""
    return settings.scheme == "https"


def cookie_name(settings: Settings) -> str:
    # __Host-: the browser takes it only if Secure, from this host, with Path=/ and no
    # Domain, so no sibling subdomain can set or overwrite the session.
    return "__Host-fediblog-desk" if cookie_secure(settings) else "fediblog-desk"


def set_session_cookie(response: Response, settings: Settings, token: str) -> None:
    secure = cookie_secure(settings)
    response.set_cookie(
        cookie_name(settings),
        token,
        max_age=int(ABSOLUTE_TIMEOUT.total_seconds()),
        path="/" if secure else PREFIX,
        secure=secure,
        httponly=True,
        samesite="strict",
    )


def clear_session_cookie(response: Response, settings: Settings) -> None:
    secure = cookie_secure(settings)
    response.delete_cookie(
        cookie_name(settings),
        path="/" if secure else PREFIX,
        secure=secure,
        httponly=True,
        samesite="strict",
    )


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a path under /admin on this blog, else /admin.

    Anything that could leave the blog (``//host``, ``https:``, backslashes, which
    browsers read as slashes, control characters, dot segments) falls back to /admin.
    """
    if not value or len(value) > 2_000 or not value.isprintable():
        return HOME
    if "\\" in value or any(c.isspace() for c in value):
        return HOME
    if not (value == PREFIX or value.startswith((PREFIX + "/", PREFIX + "?"))):
        return HOME
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or parts.fragment:
        return HOME
    if {".", ".."} & set(unquote(parts.path).split("/")) or parts.path == LOGIN_PATH:
        return HOME
    return value


def _same_origin(request: Request, settings: Settings) -> bool:
    """False for a form another site's page submitted (its Origin says so)."""
    origin = request.headers.get("origin")
    if origin is None:  # old browsers and non-browser clients send none
        return request.headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")
    return origin == settings.base_url


def _with_headers(send: Send) -> Send:
    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            kept = [
                (name, value)
                for name, value in message.get("headers", [])
                if name.lower() not in _DROPPED
            ]
            message["headers"] = [*kept, *_HEADERS.items()]
        await send(message)

    return send_with_headers


class _TooLarge(Exception):
    pass


async def _read_body(scope: Scope, receive: Receive) -> bytes:
    declared = Request(scope).headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the route the body the guard read, then the real stream
    (which can only say "disconnected" from then on)."""
    given = False

    async def replayed() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _disconnected() -> Message:
    return {"type": "http.disconnect"}


async def _csrf_given(scope: Scope, body: bytes) -> str:
    """The CSRF token the request carries: its header, or its form's field."""
    request = Request(scope, _replay(body, _disconnected))
    header = request.headers.get(CSRF_HEADER)
    if header is not None:
        return header
    # Any text field as large as the body itself: the body is already read, within
    # MAX_BODY, and how long a text may be is for the route to say (page.read_form),
    # in a sentence, not python-multipart's 1 MB default as a bare 400 here.
    form: FormData = await request.form(max_part_size=MAX_BODY)
    try:
        value = form.get(CSRF_FIELD)
        return value if isinstance(value, str) else ""
    finally:
        await form.close()


class Guard:
    """The admin's one door (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_admin_path(get_route_path(scope)):
            await self.app(scope, receive, send)
            return
        started = False
        with_headers = _with_headers(send)

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await with_headers(message)

        send = send_noting_start
        try:
            response = await self._check(scope, receive, send)
        except StorageError:
            response = PlainTextResponse(
                "503: the desk cannot read its sessions right now; try again in a minute",
                status_code=503,
                headers={"Retry-After": "60"},
            )
        except Exception:
            # A bug: the outermost handler's 500 would go out without no-store or the
            # CSP. Answer here with them, a sentence and no traceback, then let the
            # error go on to the server, which logs it.
            if not started:
                await PlainTextResponse(_ERROR, status_code=500)(scope, receive, send)
            raise
        if response is not None:
            await response(scope, receive, send)

    async def _check(self, scope: Scope, receive: Receive, send: Send) -> Response | None:
        """Pass the request on and return None, or return the refusal to send."""
        request = Request(scope)
        ctx: Services = scope["app"].state.services
        method = request.method
        path = get_route_path(scope)
        if path in PUBLIC_PATHS:
            if method not in SAFE_METHODS and not _same_origin(request, ctx.settings):
                return PlainTextResponse("403: sign in from the blog's own page", 403)
            await self.app(scope, receive, send)
            return None
        token = request.cookies.get(cookie_name(ctx.settings), "")
        session = await ctx.desk.session_for(token)
        if session is None:
            if method not in SAFE_METHODS:
                return PlainTextResponse("403: sign in first: this needs a session", 403)
            query = scope.get("query_string", b"").decode("latin-1")
            wanted = path + (f"?{query}" if query else "")
            response: Response = RedirectResponse(
                f"{LOGIN_PATH}?next={quote(safe_next(wanted), safe='/')}", status_code=303
            )
            if token:  # signed out, expired or forged: the browser may forget it
                clear_session_cookie(response, ctx.settings)
            return response
        if method not in SAFE_METHODS:
            longer = scope.get(UPLOAD_DEADLINE)
            if callable(longer):  # the author's image may take a while from a phone
                longer()
            try:
                body = await _read_body(scope, receive)
            except _TooLarge:
                return PlainTextResponse(f"413: at most {MAX_BODY // 1_048_576} MB", 413)
            try:
                given = await _csrf_given(scope, body)
            except HTTPException as error:  # a form python-multipart cannot read
                return PlainTextResponse(f"400: {error.detail}", 400)
            receive = _replay(body, receive)
            if not given or not ctx.desk.csrf_matches(token, given):
                return PlainTextResponse(
                    "403: the form's CSRF token is missing or wrong: reload the page and"
                    " send it again",
                    403,
                )
        scope[_SCOPE_KEY] = SignedIn(session, token, ctx.desk.csrf_token(token))
        await self.app(scope, receive, send)
        return None
