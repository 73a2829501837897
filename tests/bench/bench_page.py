"""The post page (its first page of responses): requests per second on one uvicorn worker.

    python -m tests.bench.bench_page [--comments 1000 50000] [--seconds 8] [--connections 32]

Seeds a fresh blog in a temp folder: one post per size, each with N threaded comments
(two thirds of them replies) from 100 actors, written in one transaction per post
(``Store.save_seed_comments``). Runs `fediblog serve` and drives each post's page with
wrk from loopback (one thread, ``--connections``): identity, gzip, and a conditional GET
whose If-None-Match is the page's ETag (answered 304). Needs wrk (Debian package `wrk`).

``measure`` returns, per size N: ``identity_rps_N``, ``gzip_rps_N``,
``not_modified_rps_N``, their p99s (``…_p99_ms_N``), ``p99_ms_N`` (the worst of the
three), ``bytes_N`` / ``gzip_bytes_N`` (the page), ``shown_N`` (comments on the first
page) and ``first_ms_N`` (the first, uncached request).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from fediblog.blog import Blog, parse_post
from fediblog.models import utcnow
from fediblog.store import Store
from tests.bench.common import bench_folder, bench_settings, running_server, tree_rss_mb, wrk_run
from tests.processes import free_port


async def seed_actors(store: Store, count: int = 100) -> list[int]:
    return [
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
        for n in range(count)
    ]


async def seed_comments(store: Store, post_id: int, count: int, actors: Sequence[int]) -> None:
    """``count`` comments: a third of them start a thread, the others answer comment n // 3."""
    post = await store.get_post_by_id(post_id)
    assert post is not None
    await store.save_seed_comments(
        post_id,
        [
            (
                n // 3 if n % 3 else None,
                actors[n % len(actors)],
                f"https://s.example/notes/{post_id}/{n}",
                f"<p>Comment number {n}, with a few words of text in it "
                f'and a <a href="https://x.example/{n}">link</a>.</p>',
                post.published + timedelta(minutes=n),
            )
            for n in range(count)
        ],
    )


async def seed(folder: Path, port: int, sizes: Sequence[int]) -> dict[int, str]:
    """One post per size with that many comments; return size → the post's path."""
    settings = bench_settings(folder, port)
    store = await Store.open(settings.store_location)
    try:
        blog = Blog(settings, store)
        actors = await seed_actors(store)
        paths = {}
        for size in sizes:
            post = await blog.publish(
                parse_post(
                    f"---\ntitle: A popular post ({size} comments)\n---\n"
                    + "A paragraph of text. " * 200
                )
            )
            await seed_comments(store, post.id, size, actors)
            paths[size] = f"/posts/{post.slug}"
        return paths
    finally:
        await store.close()


def measure(
    *, sizes: Sequence[int] = (1000, 50_000), seconds: float = 8.0, connections: int = 32
) -> dict[str, Any]:
    figures: dict[str, Any] = {"sizes": list(sizes), "seconds": seconds}
    with bench_folder("bench-page-") as tmp:
        folder, port = Path(tmp), free_port()
        started = time.monotonic()
        paths = asyncio.run(seed(folder, port, sizes))
        print(f"seeded {sum(sizes):,} comments in {time.monotonic() - started:.1f} s", flush=True)
        settings = bench_settings(folder, port)
        with running_server(settings, port) as server:
            figures["idle_rss_mb"] = tree_rss_mb(server.pid)
            for size, path in paths.items():
                url = f"http://127.0.0.1:{port}{path}"
                started = time.monotonic()
                page = httpx.get(url, headers={"Accept-Encoding": "identity"}, timeout=120)
                figures[f"first_ms_{size}"] = (time.monotonic() - started) * 1000
                page.raise_for_status()
                shown = page.text.count('<li id="comment-')
                if shown == 0 and size:
                    raise RuntimeError(f"the page of the post with {size} comments shows none")
                gz = httpx.get(url, headers={"Accept-Encoding": "gzip"})
                etag = page.headers.get("etag")
                if not etag:
                    raise RuntimeError("the post page has no ETag")
                conditional = {"Accept-Encoding": "identity", "If-None-Match": etag}
                if httpx.get(url, headers=conditional).status_code != 304:
                    raise RuntimeError("If-None-Match with the page's ETag did not get a 304")
                figures[f"bytes_{size}"] = len(page.content)
                figures[f"gzip_bytes_{size}"] = int(gz.headers.get("content-length", 0))
                figures[f"shown_{size}"] = shown
                print(
                    f"{size:,} comments: page {len(page.content):,} bytes, gzip "
                    f"{figures[f'gzip_bytes_{size}']:,}, {shown:,} comments shown, first "
                    f"request {figures[f'first_ms_{size}']:.0f} ms",
                    flush=True,
                )
                worst = 0.0
                for name, headers in (
                    ("identity", {"Accept-Encoding": "identity"}),
                    ("gzip", {"Accept-Encoding": "gzip"}),
                    ("not_modified", conditional),
                ):
                    run = wrk_run(url, seconds=seconds, connections=connections, headers=headers)
                    figures[f"{name}_rps_{size}"] = run.rps
                    figures[f"{name}_p99_ms_{size}"] = run.p99_ms
                    worst = max(worst, run.p99_ms)
                    print(
                        f"  {name}: {run.rps:,.0f} req/s, p50 {run.p50_ms:.1f} ms, "
                        f"p99 {run.p99_ms:.1f} ms",
                        flush=True,
                    )
                figures[f"p99_ms_{size}"] = worst
            figures["rss_after_mb"] = tree_rss_mb(server.pid)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--comments", type=int, nargs="+", default=[1000, 50_000])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    figures = measure(sizes=args.comments, seconds=args.seconds, connections=args.connections)
    for size in args.comments:
        print(
            f"RESULT comments={size} identity={figures[f'identity_rps_{size}']:.0f} req/s "
            f"gzip={figures[f'gzip_rps_{size}']:.0f} req/s "
            f"304={figures[f'not_modified_rps_{size}']:.0f} req/s "
            f"p99={figures[f'p99_ms_{size}']:.1f} ms"
        )
    print(
        f"RESULT idle_rss={figures['idle_rss_mb']:.1f} MB "
        f"rss_after={figures['rss_after_mb']:.1f} MB"
    )


if __name__ == "__main__":
    main()
