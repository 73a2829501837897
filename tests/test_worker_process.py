"""Background work in its own process: `fediblog serve --web-only` beside `fediblog worker`.

The real commands, each in its own process, on one temporary blog; a fake Mastodon-like
instance (tests/test_federation_e2e.py's, on its own 127.0.0.1 port) sends signed
replies and follows and verifies with pyhttpsig what the worker delivers to it.

In-process (runtime.py, web/health.py): work committed by another connection wakes a
worker whose poll is an hour away; a web-only app is unhealthy once a role goes
unreported by every worker process.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar, cast

import httpx
import pytest

from fediblog import moderation
from fediblog import runtime as runtime_module
from fediblog.app import create_app
from fediblog.blog import Blog, parse_post
from fediblog.cli import _rehearse
from fediblog.config import Settings
from fediblog.demo import seed_demo
from fediblog.errors import StorageUnavailable, WorkerFailed
from fediblog.models import InboxItem, OutgoingActivity, format_ts, utcnow
from fediblog.runtime import (
    ROLES,
    WATCH_IDLE,
    WATCH_INTERVAL,
    WATCH_WORKER_IDLE,
    Runtime,
    next_pause,
    run_worker,
)
from fediblog.schedule import Scheduler
from fediblog.server import Timeouts, bind, prepared, serve_on
from fediblog.store import MIGRATIONS, Store
from fediblog.web.deps import Services
from fediblog.web.health import Elsewhere
from fediblog.web.templating import build_templates, compile_all
from tests import dbpeek
from tests.bench import bench_inbox
from tests.bench.common import server_env
from tests.conftest import database_for, make_settings
from tests.helpers import publish, remote_actor, remote_comment, running
from tests.processes import free_port, run_cli, run_fediblog, stop, wait_until_up
from tests.test_federation_e2e import (
    Account,
    FakeInstance,
    assert_from_blog,
    blog_env,
    mastodon_follow,
    serving,
    signed_post_headers,
)
from tests.test_health import TOKEN, read_metrics

T = TypeVar("T")
PUBLIC = "https://www.w3.org/ns/activitystreams#Public"
POST = "---\ntitle: Worth an answer\n---\nA post the fediverse answers.\n"


def eventually(find: Callable[[], T | None], what: str, log: Path | None = None) -> T:
    """What ``find`` returns once it is truthy; an AssertionError after 30 s."""
    deadline = time.monotonic() + 30
    while True:
        found = find()
        if found:
            return found
        if time.monotonic() > deadline:
            output = log.read_text(errors="replace")[-3000:] if log else ""
            raise AssertionError(f"timed out waiting for {what}\n{output}")
        time.sleep(0.02)


@dataclass
class World:
    folder: Path
    env: dict[str, str]
    base: str
    port: int
    fake: FakeInstance
    ann: Account
    post_id: str  # the post's object id
    page: str  # the path of the post's page

    @contextlib.contextmanager
    def process(self, name: str, *args: str) -> Iterator[subprocess.Popen[bytes]]:
        """`python -m fediblog ARGS`, its output in NAME.log; SIGINT at the end."""
        log = self.folder / f"{name}.log"
        with log.open("ab") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "fediblog", *args],
                env=self.env,
                cwd=self.folder,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
            try:
                yield process
            finally:
                stop(process)

    @contextlib.contextmanager
    def web(self, *, web_only: bool = True) -> Iterator[subprocess.Popen[bytes]]:
        args = ["serve", "--port", str(self.port)] + ["--web-only"] * web_only
        with self.process("web", *args) as process:
            wait_until_up(f"{self.base}/about", process, "the web process")
            yield process

    def reply(self, number: int, text: str) -> httpx.Response:
        """A signed Create{Note} from @ann answering the post, POSTed to the shared inbox."""
        note = f"{self.ann.ap_id}/statuses/{number}"
        activity = {
            "@context": "https://www.w3.org/ns/activitystreams",
            "id": f"{note}/activity",
            "type": "Create",
            "actor": self.ann.ap_id,
            "to": [PUBLIC],
            "object": {
                "id": note,
                "type": "Note",
                "attributedTo": self.ann.ap_id,
                "inReplyTo": self.post_id,
                "published": format_ts(utcnow()),
                "to": [PUBLIC],
                "content": f"<p>{text}</p>",
            },
        }
        return self.signed_post(activity)

    def signed_post(self, activity: dict[str, Any]) -> httpx.Response:
        body = json.dumps(activity).encode()
        inbox = f"{self.base}/inbox"
        headers = signed_post_headers(self.ann, inbox, body)
        return httpx.post(inbox, content=body, headers=headers, trust_env=False, timeout=10)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.base}{path}", trust_env=False, timeout=10)

    def rows(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        """Read the blog's database as another process would (committed rows only)."""
        return dbpeek.rows(database_for(self.folder, "blog.db"), sql, params)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    port, fake_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    fake = FakeInstance(
        f"http://127.0.0.1:{fake_port}",
        key_client=lambda: httpx.AsyncClient(trust_env=False, timeout=5),
    )
    ann = fake.add_account("asonix")
    env = blog_env(tmp_path, base)
    run_fediblog(tmp_path, env, "init")
    (tmp_path / "post.md").write_text(POST, encoding="utf-8")
    page = run_fediblog(tmp_path, env, "post", "new", "post.md").split()[-1].removeprefix(base)
    [uid] = [row[0] for row in _read(tmp_path, "SELECT uid FROM posts")]
    with serving(fake, fake_port):
        yield World(tmp_path, env, base, port, fake, ann, f"{base}/p/{uid}", page)


def _read(folder: Path, sql: str) -> list[tuple[Any, ...]]:
    return dbpeek.rows(database_for(folder, "blog.db"), sql)


# ---- the two processes together ---------------------------------------------------------


@pytest.mark.parametrize("split", [True, False], ids=["web-only-and-worker", "one-process"])
def test_replies_and_follows_are_handled_whether_or_not_a_worker_process_does_it(
    world: World, split: bool
) -> None:
    worker = world.process("worker", "worker") if split else contextlib.nullcontext()
    with world.web(web_only=split), worker as running_worker:
        assert world.reply(1, "An answer from elsewhere").status_code == 202
        # The worker made the comment; the web process shows it within about a second
        # of its commit (it polls the database's data version: Store.version).
        eventually(
            lambda: world.rows("SELECT 1 FROM comments WHERE content_html LIKE '%from elsewhere%'"),
            "the comment in the database",
            world.folder / "worker.log",
        )
        committed = time.monotonic()
        eventually(lambda: "An answer from elsewhere" in world.get(world.page).text, "the page")
        assert time.monotonic() - committed < 3  # 1 s, with room for a busy machine

        follow = mastodon_follow(world.ann, f"{world.base}/users/blog")
        assert world.signed_post(follow).status_code == 202
        accept = eventually(lambda: world.fake.first("Accept"), "the Accept")
        assert_from_blog(accept, f"{world.base}/users/blog")
        assert accept.activity["object"]["id"] == follow["id"]

        def health() -> dict[str, Any] | None:
            found: dict[str, Any] = world.get("/healthz").json()
            states = {role["state"] for role in found["worker_processes"].values()}
            return found if states <= {"running"} else None

        found = eventually(health, "every role reported by the worker")
    assert found["status"] == "ok"
    if running_worker is not None:
        assert running_worker.returncode == 0
    if split:
        assert set(found["worker_processes"]) == set(ROLES)
        assert found["workers"] == {
            "inbox-writer": "running",
            "blocks": "running",
            **{f"{role} (worker process)": "running" for role in ROLES},
        }
        log = (world.folder / "worker.log").read_text()
        assert "fediblog: worker for @blog@" in log
        # Stopped cleanly (SIGINT): it said so, exited 0, and deleted its heartbeat.
        assert "fediblog: worker stopped" in log
        assert world.rows("SELECT key FROM meta WHERE key LIKE 'worker%'") == []
    else:
        assert found["worker_processes"] == {}
        assert found["workers"]["inbox-processor"] == "running"
        assert found["workers"]["delivery"] == "running"
    assert len(world.fake.received("Accept")) == 1
    comments = world.rows("SELECT count(*) FROM comments")
    assert comments == [(1,)]


def test_a_worker_for_deliveries_only_leaves_the_inbox_alone(world: World) -> None:
    with world.web(), world.process("deliveries", "worker", "--only", "delivery"):
        follow = mastodon_follow(world.ann, f"{world.base}/users/blog")
        assert world.signed_post(follow).status_code == 202
        # Something to deliver, queued by yet another process after the Follow was
        # stored: once it arrives, the worker has been woken since the Follow came.
        activity = {
            "@context": "https://www.w3.org/ns/activitystreams",
            "id": f"{world.base}/activities/by-hand",
            "type": "Update",
            "actor": f"{world.base}/users/blog",
            "object": f"{world.base}/users/blog",
        }
        asyncio.run(_queue_delivery(world, activity, world.ann.inbox))
        eventually(
            lambda: world.fake.first("Update"), "the Update", world.folder / "deliveries.log"
        )
        assert world.rows("SELECT status, attempts FROM inbox") == [("queued", 0)]
        assert world.fake.received("Accept") == []
        # A second worker, for the inbox only: it handles the Follow, and the first
        # one, woken by that commit, delivers the Accept.
        with world.process("inbox", "worker", "--only", "inbox"):
            eventually(lambda: world.fake.first("Accept"), "the Accept", world.folder / "inbox.log")
    assert world.rows("SELECT status FROM inbox") == [("done",)]


async def _queue_delivery(world: World, activity: dict[str, Any], inbox: str) -> None:
    store = await Store.open(database_for(world.folder, "blog.db"), create=False)
    try:
        outgoing = OutgoingActivity(activity["id"], activity["type"], json.dumps(activity))
        await store.save_activity_for(outgoing, inbox)
    finally:
        await store.close()


def test_an_unknown_role_or_none_is_one_line_and_exit_2(world: World) -> None:
    done = run_cli(world.folder, world.env, "worker", "--only", "inbox,mail")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "'mail'" in done.stderr
    assert "inbox,delivery,crawl,schedule" in done.stderr
    for none in ("", ",", " , "):
        done = run_cli(world.folder, world.env, "worker", "--only", none)
        assert done.returncode == 2
        assert done.stderr == (
            "fediblog: error: --only needs at least one of:"
            " inbox,delivery,crawl,schedule,notify,prune\n"
        )


# ---- kill -9 mid-backlog ------------------------------------------------------------------


BACKLOG = 2_000


async def _seed_backlog(settings: Settings) -> list[str]:
    """bench_inbox's blog (one post, three known actors) with BACKLOG replies stored;
    the replies' ids, in the order they were stored."""
    in_reply_to, blog_actor = await bench_inbox.seed(settings, bench_inbox.private_keys(3))
    store = await Store.open(settings.store_location)
    try:
        items = []
        for index in range(BACKLOG):
            n = index % 3
            payload = bench_inbox.reply(n, "kill", index, in_reply_to, blog_actor).decode()
            actor = bench_inbox.actor_id(n)
            items.append(
                InboxItem(f"{actor} {json.loads(payload)['id']}", actor, "Create", payload)
            )
        await store.save_inbox_items(items)
    finally:
        await store.close()
    return [json.loads(item.payload)["object"]["id"] for item in items]


# What holds the worker's write of one reply's comment, so that it is killed inside that
# batch's transaction whatever its speed (polling for it to be halfway was a race a fast
# worker won): on PostgreSQL an advisory lock the test holds, and the test sees the wait
# in pg_locks; SQLite cannot wait in a trigger, so its trigger counts a cross join of
# 2,000 rows four times over, days of work, and the test sees the comments before it.
_HOLD = 4242
# pg_locks is the cluster's: this database's waits on this lock (other tests migrate).
_WAITERS = (
    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = ? AND NOT granted"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


def _hold_reply(settings: Settings, ap_id: str) -> None:
    assert "'" not in ap_id  # a literal in the trigger: DDL takes no parameters
    if isinstance(settings.store_location, Path):
        dbpeek.execute(
            settings,
            (
                "CREATE TRIGGER hold_reply BEFORE INSERT ON comments"  # noqa: S608
                f" WHEN NEW.ap_id = '{ap_id}' BEGIN"
                " SELECT count(*) FROM inbox a, inbox b, inbox c, inbox d; END",
                (),
            ),
        )
        return
    dbpeek.execute(
        settings,
        (
            "CREATE FUNCTION hold_reply() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            f" IF NEW.ap_id = '{ap_id}' THEN PERFORM pg_advisory_xact_lock_shared({_HOLD});"
            " END IF; RETURN NEW; END $$",
            (),
        ),
        (
            "CREATE TRIGGER hold_reply BEFORE INSERT ON comments"
            " FOR EACH ROW EXECUTE FUNCTION hold_reply()",
            (),
        ),
        (f"SELECT pg_advisory_lock({_HOLD})", ()),
    )


def _held(settings: Settings) -> bool:
    """Whether the worker waits at the held reply (on SQLite: has written comments)."""
    if not isinstance(settings.store_location, Path):
        return bool(dbpeek.rows(settings, _WAITERS, (_HOLD,)))
    found = dbpeek.row(settings, "SELECT count(*) FROM comments")
    return found is not None and int(found[0]) > 0


def _release_reply(settings: Settings) -> None:
    """After the kill: the dead worker's transaction ended, the trigger gone."""
    if isinstance(settings.store_location, Path):
        dbpeek.execute(settings, ("DROP TRIGGER hold_reply", ()))
        return
    dbpeek.execute(
        settings,
        # The backend of a killed client waits on, unaware; end it, as the server would
        # once it read the closed socket.
        (
            f"SELECT pg_terminate_backend(pid, 5000) FROM ({_WAITERS}) AS waiting",  # noqa: S608
            (_HOLD,),
        ),
        (f"SELECT pg_advisory_unlock({_HOLD})", ()),
        ("DROP TRIGGER hold_reply ON comments", ()),
        ("DROP FUNCTION hold_reply()", ()),
    )


def test_a_worker_killed_mid_backlog_loses_nothing_and_doubles_nothing(
    tmp_path: Path, blog_keys: Path
) -> None:
    # bench_settings' blog, on this run's backend (the benchmarks choose theirs apart).
    settings = make_settings(
        tmp_path,
        base_url=f"http://127.0.0.1:{free_port()}",
        allow_http=True,
        allow_private_addresses=True,
        keys_dir=blog_keys,
    )
    replies = asyncio.run(_seed_backlog(settings))
    _hold_reply(settings, replies[BACKLOG // 2])
    env = server_env(settings, FEDIBLOG_ALLOW_PRIVATE_ADDRESSES="1")
    env["FEDIBLOG_CONFIG"] = str(tmp_path / "absent.toml")

    def count(sql: str) -> int:
        found = dbpeek.row(settings, sql)
        assert found is not None
        return int(found[0])

    log = tmp_path / "worker.log"
    with log.open("ab") as sink:
        first = subprocess.Popen(
            [sys.executable, "-m", "fediblog", "worker", "--only", "inbox"],
            env=env,
            cwd=tmp_path,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            eventually(lambda: _held(settings), "the worker at the held reply", log)
            first.send_signal(signal.SIGKILL)
            first.wait()
        finally:
            stop(first)
        _release_reply(settings)
        at_kill = count("SELECT count(*) FROM comments")
        assert 0 < at_kill < BACKLOG, at_kill
        # Time passes: the leases of what the dead worker had claimed end.
        past = format_ts(utcnow() - timedelta(minutes=5))
        dbpeek.execute(
            settings, ("UPDATE inbox SET next_attempt_at = ? WHERE status = 'queued'", (past,))
        )
        with subprocess.Popen(
            [sys.executable, "-m", "fediblog", "worker", "--only", "inbox"],
            env=env,
            cwd=tmp_path,
            stdout=sink,
            stderr=subprocess.STDOUT,
        ) as second:
            try:
                eventually(
                    lambda: count("SELECT count(*) FROM inbox WHERE status = 'queued'") == 0,
                    "the backlog drained",
                    log,
                )
            finally:
                stop(second)
    assert count("SELECT count(*) FROM comments") == BACKLOG
    assert count("SELECT count(DISTINCT ap_id) FROM comments") == BACKLOG
    assert dict(dbpeek.rows(settings, "SELECT status, count(*) FROM inbox GROUP BY status")) == {
        "done": BACKLOG
    }


# ---- in-process: the wake-ups and the health of a web-only process ----------------------


@pytest.mark.anyio
async def test_work_another_process_commits_wakes_a_worker_whose_poll_is_an_hour_away(
    settings: Settings,
) -> None:
    async with Runtime.open(settings) as rt:
        rt.inbox.worker._poll = 3600.0  # only a wake-up can make it look again
        wakes: list[None] = []
        wake = rt.inbox.worker.wake

        def counted() -> None:
            wakes.append(None)
            wake()

        rt.inbox.worker.wake = counted  # type: ignore[method-assign]
        # The watcher's first look takes note of the data version; only later commits
        # wake the worker. Commit after that look, or the test races it.
        looked = asyncio.Event()
        first_look = rt.store.get_data_version

        async def look() -> int:
            version = await first_look()
            looked.set()
            return version

        rt.store.get_data_version = look  # type: ignore[method-assign]
        rt.start_background({"inbox"})
        other = await Store.open(settings.store_location)  # another connection: another process
        await asyncio.wait_for(looked.wait(), 30)
        try:
            for number in (1, 2):
                # An activity nothing handles: done at once, with no fetch.
                actor, kind = "https://a.example/users/u", "Arrive"
                payload = {"id": f"{actor}/arrive/{number}", "type": kind, "actor": actor}
                await other.save_inbox_items(
                    [InboxItem(f"{actor} {number}", actor, kind, json.dumps(payload))]
                )
                for _ in range(3000):  # 30 s
                    if (await other.count_inbox()).get("done", 0) == number:
                        break
                    await asyncio.sleep(0.01)
                assert (await other.count_inbox()).get("done", 0) == number
        finally:
            await other.close()
    assert len(wakes) >= 2


@pytest.mark.anyio
async def test_a_web_only_app_is_unhealthy_once_a_role_goes_unreported(
    tmp_path: Path, blog_keys: Path
) -> None:
    settings = make_settings(tmp_path, keys_dir=blog_keys)
    async with running(settings, web_only=True) as app:
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="https://blog.example"
        )
        async with client:
            found = (await client.get("/healthz")).json()
            # Just started, no worker seen yet: waiting for them is not a fault.
            assert found["status"] == "ok"
            assert found["workers"] == {
                "inbox-writer": "running",
                "blocks": "running",
                **{f"{role} (worker process)": "starting" for role in ROLES},
            }
            assert not any(name in found["workers"] for name in ("delivery", "inbox-processor"))
            # A worker reported every role but delivery a moment ago, delivery 2 minutes
            # ago; the server has been waiting for longer than a minute.
            store = app.state.services.store
            now = utcnow()
            await store.save_worker_heartbeats([r for r in ROLES if r != "delivery"], now)
            await store.save_worker_heartbeats(["delivery"], now - timedelta(minutes=2))
            app.state.elsewhere = Elsewhere(ROLES, since=now - timedelta(minutes=5))
            app.state.heartbeats = None  # the cached read is for the public's flood
            response = await client.get("/healthz")
    assert response.status_code == 503
    found = response.json()
    assert found["reason"].startswith("no worker process has run delivery for 1")
    assert found["worker_processes"]["delivery"]["state"] == "stopped"
    assert found["worker_processes"]["inbox"] == {"state": "running", "last_seen": format_ts(now)}


@pytest.mark.anyio
async def test_a_web_only_app_drops_a_sender_another_process_blocked(
    tmp_path: Path, blog_keys: Path
) -> None:
    settings = make_settings(tmp_path, keys_dir=blog_keys)
    actor = "https://spam.example/users/bot"
    async with running(settings, web_only=True) as app:
        inbox = app.state.services.inbox
        assert not inbox.is_blocked(actor)
        other = await Store.open(settings.store_location)  # `fediblog block`, say
        try:
            await moderation.block(other, "spam.example", own_host=settings.host)
        finally:
            await other.close()
        for _ in range(3000):  # 30 s; it rereads them every second
            if inbox.is_blocked(actor):
                break
            await asyncio.sleep(0.01)
        assert inbox.is_blocked(actor)


# ---- roles split over processes: what one hands another, and how a worker ends ---------


def _services(rt: Runtime) -> Services:
    """What tests/helpers.py's builders use of the app's services, from a runtime."""
    blog = Blog(rt.settings, rt.store)
    return cast(Services, SimpleNamespace(store=rt.store, blog=blog, proxy=rt.media_proxy))


async def _wait_for(find: Callable[[], Awaitable[T | None]], what: str) -> T:
    for _ in range(3000):  # 30 s
        if found := await find():
            return found
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.anyio
async def test_replies_an_inbox_only_worker_saves_are_queued_for_the_crawler_elsewhere(
    settings: Settings,
) -> None:
    note = "https://social.example/users/ann/statuses/1"
    async with Runtime.open(settings) as rt:
        post = await publish(_services(rt), "Crawled elsewhere")
        actor_id = await remote_actor(_services(rt), "ann", "social.example")
        comment_id = await remote_comment(_services(rt), post, actor_id, "a reply", ap_id=note)
        tasks = rt.start_background({"inbox"})
        assert "crawl-queue" in {task.get_name() for task in tasks}
        # As the inbox tells its listeners once a delivered reply is saved (responses.py).
        for listener in rt.responses.reply_listeners:
            await listener(comment_id, False)
        # In the database within a second, where a crawl role in any process claims it.
        crawl = await _wait_for(lambda: rt.store.get_crawl(note), "the crawl queued")
        assert crawl.found_by == "delivery"
        assert rt.crawler.take_scheduled() == []  # nothing left to grow in memory
        # One scheduled just before the worker stops is queued as it stops.
        second = await remote_comment(
            _services(rt), post, actor_id, "another", ap_id=f"{note}0", minutes=2
        )
        await rt.crawler.schedule(second, False)
        await rt.stop()
        assert await rt.store.get_crawl(f"{note}0") is not None


@pytest.mark.anyio
async def test_a_crawl_only_worker_rereads_the_blocks(settings: Settings) -> None:
    actor = "https://spam.example/users/bot"
    async with Runtime.open(settings) as rt:
        rt.start_background({"crawl"})
        assert "blocks" in {task.get_name() for task in rt.roles["crawl"]}
        assert not rt.inbox.is_blocked(actor)  # the crawler asks the inbox's list
        other = await Store.open(settings.store_location)  # `fediblog block`, say
        try:
            await moderation.block(other, "spam.example", own_host=settings.host)
        finally:
            await other.close()

        async def blocked() -> bool:
            return rt.inbox.is_blocked(actor)

        assert await _wait_for(blocked, "the block seen")


@pytest.mark.anyio
async def test_background_work_starts_once_and_takes_a_collection_of_roles(
    settings: Settings,
) -> None:
    async with Runtime.open(settings) as rt:
        with pytest.raises(TypeError, match="not the string 'inbox'"):
            rt.start_background("inbox")
        assert rt.tasks == []
        started = rt.start_background({"delivery"})
        assert [task.get_name() for task in started] == ["delivery", "wake-ups"]
        with pytest.raises(RuntimeError, match="started already"):
            rt.start_background({"delivery"})
        with pytest.raises(RuntimeError, match="started already"):
            rt.start_background({"inbox"}, worker_process=True)
        assert [task.get_name() for task in rt.tasks] == ["delivery", "wake-ups"]


@pytest.mark.anyio
async def test_a_worker_whose_role_ends_fails_and_forgets_its_heartbeat(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran = asyncio.Event()

    async def ends(self: Scheduler) -> None:
        await ran.wait()  # after the first heartbeat
        raise RuntimeError("a bug")

    async def heartbeat_then_end(store: Store, *args: Any, **kwargs: Any) -> None:
        await save(store, *args, **kwargs)
        ran.set()

    save = Store.save_worker_heartbeats
    monkeypatch.setattr(Scheduler, "run", ends)
    monkeypatch.setattr(Store, "save_worker_heartbeats", heartbeat_then_end)
    with pytest.raises(WorkerFailed, match=r"the schedule task failed \(RuntimeError"):
        await asyncio.wait_for(run_worker(settings, ("schedule", "delivery")), 60)
    store = await Store.open(settings.store_location)
    try:
        assert ran.is_set()
        assert await store.list_worker_heartbeats() == {}
        assert await store.get_worker_counts(utcnow() - timedelta(hours=1)) == {}
    finally:
        await store.close()


def test_the_watcher_slows_down_only_as_far_as_it_may() -> None:
    def quiet(slowest: float) -> list[float]:
        pause, pauses = WATCH_INTERVAL, []
        for _ in range(8):
            pause = next_pause(pause, changed=False, slowest=slowest)
            pauses.append(pause)
        return pauses

    # A worker process: never more than 0.1 s between two looks, however quiet.
    assert quiet(WATCH_WORKER_IDLE) == [0.1] * 8
    # A process that also serves: doubling up to WATCH_IDLE, quick again after a change.
    assert quiet(WATCH_IDLE) == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    assert next_pause(WATCH_IDLE, changed=True, slowest=WATCH_IDLE) == WATCH_INTERVAL


@pytest.mark.anyio
async def test_the_watcher_wakes_only_for_other_connections_commits(settings: Settings) -> None:
    async with Runtime.open(settings) as rt:
        store = rt.store
        peeked, version = store.peek_data_version(), await store.get_data_version()
        await store.save_meta_value("mine", "1")  # this process's own commit
        # Seen at once on SQLite; on PostgreSQL when its NOTIFY arrives, a moment later.
        assert await _moves(store.peek_data_version, peeked)  # the cheap look sees every commit...
        assert await store.get_data_version() == version  # ...the writer's, only others'
        other = await Store.open(settings.store_location)
        try:
            await other.save_meta_value("theirs", "1")
        finally:
            await other.close()
        assert await _moves(store.get_data_version, version)


async def _moves(look: Callable[[], Awaitable[int] | int | None], before: int | None) -> bool:
    """Whether what ``look`` says moves from ``before`` within 10 s."""
    for _ in range(1000):
        found = look()
        if (await found if inspect.isawaitable(found) else found) != before:
            return True
        await asyncio.sleep(0.01)
    return False


# ---- the page cache and a busy worker process --------------------------------------------


@pytest.mark.anyio
async def test_a_worker_process_bookkeeping_leaves_the_page_version_alone(
    settings: Settings,
) -> None:
    web = await Store.open(settings.store_location)
    worker = await Store.open(settings.store_location)  # another connection: another process
    try:
        blog = Blog(settings, worker)
        post = await blog.publish(parse_post("---\ntitle: Versions\n---\nBody.\n"))
        web.version_max_age = 0.0  # look at every call (1 s in a server)
        before = await web.version()
        # What a worker commits many times a second: heartbeats, claims, queue rows.
        now = utcnow()
        await worker.save_worker_heartbeats(ROLES, now, process="42", counts={})
        actor = "https://a.example/users/u"
        payload = json.dumps({"id": f"{actor}/1", "type": "Arrive", "actor": actor})
        await worker.save_inbox_items([InboxItem(f"{actor} 1", actor, "Arrive", payload)])
        await worker.claim_inbox(now, now + timedelta(minutes=1), 10)
        assert await web.version() == before
        # A comment it saved changes it: the web process renders the page again.
        await worker.save_comment(
            post_id=post.id,
            parent_id=None,
            content_html="<p>shown</p>",
            published=now,
            received=now,
            source="fediverse",
            ap_id=f"{actor}/note",
        )
        after = await web.version()
        assert after != before
        assert await web.version() == after
        # Its own writes count at once, whatever version_max_age says.
        web.version_max_age = 3600.0
        await Blog(settings, web).publish(parse_post("---\ntitle: Mine\n---\nBody.\n"))
        assert await web.version() != after
    finally:
        await worker.close()
        await web.close()


# ---- starting together -------------------------------------------------------------------


@pytest.mark.anyio
async def test_processes_opening_a_new_database_together_run_each_migration_once(
    tmp_path: Path,
) -> None:
    for attempt in range(5):
        path = tmp_path / f"{attempt}" / "blog.db"
        # Each Store has its own connections and threads: they race as processes would.
        stores = await asyncio.gather(*(Store.open(path) for _ in range(3)))
        try:
            versions = {await store.migrate() for store in stores}
        finally:
            for store in stores:
                await store.close()
        assert versions == {len(MIGRATIONS)}


# ---- what the web process reports of its workers -----------------------------------------


@pytest.mark.anyio
async def test_a_web_only_app_counts_what_its_worker_processes_did(
    tmp_path: Path, blog_keys: Path
) -> None:
    settings = make_settings(tmp_path, keys_dir=blog_keys, metrics_token=TOKEN)
    async with running(settings, web_only=True) as app:
        store = app.state.services.store
        now = utcnow()
        # Two worker processes heard from lately, and one killed long ago.
        counts = {"inbox": {"done": 5, "failed": 1}, "delivery": {"done": 2}}
        await store.save_worker_heartbeats(["inbox"], now, process="101", counts=counts)
        more = {"delivery": {"done": 3, "gave_up": 1}}
        await store.save_worker_heartbeats(["delivery"], now, process="102", counts=more)
        gone = {"inbox": {"done": 1000}}
        await store.save_worker_heartbeats([], now - timedelta(hours=1), process="7", counts=gone)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="https://blog.example"
        )
        async with client:
            response = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    found = read_metrics(response.text)
    processed = "fediblog_inbox_processed_total"
    assert found[(processed, frozenset({("outcome", "done")}))] == 5
    assert found[(processed, frozenset({("outcome", "failed")}))] == 1
    delivered = "fediblog_deliveries_total"
    assert found[(delivered, frozenset({("outcome", "sent")}))] == 5
    assert found[(delivered, frozenset({("outcome", "dead")}))] == 1


@pytest.mark.anyio
async def test_healthz_answers_its_json_503_when_the_heartbeats_cannot_be_read(
    tmp_path: Path, blog_keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path, keys_dir=blog_keys)
    async with running(settings, web_only=True) as app:

        async def unreadable() -> dict[str, Any]:
            raise StorageUnavailable("the database /secret/path cannot be used now: locked")

        monkeypatch.setattr(app.state.services.store, "list_worker_heartbeats", unreadable)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="https://blog.example"
        )
        async with client:
            response = await client.get("/healthz")
    assert response.status_code == 503
    found = response.json()
    assert found["status"] == "unavailable"
    assert found["reason"] == "the worker processes' heartbeats cannot be read"
    assert "/secret/path" not in response.text


def test_both_units_read_one_environment_file_and_the_worker_starts_after_the_server() -> None:
    def lines(name: str) -> list[str]:
        text = (Path(__file__).parent.parent / "deploy" / name).read_text()
        return [line.strip() for line in text.splitlines() if not line.startswith("#")]

    server, worker = lines("fediblog.service"), lines("fediblog-worker.service")
    environment = "EnvironmentFile=-/srv/fediblog/environment"
    assert environment in server
    assert environment in worker
    assert not [line for line in server + worker if line.startswith("Environment=")]
    [after] = [line for line in worker if line.startswith("After=")]
    assert "fediblog.service" in after.split("=", 1)[1].split()


# ---- serve --workers N: several web processes and a worker, one command ----------------


def _children(pid: int) -> set[int]:
    """The children of each of ``pid``'s threads (`serve --worker-process` starts its
    worker again from a thread of its own)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            found.update(int(child) for child in (task / "children").read_text().split())
    return found


def _children_when(pid: int, count: int, without: int = 0) -> set[int] | None:
    """The pids of ``pid``'s children once there are ``count``, none of them ``without``."""
    children = _children(pid)
    return children if len(children) == count and without not in children else None


def _two_web_processes_args(world: World) -> list[str]:
    return ["serve", "--port", str(world.port), "--workers", "2"]


@contextlib.contextmanager
def _two_web_processes(world: World) -> Iterator[tuple[subprocess.Popen[bytes], set[int]]]:
    """`serve --workers 2`, once it answers and its three children run: the parent
    and their pids."""
    with world.process("web", *_two_web_processes_args(world)) as parent:
        wait_until_up(f"{world.base}/about", parent, "the web processes")
        children = eventually(
            lambda: _children_when(parent.pid, 3),
            "two web processes and a worker",
            world.folder / "web.log",
        )
        yield parent, children


def _tcp_sockets(pid: int, port: int, state: str) -> set[int]:
    """The inodes of ``pid``'s IPv4 TCP sockets on local ``port`` in ``state`` (as
    /proc/net/tcp writes it: 0A listening, 01 established)."""
    mine = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                mine.add(int(target[8:-1]))
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == state:
            found.add(int(fields[9]))
    return found & mine


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreads on Linux")
def test_each_web_process_listens_on_a_socket_of_its_own_and_gets_its_share(
    world: World,
) -> None:
    """Both web processes accepting from one socket left each connection to whichever
    woke first: one took most of a burst and the other sat idle. Each listens on a
    socket of its own (SO_REUSEPORT), and the kernel spreads connections among them by
    their addresses: 24 connections all to one process would be a 1-in-8-million
    chance."""
    with _two_web_processes(world) as (parent, children):
        def both_listening() -> dict[int, set[int]] | None:
            found = {pid: _tcp_sockets(pid, world.port, "0A") for pid in children}
            return found if sum(bool(sockets) for sockets in found.values()) == 2 else None

        # The first to listen answers; the other may still be starting.
        listening = eventually(both_listening, "both listening", world.folder / "web.log")
        web = sorted(pid for pid, sockets in listening.items() if sockets)
        assert all(len(listening[pid]) == 1 for pid in web)
        assert listening[web[0]] != listening[web[1]]
        assert not _tcp_sockets(parent.pid, world.port, "0A")  # bound, never listened on

        clients = [httpx.Client(base_url=world.base) for _ in range(24)]
        try:
            assert {client.get("/about").status_code for client in clients} == {200}
            held = [len(_tcp_sockets(pid, world.port, "01")) for pid in web]
        finally:
            for client in clients:
                client.close()
        assert sum(held) == 24
        assert min(held) > 0, held


def test_a_second_server_on_the_port_of_one_with_two_web_processes_is_refused(
    world: World,
) -> None:
    """Its web processes listen with SO_REUSEPORT, which lets any process of the same
    user listen on the port too. Another `serve --workers 2` started by mistake on it
    would then take half the connections unseen; it is refused, as before."""
    with _two_web_processes(world):
        second = subprocess.run(
            [sys.executable, "-m", "fediblog", *_two_web_processes_args(world)],
            env=world.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert second.returncode != 0
    assert "is another server using it?" in second.stderr
    assert "Traceback" not in second.stderr


def test_serve_with_two_web_processes_runs_a_worker_and_starts_a_killed_one_again(
    world: World,
) -> None:
    with _two_web_processes(world) as (parent, first):
        assert world.reply(1, "Answered through one of two").status_code == 202
        eventually(
            lambda: "Answered through one of two" in world.get(world.page).text,
            "the comment on the page",
            world.folder / "web.log",
        )

        # A web process killed outright: the other goes on serving, the parent starts a
        # new one, and what is sent meanwhile is answered and kept.
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        statuses = {world.get("/about").status_code for _ in range(20)}
        assert statuses == {200}
        again = eventually(
            lambda: _children_when(parent.pid, 3, without=victim),
            "the killed process started again",
            world.folder / "web.log",
        )
        assert len(again - first) == 1
        assert world.reply(2, "Answered after the restart").status_code == 202
        eventually(
            lambda: "Answered after the restart" in world.get(world.page).text,
            "the second comment on the page",
            world.folder / "web.log",
        )
        health = world.get("/healthz").json()
        assert health["status"] == "ok"
        assert set(health["worker_processes"]) == set(ROLES)
    assert parent.returncode == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in again)
    log = (world.folder / "web.log").read_text()
    assert "with 2 web processes and a worker" in log
    assert "the web process 1 exited (killed by SIGKILL): starting it again" in log
    assert "fediblog: worker stopped" in log  # it stopped cleanly, on the parent's word
    assert world.rows("SELECT count(*) FROM comments") == [(2,)]
    assert world.rows("SELECT key FROM meta WHERE key LIKE 'worker%'") == []


@pytest.mark.parametrize("workers", ["0", "65"])
def test_a_number_of_web_processes_out_of_range_is_one_line_and_exit_2(
    world: World, workers: str
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fediblog",
            "serve",
            "--port",
            str(world.port),
            "--workers",
            workers,
        ],
        env=world.env,
        cwd=world.folder,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--workers" in result.stderr
    assert "Traceback" not in result.stderr


def _supervise(script: str) -> subprocess.CompletedProcess[str]:
    """Run a Supervisor script in a process of its own (its children are forked from it)."""
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )


_FLAPPING = """
import sys
from fediblog import supervisor
supervisor.RESTART_PAUSE = 0.01
children = [
    supervisor.Child("steady one", lambda: __import__("time").sleep(600)),
    supervisor.Child("flapping one", lambda: sys.exit(3)),
]
sys.exit(supervisor.Supervisor(children, grace=1).run())
"""


def test_a_child_that_keeps_exiting_stops_them_all_and_exits_1() -> None:
    result = _supervise(_FLAPPING)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines.count("fediblog: the flapping one exited (exit status 3): starting it again") == 5
    assert lines[-1] == (
        "fediblog: the flapping one exited (exit status 3): 6 unexpected exits in 60 s, stopping"
    )
    assert "steady one" not in result.stderr  # stopped by the parent: not an exit to report


@pytest.mark.anyio
async def test_web_processes_share_the_limits_one_process_would_keep(settings: Settings) -> None:
    async with running(settings, processes=3) as app:
        services: Services = app.state.services
        assert services.desk.limit.per_address == 1  # 5 // 3: 3 in all, never more than 5
        assert services.desk.limit.overall == 16
        assert services.comment_limit._limit == 1
        assert services.interact_limit._limit == 3
    async with running(settings) as app:
        services = app.state.services
        assert (services.desk.limit.per_address, services.desk.limit.overall) == (5, 50)
        assert (services.comment_limit._limit, services.interact_limit._limit) == (5, 10)


_ORPHANED = """
import os, sys, time
from fediblog import supervisor

def steady() -> None:
    print(os.getpid(), flush=True)
    time.sleep(600)

sys.exit(supervisor.Supervisor([supervisor.Child("steady one", steady)], grace=1).run())
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # ended, waiting to be reaped by whoever adopted it


def test_children_do_not_outlive_a_parent_killed_outright() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _ORPHANED], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert not _gone(child)
        parent.kill()
        parent.wait()
        eventually(lambda: _gone(child), "the child to stop with its parent")
    finally:
        parent.kill()
        parent.wait()


_STOPPED_WHILE_STARTING = """
import os, signal, sys, time
from fediblog import supervisor

def first() -> None:
    os.kill(os.getppid(), signal.SIGTERM)  # the stop arrives while the others start
    time.sleep(600)

def later() -> None:
    time.sleep(600)

children = [supervisor.Child("first", first)]
children += [supervisor.Child(f"later {n}", later) for n in range(3)]
sys.exit(supervisor.Supervisor(children, grace=30).run())
"""


def test_a_stop_while_children_start_reaches_every_one_of_them() -> None:
    # A child the SIGTERM missed would be killed only after the 30 s grace period.
    result = _supervise(_STOPPED_WHILE_STARTING)
    assert result.returncode == 0, result.stderr
    assert "did not stop in time" not in result.stderr
    assert "exited" not in result.stderr  # stopped, not exits to report


_NO_FORK_ONCE = """
import multiprocessing.process, os, signal, sys, time
from fediblog import supervisor

supervisor.RESTART_PAUSE = 0.05
start = multiprocessing.process.BaseProcess.start
failed = []

def start_once_failing(self):
    if not failed:
        failed.append(self.name)
        raise BlockingIOError(11, "Resource temporarily unavailable")
    start(self)

multiprocessing.process.BaseProcess.start = start_once_failing

def child() -> None:
    print("started", flush=True)
    os.kill(os.getppid(), signal.SIGTERM)
    time.sleep(600)

sys.exit(supervisor.Supervisor([supervisor.Child("only one", child)], grace=5).run())
"""


def test_a_fork_that_fails_is_tried_again() -> None:
    result = _supervise(_NO_FORK_ONCE)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "started\n"
    assert result.stderr == (
        "fediblog: cannot start the only one: Resource temporarily unavailable:"
        " starting it again\n"
    )


# ---- serve --worker-process: the web process and a worker forked from it ---------------


def _one_child(pid: int, without: int = 0) -> int | None:
    children = _children_when(pid, 1, without)
    return children.pop() if children else None


def _smaps(pid: int) -> dict[str, float]:
    """/proc/PID/smaps_rollup in MB: Rss, Pss, Shared_Dirty..."""
    lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    pairs = (line.split(":") for line in lines)
    return {name: int(value.split()[0]) / 1024 for name, value in pairs}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc")
def test_serve_with_a_worker_process_shares_memory_and_starts_a_killed_worker_again(
    world: World,
) -> None:
    """Two processes for two cores: the web process serves, a worker forked from it
    before either opened anything turns replies into comments. Forked, the two share
    the pages of all they imported; a worker killed outright is started again as a
    `fediblog worker` of its own, and what was sent meanwhile is kept."""
    with world.process("web", "serve", "--port", str(world.port), "--worker-process") as web:
        wait_until_up(f"{world.base}/about", web, "the web process")
        log = world.folder / "web.log"
        worker = eventually(lambda: _one_child(web.pid), "the worker process", log)
        # Forked, not started anew: its command line is the web process's, and it still
        # shares written pages with it (a process of its own shares only the libraries'
        # code, none of it written).
        assert (
            Path(f"/proc/{worker}/cmdline").read_bytes()
            == Path(f"/proc/{web.pid}/cmdline").read_bytes()
        )
        assert _smaps(worker)["Shared_Dirty"] > 5, _smaps(worker)
        assert not _tcp_sockets(worker, world.port, "0A")  # the port is the web's alone

        assert world.reply(1, "Answered beside a forked worker").status_code == 202
        eventually(
            lambda: "Answered beside a forked worker" in world.get(world.page).text,
            "the comment on the page",
            log,
        )
        os.kill(worker, signal.SIGKILL)
        assert world.reply(2, "Answered while the worker was away").status_code == 202
        again = eventually(lambda: _one_child(web.pid, without=worker), "a new worker", log)
        command = Path(f"/proc/{again}/cmdline").read_bytes().split(b"\0")
        assert command[-4:-1] == [b"worker", b"--parent", str(web.pid).encode()]
        eventually(
            lambda: "Answered while the worker was away" in world.get(world.page).text,
            "the second comment on the page",
            log,
        )
        health = world.get("/healthz").json()
        assert health["status"] == "ok"
        assert set(health["worker_processes"]) == set(ROLES)
    assert web.returncode == 0
    assert not Path(f"/proc/{again}").exists()
    text = log.read_text()
    assert "and a worker process forked from it" in text
    assert "the worker process exited (killed by SIGKILL): starting it again" in text
    assert "fediblog: worker stopped" in text  # it stopped cleanly, on the web's word
    assert "Traceback" not in text
    assert world.rows("SELECT count(*) FROM comments") == [(2,)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG")
def test_a_worker_process_does_not_outlive_its_web_process_killed_outright(
    world: World,
) -> None:
    with world.process("web", "serve", "--port", str(world.port), "--worker-process") as web:
        wait_until_up(f"{world.base}/about", web, "the web process")
        worker = eventually(lambda: _one_child(web.pid), "the worker", world.folder / "web.log")
        web.kill()
        web.wait()
        eventually(lambda: _gone(worker), "the worker to stop with the web process")


def test_what_is_built_before_the_fork_serves_without_being_built_again(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve --worker-process` builds the app, uvicorn's server and every template
    before it forks (built after, by the web process alone, they would copy pages the
    two processes share): the server it prepared serves, and no page compiles a
    template again."""
    templates = build_templates()
    compile_all(templates)

    def compiled_again(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a template was compiled when a page was asked for: {args}")

    monkeypatch.setattr(templates, "compile", compiled_again)
    server = prepared(create_app(settings, web_only=True), Timeouts(shutdown=1))
    assert server.config.loaded
    sock = bind("127.0.0.1", 0)
    serving = threading.Thread(target=serve_on, args=(server, sock), daemon=True)
    serving.start()
    try:
        eventually(lambda: server.started, "the prepared server to start")
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        for path in ("/", "/about", "/tags", "/no-such-page"):
            page = httpx.get(base + path, timeout=10)
            assert page.status_code == (404 if path == "/no-such-page" else 200), path
            assert "text/html" in page.headers["content-type"]
    finally:
        server.should_exit = True
        serving.join(10)
        sock.close()
    assert not serving.is_alive()


async def _demo(settings: Settings) -> None:
    store = await Store.open(settings.store_location)
    try:
        await seed_demo(Blog(settings, store), store)
    finally:
        await store.close()


def test_the_rehearsal_before_the_fork_serves_its_pages_and_leaves_nothing_behind(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Before it forks, `serve --worker-process` starts an app of its own and asks it
    for the pages asked for most (app.rehearse), so that the code both processes will
    run has run once. Nothing of it may show: no access-log line (nobody asked), no
    thread left behind (the fork copies only the thread that forks), no error."""
    asyncio.run(_demo(settings))
    templates = build_templates()
    templates.cache.clear()  # type: ignore[union-attr]  # compiled again where pages need them
    threads = set(threading.enumerate())
    caplog.set_level(logging.INFO)

    _rehearse(replace(settings, access_log=True))  # as `serve --worker-process` does

    rendered = {name for _, name in templates.cache}  # type: ignore[union-attr]
    assert {"index.html", "about.html", "tags.html", "post.html"} <= rendered
    assert set(threading.enumerate()) <= threads, set(threading.enumerate()) - threads
    assert not [r for r in caplog.records if r.name == "fediblog.access"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_freed_memory_goes_back_to_the_system_before_the_fork() -> None:
    """The start-up frees much (the rehearsal's whole app): glibc would keep it for
    reuse, in both processes once forked; supervisor.give_back_freed_memory returns it."""
    result = subprocess.run(
        [sys.executable, "-c", _FREED_AND_GIVEN_BACK], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    held, after = (float(figure) for figure in result.stdout.split())
    assert held - after > 40, result.stdout  # of the 64 MB freed, most given back


_FREED_AND_GIVEN_BACK = """
from fediblog.supervisor import give_back_freed_memory
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
chunks = [bytearray(1000) for _ in range(64_000)]  # 64 MB from the C heap, not mmap
last = bytearray(1000)  # at its top: freeing the rest leaves it nothing to trim by itself
del chunks
held = rss()
give_back_freed_memory()
print(held, rss())
"""


_AUTHORING_ONLY = """
import sys
import fediblog.app, fediblog.cli, fediblog.runtime, fediblog.server
authoring = ("markdown_it", "mdit_py_plugins", "PIL", "frontmatter")
print(sorted({name.split(".")[0] for name in sys.modules} & set(authoring)))
from fediblog.render import markdown_to_html
print(markdown_to_html("*written*").strip(), "markdown_it" in sys.modules)
"""


def test_what_only_the_author_needs_is_imported_on_first_use() -> None:
    """Markdown, images and front matter are the author's: a server that only serves
    pages and takes replies never imports them, in either of its processes."""
    result = subprocess.run(
        [sys.executable, "-c", _AUTHORING_ONLY], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "<p><em>written</em></p> True"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc")
def test_sigterm_stops_the_worker_process_before_the_web_process_exits(world: World) -> None:
    """systemd, Docker and kill(1) stop a server with SIGTERM: the web process stops its
    worker (and waits for it) before it exits, as it does on Ctrl-C, so that nothing of
    the server is left running once its main process has ended."""
    with world.process("web", "serve", "--port", str(world.port), "--worker-process") as web:
        wait_until_up(f"{world.base}/about", web, "the web process")
        log = world.folder / "web.log"
        worker = eventually(lambda: _one_child(web.pid), "the worker process", log)
        assert world.reply(1, "Answered before the stop").status_code == 202
        eventually(
            lambda: "Answered before the stop" in world.get(world.page).text, "the comment", log
        )
        web.send_signal(signal.SIGTERM)
        assert web.wait(timeout=30) == 0
        assert _gone(worker)  # stopped, and waited for, before the web process ended
    text = log.read_text()
    assert "fediblog: worker stopped" in text
    assert "Traceback" not in text
    assert world.rows("SELECT count(*) FROM comments") == [(1,)]


@pytest.mark.parametrize(
    "beside", [["--web-only"], ["--workers", "2"]], ids=["web-only", "workers"]
)
def test_a_worker_process_with_web_only_or_several_web_processes_is_exit_2(
    world: World, beside: list[str]
) -> None:
    result = run_cli(
        world.folder, world.env, "serve", "--port", str(world.port), "--worker-process", *beside
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--worker-process" in result.stderr
    assert beside[0] in result.stderr
    assert "Traceback" not in result.stderr


_FROZEN_BEFORE_THE_FORK = """
import gc, os, signal, sys, threading
from fediblog import supervisor
stopped = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stopped.set())
def worker() -> None:
    print(gc.get_freeze_count() > 1000, flush=True)
    os.kill(os.getppid(), signal.SIGTERM)
    threading.Event().wait(30)
companion = supervisor.Companion("worker process", worker, lambda parent: [], grace=5)
companion.start()
stopped.wait(30)
companion.stop()
print(gc.get_freeze_count() > 1000, flush=True)
"""


def test_what_the_web_process_loaded_stays_out_of_both_processes_collections() -> None:
    """A full collection in either process would write to every object it visits, and
    each page written is one the two no longer share: all that was loaded at the fork
    is frozen (gc.freeze), in the worker and in the web process alike."""
    result = _supervise(_FROZEN_BEFORE_THE_FORK)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "True\nTrue\n"
    assert result.stderr == ""


_WORKER_KEEPS_EXITING = """
import signal, sys, threading
from fediblog import supervisor
supervisor.RESTART_PAUSE = 0.01
stopped = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stopped.set())
companion = supervisor.Companion(
    "worker process",
    lambda: sys.exit(4),
    lambda parent: [sys.executable, "-c", "import sys; sys.exit(3)"],
    grace=1,
)
companion.start()
stopped.wait(30)
companion.stop()
sys.exit(1 if companion.failed else 0)
"""


def test_a_worker_process_that_keeps_exiting_stops_the_web_process_with_exit_1() -> None:
    result = _supervise(_WORKER_KEEPS_EXITING)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "fediblog: the worker process exited (exit status 4): starting it again"
    again = "fediblog: the worker process exited (exit status 3): starting it again"
    assert lines[1:5] == [again] * 4
    assert lines[5:] == [
        "fediblog: the worker process exited (exit status 3): 6 unexpected exits in 60 s, stopping"
    ]


@pytest.mark.anyio
async def test_in_one_process_the_inbox_waits_for_a_worker_that_is_behind(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serving and processing in one process: while the inbox worker is behind (its
    last claim was full), a group commit waits for its next claim, so what is accepted
    follows what is shown; a worker that is stuck only delays each commit, by
    PACE_LONGEST at most."""
    actor = "https://social.example/users/ann"
    async with Runtime.open(settings) as rt:
        worker = rt.inbox.worker
        release = asyncio.Event()
        real = worker._run_batch
        assert real is not None

        async def stuck_until_released(jobs: list[Any], report: Any) -> None:
            await release.wait()
            await real(jobs, report)

        monkeypatch.setattr(worker, "_run_batch", stuck_until_released)
        monkeypatch.setattr(worker, "_batch", 2)
        monkeypatch.setattr(runtime_module, "PACE_LONGEST", 60.0)
        await rt.store.save_inbox_items(
            [InboxItem(f"k{n}", actor, "Like", "{}") for n in range(6)]
        )
        rt.start_writer()
        rt.start_background({"inbox"})
        await _wait_for(lambda: _now(worker.behind), "the worker to fall behind")
        before = worker.outcomes.copy()
        accepted = asyncio.ensure_future(rt.writer.submit(InboxItem("new", actor, "Like", "{}")))
        await asyncio.sleep(0.3)
        assert not accepted.done()  # held: the worker has not taken its next batch
        assert await rt.store.count_inbox() == {"queued": 6}
        release.set()  # it finishes a batch, records it, claims the next: the commit goes
        await asyncio.wait_for(accepted, 30)
        assert worker.outcomes != before
        assert sum((await rt.store.count_inbox()).values()) == 7

        # Stuck for good: each commit waits PACE_LONGEST, then goes; nothing is refused.
        release.clear()
        await rt.store.save_inbox_items(
            [InboxItem(f"more{n}", actor, "Like", "{}") for n in range(4)]
        )
        await _wait_for(lambda: _now(worker.behind), "the worker behind again")
        monkeypatch.setattr(runtime_module, "PACE_LONGEST", 0.05)
        late = [InboxItem(f"late{n}", actor, "Like", "{}") for n in range(3)]
        await asyncio.wait_for(asyncio.gather(*(rt.writer.submit(i) for i in late)), 30)
        assert sum((await rt.store.count_inbox()).values()) == 14


async def _now(value: bool) -> bool:
    return value
