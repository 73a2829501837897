"""``/media/{hash}-{width}.{ext}``: the media store's files (media.py), as they are.

A file's name is the hash of its content, so it never changes: browsers and the
servers that fetch an attachment may keep it for a year without asking again.
``X-Content-Type-Options: nosniff`` (app.py, on every response) keeps a browser from
reading one as anything but the image type we name.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from fediblog.media import MediaStore, media_type_of
from fediblog.web.deps import services

IMMUTABLE = "public, max-age=31536000, immutable"


async def media_file(request: Request) -> Response:
    ctx = services(request)
    name = request.path_params["name"]
    path = MediaStore(ctx.settings, ctx.store).file_for(name)
    if path is None:
        raise HTTPException(404)
    return FileResponse(path, media_type=media_type_of(name), headers={"Cache-Control": IMMUTABLE})


routes = [Route("/media/{name}", media_file, methods=["GET", "HEAD"])]
