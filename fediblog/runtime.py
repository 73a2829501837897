"""The blog's running parts, built in one place: ``async with Runtime.open(settings) as rt``.

The web app (app.py) and a worker process (``fediblog worker``) build the same object
graph here: the store, the HTTP clients and the fetcher, the actor directory, the
deliverer, the inbox with its batch writer, the responses, the media proxy, the
crawler, the notifier and the scheduler. Leaving the block stops every task the
runtime started (a worker records what it finished; the leases bring back the rest)
and closes the clients and the database.

Background work comes in **roles** (``ROLES``), each one or two tasks on the common
worker mechanism (worker.py): ``rt.start_background(only={...})`` starts those asked
for, so one process may run them all (``fediblog serve``, the default with SQLite) or
a web process may run none (``serve --web-only``) while ``fediblog worker`` runs them.

Roles split over processes need a few things one process does not:

* **wake-ups across processes**: work another process queued (the web process storing
  an inbox POST, the desk or the CLI publishing a post) wakes this process's inbox,
  delivery and notification workers, not at their next poll (a second). A watcher asks
  SQLite's ``PRAGMA data_version`` (no table read), which changes when another
  connection commits, and wakes them when it changes. Twice: first on a connection of
  its own, synchronously (``Store.peek_data_version``: microseconds, so looking often
  costs nothing while nothing happens), and only when that one moved, on the writer
  connection through aiosqlite's thread (0.2 ms), whose value this process's own
  commits do not move: work this process queued wakes its workers directly. The pause
  between two looks is ``WATCH_INTERVAL`` after a change and doubles with each quiet
  look: up to ``WATCH_WORKER_IDLE`` in a worker process, which thus reacts within
  about 0.1 s (idle, ten looks a second: a fraction of a percent of a core, mostly the
  cost of waking up at all); up to ``WATCH_IDLE`` in a process that also serves
  (``fediblog serve``), which watches only for the CLI: a first wake-up after a quiet
  time comes within ``WATCH_IDLE`` seconds, no later than the workers' own poll.
* **a heartbeat**: a worker process writes, every ``HEARTBEAT_INTERVAL`` seconds, when
  it last saw each of its roles running (one ``meta`` row per role), so the web
  process's /healthz and the desk can tell a worker that stopped from one that is idle;
  and its outcome counts since it started (one row per process), which the web
  process's /metrics adds to its own. A worker that stops cleanly deletes its rows.
* **what one role hands another**: replies the inbox saves are crawled (crawl.py); with
  the crawl role in another process, the crawls they schedule are queued in the
  database every ``QUEUE_CRAWLS`` seconds, in one commit. The crawl role checks
  senders against the blocks, which the inbox role rereads every second; without it,
  this process rereads them itself (``start_block_reload``).
* **a worker process stops when a part of it stops**: a role's task never ends on its
  own; if one does, ``run_worker`` raises WorkerFailed (exit 1) so that systemd
  restarts the process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Collection, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx

from fediblog.activitystreams import Urls
from fediblog.actors import ActorDirectory
from fediblog.blog import Blog
from fediblog.config import Settings
from fediblog.crawl import Crawler
from fediblog.delivery import PER_HOST, USER_AGENT, Deliverer
from fediblog.errors import WorkerFailed
from fediblog.httpsig import sign_request
from fediblog.inbox import BatchWriter, Inbox
from fediblog.keys import KeyPair, load_key
from fediblog.models import utcnow
from fediblog.netguard import NoCookies
from fediblog.notify import Notifier
from fediblog.proxy import MediaProxy
from fediblog.remote import Fetcher, FetchPolicy, build_transport
from fediblog.responses import Responses
from fediblog.schedule import Scheduler
from fediblog.store import Store
from fediblog.worker import ThrottledLog, Worker, describe, every

log = logging.getLogger("fediblog.runtime")

# The background roles, in the order a worker names them; `fediblog worker --only` takes them.
ROLES = ("inbox", "delivery", "crawl", "schedule", "notify", "prune")
# Roles that check senders against the blocks (crawl.py's is_blocked is the inbox's).
BLOCK_READERS = ("inbox", "crawl")
WATCH_INTERVAL = 0.05  # seconds between two looks at the database's data version...
WATCH_WORKER_IDLE = 0.1  # ...growing when nothing changes up to this, in a worker process
WATCH_IDLE = 1.0  # ...and up to this in a process that also serves
# In one process, accepting a flood and turning it into comments share one core: while
# the inbox worker is behind (its last claim was full), each group commit waits for its
# next claim, at most this long. What is accepted then follows what is shown, instead
# of a backlog growing for as long as the flood lasts; a worker that is stuck slows
# each commit by this much at most, and nothing is refused for it.
PACE_LONGEST = 0.25
HEARTBEAT_INTERVAL = 5.0  # seconds between two heartbeats of a worker process
QUEUE_CRAWLS = 1.0  # seconds between two commits of the crawls the inbox scheduled


async def run_worker(settings: Settings, roles: Collection[str] = ROLES) -> None:
    """``fediblog worker``: run ``roles`` until SIGTERM or SIGINT, then stop cleanly
    (each worker records what it finished; what it had claimed is due again; the
    heartbeat rows are deleted). A task that ends on its own raises WorkerFailed."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        async with Runtime.open(settings) as rt:
            tasks = rt.start_background(roles, worker_process=True)
            stop = asyncio.create_task(stopping.wait(), name="stopping")
            try:
                await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
            ended = [task for task in tasks if task.done()]
            if ended:
                raise WorkerFailed(_why_ended(ended[0]))
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def next_pause(pause: float, *, changed: bool, slowest: float) -> float:
    """The watcher's next pause: WATCH_INTERVAL after a change, else twice the last one,
    up to ``slowest``."""
    return WATCH_INTERVAL if changed else min(pause * 2, slowest)


def _why_ended(task: asyncio.Task[None]) -> str:
    """One line for a task that ended; its traceback, if any, goes to the log."""
    if task.cancelled():
        return f"the {task.get_name()} task was cancelled: stopping the worker"
    error = task.exception()
    if error is None:
        return f"the {task.get_name()} task ended: stopping the worker"
    log.error("the %s task failed", task.get_name(), exc_info=error)
    return f"the {task.get_name()} task failed ({describe(error)}): stopping the worker"


@dataclass(eq=False)
class Runtime:
    """Every long-lived part of a running blog, and the background tasks it started."""

    settings: Settings
    store: Store
    urls: Urls
    blog_key: KeyPair
    instance_key: KeyPair
    fetcher: Fetcher
    actors: ActorDirectory
    deliverer: Deliverer
    writer: BatchWriter
    inbox: Inbox
    media_proxy: MediaProxy
    responses: Responses
    crawler: Crawler
    notifier: Notifier
    scheduler: Scheduler
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # role -> the tasks that carry it: what the heartbeat reports as running.
    roles: dict[str, list[asyncio.Task[None]]] = field(default_factory=dict)
    _background: bool = False  # start_background was called: it starts once

    @classmethod
    @asynccontextmanager
    async def open(
        cls, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> AsyncIterator[Runtime]:
        """Build the graph for these settings; ``transport`` replaces the network for
        every outbound request (tests). Everything is closed when the block ends."""
        async with AsyncExitStack() as stack:
            blog_key = load_key(settings.keys_dir, "blog")
            instance_key = load_key(settings.keys_dir, "instance")
            urls = Urls.of(settings)
            policy = FetchPolicy(
                allow_http=settings.allow_http,
                allow_private_addresses=settings.allow_private_addresses,
            )
            store = await Store.open(settings.store_location)
            stack.push_async_callback(store.close)

            def http_client(max_per_host: int | None = None) -> httpx.AsyncClient:
                client = httpx.AsyncClient(
                    transport=transport or build_transport(policy, max_per_host=max_per_host),
                    headers={"User-Agent": USER_AGENT},
                    follow_redirects=False,
                    cookies=NoCookies(),  # a server's Set-Cookie is neither kept nor sent back
                )
                stack.push_async_callback(client.aclose)
                return client

            # Separate connection pools: GETs (key and actor fetches, which strangers can
            # point at a tarpit) never take the connections that deliveries need, nor the
            # reverse; remote images and the webhook have their own too.
            fetch_client = http_client()
            delivery_client = http_client(PER_HOST)
            proxy_client = http_client()
            notify_client = http_client()

            def sign_get(method: str, url: str) -> dict[str, str]:
                return sign_request(
                    method,
                    url,
                    body=None,
                    key_id=urls.instance_key_id,
                    private_key=instance_key.private_key,
                    now=utcnow(),
                )

            fetcher = Fetcher(fetch_client, policy, sign_get)
            stack.push_async_callback(fetcher.aclose)
            actors = ActorDirectory(store, fetcher, allow_http=settings.allow_http)
            stack.push_async_callback(actors.aclose)
            deliverer = Deliverer(store, delivery_client, blog_key, urls.key_id)
            writer = BatchWriter(store)
            inbox = Inbox(settings, store, actors, writer, on_queued=deliverer.wake)
            media_proxy = await MediaProxy.open(
                store,
                proxy_client,
                policy,
                settings.database.parent / "proxy",
                cache_bytes=settings.proxy_cache_mb * 1_000_000,
                user_agent=USER_AGENT,
            )
            stack.push_async_callback(media_proxy.aclose)
            responses = Responses(settings, store, actors, fetcher, media_proxy)
            inbox.add_handlers(responses.handlers())
            inbox.sharing = responses  # a batch of replies becomes comments in one commit
            # Each saved reply is crawled for the replies that never reached the inbox.
            crawler = Crawler(settings, store, fetcher, responses, is_blocked=inbox.is_blocked)
            responses.reply_listeners.append(crawler.schedule)
            # The author hears of each new reply; the local form tells it too (web/forms.py).
            notifier = Notifier(settings, store, notify_client)
            responses.reply_listeners.append(notifier.response_saved)
            # Scheduled posts go out at their time, even if scheduled while we were down.
            scheduler = Scheduler(Blog(settings, store), on_published=deliverer.wake)
            await inbox.load_blocks()
            runtime = cls(
                settings=settings,
                store=store,
                urls=urls,
                blog_key=blog_key,
                instance_key=instance_key,
                fetcher=fetcher,
                actors=actors,
                deliverer=deliverer,
                writer=writer,
                inbox=inbox,
                media_proxy=media_proxy,
                responses=responses,
                crawler=crawler,
                notifier=notifier,
                scheduler=scheduler,
            )
            stack.push_async_callback(runtime.stop)
            yield runtime

    async def stop(self) -> None:
        """Cancel every task started here and wait for each to record what it did."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()
        self.roles.clear()

    def _start(self, coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine, name=name)
        self.tasks.append(task)
        return task

    def start_writer(self) -> asyncio.Task[None]:
        """The inbox's group commit: the web process needs it to accept activities."""
        return self._start(self.writer.run(), "inbox-writer")

    def start_block_reload(self) -> asyncio.Task[None]:
        """Reread the blocks every second (`fediblog block` may run in another process),
        as the inbox role does: a web-only process drops a newly blocked sender too."""
        return self._start(self.inbox.reload_blocks(), "blocks")

    def start_background(
        self, only: Collection[str] = ROLES, *, worker_process: bool = False
    ) -> list[asyncio.Task[None]]:
        """Start the background roles in ``only`` (all by default); return every task
        started. Once per runtime: a second call raises RuntimeError.

        With any of inbox, delivery or notify, also the watcher that wakes them when
        another process commits; with ``worker_process`` (``fediblog worker``), the
        heartbeat, and a watcher that looks at least every 0.1 s (module docstring).
        With inbox but not crawl, the crawls replies schedule are queued in the
        database; with crawl but not inbox, the blocks are reread every second.
        """
        if isinstance(only, str):  # "inbox" would be the roles i, n, b, o, x
            raise TypeError(f"only takes a collection of roles, not the string {only!r}")
        unknown = set(only) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown roles: {', '.join(sorted(unknown))}")
        if self._background:
            raise RuntimeError("the background work of this runtime has started already")
        self._background = True
        store, settings, media_proxy = self.store, self.settings, self.media_proxy

        async def prune() -> None:
            await store.prune(utcnow() - timedelta(days=settings.retention_days))
            await store.prune_notifications(utcnow() - timedelta(days=settings.retention_days))
            await media_proxy.sweep()  # avatars changed by profile updates
            await media_proxy.prune()

        starters: dict[str, list[tuple[Callable[[], Coroutine[Any, Any, None]], str]]] = {
            "inbox": [(self.inbox.run, "inbox-processor")],
            "delivery": [(self.deliverer.run, "delivery")],
            "crawl": [(self.crawler.run, "crawler")],
            "prune": [(lambda: every(3600, prune, "pruning"), "retention")],
            "notify": [(self.notifier.run, "notify")] if self.notifier.enabled else [],
            "schedule": [(self.scheduler.run, "schedule")],
        }
        # What one role hands another, when that other runs elsewhere (module docstring).
        if "inbox" in only and "crawl" not in only:
            starters["inbox"].append((self._queue_crawls, "crawl-queue"))
        if "inbox" not in only:
            for role in BLOCK_READERS:
                if role in only:
                    starters[role].append((self.inbox.reload_blocks, "blocks"))
                    break
        if "inbox" in only and not worker_process:  # this process's writer, if it serves
            worker = self.inbox.worker
            self.writer.pace = lambda: worker.until_caught_up(PACE_LONGEST)
        started: list[asyncio.Task[None]] = []
        for role in ROLES:  # in a fixed order, whatever order ``only`` has
            if role in only:
                tasks = [self._start(run(), name) for run, name in starters[role]]
                self.roles[role] = tasks
                started += tasks
        woken = [
            worker
            for role, worker in (
                ("inbox", self.inbox.worker),
                ("delivery", self.deliverer.worker),
                ("notify", self.notifier.worker),
            )
            if self.roles.get(role)
        ]
        if woken:
            slowest = WATCH_WORKER_IDLE if worker_process else WATCH_IDLE
            started.append(self._start(self._watch(woken, slowest), "wake-ups"))
        if worker_process:
            started.append(self._start(self._heartbeat(), "heartbeat"))
        return started

    async def _watch(self, workers: list[Worker[Any]], slowest: float) -> None:
        """Wake ``workers`` whenever another process has committed: look every
        WATCH_INTERVAL seconds after a change, the pause doubling with each quiet
        look up to ``slowest`` (see the module docstring)."""
        trouble = ThrottledLog(log)
        seen: int | None = None  # the writer connection's data version
        peeked: int | None = None  # the peeking connection's
        pause = WATCH_INTERVAL
        while True:
            changed = False
            # Cheap, on this thread, and moved by any commit; only when it moved, the
            # writer connection's, moved only by other connections' (module docstring).
            peek = self.store.peek_data_version()
            if peek is None or peek != peeked:
                peeked = peek
                try:
                    version = await self.store.get_data_version()
                except Exception as error:  # a database gone for a while: the polls go on
                    trouble.error("watch", f"watching the database for work: {describe(error)}")
                else:
                    # The first look only takes note: what another process committed
                    # between the workers' first pass and this look waits for their
                    # poll (a second). Waking them here instead raced this process's own
                    # callers of deliver_once/process_once for the same rows.
                    changed = seen is not None and version != seen
                    seen = version
            if changed:
                for worker in workers:
                    worker.wake()
            pause = next_pause(pause, changed=changed, slowest=slowest)
            await asyncio.sleep(pause)

    async def _queue_crawls(self) -> None:
        """Queue the crawls the inbox scheduled, for a crawl role in another process
        (which finds them at its next poll); once more when stopping."""
        try:
            await every(QUEUE_CRAWLS, self.crawler.queue_scheduled, "queueing crawls")
        finally:
            try:
                await self.crawler.queue_scheduled()
            except Exception as error:  # the crawler's hourly sweep queues them later
                log.error("queueing crawls at shutdown: %s", describe(error))

    def _counts(self) -> dict[str, dict[str, int]]:
        """This process's outcome counts, for the web process's /metrics."""
        return {
            "inbox": dict(self.inbox.worker.outcomes),
            "delivery": dict(self.deliverer.worker.outcomes),
        }

    async def _heartbeat(self) -> None:
        """Record, now and then, which roles still run here and what they did
        (web/health.py reads it); delete the rows when stopped."""
        trouble = ThrottledLog(log)
        process = str(os.getpid())
        written: dict[str, datetime] = {}  # role -> the last heartbeat written for it
        try:
            while True:
                running = [
                    role
                    for role, tasks in self.roles.items()
                    if not any(task.done() for task in tasks)
                ]
                now = utcnow()
                # Before the write: one cancelled while it commits still commits.
                written.update(dict.fromkeys(running, now))
                try:
                    await self.store.save_worker_heartbeats(
                        running, now, process=process, counts=self._counts()
                    )
                except Exception as error:
                    trouble.error("heartbeat", f"recording the heartbeat: {describe(error)}")
                await asyncio.sleep(HEARTBEAT_INTERVAL)
        finally:
            try:
                await self.store.delete_worker_heartbeats(written, process=process)
            except Exception as error:  # they go stale within a minute: say so only
                log.error("deleting the heartbeat at shutdown: %s", describe(error))
