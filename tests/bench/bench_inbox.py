"""Signed replies into the shared inbox: accepted and durably stored per second.

    python -m tests.bench.bench_inbox [--connections 64 256] [--seconds 10]
                                      [--per-run 60000] [--threads 1]

Target (issue 12): one uvicorn worker on 2 cores accepts and durably stores >= 5,000
signed replies/s, p99 <= 100 ms, and never answers 500. ``measure`` returns the figures
(``accepted_rps``, ``p99_ms``, ``non_202``, ``lost`` …) that ``python -m tests.bench``
reports.

A fresh blog in a temp folder (FEDIBLOG_ALLOW_HTTP=1, FEDIBLOG_ALLOW_PRIVATE_ADDRESSES=1)
with one post and 100 remote actors on 10 fake hosts whose public keys are already in
the database, so the run measures the inbox and not key fetching. For every run
(one per connection count, plus a short warm-up) a slice of distinct
``Create{Note}`` replies to the post is generated and signed with the actors'
private keys (draft-cavage rsa-sha256 over (request-target) host date digest, via
``fediblog.httpsig.sign_request``), in as many processes as there are cores, before
the server starts. wrk then POSTs each request exactly once (tests/bench/inbox.lua),
for ``--seconds``, then lets what is in flight finish. Reported per run: accepted
(202) per second over the window, every non-202 answer by status, latency.
Afterwards the server is stopped cleanly and the ``inbox`` table is counted: for
every run, the rows stored must equal the 202s answered.

Needs wrk (Debian package `wrk`, built with LuaJIT).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import multiprocessing
import os
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fediblog.blog import Blog, parse_post
from fediblog.httpsig import sign_request
from fediblog.models import utcnow
from fediblog.store import Store
from tests.bench.common import (
    Reader,
    bench_folder,
    bench_settings,
    postgres_admin,
    running_server,
    tree_rss_mb,
)
from tests.bench.sysstat import CpuWindow, wait_for_quiet
from tests.processes import free_port

LUA = Path(__file__).with_name("inbox.lua")
ACTORS = 100
HOSTS = 10
PUBLIC = "https://www.w3.org/ns/activitystreams#Public"
CONTEXT = [
    "https://www.w3.org/ns/activitystreams",
    "https://w3id.org/security/v1",
    {
        "ostatus": "http://ostatus.org#",
        "atomUri": "ostatus:atomUri",
        "inReplyToAtomUri": "ostatus:inReplyToAtomUri",
        "conversation": "ostatus:conversation",
        "sensitive": "as:sensitive",
        "toot": "http://joinmastodon.org/ns#",
        "votersCount": "toot:votersCount",
        "Hashtag": "as:Hashtag",
    },
]


def actor_id(n: int) -> str:
    return f"http://h{n % HOSTS}.bench/users/u{n}"


def key_id(n: int) -> str:
    return actor_id(n) + "#main-key"


def reply(n: int, run: str, index: int, in_reply_to: str, blog_actor: str) -> bytes:
    """A Mastodon-shaped Create{Note} reply (about 1.8 KB), unique by (run, index)."""
    actor = actor_id(n)
    note = f"{actor}/statuses/{run}-{index}"
    published = "2026-01-01T12:00:00Z"
    cc = [f"{actor}/followers", blog_actor]
    activity = {
        "@context": CONTEXT,
        "id": note + "/activity",
        "type": "Create",
        "actor": actor,
        "published": published,
        "to": [PUBLIC],
        "cc": cc,
        "object": {
            "id": note,
            "type": "Note",
            "summary": None,
            "inReplyTo": in_reply_to,
            "published": published,
            "url": f"http://h{n % HOSTS}.bench/@u{n}/{run}-{index}",
            "attributedTo": actor,
            "to": [PUBLIC],
            "cc": cc,
            "sensitive": False,
            "atomUri": note,
            "inReplyToAtomUri": in_reply_to,
            "conversation": (
                f"tag:h{n % HOSTS}.bench,2026-01-01:objectId={index}:objectType=Conversation"
            ),
            "content": f'<p><span class="h-card"><a href="{blog_actor}" class="u-url mention">'
            f"@<span>blog</span></a></span> Reply {index} of run {run}: a thoughtful answer"
            " with a few sentences of text, as readers write them. #bench</p>",
            "contentMap": {"en": f"<p>Reply {index} of run {run}.</p>"},
            "attachment": [],
            "tag": [
                {"type": "Mention", "href": blog_actor, "name": "@blog@127.0.0.1"},
                {
                    "type": "Hashtag",
                    "href": f"http://h{n % HOSTS}.bench/tags/bench",
                    "name": "#bench",
                },
            ],
            "replies": {
                "id": note + "/replies",
                "type": "Collection",
                "first": {
                    "type": "CollectionPage",
                    "next": note + "/replies?page=true",
                    "partOf": note + "/replies",
                    "items": [],
                },
            },
        },
    }
    return json.dumps(activity, separators=(",", ":")).encode()


# ---- generation (worker processes) ------------------------------------------------------

_keys: list[rsa.RSAPrivateKey] = []
_job: dict[str, str] = {}


def _worker_init(pems: list[bytes], job: dict[str, str]) -> None:
    _keys[:] = [serialization.load_pem_private_key(p, password=None) for p in pems]  # type: ignore[misc]
    _job.update(job)


def _sign_range(task: tuple[str, int, int]) -> list[str]:
    run, start, stop = task
    now = utcnow()
    lines = []
    for index in range(start, stop):
        n = index % ACTORS
        body = reply(n, run, index, _job["in_reply_to"], _job["blog_actor"])
        headers = sign_request(
            "POST",
            _job["inbox"],
            body=body,
            key_id=key_id(n),
            private_key=_keys[n],
            now=now,
            headers={"Content-Type": "application/activity+json"},
        )
        lines.append(
            f"{headers['Date']}\t{headers['Digest']}\t{headers['Signature']}\t{body.decode()}\n"
        )
    return lines


def generate(
    folder: Path, runs: dict[str, int], threads: int, pems: list[bytes], job: dict[str, str]
) -> dict[str, str]:
    """Sign every run's requests; write <folder>/<run>-<thread>.tsv; return the prefixes."""
    chunk = 500
    tasks = [
        (run, start, min(start + chunk, count))
        for run, count in runs.items()
        for start in range(0, count, chunk)
    ]
    started = time.monotonic()
    prefixes = {run: str(folder / f"{run}-") for run in runs}
    files = {
        (run, t): open(f"{prefixes[run]}{t}.tsv", "w")  # noqa: SIM115
        for run in runs
        for t in range(threads)
    }
    try:
        with multiprocessing.get_context("fork").Pool(
            os.cpu_count() or 2, _worker_init, (pems, job)
        ) as pool:
            for (run, start, _), lines in zip(tasks, pool.imap(_sign_range, tasks), strict=True):
                for offset, line in enumerate(lines):
                    files[(run, (start + offset) % threads)].write(line)
    finally:
        for handle in files.values():
            handle.close()
    total = sum(runs.values())
    elapsed = time.monotonic() - started
    print(f"signed {total:,} requests in {elapsed:.1f} s ({total / elapsed:,.0f}/s)", flush=True)
    return prefixes


# ---- seeding ---------------------------------------------------------------------------


async def seed(settings: object, pems: list[bytes]) -> tuple[str, str]:
    store = await Store.open(settings.store_location)  # type: ignore[attr-defined]
    try:
        blog = Blog(settings, store)  # type: ignore[arg-type]
        post = await blog.publish(
            parse_post("---\ntitle: A post people answer\n---\n" + "Some text. " * 50)
        )
        for n, pem in enumerate(pems):
            public = (
                serialization.load_pem_private_key(pem, password=None)
                .public_key()
                .public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
                .decode()
            )
            host = f"h{n % HOSTS}.bench"
            await store.save_actor(
                ap_id=actor_id(n),
                username=f"u{n}",
                domain=host,
                name=f"User {n}",
                url=f"http://{host}/@u{n}",
                icon_url=None,
                inbox=actor_id(n) + "/inbox",
                shared_inbox=f"http://{host}/inbox",
                key_id=key_id(n),
                public_key_pem=public,
                fetched=utcnow(),
            )
        return blog.object_id(post.uid), blog.urls.actor
    finally:
        await store.close()


# ---- running ---------------------------------------------------------------------------


@dataclass
class RunResult:
    name: str
    connections: int
    sent: int
    pool: int
    window: float
    statuses: dict[int, int]
    idle: int
    latency: str
    cpu: float  # server CPU seconds over the whole wrk run (window and drain)
    noise: str  # how busy the machine was, and with what

    @property
    def accepted(self) -> int:
        return self.statuses.get(202, 0)

    @property
    def rate(self) -> float:
        return self.accepted / self.window if self.window > 0 else 0.0

    @property
    def non_202(self) -> int:
        return sum(count for status, count in self.statuses.items() if status != 202)

    @property
    def cpu_per_request(self) -> float:
        return self.cpu / max(1, sum(self.statuses.values()))

    def _latency(self, name: str) -> float:
        match = re.search(rf"{name}=([\d.]+)ms", self.latency)
        return float(match.group(1)) if match else float("nan")

    @property
    def p50_ms(self) -> float:
        return self._latency("p50")

    @property
    def p99_ms(self) -> float:
        return self._latency("p99")

    @property
    def max_ms(self) -> float:
        return self._latency("max")


def drive(
    name: str,
    prefix: str,
    port: int,
    *,
    connections: int,
    seconds: float,
    threads: int,
    pid: int,
    quiet_wait: float = 0.0,
) -> RunResult:
    drain = 4
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{int(seconds + drain)}s",
        "--timeout",
        "30s",
        "-s",
        str(LUA),
        f"http://127.0.0.1:{port}/",
        "--",
        prefix,
        str(seconds),
        f"127.0.0.1:{port}",
    ]
    if quiet_wait > 0:
        load = wait_for_quiet(quiet_wait)
        print(f"run {name}: other processes used {load:.2f} cores just before it", flush=True)
    window_cpu = CpuWindow(pid).start()
    done = subprocess.run(
        command, capture_output=True, text=True, check=True, timeout=seconds + drain + 120
    )
    window_cpu.stop()
    cpu = window_cpu.server
    output = done.stdout
    sent = pool = idle = 0
    window = 0.0
    statuses: dict[int, int] = {}
    for match in re.finditer(
        r"BENCH thread=\d+ sent=(\d+) pool=(\d+) window=([\d.]+) idle=(\d+) statuses=(\S*)", output
    ):
        sent += int(match.group(1))
        pool += int(match.group(2))
        window = max(window, float(match.group(3)))
        idle += int(match.group(4))
        for part in filter(None, match.group(5).split(",")):
            status, count = part.split(":")
            statuses[int(status)] = statuses.get(int(status), 0) + int(count)
    latency = re.search(r"BENCH latency (.*)", output)
    errors = re.search(r"Socket errors:.*", output)
    if not sent:
        raise RuntimeError(f"wrk printed no result:\n{output}\n{done.stderr}")
    result = RunResult(
        name,
        connections,
        sent,
        pool,
        window,
        statuses,
        idle,
        (latency.group(1) if latency else "?") + (f" ({errors.group(0)})" if errors else ""),
        cpu,
        window_cpu.describe(),
    )
    answered = sum(statuses.values())
    print(
        f"run {name}: c={connections} sent={sent:,} (pool {pool:,}) answered={answered:,} "
        f"window={window:.2f}s 202={result.accepted:,} -> {result.rate:,.0f}/s "
        f"non-202={result.non_202} {dict(sorted(statuses.items()))} latency {result.latency} "
        f"server CPU {cpu:.2f} s = {cpu / max(1, answered) * 1e6:,.0f} us/request\n"
        f"  CPU over the run: {window_cpu.describe()}",
        flush=True,
    )
    if answered != sent:
        print(f"  WARNING: {sent - answered} POSTs were not answered before wrk stopped")
    return result


@functools.cache
def private_keys(count: int = ACTORS) -> list[bytes]:
    """``count`` RSA-2048 private keys (PKCS8 PEM), one per remote actor; made once per
    process (python -m tests.bench runs two benchmarks that need them)."""
    return [
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        for _ in range(count)
    ]


def probe(inbox: str, line: str) -> None:
    """POST one signed request by hand: the set-up must give 202, not 401."""
    date, digest, signature, body = line.split("\t")
    first = httpx.post(
        inbox,
        content=body.encode(),
        headers={
            "Date": date,
            "Digest": digest,
            "Signature": signature,
            "Content-Type": "application/activity+json",
        },
    )
    if first.status_code != 202:
        raise RuntimeError(f"the first signed request got {first.status_code}: {first.text}")


def measure(
    *,
    connections: Sequence[int] = (64, 256),
    seconds: float = 10.0,
    per_run: int = 60_000,
    warmup: int = 3_000,
    threads: int = 1,
    quiet_wait: float = 120.0,
    profile: Path | None = None,
    keep: Path | None = None,
) -> dict[str, Any]:
    """Run the warm-up and one run per connection count; return the figures of the best
    run (``accepted_rps``, ``p50_ms``, ``p99_ms``, ``cpu_us_per_request``), ``non_202``
    and ``lost`` (202s without their row) over all runs, RSS, and every run."""
    with bench_folder("bench-inbox-") as tmp:
        folder, port = Path(tmp), free_port()
        settings = bench_settings(folder, port, allow_private_addresses=True)
        started = time.monotonic()
        pems = private_keys()
        in_reply_to, blog_actor = asyncio.run(seed(settings, pems))
        print(f"seeded {ACTORS} actors and a post in {time.monotonic() - started:.1f} s")
        runs = {"probe": 1, "warmup": warmup} | {f"c{c}": per_run for c in connections}
        job = {
            "inbox": f"http://127.0.0.1:{port}/inbox",
            "in_reply_to": in_reply_to,
            "blog_actor": blog_actor,
        }
        prefixes = generate(folder, runs, threads, pems, job)
        sample = Path(prefixes["probe"] + "0.tsv").read_text().split("\n", 1)[0]
        print(f"one request body: {len(sample.split(chr(9))[3]):,} bytes")

        results: list[RunResult] = []
        with running_server(settings, port, FEDIBLOG_ALLOW_PRIVATE_ADDRESSES="1") as server:
            idle_rss = tree_rss_mb(server.pid)
            probe(job["inbox"], sample)
            results.append(
                drive(
                    "warmup",
                    prefixes["warmup"],
                    port,
                    connections=64,
                    seconds=min(3.0, seconds),
                    threads=threads,
                    pid=server.pid,
                )
            )
            for number, count in enumerate(connections):
                spy = None
                if profile and number == 0:
                    spy = subprocess.Popen(
                        [
                            "py-spy",
                            "record",
                            "--pid",
                            str(server.pid),
                            "--rate",
                            "200",
                            "--duration",
                            str(int(seconds)),
                            "--format",
                            "raw",
                            "--output",
                            str(profile),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    time.sleep(1)  # py-spy attaches
                results.append(
                    drive(
                        f"c{count}",
                        prefixes[f"c{count}"],
                        port,
                        connections=count,
                        seconds=seconds,
                        threads=threads,
                        pid=server.pid,
                        quiet_wait=quiet_wait,
                    )
                )
                if spy is not None:
                    spy.wait(timeout=120)
            rss_after = tree_rss_mb(server.pid)
        # The server is stopped (SIGINT, lifespan shut down): count what is on disk.
        with Reader(settings) as db:
            stored = {
                name: db.one(
                    "SELECT count(*) FROM inbox WHERE dedup_key LIKE ?", (f"%/statuses/{name}-%",)
                )
                for name in runs
            }
            if stored["probe"] != 1:
                raise RuntimeError("the probe request was not stored")
            total_rows = db.one("SELECT count(*) FROM inbox")
        if keep and not settings.database_url:  # on PostgreSQL: refused by main()
            keep.write_bytes(settings.database.read_bytes())

    print()
    print(
        "| run | connections | 202/s | 202s | non-202 | rows stored | rows == 202s "
        "| server CPU/request | latency |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        same = stored[r.name] == r.accepted
        print(
            f"| {r.name} | {r.connections} | {r.rate:,.0f} | {r.accepted:,} | {r.non_202} | "
            f"{stored[r.name]:,} | {'yes' if same else 'NO'} | "
            f"{r.cpu_per_request * 1e6:,.0f} us | {r.latency} |"
        )
    print(f"inbox rows in all: {total_rows:,}")
    measured = [r for r in results if r.name != "warmup"]
    best = max(measured, key=lambda r: r.rate)
    lost = sum(max(0, r.accepted - stored[r.name]) for r in results)
    return {
        "accepted_rps": best.rate,
        "p50_ms": best.p50_ms,
        "p99_ms": best.p99_ms,
        "max_ms": best.max_ms,
        "cpu_us_per_request": best.cpu_per_request * 1e6,
        "best_connections": best.connections,
        "non_202": sum(r.non_202 for r in results),
        "statuses": {
            str(status): sum(r.statuses.get(status, 0) for r in results)
            for status in sorted({s for r in results for s in r.statuses})
        },
        "lost": lost,
        "durable": lost == 0 and all(stored[r.name] == r.accepted for r in results),
        "idle_rss_mb": idle_rss,
        "rss_after_mb": rss_after,
        "runs": [
            {
                "name": r.name,
                "connections": r.connections,
                "accepted_rps": r.rate,
                "accepted": r.accepted,
                "stored": stored[r.name],
                "non_202": r.non_202,
                "window_s": r.window,
                "p99_ms": r.p99_ms,
                "cpu_us_per_request": r.cpu_per_request * 1e6,
                "cpu": r.noise,
            }
            for r in results
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--per-run",
        type=int,
        default=60_000,
        help="requests signed for each run (a run ends early if its slice runs out)",
    )
    parser.add_argument("--warmup", type=int, default=3_000)
    parser.add_argument(
        "--profile",
        type=Path,
        help="record the server with py-spy during the first measured run (speedscope JSON)",
    )
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="before each run, wait up to this long for other processes to go quiet",
    )
    parser.add_argument("--keep", type=Path, help="copy the database here afterwards")
    args = parser.parse_args()
    if args.per_run * len(args.connections) > 400_000:
        parser.error("at most 400,000 requests in all")
    if args.keep and postgres_admin():
        parser.error("--keep copies a SQLite file: not with FEDIBLOG_BENCH_POSTGRES (pg_dump it)")
    figures = measure(
        connections=args.connections,
        seconds=args.seconds,
        per_run=args.per_run,
        warmup=args.warmup,
        threads=args.threads,
        quiet_wait=args.quiet_wait,
        profile=args.profile,
        keep=args.keep,
    )
    met = figures["accepted_rps"] >= 5000 and figures["durable"] and figures["non_202"] == 0
    print(
        f"RESULT inbox best={figures['accepted_rps']:,.0f} accepted/s "
        + " ".join(
            f"{run['name']}={run['accepted_rps']:,.0f}/s"
            for run in figures["runs"]
            if run["name"] != "warmup"
        )
        + f" non202={figures['non_202']} durable={'yes' if figures['durable'] else 'NO'}"
        f" p99={figures['p99_ms']:.0f} ms"
        f" idle_rss={figures['idle_rss_mb']:.1f} MB rss_after={figures['rss_after_mb']:.1f} MB"
        f" target=5,000/s {'MET' if met else 'NOT MET'}"
    )


if __name__ == "__main__":
    main()
