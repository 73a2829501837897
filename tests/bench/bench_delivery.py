"""One post to 10,000 followers on 1,000 shared inboxes: seconds until all have it.

    python -m tests.bench.bench_delivery [--servers 1000] [--per-server 10]

Target (project brief): on one uvicorn worker on 2 cores, one post reaches 10,000
followers on 1,000 shared inboxes in <= 10 s, one signature per inbox, with bounded
concurrency.

A fresh blog in a temp folder gets 10,000 followers, 10 per fake server
(``http://s0042.bench/users/f0420`` …). Each server's shared inbox is a path on ONE
receiver process on loopback (``http://127.0.0.1:PORT/s/42/inbox``): a plain uvicorn
app that answers 202, counts POSTs per path and checks every one of them with our
verifier (``parse_signature`` + ``verify_signature`` with the blog's public key, the
expected keyId, and a body that is the Create of the post). Then ``fediblog serve``
starts, ``fediblog post new`` (a separate CLI process, as an author would) publishes a
post, and the clock runs until every inbox has received the Create. Reported: seconds
from launching the CLI (and from the CLI's commit) to the last arrival, POSTs and
distinct valid signatures (both must be 1,000: one per inbox, none twice), the
delivery rows in the database, and the server's RSS and CPU.

Every inbox here shares one origin (127.0.0.1:PORT), so httpx keeps its connections
alive between inboxes: real servers add a TCP+TLS handshake per host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from fediblog.models import utcnow
from fediblog.store import Store
from tests.bench.common import bench_settings, rss_mb, running_server, server_env
from tests.bench.sysstat import CpuWindow, wait_for_quiet
from tests.processes import free_port

# ---- the receiver (a separate process: python -m tests.bench.bench_delivery --receiver) ----


def receiver_app(port: int, public_pem: str, key_id: str) -> Any:
    from fediblog.errors import SignatureError
    from fediblog.httpsig import parse_signature, verify_signature

    stats: dict[str, Any] = {
        "posts": 0,
        "paths": {},
        "valid": 0,
        "invalid": [],
        "signatures": set(),
        "objects": set(),
        "first": None,
        "last": None,
    }

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["method"] == "GET" and scope["path"] == "/stats":
            body = json.dumps(
                {
                    **stats,
                    "signatures": len(stats["signatures"]),
                    "objects": sorted(stats["objects"]),
                }
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # cut off mid-body (a sender killed): not a delivery
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        now = time.time()
        stats["posts"] += 1
        stats["first"] = stats["first"] or now
        stats["last"] = now
        path = scope["path"]
        stats["paths"][path] = stats["paths"].get(path, 0) + 1
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            headers[name.decode("latin-1")] = value.decode("latin-1")
        try:
            signed = parse_signature(
                scope["method"],
                scope["raw_path"].decode("latin-1"),
                headers,
                body,
                expected_host=f"127.0.0.1:{port}",
                now=utcnow(),
                scheme="http",
            )
            if signed.key_id != key_id:
                raise SignatureError(f"signed with {signed.key_id}, not the blog's key")
            verify_signature(signed, public_pem)
            activity = json.loads(body)
            if activity.get("type") != "Create":
                raise SignatureError(f"a {activity.get('type')}, not a Create")
            stats["objects"].add(activity["object"]["id"])
            stats["signatures"].add(headers.get("signature"))
            stats["valid"] += 1
        except (SignatureError, ValueError, KeyError, TypeError) as error:
            if len(stats["invalid"]) < 20:
                stats["invalid"].append(f"{path}: {error}")
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return app


def run_receiver(port: int, keys_dir: Path, key_id: str) -> None:
    import uvicorn

    from fediblog.keys import load_key

    public_pem = load_key(keys_dir, "blog").public_pem
    uvicorn.run(
        receiver_app(port, public_pem, key_id),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
    )


# ---- the blog ---------------------------------------------------------------------------


def inbox_path(server: int) -> str:
    return f"/s/{server}/inbox"


async def seed(settings: Any, receiver_port: int, servers: int, per_server: int) -> None:
    """Followers, 10 per server, through the Store API (fsync off while seeding only)."""
    store = await Store.open(settings.database)
    try:
        await store._db.execute("PRAGMA synchronous = OFF")  # seeding speed; serve is FULL
        for server in range(servers):
            host = f"s{server:04d}.bench"
            shared = f"http://127.0.0.1:{receiver_port}{inbox_path(server)}"
            for n in range(per_server):
                actor = f"http://{host}/users/f{server * per_server + n}"
                local_id = await store.save_actor(
                    ap_id=actor,
                    username=f"f{server * per_server + n}",
                    domain=host,
                    name=f"Follower {n} of {host}",
                    url=actor,
                    icon_url=None,
                    inbox=f"http://127.0.0.1:{receiver_port}/s/{server}/users/{n}/inbox",
                    shared_inbox=shared,
                    key_id=actor + "#main-key",
                    public_key_pem=None,
                    fetched=utcnow(),
                )
                await store.save_follower(
                    actor_id=local_id,
                    follow_id=f"{actor}#follows/1",
                    inbox=f"http://127.0.0.1:{receiver_port}/s/{server}/users/{n}/inbox",
                    shared_inbox=shared,
                    status="accepted",
                )
    finally:
        await store.close()


def stats(receiver_port: int) -> dict[str, Any]:
    return httpx.get(f"http://127.0.0.1:{receiver_port}/stats", timeout=10).json()  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--servers", type=int, default=1000)
    parser.add_argument("--per-server", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=120.0, help="give up after (s)")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="wait at most this long for other processes to go quiet",
    )
    parser.add_argument(
        "--profile", type=Path, help="record the server with py-spy while it delivers (raw stacks)"
    )
    parser.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--keys", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--key-id", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receiver:
        run_receiver(args.port, args.keys, args.key_id)
        return
    if not 1 <= args.servers * args.per_server <= 100_000:
        parser.error("between 1 and 100,000 followers")

    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as tmp:
        folder, port, receiver_port = Path(tmp), free_port(), free_port()
        settings = bench_settings(folder, port, allow_private_addresses=True)
        started = time.monotonic()
        asyncio.run(seed(settings, receiver_port, args.servers, args.per_server))
        followers = args.servers * args.per_server
        print(
            f"seeded {followers:,} followers on {args.servers:,} servers "
            f"in {time.monotonic() - started:.1f} s",
            flush=True,
        )
        key_id = f"{settings.base_url}/users/{settings.handle}#main-key"
        receiver = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.bench.bench_delivery",
                "--receiver",
                "--port",
                str(receiver_port),
                "--keys",
                str(settings.keys_dir),
                "--key-id",
                key_id,
            ],
            cwd=Path(__file__).resolve().parents[2],
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    stats(receiver_port)
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline or receiver.poll() is not None:
                        raise RuntimeError("the receiver did not start") from None
                    time.sleep(0.1)
            post_file = folder / "post.md"
            post_file.write_text(
                "---\ntitle: News for everyone\ntags: [bench]\n---\n"
                + "A paragraph that ten thousand people will read. " * 40
            )
            env = server_env(settings, FEDIBLOG_ALLOW_PRIVATE_ADDRESSES="1")
            with running_server(settings, port, FEDIBLOG_ALLOW_PRIVATE_ADDRESSES="1") as server:
                time.sleep(1.0)  # let start-up settle
                rss_before = rss_mb(server.pid)
                load = wait_for_quiet(args.quiet_wait)
                print(f"background load before the run: {load:.2f} cores", flush=True)
                spy = None
                if args.profile:
                    spy = subprocess.Popen(
                        [
                            "py-spy",
                            "record",
                            "--pid",
                            str(server.pid),
                            "--rate",
                            "250",
                            "--duration",
                            "30",
                            "--format",
                            "raw",
                            "--output",
                            str(args.profile),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    time.sleep(1)
                cpu = CpuWindow(server.pid, "the CLI", receiver.pid).start()
                launched = time.time()
                cli = subprocess.run(
                    [sys.executable, "-m", "fediblog", "post", "new", str(post_file)],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                committed = time.time()
                if cli.returncode != 0:
                    raise RuntimeError(f"fediblog post new failed: {cli.stderr}")
                print(
                    cli.stdout.strip(), f"(the CLI took {committed - launched:.2f} s)", flush=True
                )
                seen: dict[str, Any] = {}
                give_up = time.monotonic() + args.timeout
                while time.monotonic() < give_up:
                    seen = stats(receiver_port)
                    if len(seen["paths"]) >= args.servers:
                        break
                    time.sleep(0.05)
                time.sleep(2.0)  # anything sent twice would arrive now
                seen = stats(receiver_port)
                cpu.stop()
                rss_after = rss_mb(server.pid)
                if spy is not None:
                    spy.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
                    spy.wait(timeout=60)
            db = sqlite3.connect(settings.database)
            try:
                rows = dict(
                    db.execute("SELECT status, count(*) FROM deliveries GROUP BY status").fetchall()
                )
                attempts = db.execute("SELECT sum(attempts) FROM deliveries").fetchone()[0]
            finally:
                db.close()
        finally:
            receiver.terminate()
            receiver.wait(timeout=20)

    reached = len(seen["paths"])
    twice = sum(1 for count in seen["paths"].values() if count > 1)
    last = seen["last"] or committed
    ok = (
        reached == args.servers
        and twice == 0
        and seen["posts"] == args.servers
        and seen["valid"] == args.servers
        and seen["signatures"] == args.servers
        and not seen["invalid"]
        and len(seen["objects"]) == 1
    )
    print(
        f"inboxes reached: {reached:,}/{args.servers:,}; POSTs {seen['posts']:,}; "
        f"valid signatures {seen['valid']:,} ({seen['signatures']:,} distinct); "
        f"inboxes hit twice: {twice}; invalid: {seen['invalid'][:3]}"
    )
    print(f"delivery rows: {rows}; attempts (= signatures made) {attempts}")
    print(
        f"first arrival {seen['first'] - committed if seen['first'] else float('nan'):.2f} s "
        f"after the CLI's commit; last {last - committed:.2f} s after it"
    )
    print(f"CPU during the run: {cpu.describe()}")
    print(
        f"RESULT delivery followers={followers:,} inboxes={reached:,}/{args.servers:,} "
        f"seconds_from_cli_start={last - launched:.2f} seconds_from_commit={last - committed:.2f} "
        f"signatures={seen['signatures']:,} attempts={attempts} duplicates={twice} "
        f"rss_before={rss_before:.1f} MB rss_after={rss_after:.1f} MB "
        f"server_cpu={cpu.server:.2f} s target=10 s "
        f"{'MET' if ok and last - launched <= 10 else 'NOT MET'}"
    )
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
