"""Demo content: three posts and a threaded conversation from several servers.

Used by ``fediblog demo`` on an empty database only. The commenters live on
reserved ``.example`` domains, so nothing here can ever point at a real server.
"""

from __future__ import annotations

import html
from datetime import timedelta
from importlib.resources import files

from fediblog.blog import Blog, parse_post
from fediblog.store import Store

# (key, parent key, actor, minutes after the post, text, content warning)
_CONVERSATION = (
    (
        "a",
        None,
        "alice",
        45,
        "This is exactly why I moved my blog comments to the fediverse. No more spam queue!",
        None,
    ),
    (
        "b",
        "a",
        "bob",
        80,
        "Same here. Does it thread replies from different servers, though?",
        None,
    ),
    (
        "c",
        "b",
        "carol",
        95,
        "It does: I'm replying from Misskey and this lands under Bob's GoToSocial reply.",
        None,
    ),
    (
        "d",
        None,
        "dmitri",
        240,
        "Counterpoint: some readers have no fediverse account. (The local form is coming.)",
        "mild disagreement",
    ),
    ("e", "d", "alice", 300, "Then they can read, and join when they like. Lurking is fine!", None),
)
_ACTORS = {
    "alice": (
        "Alice Example",
        "mastodon.example",
        "https://mastodon.example/users/alice",
        "https://mastodon.example/@alice",
    ),
    "bob": ("Bob", "gts.example", "https://gts.example/users/bob", "https://gts.example/@bob"),
    "carol": (
        "carol ✿",
        "misskey.example",
        "https://misskey.example/users/9a8b7c",
        "https://misskey.example/@carol",
    ),
    "dmitri": (
        "Dmitri",
        "pleroma.example",
        "https://pleroma.example/users/dmitri",
        "https://pleroma.example/users/dmitri",
    ),
}


async def seed_demo(blog: Blog, store: Store) -> bool:
    """Publish the demo posts and conversation, unless the blog has posts already."""
    if await store.count_posts() > 0:
        return False
    folder = files("fediblog") / "demo_posts"
    posts = []
    for entry in sorted(folder.iterdir(), key=lambda item: item.name):
        if entry.name.endswith(".md"):
            posts.append(
                await blog.publish(parse_post(entry.read_text("utf-8"), source=entry.name))
            )

    actor_ids: dict[str, int] = {}
    for key, (name, domain, ap_id, url) in _ACTORS.items():
        actor_ids[key] = await store.save_actor(
            ap_id=ap_id,
            username=url.rsplit("@", 1)[-1] if "@" in url else key,
            domain=domain,
            name=name,
            url=url,
            icon_url=None,
            inbox=f"{ap_id}/inbox",
            shared_inbox=f"https://{domain}/inbox",
            key_id=f"{ap_id}#main-key",
            public_key_pem=None,
            fetched=posts[-1].published,
        )

    post = posts[-1]  # the newest post carries the conversation
    comment_ids: dict[str, int] = {}
    for key, parent, actor, minutes, text, warning in _CONVERSATION:
        ap_id = f"{_ACTORS[actor][2]}/statuses/{key}{post.id}"
        moment = post.published + timedelta(minutes=minutes)
        comment_ids[key] = await store.save_comment(
            post_id=post.id,
            parent_id=comment_ids.get(parent) if parent else None,
            content_html=f"<p>{html.escape(text)}</p>",
            published=moment,
            received=moment,
            source="fediverse",
            ap_id=ap_id,
            url=ap_id,
            actor_id=actor_ids[actor],
            summary=warning,
            sensitive=warning is not None,
        )
    for key, kind in (
        ("alice", "Like"),
        ("bob", "Like"),
        ("carol", "Like"),
        ("dmitri", "Announce"),
    ):
        await store.save_reaction(
            post_id=post.id,
            actor_id=actor_ids[key],
            kind=kind,
            ap_id=None,
            content="⭐" if key == "carol" else None,
            when=post.published,
        )
    await store.save_comment(
        post_id=posts[0].id,
        parent_id=None,
        source="local",
        content_html="<p>Congratulations on the new blog!</p>",
        published=posts[0].published + timedelta(hours=3),
        received=posts[0].published + timedelta(hours=3),
        author_name="Jane from next door",
        author_url="https://jane.example/",
        author_email="jane@jane.example",
    )
    return True
