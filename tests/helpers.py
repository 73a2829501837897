"""Small builders for tests: posts through the real Blog, comments through the Store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import pytest
from bs4 import BeautifulSoup, Tag
from starlette.applications import Starlette

from fediblog.app import create_app
from fediblog.blog import parse_post
from fediblog.cli import main
from fediblog.config import Settings
from fediblog.keys import ensure_keys
from fediblog.models import InboxItem, Post, utcnow
from fediblog.web.deps import Services


@asynccontextmanager
async def running(settings: Settings, **options: Any) -> AsyncIterator[Starlette]:
    """The real app for these settings with its lifespan entered (``app.state.services``
    is ready); ``create_app`` options pass through. Cross-process changes are polled,
    and in tests on every request. Keys are made if the settings' folder has none."""
    ensure_keys(settings.keys_dir)
    app = create_app(settings, **options)
    async with app.router.lifespan_context(app):
        app.state.services.store.version_max_age = 0.0
        yield app


async def publish(services: Services, title: str, body: str = "Body.", **front: str) -> Post:
    lines = [f"title: {title!r}"] + [f"{key}: {value}" for key, value in front.items()]
    text = "---\n" + "\n".join(lines) + "\n---\n" + body
    return await services.blog.publish(parse_post(text))


async def remote_actor(
    services: Services, username: str, domain: str, name: str | None = None
) -> int:
    ap_id = f"https://{domain}/users/{username}"
    icon = f"https://{domain}/avatars/{username}.png"
    actor_id = await services.store.save_actor(
        ap_id=ap_id,
        username=username,
        domain=domain,
        name=name if name is not None else username.title(),
        url=f"https://{domain}/@{username}",
        icon_url=icon,
        inbox=f"{ap_id}/inbox",
        shared_inbox=f"https://{domain}/inbox",
        key_id=f"{ap_id}#main-key",
        public_key_pem=None,
        fetched=utcnow(),
    )
    await services.proxy.register([icon], "avatar")  # as a reply's arrival does
    return actor_id


async def remote_comment(
    services: Services,
    post: Post,
    actor_id: int,
    text: str,
    *,
    parent: int | None = None,
    minutes: int = 1,
    status: str = "published",
    visibility: str = "public",
    ap_id: str | None = None,
    published: datetime | None = None,
) -> int:
    moment = published or post.published + timedelta(minutes=minutes)
    return await services.store.save_comment(
        post_id=post.id,
        parent_id=parent,
        content_html=f"<p>{text}</p>",
        published=moment,
        received=moment,
        source="fediverse",
        ap_id=ap_id or f"https://remote.example/notes/{text.replace(' ', '-')}-{minutes}",
        actor_id=actor_id,
        status=status,
        visibility=visibility,  # type: ignore[arg-type]
    )


def soup(html: str) -> BeautifulSoup:
    return BeautifulSoup(html, "html.parser")


def comment_tree(page: BeautifulSoup) -> list[tuple[str, list[object]]]:
    """The responses as nested (text of the first paragraph, children) pairs."""

    def items(ol: Tag) -> list[tuple[str, list[object]]]:
        result: list[tuple[str, list[object]]] = []
        for li in ol.find_all("li", recursive=False):
            body = li.find(class_="comment-body")
            content = body.find(class_="e-content") if body else None
            text = (
                content.get_text(" ", strip=True)
                if content
                else body.get_text(" ", strip=True)
                if body
                else ""
            )
            children = li.find("ol", class_="children", recursive=False)
            result.append((text, list(items(children)) if children else []))
        return result

    top = page.find("ol", class_="comment-list")
    return items(top) if isinstance(top, Tag) else []


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the fediblog command in-process: (exit code, stdout, stderr)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def inbox_items(count: int, prefix: str = "k") -> list[InboxItem]:
    """``count`` activities for the inbox's batch writer, keys ``<prefix>0``, ..."""
    return [InboxItem(f"{prefix}{n}", "https://a.example/u", "Like", "{}") for n in range(count)]
