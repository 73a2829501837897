"""One post to every follower's shared inbox: seconds until all have it, CPU, memory.

    python -m tests.bench.bench_delivery [--servers 1000] [--per-server 10]

Target (issue 12): one post reaches 100,000 followers on 10,000 shared inboxes in
<= 30 s end to end, each inbox exactly once with a valid signature; server CPU per
delivery <= 1.5 ms; peak RSS during the fan-out <= 200 MB. The defaults here are the
older 10,000 followers on 1,000 inboxes (``python -m tests.bench`` runs the target's
sizes, and these with --quick).

A fresh blog in a temp folder gets servers x per-server followers, 10 per fake server
(``http://s0042.bench/users/f0420`` …). Each server's shared inbox is a path on ONE
receiver process on loopback (``http://127.0.0.1:PORT/s/42/inbox``): a plain uvicorn
app that answers 202, counts POSTs per path and checks every one of them with our
verifier (``parse_signature`` + ``verify_signature`` with the blog's public key, the
expected keyId, and a body that is the Create of the post). Then ``fediblog serve``
starts, ``fediblog post new`` (a separate CLI process, as an author would) publishes a
post, and the clock runs until every inbox has received the Create. Reported: seconds
from launching the CLI (and from the CLI's commit) to the last arrival, POSTs and
distinct valid signatures (both must be one per inbox, none twice), the
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
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from fediblog.models import utcnow
from fediblog.store import Store
from tests.bench.common import (
    Reader,
    RssSampler,
    bench_folder,
    bench_settings,
    peak_rss_mb,
    running_server,
    server_env,
    tree_rss_mb,
)
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
        "others": 0,  # activities other than a Create, not counted as deliveries
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
        try:
            kind = json.loads(body).get("type")
        except (ValueError, AttributeError):
            kind = None
        if kind not in ("Create", None):
            # Not the post: the Update of the blog's actor that a server sends its
            # followers when it starts with a profile they have not seen yet.
            stats["others"] += 1
            await send({"type": "http.response.start", "status": 202, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
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
    """Followers, ``per_server`` per server, in bulk (``Store.save_seed_followers``).

    The blog's face is synced first (as ``fediblog serve`` does at start-up), while it
    has no followers: the first start's Update of the actor then reaches nobody instead
    of racing the post under measurement.
    """
    from fediblog.keys import load_key
    from fediblog.media import MediaStore

    store = await Store.open(settings.store_location)
    try:
        await MediaStore(settings, store).sync_face(load_key(settings.keys_dir, "blog").public_pem)
        rows: list[tuple[str, str, str, str, str | None]] = []
        for server in range(servers):
            host = f"s{server:04d}.bench"
            base = f"http://127.0.0.1:{receiver_port}/s/{server}"
            for n in range(per_server):
                number = server * per_server + n
                rows.append(
                    (f"http://{host}/users/f{number}", f"f{number}", host,
                     f"{base}/users/{n}/inbox", f"http://127.0.0.1:{receiver_port}{inbox_path(server)}")
                )  # fmt: skip
            if len(rows) >= 20_000 or server == servers - 1:
                await store.save_seed_followers(rows)
                rows = []
    finally:
        await store.close()


def quiet_queue(settings: Any, timeout: float) -> None:
    """Wait until no delivery is queued: anything the server sends at start-up (an
    Update of its actor to every follower) must not run into the measured fan-out."""
    give_up = time.monotonic() + timeout
    with Reader(settings) as db:
        while time.monotonic() < give_up:
            if not db.one("SELECT count(*) FROM deliveries WHERE status = 'queued'"):
                return
            time.sleep(0.2)
    raise RuntimeError("deliveries queued at start-up were still queued after the timeout")


def stats(receiver_port: int) -> dict[str, Any]:
    return httpx.get(f"http://127.0.0.1:{receiver_port}/stats", timeout=10).json()  # type: ignore[no-any-return]


def measure(
    *,
    servers: int = 1000,
    per_server: int = 10,
    timeout: float = 120.0,
    quiet_wait: float = 120.0,
    profile: Path | None = None,
) -> dict[str, Any]:
    """One fan-out; figures: ``seconds`` (CLI start -> last inbox), ``wrong`` (inboxes
    missed, hit twice, or with an invalid signature), server CPU (the server and any
    process it started) per delivery, peak RSS (sampled every 0.1 s, and VmHWM)."""
    with bench_folder("bench-delivery-") as tmp:
        folder, port, receiver_port = Path(tmp), free_port(), free_port()
        settings = bench_settings(folder, port, allow_private_addresses=True)
        started = time.monotonic()
        asyncio.run(seed(settings, receiver_port, servers, per_server))
        followers = servers * per_server
        print(
            f"seeded {followers:,} followers on {servers:,} servers "
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
                quiet_queue(settings, timeout)
                others = stats(receiver_port)["others"]
                if others:
                    print(f"{others:,} other activities (the actor's Update) before the post")
                rss_before = tree_rss_mb(server.pid)
                if quiet_wait > 0:
                    load = wait_for_quiet(quiet_wait)
                    print(f"background load before the run: {load:.2f} cores", flush=True)
                spy = None
                if profile:
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
                            str(profile),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    time.sleep(1)
                with RssSampler(server.pid) as sampler:
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
                        cli.stdout.strip(),
                        f"(the CLI took {committed - launched:.2f} s)",
                        flush=True,
                    )
                    seen: dict[str, Any] = {}
                    give_up = time.monotonic() + timeout
                    while time.monotonic() < give_up:
                        seen = stats(receiver_port)
                        if len(seen["paths"]) >= servers:
                            break
                        time.sleep(0.05)
                    time.sleep(2.0)  # anything sent twice would arrive now
                    seen = stats(receiver_port)
                    cpu.stop()
                rss_after = tree_rss_mb(server.pid)
                high_water = peak_rss_mb(server.pid)
                if spy is not None:
                    spy.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
                    spy.wait(timeout=60)
            with Reader(settings) as db:
                rows = dict(db.rows("SELECT status, count(*) FROM deliveries GROUP BY status"))
                attempts = db.one("SELECT sum(attempts) FROM deliveries")
        finally:
            receiver.terminate()
            receiver.wait(timeout=20)

    reached = len(seen["paths"])
    twice = sum(1 for count in seen["paths"].values() if count > 1)
    last = seen["last"] or committed
    invalid = seen["posts"] - seen["valid"]
    wrong = (servers - reached) + twice + invalid
    ok = wrong == 0 and seen["signatures"] == servers and len(seen["objects"]) == 1
    print(
        f"inboxes reached: {reached:,}/{servers:,}; POSTs {seen['posts']:,}; "
        f"valid signatures {seen['valid']:,} ({seen['signatures']:,} distinct); "
        f"inboxes hit twice: {twice}; invalid: {seen['invalid'][:3]}"
    )
    print(f"delivery rows: {rows}; attempts (= signatures made) {attempts}")
    print(
        f"first arrival {seen['first'] - committed if seen['first'] else float('nan'):.2f} s "
        f"after the CLI's commit; last {last - committed:.2f} s after it"
    )
    print(f"CPU during the run: {cpu.describe()}")
    return {
        "followers": followers,
        "inboxes": servers,
        "reached": reached,
        "posts": seen["posts"],
        "duplicates": twice,
        "invalid": invalid,
        "wrong": wrong if ok or wrong else 1,  # a stray object or signature counts too
        "ok": ok,
        "seconds": last - launched,
        "seconds_from_commit": last - committed,
        "first_arrival_s": (seen["first"] - committed) if seen["first"] else None,
        "attempts": attempts,
        "rows": rows,
        "server_cpu_s": cpu.server,
        "cpu_ms_per_delivery": cpu.server / max(1, seen["posts"]) * 1000,
        "rss_before_mb": rss_before,
        "peak_rss_mb": max(sampler.peak, high_water),
        "peak_rss_sampled_mb": sampler.peak,
        "vm_hwm_mb": high_water,
        "rss_after_mb": rss_after,
        "cpu": cpu.describe(),
    }


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
    if not 1 <= args.servers * args.per_server <= 1_000_000:
        parser.error("between 1 and 1,000,000 followers")
    figures = measure(
        servers=args.servers,
        per_server=args.per_server,
        timeout=args.timeout,
        quiet_wait=args.quiet_wait,
        profile=args.profile,
    )
    print(
        f"RESULT delivery followers={figures['followers']:,} "
        f"inboxes={figures['reached']:,}/{figures['inboxes']:,} "
        f"seconds_from_cli_start={figures['seconds']:.2f} "
        f"seconds_from_commit={figures['seconds_from_commit']:.2f} "
        f"attempts={figures['attempts']} duplicates={figures['duplicates']} "
        f"rss_before={figures['rss_before_mb']:.1f} MB peak_rss={figures['peak_rss_mb']:.1f} MB "
        f"server_cpu={figures['server_cpu_s']:.2f} s "
        f"({figures['cpu_ms_per_delivery']:.2f} ms/delivery) target=30 s for 100,000 on 10,000 "
        f"{'MET' if figures['ok'] and figures['seconds'] <= 30 else 'NOT MET'}"
    )
    if not figures["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
