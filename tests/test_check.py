"""`fediblog check` against a real server on 127.0.0.1, through a real reverse proxy.

The blog runs as `fediblog serve` (a subprocess, uvicorn trusting proxy headers from
127.0.0.1 as in production). In front of it, a small proxy made here forwards every GET,
and can do what misconfigured proxies do: rewrite Host, or drop X-Forwarded-Proto. For
https it terminates TLS with a certificate from a CA made for the test, which the check
trusts through SSL_CERT_FILE, as an operator with a private CA would. `fediblog check`
itself runs as a subprocess, exactly as on a server.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.processes import free_port, run_cli, stop

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-encoding", "content-length"}


def blog_env(folder: Path, base_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDIBLOG_", "SSL_CERT"))}
    env.update(FEDIBLOG_CONFIG=str(folder / "fediblog.toml"), FEDIBLOG_BASE_URL=base_url)
    if base_url.startswith("http:"):
        env["FEDIBLOG_ALLOW_HTTP"] = "1"
    env.update(extra)
    return env


def fediblog(folder: Path, env: dict[str, str], *args: str) -> tuple[int, list[str], str]:
    """A fediblog command: (exit code, stdout lines, stderr)."""
    done = run_cli(folder, env, *args)
    return done.returncode, done.stdout.splitlines(), done.stderr


def by_check(lines: list[str]) -> dict[str, tuple[str, str]]:
    """{check name: (status, detail)} from the one line each check prints."""
    found = {}
    for line in lines:
        status, name, detail = line.split(None, 2)
        found[name] = (status, detail)
    return found


@contextmanager
def blog_server(folder: Path, base_url: str) -> Iterator[int]:
    """`fediblog init` then `fediblog serve` on a free port; yields the port."""
    env = blog_env(folder, base_url)
    code, _, err = fediblog(folder, env, "init")
    assert code == 0, err
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "fediblog", "serve", "--port", str(port)],
        cwd=folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:  # bounded wait until it listens
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        yield port
    finally:
        stop(server)
        if server.stderr:
            server.stderr.close()


@dataclass
class ProxyRules:
    backend: int
    pass_host: bool = True
    forwarded_proto: str | None = None  # X-Forwarded-Proto to send, None: none


@contextmanager
def serve_http(
    handler: type[BaseHTTPRequestHandler], tls: ssl.SSLContext | None = None
) -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextmanager
def peer_with_clock(offset: dt.timedelta) -> Iterator[str]:
    """A server whose Date header is ``offset`` away from this machine's clock."""

    class Peer(BaseHTTPRequestHandler):
        def date_time_string(self, timestamp: float | None = None) -> str:
            return format_datetime(dt.datetime.now(dt.UTC) + offset, usegmt=True)

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    with serve_http(Peer) as port:
        yield f"http://127.0.0.1:{port}/"


# ---- a CA and a certificate for 127.0.0.1 -------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    ca_file: Path
    server: ssl.SSLContext


def make_certificates(folder: Path, days: int) -> Certificates:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Private CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days, hours=12))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    return Certificates(ca_file, server)


# ---- the checks ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def https_blog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, int]]:
    """A blog whose public URL is an https proxy: (folder, base URL, backend port)."""
    folder = tmp_path_factory.mktemp("https-blog")
    proxy_port = free_port()
    base_url = f"https://127.0.0.1:{proxy_port}"
    with blog_server(folder, base_url) as port:
        yield folder, base_url, port


def test_check_passes_through_a_proxy_that_does_everything_right(
    https_blog: tuple[Path, str, int], tmp_path: Path
) -> None:
    folder, base_url, backend = https_blog
    certificates = make_certificates(tmp_path, days=90)
    proxy_port = int(base_url.rsplit(":", 1)[1])
    rules = ProxyRules(backend, forwarded_proto="https")
    env = blog_env(folder, base_url, SSL_CERT_FILE=str(certificates.ca_file))
    with (
        reverse_proxy_on(proxy_port, rules, certificates.server),
        peer_with_clock(dt.timedelta(seconds=0)) as peer,
    ):
        code, lines, err = fediblog(folder, env, "check", "--peer", peer)
    found = by_check(lines)
    assert list(found) == [
        "tls", "health", "proxy", "webfinger", "host-meta", "nodeinfo", "actor", "signed-get",
        "clock",
    ]  # fmt: skip
    assert {status for status, _ in found.values()} == {"ok"}, lines
    assert code == 0, err
    assert found["tls"][1].startswith("valid for 90 more days")
    assert found["tls"][1].endswith("issued by Test Private CA")
    assert found["proxy"][1] == f"the app sees {base_url}, as configured"
    assert found["webfinger"][1] == f"acct:blog@127.0.0.1:{proxy_port} -> {base_url}/users/blog"
    assert "verified" in found["signed-get"][1]


def test_check_fails_a_proxy_that_drops_x_forwarded_proto(
    https_blog: tuple[Path, str, int], tmp_path: Path
) -> None:
    folder, base_url, backend = https_blog
    certificates = make_certificates(tmp_path, days=90)
    proxy_port = int(base_url.rsplit(":", 1)[1])
    env = blog_env(folder, base_url, SSL_CERT_FILE=str(certificates.ca_file))
    with reverse_proxy_on(proxy_port, ProxyRules(backend), certificates.server):
        code, lines, _ = fediblog(folder, env, "check")
    found = by_check(lines)
    assert code == 1
    assert found["proxy"] == (
        "FAIL",
        "the app saw scheme 'http', not 'https': the proxy must send X-Forwarded-Proto"
        " (nginx: proxy_set_header X-Forwarded-Proto $scheme)",
    )
    assert found["webfinger"][0] == found["actor"][0] == "ok"
    assert found["clock"] == ("skip", "no peer to compare with (--peer https://a.server)")


def test_check_fails_a_certificate_the_machine_does_not_trust_or_that_ends_soon(
    https_blog: tuple[Path, str, int], tmp_path: Path
) -> None:
    folder, base_url, backend = https_blog
    proxy_port = int(base_url.rsplit(":", 1)[1])
    rules = ProxyRules(backend, forwarded_proto="https")
    certificates = make_certificates(tmp_path, days=5)
    with reverse_proxy_on(proxy_port, rules, certificates.server):
        code, lines, _ = fediblog(folder, blog_env(folder, base_url), "check")
        assert code == 1
        status, detail = by_check(lines)["tls"]
        assert status == "FAIL"
        assert "unable to get local issuer certificate" in detail
        trusted = blog_env(folder, base_url, SSL_CERT_FILE=str(certificates.ca_file))
        code, lines, _ = fediblog(folder, trusted, "check")
    assert code == 1
    assert by_check(lines)["tls"] == (
        "FAIL",
        "valid for only 5 more days"
        f" (until {(dt.datetime.now(dt.UTC) + dt.timedelta(days=5, hours=12)):%Y-%m-%d}),"
        " issued by Test Private CA: is renewal working?",
    )


def test_check_fails_a_proxy_that_rewrites_host_and_a_clock_that_is_off(
    tmp_path: Path,
) -> None:
    proxy_port = free_port()
    base_url = f"http://127.0.0.1:{proxy_port}"
    rules = ProxyRules(0, pass_host=False)  # nginx's default: Host is the backend's
    with blog_server(tmp_path, base_url) as backend:
        rules.backend = backend
        with (
            reverse_proxy_on(proxy_port, rules, None),
            peer_with_clock(dt.timedelta(hours=2)) as peer,
        ):
            code, lines, _ = fediblog(
                tmp_path, blog_env(tmp_path, base_url), "check", "--peer", peer
            )
    found = by_check(lines)
    assert code == 1
    assert found["tls"] == ("skip", "the base URL is http (FEDIBLOG_ALLOW_HTTP): no TLS")
    assert found["proxy"] == (
        "FAIL",
        f"the app saw Host '127.0.0.1:{backend}', not '127.0.0.1:{proxy_port}': the proxy"
        " must pass the Host header (nginx: proxy_set_header Host $host)",
    )
    status, detail = found["signed-get"]
    assert status == "FAIL"
    assert detail.startswith("the server did not verify our signature (refused: ")
    assert found["webfinger"][0] == found["nodeinfo"][0] == "ok"
    status, detail = found["clock"]
    assert status == "FAIL"
    assert detail.startswith("this clock is 7200 s behind") or detail.startswith(
        "this clock is 7199 s behind"
    )


def test_check_with_a_wrong_base_url_fails_every_check_in_one_line_each(tmp_path: Path) -> None:
    base_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = blog_env(tmp_path, base_url)
    assert fediblog(tmp_path, env, "init")[0] == 0
    code, lines, err = fediblog(tmp_path, env, "check")
    assert code == 1
    assert err == ""
    found = by_check(lines)
    assert len(lines) == 9
    assert all(found[name][0] == "FAIL" for name in ("health", "webfinger", "signed-get"))
    assert "ConnectError" in found["health"][1]


def test_check_refuses_a_peer_that_is_not_a_url(tmp_path: Path) -> None:
    env = blog_env(tmp_path, "https://blog.example")
    code, _, err = fediblog(tmp_path, env, "check", "--peer", "mastodon.social")
    assert code == 2
    assert err == "fediblog: error: --peer must be an http(s) URL, not 'mastodon.social'\n"


@contextmanager
def reverse_proxy_on(port: int, rules: ProxyRules, tls: ssl.SSLContext | None) -> Iterator[int]:
    """``reverse_proxy`` on a given port (the blog's base URL names it)."""

    class Server(ThreadingHTTPServer):
        allow_reuse_address = True

    with reverse_proxy_server(Server, port, rules, tls):
        yield port


@contextmanager
def reverse_proxy_server(
    server_class: type[ThreadingHTTPServer],
    port: int,
    rules: ProxyRules,
    tls: ssl.SSLContext | None,
) -> Iterator[None]:
    handler = _forward_handler(rules)
    server = server_class(("127.0.0.1", port), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _forward_handler(rules: ProxyRules) -> type[BaseHTTPRequestHandler]:
    class Forward(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            headers["X-Forwarded-For"] = self.client_address[0]
            if rules.pass_host:
                headers["Host"] = self.headers["Host"]
            if rules.forwarded_proto:
                headers["X-Forwarded-Proto"] = rules.forwarded_proto
            headers["Accept-Encoding"] = "identity"
            url = f"http://127.0.0.1:{rules.backend}{self.path}"
            answer = httpx.get(url, headers=headers, timeout=10)
            self.send_response(answer.status_code)
            for name, value in answer.headers.items():
                if name.lower() not in HOP_BY_HOP and name.lower() not in ("date", "server"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Forward
