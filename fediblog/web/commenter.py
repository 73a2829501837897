"""The local comment form's state: what a reader typed, what is wrong with it, and the
details a reader asked this blog to remember in their own browser.

"Remember me" keeps name, email and website in one cookie, in the reader's browser
only (nothing server-side): host-only, ``Path=/posts/`` (the pages that show the form),
HttpOnly, SameSite=Lax, Secure unless ``FEDIBLOG_ALLOW_HTTP``. A page that shows them
is that reader's alone: never from or into the shared page cache (``web.cache``), and
``Cache-Control: private, no-store`` so no proxy keeps it (``personal``).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response

from fediblog.config import Settings
from fediblog.web.cache import CachedPage

COOKIE = "fediblog_commenter"
COOKIE_PATH = "/posts/"
COOKIE_MAX_AGE = 365 * 24 * 3600
MAX_NAME = 100
MAX_EMAIL = 254
MAX_WEBSITE = 300


@dataclass(frozen=True, slots=True)
class CommentForm:
    """The local form's fields as the reader typed them, and a sentence for each field
    that needs a change (keyed by the field's name)."""

    name: str = ""
    email: str = ""
    website: str = ""
    comment: str = ""
    remember: bool = False
    errors: dict[str, str] = field(default_factory=dict)


def remembered(request: Request) -> CommentForm | None:
    """The details this reader asked us to remember, or None (no cookie, or one that
    is not ours: ignored, never an error)."""
    raw = request.cookies.get(COOKIE)
    if not raw or len(raw) > 2_000:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(raw.encode("ascii") + b"=="))
    except (ValueError, UnicodeError, binascii.Error):
        return None
    if not isinstance(data, dict):
        return None
    values = [data.get("name", ""), data.get("email", ""), data.get("website", "")]
    if not all(isinstance(v, str) for v in values):
        return None
    name, email, website = values
    if len(name) > MAX_NAME or len(email) > MAX_EMAIL or len(website) > MAX_WEBSITE:
        return None
    if not (name or email or website):
        return None
    return CommentForm(name=name, email=email, website=website, remember=True)


def remember(response: Response, settings: Settings, form: CommentForm) -> None:
    """Keep the form's name, email and website in the reader's browser."""
    data = {"name": form.name, "email": form.email, "website": form.website}
    value = base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")
    response.set_cookie(
        COOKIE,
        value,
        max_age=COOKIE_MAX_AGE,
        path=COOKIE_PATH,
        secure=not settings.allow_http,
        httponly=True,
        samesite="lax",
    )


def forget(response: Response, settings: Settings) -> None:
    response.delete_cookie(
        COOKIE, path=COOKIE_PATH, secure=not settings.allow_http, httponly=True, samesite="lax"
    )


def personal(page: CachedPage, status_code: int = 200) -> Response:
    """A page rendered for one reader: no shared cache, no conditional answer, no store."""
    return Response(
        page.body,
        status_code=status_code,
        media_type=page.media_type,
        headers={"Cache-Control": "private, no-store", "Vary": "Cookie, " + page.vary},
    )
