"""``GET /admin``: the dashboard. What waits for the author, counted, with links to
the section that deals with each, and the browsers signed in to the desk."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fediblog.web.admin.guard import signed_in
from fediblog.web.admin.page import render
from fediblog.web.deps import services


@dataclass(frozen=True, slots=True)
class Count:
    label: str
    number: int
    href: str
    attention: bool = False  # something for the author to act on


async def dashboard(request: Request) -> Response:
    ctx = services(request)
    states = Counter(post.state for post in await ctx.store.list_authored_posts())
    deliveries = await ctx.store.count_deliveries()
    failing = deliveries.get("failed", 0) + deliveries.get("dead", 0)
    held = await ctx.store.count_held_comments()
    pending = await ctx.store.count_followers("pending")
    counts = [
        Count("Posts", states["published"], "/admin/write"),
        Count("Drafts", states["draft"], "/admin/write"),
        Count("Scheduled", states["scheduled"], "/admin/write"),
        Count("Held responses", held, "/admin/responses", attention=held > 0),
        Count("Followers", await ctx.store.count_followers("accepted"), "/admin/followers"),
        Count("Follow requests", pending, "/admin/followers", attention=pending > 0),
        Count("Deliveries waiting", deliveries.get("queued", 0), "/admin/health"),
        Count("Deliveries failed", failing, "/admin/health", attention=failing > 0),
    ]
    return render(
        request,
        "admin/dashboard.html",
        title="Dashboard",
        counts=counts,
        sessions=await ctx.desk.list_sessions(),
        this_session=signed_in(request).session.key,
    )


routes = [Route("/admin", dashboard, methods=["GET"])]
