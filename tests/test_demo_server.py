"""`fediblog demo` as a real process on a loopback socket: the README's first command."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.helpers import comment_tree, soup
from tests.processes import free_port, stop


def test_demo_serves_posts_with_threaded_responses(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDIBLOG_")}
    server = subprocess.Popen(
        [sys.executable, "-m", "fediblog", "demo", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:  # wait until it listens (bounded), then talk to it
            try:
                index = httpx.get(base + "/", timeout=2)
                break
            except httpx.TransportError:
                assert server.poll() is None, server.stdout.read() if server.stdout else ""
                assert time.monotonic() < deadline, "the demo server did not start"
                time.sleep(0.1)
        titles = [h.get_text(strip=True) for h in soup(index.text).select("li.post-summary h2")]
        assert titles == [
            "Why comments should federate",
            "A short tour of Markdown",
            "Hello, fediverse",
        ]

        page = soup(httpx.get(base + "/posts/why-comments-should-federate", timeout=5).text)
        tree = comment_tree(page)
        assert len(tree) == 2
        assert len(tree[0][1]) == 1  # Alice <- Bob
        assert len(tree[0][1][0][1]) == 1  # Bob <- Carol: three levels
        assert page.find(id="responses-title").get_text().startswith("5 Responses")
        assert "@blog@127.0.0.1:" + str(port) in page.get_text()
        assert (tmp_path / "keys" / "blog.pem").exists()
        assert (tmp_path / "data" / "demo.db").exists()
        assert "jane@jane.example" not in httpx.get(base + "/posts/hello-fediverse", timeout=5).text
    finally:
        stop(server)
        if server.stdout:
            server.stdout.close()
    assert server.returncode == 0
