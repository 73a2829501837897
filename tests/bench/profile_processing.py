"""Where the inbox processor's time goes: a backlog processed in-process, profiled.

    python -m tests.bench.profile_processing [--comments 0] [--backlog 4000] [--top 30]
                                             [--images] [--no-profile]

bench_processing's blog and backlog (``seed``: Mastodon-shaped replies stored through
``Store.save_inbox_items``), then the real app (``create_app``, workers off) runs
``inbox.process_once()`` until the backlog is done, on this process's one thread. It
prints the CPU time per reply (``time.process_time``), how long each shared transaction
held the store's write lock (from its BEGIN to its COMMIT: what the group commit of
accepted POSTs waits on) and, unless ``--no-profile``, cProfile's top functions by
cumulative and by own time. ``--images`` gives every reply a custom emoji and an image
attachment, so the media proxy's rewrite runs for each one. No network: the senders are
in the database and the fake transport answers nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import pstats
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from fediblog.store import Store
from tests.bench import bench_inbox, bench_processing
from tests.bench.bench_processing import percentile
from tests.bench.common import POSTGRES, bench_settings, postgres_admin
from tests.helpers import running
from tests.processes import free_port


def _with_images(payload: str, index: int) -> str:
    activity: dict[str, Any] = json.loads(payload)
    note = activity["object"]
    note["content"] += "<p>:blobcat: and a picture</p>"
    note["tag"].append(
        {
            "type": "Emoji",
            "name": ":blobcat:",
            "icon": {"type": "Image", "url": "http://h1.bench/emoji/blobcat.png"},
        }
    )
    note["attachment"] = [
        {
            "type": "Document",
            "mediaType": "image/png",
            "url": f"http://h1.bench/media/{index}.png",
            "name": f"picture {index}",
        }
    ]
    return json.dumps(activity)


async def _add_images(database: Path) -> None:
    store = await Store.open(database)
    try:
        db = store._db  # a bench's set-up, not the app: rewrite the stored payloads
        rows = list(await db.execute_fetchall("SELECT id, payload FROM inbox_payloads"))
        await db.executemany(
            "UPDATE inbox_payloads SET payload = ? WHERE id = ?",
            [(_with_images(row[1], row[0]), row[0]) for row in rows],
        )
    finally:
        await store.close()


async def run(backlog: int, comments: int, images: bool, profile: bool, top: int) -> None:
    with tempfile.TemporaryDirectory(prefix="profile-processing-") as tmp:
        settings = bench_settings(Path(tmp), free_port(), allow_private_addresses=True)
        pems = bench_inbox.private_keys()
        await bench_processing.seed(settings, pems, comments, backlog)
        if images:
            await _add_images(settings.database)
        nothing = httpx.MockTransport(lambda request: httpx.Response(404))
        async with running(settings, transport=nothing, run_workers=False) as app:
            services = app.state.services
            store: Store = services.store
            holds: list[float] = []
            original = store.shared_transaction

            @contextlib.asynccontextmanager
            async def timed() -> AsyncIterator[Any]:
                # From just after BEGIN (the lock is held) to just after COMMIT or ROLLBACK.
                started = 0.0
                try:
                    async with original() as transaction:
                        started = time.perf_counter()
                        yield transaction
                finally:
                    if started:
                        holds.append(time.perf_counter() - started)

            store.shared_transaction = timed  # type: ignore[method-assign]
            profiler = cProfile.Profile() if profile else None
            cpu, wall, done = time.process_time(), time.perf_counter(), 0
            if profiler is not None:
                profiler.enable()
            while done < backlog:
                ran = await services.inbox.process_once()
                if ran == 0:
                    break
                done += ran
            if profiler is not None:
                profiler.disable()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            statuses = await store.count_inbox()
            made = await store.count_comments() - comments
        print(
            f"{done:,} replies on a post with {comments:,} comments"
            f"{' (emoji + image each)' if images else ''}: {made:,} comments, inbox {statuses}\n"
            f"  CPU {cpu / max(1, done) * 1000:.3f} ms/reply, wall {wall / max(1, done) * 1000:.3f}"
            f" ms/reply ({done / wall:,.0f}/s){' with cProfile on' if profile else ''}"
        )
        if holds:
            p50, p90 = percentile(holds, 50) * 1000, percentile(holds, 90) * 1000
            print(
                f"  write lock held per shared transaction: {len(holds)} transactions, p50"
                f" {p50:.1f} ms, p90 {p90:.1f} ms, max {max(holds) * 1000:.1f} ms,"
                f" total {sum(holds):.2f} s"
            )
        if profiler is not None:
            stats = pstats.Stats(profiler)
            stats.sort_stats("cumulative").print_stats(top)
            stats.sort_stats("tottime").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backlog", type=int, default=4_000)
    parser.add_argument("--comments", type=int, default=0)
    parser.add_argument("--images", action="store_true")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    if args.images and postgres_admin():  # it rewrites the rows through SQLite's connection
        parser.error(f"--images is SQLite only: unset {POSTGRES}")
    asyncio.run(run(args.backlog, args.comments, args.images, not args.no_profile, args.top))


if __name__ == "__main__":
    main()
