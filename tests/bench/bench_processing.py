"""Accepted replies becoming visible comments: the inbox processor's rate, and the lag.

    python -m tests.bench.bench_processing [--comments 0 50000] [--backlog 30000]
                                           [--window 10] [--flood-seconds 10]
                                           [--flood-rate 5000] [--drain 60]

Targets (issue 12): replies become comments at >= 2,500/s on one worker, the rate at
50,000 comments on the post within 20% of the rate at 0, and accept -> visible p99
<= 2 s during a 10-second flood at the acceptance rate.

A. Rate, once per ``--comments`` size. A fresh blog (as bench_inbox's: one post, 100
   remote actors with their keys in the database) whose post already holds that many
   comments (``Store.save_seed_comments``), and ``--backlog`` accepted replies waiting
   in the inbox table (bench_inbox's Mastodon-shaped ``Create{Note}``s, stored through
   ``Store.save_inbox_items``, the inbox's own batch path: processing reads stored rows,
   so they need no signature). `fediblog serve` starts; its one inbox worker turns them
   into comments. The rate is the comments added between the moment the server answers
   and the moment the backlog is done or ``--window`` s have passed, over that time.
   Server CPU per reply over the same window.

B. Lag. A fresh blog (its post holding ``--flood-comments`` comments); replies signed
   beforehand (``--flood-seconds`` x ``--flood-rate`` of them); wrk POSTs them to /inbox
   as fast as they are accepted (bench_inbox's inbox.lua, ``--connections``), each once,
   for ``--flood-seconds``. Visibility is measured by polling the database every 50 ms
   from this process (on SQLite a read-only view through WAL; on PostgreSQL rows
   committed out of id order are caught too): a reply is *accepted* when its inbox
   row is first seen committed (the 202 is sent right after that commit) and *visible*
   when its comment row (published) is first seen; lag = visible - accepted, so both
   ends have the same 50 ms resolution. (The database's own timestamps have one-second
   precision: too coarse for a 2 s target.) After the flood the poll goes on until every
   accepted reply is visible or ``--drain`` s have passed; a reply still not visible
   then counts with the lag it had so far (``lag_unseen`` says how many: the p99 is then
   a lower bound).
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fediblog.config import Settings
from fediblog.models import InboxItem
from fediblog.store import Store
from tests.bench import bench_inbox, bench_page
from tests.bench.common import Reader, bench_folder, bench_settings, running_server
from tests.bench.sysstat import CpuWindow
from tests.processes import free_port

ENV = {"FEDIBLOG_ALLOW_PRIVATE_ADDRESSES": "1"}
POLL = 0.05


async def seed(settings: Settings, pems: list[bytes], comments: int, backlog: int) -> str:
    """bench_inbox's blog, ``comments`` on its post, ``backlog`` replies in the inbox;
    return the post's object id."""
    in_reply_to, blog_actor = await bench_inbox.seed(settings, pems)
    store = await Store.open(settings.store_location)
    try:
        if comments:
            post_id = (await store.list_posts(limit=1))[0].id  # the blog's one post
            actors = []
            for n in range(bench_inbox.ACTORS):
                row = await store.get_cached_actor(bench_inbox.actor_id(n))
                assert row is not None
                actors.append(int(row.id))
            await bench_page.seed_comments(store, post_id, comments, actors)
        for start in range(0, backlog, 5_000):
            items = []
            for index in range(start, min(backlog, start + 5_000)):
                n = index % bench_inbox.ACTORS
                actor = bench_inbox.actor_id(n)
                note = f"{actor}/statuses/backlog-{index}"
                items.append(
                    InboxItem(
                        dedup_key=f"{actor} {note}/activity",
                        actor=actor,
                        type="Create",
                        payload=bench_inbox.reply(
                            n, "backlog", index, in_reply_to, blog_actor
                        ).decode(),
                    )
                )
            await store.save_inbox_items(items)
    finally:
        await store.close()
    return in_reply_to


def _count(db: Reader, sql: str) -> int:
    return int(db.one(sql))


def measure_rate(
    pems: list[bytes], *, comments: int, backlog: int, window: float
) -> dict[str, Any]:
    """Part A for one thread size: replies turned into comments per second."""
    with bench_folder("bench-processing-") as tmp:
        folder, port = Path(tmp), free_port()
        settings = bench_settings(folder, port, allow_private_addresses=True)
        started = time.monotonic()
        asyncio.run(seed(settings, pems, comments, backlog))
        print(
            f"post with {comments:,} comments, {backlog:,} replies waiting: seeded in "
            f"{time.monotonic() - started:.1f} s",
            flush=True,
        )
        db = Reader(settings)
        try:
            with running_server(settings, port, **ENV) as server:
                cpu = CpuWindow(server.pid).start()
                t0, c0 = time.monotonic(), _count(db, "SELECT count(*) FROM comments")
                target = comments + backlog
                t1, c1 = t0, c0
                while c1 < target and t1 - t0 < window:
                    time.sleep(0.1)
                    t1, c1 = time.monotonic(), _count(db, "SELECT count(*) FROM comments")
                cpu.stop()
            statuses = dict(db.rows("SELECT status, count(*) FROM inbox GROUP BY status"))
        finally:
            db.close()
    done = c1 - c0
    if done <= 0 and c0 >= target:
        raise RuntimeError("the backlog was done before the server answered: use a larger one")
    rate = done / (t1 - t0) if t1 > t0 else 0.0
    print(
        f"  {done:,} comments in {t1 - t0:.1f} s = {rate:,.0f}/s ({c0 - comments:,} before the "
        f"server answered); server CPU {cpu.server / max(1, done) * 1000:.2f} ms/reply; "
        f"inbox rows {statuses}\n  CPU: {cpu.describe()}",
        flush=True,
    )
    return {
        "rate": rate,
        "processed": done,
        "seconds": t1 - t0,
        "cpu_ms_per_reply": cpu.server / max(1, done) * 1000,
        "failed": int(statuses.get("failed", 0)),
        "cpu": cpu.describe(),
    }


class _NewRows:
    """The rows of a table committed since the last read, by id. On PostgreSQL several
    processes insert at once, so a row can commit after one with a higher id was seen:
    the ids skipped are asked for again on each read until they show, or for
    ``GAP_WAIT`` s (an insert rolled back, or a sequence number an upsert used up)."""

    GAP_WAIT = 10.0
    GAPS_READ = 500  # at most this many skipped ids asked for per read

    def __init__(self, db: Reader, table: str, columns: str) -> None:
        # table and columns: names written in this module, never data.
        self.select = f"SELECT id, {columns} FROM {table}"  # noqa: S608
        self.last = _count(db, f"SELECT coalesce(max(id), 0) FROM {table}")  # noqa: S608
        self.gaps: dict[int, float] = {}  # id skipped -> when it was first missed

    def read(self, db: Reader) -> list[tuple[Any, ...]]:
        rows = db.rows(f"{self.select} WHERE id > ? ORDER BY id", (self.last,))
        now = time.monotonic()
        for row_id, *_ in rows:
            for missing in range(self.last + 1, min(row_id, self.last + 1 + self.GAPS_READ)):
                self.gaps[missing] = now
            self.last = row_id
        for gap in [gap for gap, since in self.gaps.items() if now - since > self.GAP_WAIT]:
            del self.gaps[gap]
        if self.gaps:
            wanted = sorted(self.gaps)[: self.GAPS_READ]
            late = db.rows(f"{self.select} WHERE id IN ({', '.join('?' * len(wanted))})", wanted)
            for row_id, *_ in late:
                del self.gaps[row_id]
            rows += late
        return rows


class Visibility(threading.Thread):
    """Polls the database: when each reply's inbox row, then its comment, first shows."""

    def __init__(self, settings: Settings, interval: float = POLL) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.interval = interval
        self.accepted: dict[str, float] = {}  # note id -> first seen stored
        self.visible: dict[str, float] = {}  # note id -> first seen as a published comment
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            db = Reader(self.settings)  # opened in this thread: used only here
            try:
                self._poll(db)
            finally:
                db.close()
        except BaseException as error:  # reported by the caller
            self.error = error

    def _poll(self, db: Reader) -> None:
        inbox = _NewRows(db, "inbox", "dedup_key")
        comments = _NewRows(db, "comments", "ap_id, status")
        while not self.halt.is_set():
            rows = inbox.read(db)
            now = time.monotonic()
            for _, key in rows:
                activity = key.split(" ", 1)[-1]
                self.accepted.setdefault(activity.removesuffix("/activity"), now)
            # A comment row is only ever added after its inbox row: read them second.
            rows = comments.read(db)
            now = time.monotonic()
            for _, ap_id, status in rows:
                if status == "published" and ap_id:
                    self.visible.setdefault(ap_id, now)
            self.halt.wait(self.interval)

    def pending(self) -> int:
        return sum(1 for note in self.accepted if note not in self.visible)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * p // 100)))
    return ordered[int(rank) - 1]


def measure_lag(
    pems: list[bytes],
    *,
    comments: int,
    seconds: float,
    rate: int,
    connections: int,
    drain: float,
    quiet_wait: float,
) -> dict[str, Any]:
    """Part B: accept -> visible lag during a flood."""
    with bench_folder("bench-processing-lag-") as tmp:
        folder, port = Path(tmp), free_port()
        settings = bench_settings(folder, port, allow_private_addresses=True)
        in_reply_to = asyncio.run(seed(settings, pems, comments, 0))
        blog_actor = f"{settings.base_url}/users/{settings.handle}"
        job = {
            "inbox": f"http://127.0.0.1:{port}/inbox",
            "in_reply_to": in_reply_to,
            "blog_actor": blog_actor,
        }
        count = max(1000, int(seconds * rate))
        prefixes = bench_inbox.generate(folder, {"probe": 1, "flood": count}, 1, pems, job)
        sample = Path(prefixes["probe"] + "0.tsv").read_text().split("\n", 1)[0]
        with running_server(settings, port, **ENV) as server:
            bench_inbox.probe(job["inbox"], sample)
            time.sleep(0.5)  # the probe's reply is processed before the clock starts
            watch = Visibility(settings)
            watch.start()
            try:
                run = bench_inbox.drive(
                    "flood",
                    prefixes["flood"],
                    port,
                    connections=connections,
                    seconds=seconds,
                    threads=1,
                    pid=server.pid,
                    quiet_wait=quiet_wait,
                )
                deadline = time.monotonic() + drain
                while watch.pending() and time.monotonic() < deadline and watch.is_alive():
                    time.sleep(0.2)
            finally:
                watch.halt.set()
                watch.join()
            end = time.monotonic()
    if watch.error is not None:
        raise RuntimeError(f"polling the database failed: {watch.error}")
    accepted = watch.accepted
    if not accepted:
        raise RuntimeError("no reply was accepted during the flood")
    lags = [watch.visible.get(note, end) - moment for note, moment in accepted.items()]
    unseen = watch.pending()
    first, last = min(accepted.values()), max(accepted.values())
    during = sum(1 for moment in watch.visible.values() if first <= moment <= last)
    after = [moment for moment in watch.visible.values() if moment > last]
    figures = {
        "lag_p50_s": percentile(lags, 50),
        "lag_p99_s": percentile(lags, 99),
        "lag_max_s": max(lags),
        "lag_unseen": unseen,
        "lag_method": f"database polled every {int(POLL * 1000)} ms",
        "flood_comments": comments,
        "flood_accepted": len(accepted),
        "flood_202": run.accepted,
        "flood_non_202": run.non_202,
        "flood_seconds": last - first,
        "flood_rps": len(accepted) / (last - first) if last > first else 0.0,
        "flood_processing_rps": during / (last - first) if last > first else 0.0,
        "after_flood_processing_rps": (
            len(after) / (max(after) - last) if after and max(after) > last else 0.0
        ),
    }
    print(
        f"flood: {len(accepted):,} replies stored in {figures['flood_seconds']:.1f} s "
        f"({figures['flood_rps']:,.0f}/s); comments {figures['flood_processing_rps']:,.0f}/s "
        f"during it, {figures['after_flood_processing_rps']:,.0f}/s after; lag p50 "
        f"{figures['lag_p50_s']:.2f} s, p99 {figures['lag_p99_s']:.2f} s, max "
        f"{figures['lag_max_s']:.2f} s; {unseen:,} not visible after the drain",
        flush=True,
    )
    return figures


def measure(
    *,
    sizes: Sequence[int] = (0, 50_000),
    backlog: int = 30_000,
    window: float = 10.0,
    flood_seconds: float = 10.0,
    flood_rate: int = 5_000,
    flood_comments: int = 0,
    connections: int = 256,
    drain: float = 60.0,
    quiet_wait: float = 0.0,
) -> dict[str, Any]:
    """Both parts. ``rate_empty`` is the rate at the smallest size, ``rate_big`` at the
    largest, ``rate_big_vs_empty`` their ratio; ``rate_N`` for every size."""
    pems = bench_inbox.private_keys()
    figures: dict[str, Any] = {"backlog": backlog, "window": window}
    for size in sizes:
        result = measure_rate(pems, comments=size, backlog=backlog, window=window)
        for key, value in result.items():
            figures[f"{key}_{size}"] = value
    low, high = min(sizes), max(sizes)
    figures["rate_empty"] = figures[f"rate_{low}"]
    figures["rate_big"] = figures[f"rate_{high}"]
    figures["big_comments"] = high
    figures["rate_big_vs_empty"] = (
        figures["rate_big"] / figures["rate_empty"] if figures["rate_empty"] else None
    )
    if flood_seconds > 0:
        figures.update(
            measure_lag(
                pems,
                comments=flood_comments,
                seconds=flood_seconds,
                rate=flood_rate,
                connections=connections,
                drain=drain,
                quiet_wait=quiet_wait,
            )
        )
    return figures


def measure_in_process(
    *, comments: int = 0, backlog: int = 3_000, profile: Path | None = None
) -> dict[str, float]:
    """Processing alone, without a server: the same seeded blog, then the app's own
    ``inbox.process_once()`` (in this process, no HTTP) until the backlog is done.
    CPU per reply (both of this process's threads: the event loop and SQLite's) is the
    figure to compare between versions on a busy machine. ``profile`` writes cProfile
    stats of the processing (`python -m pstats FILE`).

        python -c "from tests.bench.bench_processing import measure_in_process as m;
                   print(m(comments=50_000))"
    """
    import cProfile

    from tests.helpers import running

    async def run(folder: Path) -> dict[str, float]:
        settings = bench_settings(folder, free_port(), allow_private_addresses=True)
        await seed(settings, bench_inbox.private_keys(), comments, backlog)
        async with running(settings, run_workers=False) as app:
            inbox = app.state.services.inbox
            profiler = cProfile.Profile() if profile else None
            cpu, wall, done = time.process_time(), time.perf_counter(), 0
            if profiler:
                profiler.enable()
            while count := await inbox.process_once():
                done += count
            if profiler:
                profiler.disable()
                profiler.dump_stats(profile)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return {"processed": done, "rate": done / wall, "cpu_ms_per_reply": cpu / done * 1000}

    with bench_folder("bench-processing-inproc-") as tmp:
        return asyncio.run(run(Path(tmp)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--comments", type=int, nargs="+", default=[0, 50_000])
    parser.add_argument("--backlog", type=int, default=30_000)
    parser.add_argument("--window", type=float, default=10.0, help="seconds per rate run")
    parser.add_argument("--flood-seconds", type=float, default=10.0, help="0: no lag run")
    parser.add_argument("--flood-rate", type=int, default=5_000, help="replies signed per s")
    parser.add_argument("--flood-comments", type=int, default=0)
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--drain", type=float, default=60.0)
    parser.add_argument("--quiet-wait", type=float, default=0.0)
    args = parser.parse_args()
    figures = measure(
        sizes=args.comments,
        backlog=args.backlog,
        window=args.window,
        flood_seconds=args.flood_seconds,
        flood_rate=args.flood_rate,
        flood_comments=args.flood_comments,
        connections=args.connections,
        drain=args.drain,
        quiet_wait=args.quiet_wait,
    )
    line = " ".join(f"rate_{size}={figures[f'rate_{size}']:,.0f}/s" for size in args.comments)
    if args.flood_seconds > 0:
        line += (
            f" lag_p99={figures['lag_p99_s']:.2f} s (unseen {figures['lag_unseen']})"
            f" flood={figures['flood_rps']:,.0f}/s"
        )
    print(f"RESULT processing {line}")


if __name__ == "__main__":
    main()
