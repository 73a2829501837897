"""The desk's Followers section.

* ``GET /admin/followers``: follow requests waiting (with FEDIBLOG_MANUALLY_APPROVES_
  FOLLOWERS), the followers counted per server, and the followers, ``PER_PAGE`` a page.
* ``POST /admin/followers/approve|reject``: followers.approve / reject, as ``fediblog
  followers approve|reject`` does: an Accept or a Reject, queued and signed when sent.
* ``POST /admin/followers/remove``: followers.remove, as ``fediblog followers remove``
  does: the follower gets no more posts and its server is sent a Reject of its Follow
  (what Mastodon sends when its user removes a follower; GoToSocial ignores it for an
  accepted follow, see followers.remove).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from fediblog import followers
from fediblog.models import Follower, actor_address, actor_handle
from fediblog.web.admin.page import read_form, render
from fediblog.web.deps import services

PAGE = "/admin/followers"
PER_PAGE = 100
PENDING_SHOWN = 500  # the oldest requests; the heading counts them all
DONE = {
    "approve": "Approved: the Accept is on its way; they get your posts from now on.",
    "reject": "Rejected: the Reject is on its way; they get none of your posts.",
    "remove": "Removed: they get no more posts, and their server is sent a Reject of their"
    " Follow. Mastodon and Misskey then show them as no longer following you; GoToSocial"
    " ignores it for now and keeps showing them as following, though nothing reaches them.",
}


@dataclass(frozen=True, slots=True)
class Shown:
    follower: Follower
    handle: str | None
    name: str


async def _list(request: Request, status: str, limit: int, offset: int = 0) -> list[Shown]:
    found = await services(request).store.list_followers_for_desk(
        status=status, limit=limit, offset=offset
    )
    return [
        Shown(f, actor_handle(username, domain), name or username or actor_address(f.actor))
        for f, username, domain, name in found
    ]


async def page(request: Request) -> Response:
    ctx = services(request)
    raw = request.query_params.get("page", "1")
    total = await ctx.store.count_followers("accepted")
    pages = max(1, -(-total // PER_PAGE))
    # Past the end (followers removed since the link was made): the last page, which
    # has the pager back, rather than an empty one without it.
    number = int(raw) if raw.isdigit() and len(raw) < 10 else 1
    number = min(max(number, 1), pages)
    return render(
        request,
        "admin/followers.html",
        title="Followers",
        pending=await _list(request, "pending", PENDING_SHOWN),
        pending_total=await ctx.store.count_followers("pending"),
        by_server=await ctx.store.count_followers_by_domain(),
        followers=await _list(request, "accepted", PER_PAGE, (number - 1) * PER_PAGE),
        total=total,
        number=number,
        pages=pages,
        manual=ctx.settings.manually_approves_followers,
        done=DONE.get(request.query_params.get("done", "")),
    )


async def _act(request: Request) -> Response:
    ctx = services(request)
    action = request.url.path.rsplit("/", 1)[-1]
    form = await read_form(request)
    actor = form.get("actor")
    if not isinstance(actor, str) or not actor:
        return _problem(request, "Say which follower: the form has no actor.", 400)
    try:
        await getattr(followers, action)(ctx.settings, ctx.store, actor)
    except followers.NoSuchFollower as error:
        return _problem(request, f"{error}.", 404)
    ctx.deliverer.wake()
    return RedirectResponse(f"{PAGE}?{urlencode({'done': action})}", status_code=303)


def _problem(request: Request, message: str, status: int) -> Response:
    return render(
        request,
        "admin/responses_problem.html",
        title="That cannot be done",
        message=message,
        back=PAGE,
        status=status,
    )


routes = [
    Route(PAGE, page, methods=["GET"]),
    *[Route(f"{PAGE}/{name}", _act, methods=["POST"]) for name in ("approve", "reject", "remove")],
]
