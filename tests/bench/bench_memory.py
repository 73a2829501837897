"""Resident memory of one `fediblog serve` worker: idle, and after serving every page once.

    python -m tests.bench.bench_memory

Target (project brief): idle memory <= 80 MB.

Three measurements, each of a fresh server process (one uvicorn worker):

1. an empty blog, right after start-up;
2. a blog with the demo content (``fediblog.demo.seed_demo``: posts, tags, threaded
   comments), right after start-up;
3. the same server after every page was served once: the pages linked from the
   home page (posts, tags, about, feeds, pagination), each post's ActivityPub object,
   the actor, outbox, followers, WebFinger, host-meta and NodeInfo; then 2 s idle.

RSS is what the server's processes hold resident, each page counted once (common.
tree_memory_mb, from /proc/PID/pagemap): for one process, its VmRSS (what `ps` shows);
for several, what the machine gives them all (a container's memory counts each page
once too), where pages that processes forked from one another still share count once,
not once per process. ``*_rss_sum_mb`` is their VmRSS added up, as `ps` would add them.
With ``--split`` (``python -m tests.bench --split``) the server is `serve --web-only`
plus ``--worker-processes`` `fediblog worker`s (one by default): ``*_web_mb`` is the web
process(es)' own and ``*_worker_mb`` the workers' (VmRSS, added up); with
``--worker-process``, `serve --worker-process`: a web process and a worker forked from it.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from pathlib import Path
from typing import Any

import httpx

from fediblog.blog import Blog
from fediblog.demo import seed_demo
from fediblog.store import Store
from tests.bench.common import (
    bench_folder,
    bench_settings,
    process_tree,
    running_server,
    tree_memory_mb,
    tree_rss_mb,
    workers_of,
)
from tests.processes import free_port

AP = "application/activity+json"
LINK = re.compile(r'href="(/[^"#]*)"')


async def seed(settings: object) -> None:
    store = await Store.open(settings.store_location)  # type: ignore[attr-defined]
    try:
        await seed_demo(Blog(settings, store), store)  # type: ignore[arg-type]
    finally:
        await store.close()


async def create(settings: object) -> None:
    """An empty blog: its database, migrated (`fediblog serve` needs one)."""
    store = await Store.open(settings.store_location)  # type: ignore[attr-defined]
    await store.close()


def crawl(base: str, limit: int) -> tuple[int, int]:
    """GET every same-site page reachable from / (at most ``limit``); return (pages, bytes)."""
    seen: set[str] = set()
    queue = ["/", "/feed.xml", "/feed.json", "/tags", "/about"]
    size = 0
    with httpx.Client(base_url=base, timeout=30) as client:
        while queue and len(seen) < limit:
            path = queue.pop(0)
            if path in seen or path.startswith("/static/"):
                continue
            seen.add(path)
            page = client.get(path)
            size += len(page.content)
            if "text/html" in page.headers.get("content-type", ""):
                queue.extend(p for p in LINK.findall(page.text) if p not in seen)
            if path.startswith("/posts/") and page.status_code == 200:
                doc = client.get(path, headers={"Accept": AP})  # the post as an object
                size += len(doc.content)
        host = base.split("://", 1)[1]
        for path, accept in [
            ("/users/blog", AP),
            ("/users/blog/outbox", AP),
            ("/users/blog/outbox?page=1", AP),
            ("/users/blog/followers", AP),
            ("/actor", AP),
            (f"/.well-known/webfinger?resource=acct:blog@{host}", "application/jrd+json"),
            ("/.well-known/host-meta", "*/*"),
            ("/.well-known/nodeinfo", "*/*"),
            ("/nodeinfo/2.1", "*/*"),
        ]:
            size += len(client.get(path, headers={"Accept": accept}).content)
            seen.add(path)
    return len(seen), size


def each_process(pid: int, name: str, parts: dict[str, float]) -> float:
    """The server's RSS, each page once; with several processes, their VmRSS added up
    goes into ``parts`` as NAME_rss_sum_mb, and in a split run the web process(es)' own
    as NAME_web_mb, the workers' as NAME_worker_mb."""
    total = tree_memory_mb(pid)
    added = tree_rss_mb(pid)
    if len(process_tree(pid)) > 1:
        parts[f"{name}_rss_sum_mb"] = added
    workers = workers_of(pid)
    if workers:
        parts[f"{name}_worker_mb"] = sum(tree_rss_mb(worker) for worker in workers)
        parts[f"{name}_web_mb"] = added - parts[f"{name}_worker_mb"]
    return total


def measure_one(
    demo: bool, limit: int, parts: dict[str, float]
) -> tuple[float, float | None, int]:
    with bench_folder("bench-memory-") as tmp:
        folder, port = Path(tmp), free_port()
        settings = bench_settings(folder, port)
        asyncio.run(seed(settings) if demo else create(settings))
        with running_server(settings, port) as server:
            time.sleep(2.0)  # start-up settles; the probe GET /about has been served
            idle = each_process(server.pid, "demo_idle" if demo else "empty_idle", parts)
            if not demo:
                return idle, None, 0
            pages, size = crawl(f"http://127.0.0.1:{port}", limit)
            time.sleep(2.0)
            after = each_process(server.pid, "demo_after", parts)
            print(f"served {pages} pages and documents once ({size:,} bytes)")
            return idle, after, pages


def measure(*, pages: int = 300) -> dict[str, Any]:
    """``empty_idle_mb``, ``demo_idle_mb``, ``demo_after_mb``, and ``idle_rss_mb``: the
    worst of the three (the target's figure)."""
    parts: dict[str, float] = {}
    empty, _, _ = measure_one(False, pages, parts)
    demo_idle, demo_after, served = measure_one(True, pages, parts)
    assert demo_after is not None
    if parts:
        print("per process: " + ", ".join(f"{k}={v:.1f}" for k, v in parts.items()))
    return {
        "empty_idle_mb": empty,
        "demo_idle_mb": demo_idle,
        "demo_after_mb": demo_after,
        "pages_served": served,
        "idle_rss_mb": max(empty, demo_idle, demo_after),
        **parts,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=300, help="crawl at most this many pages")
    args = parser.parse_args()
    figures = measure(pages=args.pages)
    worst = figures["idle_rss_mb"]
    print(
        f"RESULT memory empty_idle={figures['empty_idle_mb']:.1f} MB "
        f"demo_idle={figures['demo_idle_mb']:.1f} MB "
        f"demo_after_serving_{figures['pages_served']}_pages={figures['demo_after_mb']:.1f} MB "
        f"target=80 MB {'MET' if worst <= 80 else 'NOT MET'}"
    )


if __name__ == "__main__":
    main()
