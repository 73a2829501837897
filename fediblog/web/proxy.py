"""``/proxy/{key}``: remote images of comments, served by the blog (see proxy.py)."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fediblog.web.deps import services


async def proxied_image(request: Request) -> Response:
    image = await services(request).proxy.serve(request.path_params["key"])
    if image is None:
        raise HTTPException(404)  # a key we never made: nothing is fetched
    cache = f"public, max-age={image.max_age}" if image.max_age else "no-store"
    return Response(
        image.body,
        media_type=image.content_type,
        headers={
            "Cache-Control": cache,
            "X-Content-Type-Options": "nosniff",
            # Opened as a page of its own, it may load and run nothing.
            "Content-Security-Policy": "default-src 'none'",
        },
    )


routes = [Route("/proxy/{key}", proxied_image)]
