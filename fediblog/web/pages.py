"""The page-cache flow every cached route shares: render on a miss, then respond."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from fediblog.web.cache import CachedPage, respond
from fediblog.web.deps import Services, services

Renderer = Callable[[Services], Awaitable[CachedPage | None]]


async def cached(request: Request, key: str, render: Renderer) -> Response:
    """Serve ``key`` from the page cache, rendering it when the data changed.

    ``render`` returns None for "no such page", which is never cached, so random
    URLs cannot fill the cache.
    """
    ctx = services(request)
    version = await ctx.store.version()
    page = ctx.pages.get(key, version, max_stale=ctx.store.version_max_age)
    if page is None:
        page = await render(ctx)
        if page is None:
            raise HTTPException(404)
        page = ctx.pages.put(key, version, page)
    return respond(request, page)
