"""A post page with 1,000 comments: requests per second on one uvicorn worker.

    python -m tests.bench.bench_page [--comments 1000] [--seconds 10]

Seeds a fresh blog in a temp folder (one post, N threaded comments from 100
actors), runs `fediblog serve`, and drives it with wrk from loopback, with and
without gzip. Needs wrk (Debian package `wrk`).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from datetime import timedelta
from pathlib import Path

import httpx

from fediblog.blog import Blog, parse_post
from fediblog.models import utcnow
from fediblog.store import Store
from tests.bench.common import bench_settings, rss_mb, running_server, wrk
from tests.processes import free_port


async def seed(folder: Path, port: int, comments: int) -> str:
    settings = bench_settings(folder, port)
    store = await Store.open(settings.database)
    try:
        blog = Blog(settings, store)
        post = await blog.publish(
            parse_post("---\ntitle: A popular post\n---\n" + "A paragraph of text. " * 200)
        )
        actors = [
            await store.save_actor(
                ap_id=f"https://s{n % 10}.example/users/u{n}",
                username=f"u{n}",
                domain=f"s{n % 10}.example",
                name=f"User {n}",
                url=f"https://s{n % 10}.example/@u{n}",
                icon_url=f"https://s{n % 10}.example/a/{n}.png",
                inbox=None,
                shared_inbox=None,
                key_id=None,
                public_key_pem=None,
                fetched=utcnow(),
            )
            for n in range(100)
        ]
        ids: list[int] = []
        for n in range(comments):
            parent = ids[n // 3] if n % 3 and ids else None  # two thirds are replies
            ids.append(
                await store.save_comment(
                    post_id=post.id,
                    parent_id=parent,
                    content_html=f"<p>Comment number {n}, with a few words of text in it "
                    f'and a <a href="https://x.example/{n}">link</a>.</p>',
                    published=post.published + timedelta(minutes=n),
                    received=utcnow(),
                    source="fediverse",
                    ap_id=f"https://s.example/notes/{n}",
                    url=f"https://s.example/@u/{n}",
                    actor_id=actors[n % 100],
                )
            )
        return f"/posts/{post.slug}"
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--comments", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, port = Path(tmp), free_port()
        path = asyncio.run(seed(folder, port, args.comments))
        settings = bench_settings(folder, port)
        with running_server(settings, port) as server:
            idle = rss_mb(server.pid)
            url = f"http://127.0.0.1:{port}{path}"
            page = httpx.get(url)
            assert page.text.count('class="comment') >= args.comments, "comments missing"
            gz = httpx.get(url, headers={"Accept-Encoding": "gzip"})
            print(f"page: {len(page.content):,} bytes, gzip {int(gz.headers['content-length']):,}")
            plain = wrk(url, seconds=args.seconds, headers={"Accept-Encoding": "identity"})
            zipped = wrk(url, seconds=args.seconds, headers={"Accept-Encoding": "gzip"})
            print(
                f"RESULT comments={args.comments} identity={plain:.0f} req/s "
                f"gzip={zipped:.0f} req/s idle_rss={idle:.1f} MB "
                f"rss_after={rss_mb(server.pid):.1f} MB"
            )


if __name__ == "__main__":
    main()
