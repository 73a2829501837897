"""What every admin page shares: the nav, and rendering a template into a response.

Admin pages are rendered on every request and never go through the public page
cache (web/pages.py): what the author sees is never served to anyone else.
"""

from __future__ import annotations

from markupsafe import Markup
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from fediblog.blog import MAX_FILE_BYTES
from fediblog.web.admin.guard import CSRF_FIELD, signed_in
from fediblog.web.deps import services

# A text field may be as long as a whole post file `fediblog post new` takes (2 MB).
MAX_TEXT_FIELD = MAX_FILE_BYTES
TEXT_TOO_LARGE = (
    f"The text is larger than {MAX_TEXT_FIELD // 1_000_000} MB, the most a post may have:"
    " shorten it, or split it into several posts."
)

# The desk's sections, in nav order; "Sign out" follows them (a form: it is a POST).
NAV: tuple[tuple[str, str], ...] = (
    ("/admin", "Dashboard"),
    ("/admin/write", "Write"),
    ("/admin/responses", "Responses"),
    ("/admin/followers", "Followers"),
    ("/admin/health", "Health"),
)


def csrf_field(csrf: str) -> Markup:
    return Markup('<input type="hidden" name="{}" value="{}">').format(CSRF_FIELD, csrf)


def render(
    request: Request, template: str, *, title: str, status: int = 200, **context: object
) -> Response:
    """A signed-in admin page: ``template`` extends admin/base.html and gets ``site``,
    ``title``, ``nav``, ``here`` (the current section's path), ``csrf`` (the session's
    token) and ``csrf_field()``, its hidden field, which every form carries."""
    ctx = services(request)
    csrf = signed_in(request).csrf
    path = request.url.path
    here = max(
        (href for href, _ in NAV if path == href or path.startswith(href + "/")),
        key=len,
        default="/admin",
    )
    body = ctx.templates.get_template(template).render(
        site=ctx.settings,
        title=title,
        nav=NAV,
        here=here,
        csrf=csrf,
        csrf_field=lambda: csrf_field(csrf),
        signed=True,
        **context,
    )
    return HTMLResponse(body, status_code=status)


class FormTooLarge(HTTPException):
    """A text field of the form is longer than ``MAX_TEXT_FIELD`` (413)."""

    def __init__(self) -> None:
        super().__init__(413, TEXT_TOO_LARGE)


async def read_form(request: Request) -> FormData:
    """The form the guard already checked the CSRF token of (urlencoded or multipart).
    FormTooLarge if a text field is longer than the longest post."""
    try:
        return await request.form(max_part_size=MAX_TEXT_FIELD)
    except HTTPException as error:
        # python-multipart's words for a field or part over max_part_size.
        if "exceeded maximum size" in str(error.detail):
            raise FormTooLarge from None
        raise
