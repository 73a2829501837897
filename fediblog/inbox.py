"""The inbox: verify a signed POST, store it durably, then act on it.

Receiving is the hot path and does no network I/O once a key is known
(activitypub-federation-rust's order: parse → dereference actor → verify → store):

1. every signature check that needs no key (``httpsig.parse_signature``): 401;
2. the body as plain, size- and depth-capped JSON with a ``type`` and an ``actor``: 400;
3. the signer's key (memory, database, or one signed fetch), the signature, one
   rate-limited refresh if it fails, and signer == ``actor``: 401;
4. the activity goes to ``BatchWriter``, which commits many in one SQLite
   transaction (group commit); the POST is answered 202 only after that commit.

Processing runs apart from receiving (``process_once`` / ``run``), from the stored
rows, so a slow remote server never holds an inbound POST open, and a crash between
the two loses nothing. What an activity means is decided from its content, never
from which inbox URL it came to.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any

from fediblog.activitystreams import (
    ACTOR_TYPES,
    Urls,
    host_of,
    id_of,
    parse_actor,
)
from fediblog.actors import ActorDirectory
from fediblog.config import Settings
from fediblog.errors import (
    ActivityError,
    FediblogError,
    FetchError,
    SignatureError,
    StorageUnavailable,
)
from fediblog.followers import queue_answer
from fediblog.httpsig import parse_signature, verify_signature
from fediblog.metrics import InboxStats
from fediblog.models import InboxItem, InboxJob, JsonObject, utcnow
from fediblog.remote import parse_json
from fediblog.store import Store
from fediblog.worker import (
    Outcome,
    RetryPolicy,
    TableQueue,
    ThrottledLog,
    Worker,
    describe,
    every,
    is_transient,
)

log = logging.getLogger("fediblog.inbox")

Handler = Callable[[JsonObject], Awaitable[None]]


class Overloaded(FediblogError):
    """Too many activities are waiting to be stored: answer 503, the sender retries."""


class Sender:
    """Who an inbox POST says it comes from, filled in as ``receive`` learns it: the
    refusal log names the signer's keyId and the activity's actor when they are known."""

    __slots__ = ("actor", "key_id")

    def __init__(self) -> None:
        self.key_id: str | None = None
        self.actor: str | None = None


class BatchWriter:
    """Group commit: every activity waiting when a commit starts rides in the next one.

    One activity that cannot be stored (a constraint, text SQLite refuses) must not
    refuse its batch: when a batch fails for anything but the database itself, its
    activities are stored one by one and only the culprit is refused (400).
    """

    def __init__(self, store: Store, *, max_batch: int = 2_000, max_waiting: int = 20_000) -> None:
        self._store = store
        self._queue: asyncio.Queue[tuple[InboxItem, asyncio.Future[None]]] = asyncio.Queue()
        self._max_batch = max_batch
        self._max_waiting = max_waiting
        self._trouble = ThrottledLog(log)

    async def submit(self, item: InboxItem) -> None:
        """Return once ``item`` is committed; raise what the commit raised."""
        if self._queue.qsize() >= self._max_waiting:
            raise Overloaded("the inbox is busy, retry later")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, done))
        await done

    async def run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._commit(batch)

    async def _commit(self, batch: list[tuple[InboxItem, asyncio.Future[None]]]) -> None:
        try:
            await self._store.save_inbox_items([item for item, _ in batch])
        except StorageUnavailable as error:
            self._refuse(batch, error)
            return
        except Exception:
            if len(batch) == 1:
                item, done = batch[0]
                log.info("refused an activity from %s that cannot be stored", item.actor)
                _settle(done, ActivityError("the activity cannot be stored"))
                return
            for one in batch:
                await self._commit([one])
            return
        for _, done in batch:
            _settle(done, None)

    def _refuse(
        self, batch: list[tuple[InboxItem, asyncio.Future[None]]], error: StorageUnavailable
    ) -> None:
        # A full disk fails every request: one log line a minute, not one per request.
        self._trouble.error("store", f"storing inbox activities failed: {error}")
        for _, done in batch:
            _settle(done, Overloaded("the inbox cannot store activities now"))


def _settle(done: asyncio.Future[None], error: Exception | None) -> None:
    if done.done():
        return  # the request gave up waiting
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


# Processing retries what may pass later (a server down, a locked database) for about
# a day; what is refused or malformed fails at once.
RETRY = RetryPolicy(
    tuple(timedelta(minutes=m) for m in (0.5, 1, 2, 5, 10, 20, 40, 60, 120, 240, 480))
)



class Inbox:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        actors: ActorDirectory,
        writer: BatchWriter,
        *,
        on_queued: Callable[[], None] = lambda: None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._actors = actors
        self._writer = writer
        self._urls = Urls.of(settings)
        self._on_queued = on_queued
        self._blocked: frozenset[str] = frozenset()
        self.stats = InboxStats()  # the POSTs answered, and the last refusals (metrics.py)
        self.worker = Worker(
            "inbox",
            TableQueue(store.claim_inbox, store.record_inbox),
            self._process,
            # Small batches: after a crash, at most this many are processed twice (the
            # handlers are idempotent) and wait out the lease before they are retried.
            batch=50,
            record_every=50,
            lease=timedelta(minutes=1),
        )
        # Every handler registered for a type runs; each ignores what is not its concern
        # (an Undo may undo a Follow here, or a Like in ``responses``).
        self.handlers: dict[str, list[Handler]] = {
            "Follow": [self.handle_follow],
            "Undo": [self.handle_undo],
            "Delete": [self.handle_delete],
            "Update": [self.handle_update],
        }

    def add_handlers(self, handlers: Mapping[str, Handler]) -> None:
        for kind, handler in handlers.items():
            self.handlers.setdefault(kind, []).append(handler)

    # ---- receiving --------------------------------------------------------------

    async def load_blocks(self) -> None:
        self._blocked = frozenset(target for target, _ in await self._store.list_blocks())

    def is_blocked(self, actor: str) -> bool:
        """Blocked as an actor, or its domain or a parent domain is (as Mastodon does)."""
        authority = host_of(actor)
        if actor in self._blocked or authority in self._blocked:
            return True
        labels = authority.split(":")[0].split(".")
        return any(".".join(labels[i:]) in self._blocked for i in range(1, len(labels) - 1))

    async def receive(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes,
        sender: Sender | None = None,
    ) -> None:
        """Verify and durably store one inbound activity (or drop it silently).

        Raises SignatureError (401), ActivityError (400), Overloaded or FetchBusy
        (503: too many signing keys are being fetched). ``sender`` learns the keyId
        and the actor as they are read, for the refusal log.
        """
        signed = parse_signature(
            method,
            target,
            headers,
            body,
            expected_host=self._settings.host,
            now=utcnow(),
            scheme=self._settings.scheme,
        )
        if sender is not None:
            sender.key_id = signed.key_id
        try:
            payload = body.decode("utf-8")  # decoded once: checked here, stored below
        except UnicodeDecodeError:
            raise ActivityError("the body is not UTF-8") from None
        activity = _parse_activity(body)
        actor = activity["actor"]
        if sender is not None:
            sender.actor = actor
        if self.is_blocked(actor) or self.is_blocked(signed.key_id):
            return  # 202 and nothing stored: a blocked server learns nothing
        if activity["type"] == "Delete" and id_of(activity.get("object")) == actor:
            # An account deleting itself: its URL now answers 410, so only a key we
            # already hold can verify it. Unknown actor: drop it, fetch nothing.
            key = self._actors.cached_key(signed.key_id) or await self._store.get_actor_key(
                signed.key_id
            )
            if key is None:
                return
            verify_signature(signed, key.public_key_pem)
        else:
            key = await self._actors.get_key(signed.key_id)
            try:
                verify_signature(signed, key.public_key_pem)
            except SignatureError:
                fresh = await self._actors.refresh_key(key)
                if fresh is None:
                    raise
                verify_signature(signed, fresh.public_key_pem)
                key = fresh
        # Only now is a freshly fetched key (and its actor) stored: a request that is
        # not signed by it stores nothing.
        await self._actors.confirm(key)
        if key.actor != actor:
            raise SignatureError("the signer is not the activity's actor")
        activity_id = activity.get("id")
        # Scoped to the signer: nobody can squat another actor's activity id to have
        # the real activity dropped as a duplicate.
        dedup_key = (
            f"{actor} {activity_id}"
            if isinstance(activity_id, str) and activity_id
            else "sha256:" + hashlib.sha256(body).hexdigest()
        )
        await self._writer.submit(
            InboxItem(
                dedup_key=dedup_key,
                actor=actor,
                type=activity["type"],
                payload=payload,
            )
        )
        self.worker.wake()

    # ---- processing -------------------------------------------------------------

    async def process_once(self) -> int:
        """Act on every stored activity that is due; return how many were run."""
        return await self.worker.run_once()

    async def run(self) -> None:
        """Process forever; reread the blocks every second (`fediblog block` may run
        in another process)."""
        async with asyncio.TaskGroup() as group:
            group.create_task(every(1.0, self.load_blocks, "reloading blocks"))
            group.create_task(self.worker.run_forever())

    async def _process(self, job: InboxJob) -> Outcome:
        """Run the handlers for one stored activity.

        An activity that breaks a handler for good fails alone and never stops the ones
        behind it; one that may pass later (its sender's server is down, the database
        is locked) is retried with back-off.
        """
        activity: JsonObject = json.loads(job.payload)
        activity["actor"] = id_of(activity.get("actor"))  # verified on receipt
        try:
            for handler in self.handlers.get(activity["type"], ()):
                await handler(activity)
        except Exception as error:
            transient = is_transient(error)
            if isinstance(error, ActivityError | FetchError):
                reason = str(error)
            elif transient:
                reason = describe(error)
            else:
                log.exception("handling %s %s failed", activity["type"], activity.get("id"))
                reason = f"internal error: {describe(error)}"
            return RETRY.after_error(job, reason, self.worker.clock(), transient=transient)
        return Outcome.done()  # an activity we have no use for is simply done

    # ---- handlers -----------------------------------------------------------------

    async def handle_follow(self, activity: JsonObject) -> None:
        if id_of(activity.get("object")) != self._urls.actor:
            return  # following someone else: not ours to answer
        actor_id = activity["actor"]
        actor = await self._actors.get_actor(actor_id)
        local_id = await self._actors.save(actor)
        manual = self._settings.manually_approves_followers
        await self._store.save_follower(
            actor_id=local_id,
            follow_id=str(activity.get("id") or ""),
            inbox=actor.inbox,
            shared_inbox=actor.shared_inbox,
            status="pending" if manual else "accepted",
        )
        follower = await self._store.get_follower(actor_id)
        if follower is not None and follower.status == "accepted":
            await self.send_accept(activity, actor.inbox)

    async def send_accept(self, follow: JsonObject, inbox: str) -> None:
        await queue_answer(self._settings, self._store, follow, inbox)
        self._on_queued()

    async def handle_undo(self, activity: JsonObject) -> None:
        inner = activity.get("object")
        actor = activity["actor"]
        if isinstance(inner, dict):
            if id_of(inner.get("actor")) != actor:
                return  # undoing someone else's activity (ATTACKS.md 12)
            if inner.get("type") == "Follow" and id_of(inner.get("object")) == self._urls.actor:
                await self._store.delete_follower(actor)
        elif isinstance(inner, str):
            follower = await self._store.get_follower(actor)
            if follower is not None and follower.follow_id == inner:
                await self._store.delete_follower(actor)

    async def handle_delete(self, activity: JsonObject) -> None:
        actor = activity["actor"]
        if id_of(activity.get("object")) == actor:
            await self._store.delete_actor(actor, utcnow())
            self._actors.forget(actor)

    async def handle_update(self, activity: JsonObject) -> None:
        obj = activity.get("object")
        actor = activity["actor"]
        if isinstance(obj, dict) and obj.get("type") in ACTOR_TYPES:
            if obj.get("id") != actor:
                return  # only an actor may update itself (ATTACKS.md 11)
            updated = parse_actor(obj, allow_http=self._settings.allow_http)
            await self._actors.save(updated)
            self._actors.forget(actor)


def _parse_activity(body: bytes) -> JsonObject:
    try:
        activity: Any = parse_json(body)
    except FetchError as error:
        raise ActivityError(f"the body is not acceptable JSON: {error}") from None
    if not isinstance(activity, dict):
        raise ActivityError("the body is not a JSON object")
    kind = activity.get("type")
    if not isinstance(kind, str) or not kind or len(kind) > 64:
        raise ActivityError("the activity has no type")
    actor = id_of(activity.get("actor"))
    if actor is None or not host_of(actor):
        raise ActivityError("the activity has no actor")
    activity_id = activity.get("id")
    # JSON may escape half a surrogate pair ("\ud800"), which no UTF-8 column can hold:
    # refuse it here rather than fail the group commit it would ride in.
    for value in (kind, actor, activity_id):
        if isinstance(value, str) and not _is_unicode(value):
            raise ActivityError("the activity's type, id or actor is not valid Unicode")
    activity["actor"] = actor
    return activity


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
