"""The hello-world ceiling: a trivial starlette endpoint behind ``fediblog serve``'s uvicorn.

    python -m tests.bench.hello [--seconds 5] [--connections 32]   # measure it alone
    python -m tests.bench.hello --serve --port PORT                # only serve it

``GET /`` answers 14 bytes of text, or their gzip (compressed once, at import) when the
request accepts gzip. It is served by ``fediblog.server.serve`` itself, with the
timeouts of a default configuration: the same event loop (uvloop), HTTP protocol
(httptools with the head deadline), body deadline wrapper and single worker as the
blog, so the ratio page/ceiling measures fediblog's own work per request. ``measure``
starts it as a subprocess and drives it with wrk exactly as bench_page drives a page.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.bench.common import wrk_run
from tests.processes import free_port, stop, wait_until_up

BODY = b"Hello, world!\n"
GZIPPED = gzip.compress(BODY, mtime=0)


async def hello(request: Request) -> Response:
    if "gzip" in request.headers.get("accept-encoding", ""):
        return Response(
            GZIPPED,
            media_type="text/plain",
            headers={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"},
        )
    return Response(BODY, media_type="text/plain", headers={"Vary": "Accept-Encoding"})


app = Starlette(routes=[Route("/", hello)])


def serve(port: int) -> None:
    from fediblog.config import load_settings
    from fediblog.server import Timeouts
    from fediblog.server import serve as fediblog_serve

    settings = load_settings(
        {"FEDIBLOG_CONFIG": "/nonexistent/fediblog.toml"},  # the defaults, no file
        base_url=f"http://127.0.0.1:{port}", allow_http=True
    )
    fediblog_serve(
        app,
        "127.0.0.1",
        port,
        Timeouts(
            header=settings.header_timeout,
            body=settings.body_timeout,
            keep_alive=settings.keep_alive_timeout,
            shutdown=settings.shutdown_timeout,
        ),
    )


@contextlib.contextmanager
def running(port: int) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.hello", "--serve", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/", process, "the hello-world server")
        yield process
    finally:
        stop(process, timeout=20)


def measure(*, seconds: float = 5.0, connections: int = 32) -> dict[str, Any]:
    """Requests/s and p99 of the hello-world endpoint, identity and gzip."""
    port = free_port()
    with running(port):
        url = f"http://127.0.0.1:{port}/"
        zipped = httpx.get(url, headers={"Accept-Encoding": "gzip"})
        if zipped.headers.get("content-encoding") != "gzip" or zipped.content != BODY:
            raise RuntimeError("the hello-world endpoint did not answer gzip")
        plain = wrk_run(
            url, seconds=seconds, connections=connections, headers={"Accept-Encoding": "identity"}
        )
        gz = wrk_run(
            url, seconds=seconds, connections=connections, headers={"Accept-Encoding": "gzip"}
        )
    return {
        "identity_rps": plain.rps,
        "identity_p99_ms": plain.p99_ms,
        "gzip_rps": gz.rps,
        "gzip_p99_ms": gz.p99_ms,
        "connections": connections,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", action="store_true", help="only serve the endpoint")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    if args.serve:
        serve(args.port)
        return
    figures = measure(seconds=args.seconds, connections=args.connections)
    print(
        f"RESULT ceiling identity={figures['identity_rps']:,.0f} req/s "
        f"(p99 {figures['identity_p99_ms']:.1f} ms) gzip={figures['gzip_rps']:,.0f} req/s "
        f"(p99 {figures['gzip_p99_ms']:.1f} ms)"
    )


if __name__ == "__main__":
    main()
