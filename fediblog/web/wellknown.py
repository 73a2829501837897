"""Discovery: WebFinger, host-meta (XRD and JSON), NodeInfo 2.1 and 2.0 (INTEROP.md 1-3)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from fediblog import __version__
from fediblog.web.deps import Services, services

JRD = "application/jrd+json; charset=utf-8"
HTML = "text/html; charset=utf-8"
NODEINFO_21 = "http://nodeinfo.diaspora.software/ns/schema/2.1"
NODEINFO_20 = "http://nodeinfo.diaspora.software/ns/schema/2.0"
CORS = {"Access-Control-Allow-Origin": "*"}


def _json(document: Any, media_type: str, status: int = 200) -> Response:
    body = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
    headers = {**CORS, "Cache-Control": "public, max-age=600"}
    return Response(body, status_code=status, media_type=media_type, headers=headers)


def _error(status: int, reason: str) -> Response:
    return Response(
        f"{status}: {reason}", status_code=status, media_type="text/plain", headers=CORS
    )


async def webfinger(request: Request) -> Response:
    ctx = services(request)
    settings, urls = ctx.settings, ctx.urls
    resource = request.query_params.get("resource", "").strip()
    if not resource:
        return _error(400, "the resource parameter is required")
    hostname = urlsplit(settings.base_url).hostname or ""
    blog_accts = {f"acct:{settings.handle}@{settings.host}".lower()}
    instance_accts = {f"acct:{hostname}@{settings.host}".lower()}
    normalized = resource.lower() if resource.lower().startswith("acct:") else resource
    normalized = normalized.replace("acct:@", "acct:", 1)  # acct:@blog@host, as some send it
    if normalized in blog_accts or resource in (urls.actor, urls.base, urls.base + "/"):
        subject, actor, profile = f"acct:{settings.acct}", urls.actor, urls.base + "/"
    elif normalized in instance_accts or resource == urls.instance_actor:
        subject, actor, profile = (
            f"acct:{hostname}@{settings.host}",
            urls.instance_actor,
            urls.base + "/about",
        )
    else:
        return _error(404, "no such account here")
    return _json(
        {
            "subject": subject,
            "aliases": [actor, profile],
            "links": [
                {"rel": "self", "type": "application/activity+json", "href": actor},
                {
                    "rel": "http://webfinger.net/rel/profile-page",
                    "type": "text/html",
                    "href": profile,
                },
                {
                    "rel": "http://ostatus.org/schema/1.0/subscribe",
                    "template": urls.base + "/authorize_interaction?uri={uri}",
                },
            ],
        },
        JRD,
    )


async def host_meta(request: Request) -> Response:
    base = services(request).urls.base
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<XRD xmlns="http://docs.oasis-open.org/ns/xri/xrd-1.0">\n'
        f'  <Link rel="lrdd" template="{base}/.well-known/webfinger?resource={{uri}}"/>\n'
        "</XRD>\n"
    )
    return Response(body, media_type="application/xrd+xml; charset=utf-8", headers=CORS)


async def host_meta_json(request: Request) -> Response:
    base = services(request).urls.base
    template = f"{base}/.well-known/webfinger?resource={{uri}}"
    return _json({"links": [{"rel": "lrdd", "template": template}]}, "application/json")


async def nodeinfo_links(request: Request) -> Response:
    base = services(request).urls.base
    return _json(
        {
            "links": [
                {"rel": NODEINFO_21, "href": base + "/nodeinfo/2.1"},
                {"rel": NODEINFO_20, "href": base + "/nodeinfo/2.0"},
            ]
        },
        "application/json",
    )


async def nodeinfo(request: Request) -> Response:
    ctx = services(request)
    version = request.path_params["version"]
    if version not in ("2.0", "2.1"):
        return _error(404, "NodeInfo 2.0 and 2.1 are served")
    software: dict[str, Any] = {"name": "fediblog", "version": __version__}
    if version == "2.1":
        software["repository"] = "https://pypi.org/project/fediblog/"
    posts = await ctx.store.count_posts()
    document = {
        "version": version,
        "software": software,
        "protocols": ["activitypub"],
        "services": {"inbound": [], "outbound": ["atom1.0"]},
        "openRegistrations": False,
        "usage": {
            "users": {"total": 1, "activeMonth": 1, "activeHalfyear": 1},
            "localPosts": posts,
            "localComments": await ctx.store.count_comments(),
        },
        "metadata": {"nodeName": ctx.settings.title, "nodeDescription": ctx.settings.description},
    }
    schema = NODEINFO_21 if version == "2.1" else NODEINFO_20
    return _json(document, f'application/json; profile="{schema}#"')


async def authorize_interaction(request: Request) -> Response:
    """The OStatus subscribe template, as WebFinger advertises it. The blog has no local
    accounts to follow or answer from, so only its own posts lead anywhere (to their
    page); anything else gets a page that says so, never a 404."""
    ctx = services(request)
    uri = request.query_params.get("uri", "").strip()
    if not uri:
        return _page(
            ctx,
            400,
            "Nothing to open",
            "This address opens a post of this blog from its link: add ?uri= and the link.",
        )
    target = await _own_page(ctx, uri)
    if target is not None:
        return RedirectResponse(target, status_code=302)
    follow = f"To follow this blog, search for @{ctx.settings.acct} on your own server."
    if _is_own(ctx, uri):
        return _page(
            ctx, 200, "Not a post", f"There is no post of this blog at {uri[:200]}. {follow}"
        )
    scheme = urlsplit(uri).scheme.lower()
    if scheme not in ("http", "https", "acct") and not uri.startswith("@"):
        return _page(ctx, 400, "Not an address", f"“{uri[:200]}” is not a link. {follow}")
    return _page(
        ctx,
        200,
        "Nothing to do here",
        f"This blog has no accounts of its own, so it cannot follow or answer {uri[:200]}"
        f" from here. {follow}",
    )


def _is_own(ctx: Services, uri: str) -> bool:
    ours, theirs = urlsplit(ctx.urls.base), urlsplit(uri)
    return (theirs.scheme.lower(), theirs.netloc.lower()) == (ours.scheme, ours.netloc.lower())


async def _own_page(ctx: Services, uri: str) -> str | None:
    """Where a link to this blog opens: a post's page (from its id, its page or an old
    slug), an author's answer, or the front page for the blog's account; else None."""
    settings = ctx.settings
    acct = uri.lower().removeprefix("acct:").removeprefix("@")
    if acct == settings.acct.lower():
        return ctx.urls.base + "/"
    if not _is_own(ctx, uri):
        return None
    path = urlsplit(uri).path.rstrip("/")
    if path in ("", f"/users/{settings.handle}"):
        return ctx.urls.base + "/"
    parts = path.split("/")
    if len(parts) >= 3 and parts[1] == "p":
        post = await ctx.store.get_post_by_uid(parts[2])
        if post is None:
            return None
        # An answer's id leads to its place on the page (its own route redirects there).
        return uri if len(parts) == 5 and parts[3] == "answers" else ctx.blog.post_url(post)
    if len(parts) >= 3 and parts[1] == "posts":
        if await ctx.store.get_post_by_slug(parts[2]) is not None:
            return uri
        moved = await ctx.store.get_current_slug(parts[2])
        return ctx.urls.post_url(moved) if moved is not None else None
    return None


def _page(ctx: Services, status: int, title: str, text: str) -> Response:
    body = ctx.templates.get_template("message.html").render(
        site=ctx.settings, title=title, text=text, post=None
    )
    headers = {"X-Robots-Tag": "noindex", "Cache-Control": "no-store"}
    return Response(body, status_code=status, media_type=HTML, headers=headers)


routes = [
    Route("/.well-known/webfinger", webfinger),
    Route("/.well-known/host-meta", host_meta),
    Route("/.well-known/host-meta.json", host_meta_json),
    Route("/.well-known/nodeinfo", nodeinfo_links),
    Route("/nodeinfo/{version}", nodeinfo),
    Route("/authorize_interaction", authorize_interaction),
]
