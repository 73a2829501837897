"""The inbox: verify a signed POST, store it durably, then act on it.

Receiving is the hot path and does no network I/O once a key is known
(activitypub-federation-rust's order: parse → dereference actor → verify → store):

1. every signature check that needs no key (``httpsig.parse_signature``): 401;
2. the body as plain, size- and depth-capped JSON with a ``type`` and an ``actor``: 400;
3. the signer's key (memory, database, or one signed fetch), the signature, the key
   the database holds now and one rate-limited refresh if it fails, and signer ==
   ``actor``: 401 (actors.py keeps keys current across processes);
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
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, Protocol

from fediblog.activitystreams import (
    ACTOR_TYPES,
    Urls,
    host_of,
    id_of,
    is_unicode,
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
from fediblog.httpsig import SignedRequest, parse_signature, verify_signature
from fediblog.metrics import InboxStats
from fediblog.models import ActorKey, InboxItem, InboxJob, JsonObject, utcnow
from fediblog.remote import parse_json
from fediblog.store import Store
from fediblog.worker import (
    Outcome,
    Report,
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


class SharedWork(Protocol):
    """What handlers prepared for activities to share one transaction: entered around
    each transaction by the task that runs it; ``committed()`` once one committed."""

    @property
    def ready(self) -> Sequence[bool]:
        """Which of the activities may join: their handlers now need no network."""
        ...

    @property
    def problems(self) -> Sequence[Exception | None]:
        """For each activity that may not join, what its handlers would fail on (its
        sender could not be fetched), or None: it runs alone."""
        ...

    async def committed(self) -> None:
        """The last transaction committed: act on what it saved (tell listeners)."""
        ...

    async def __aenter__(self) -> object: ...

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...


class Sharing(Protocol):
    """Handlers whose activities may be acted on many to a transaction (responses.py)."""

    def shareable(self, activity: JsonObject) -> bool: ...

    async def prepare_shared(self, activities: Sequence[JsonObject]) -> SharedWork: ...


class Overloaded(FediblogError):
    """Too many activities are waiting to be stored: answer 503, the sender retries."""


class Sender:
    """Who an inbox POST says it comes from, filled in as ``receive`` learns it: the
    refusal log names the signer's keyId and the activity's actor when they are known."""

    __slots__ = ("actor", "key_id")

    def __init__(self) -> None:
        self.key_id: str | None = None
        self.actor: str | None = None


SHUTTING_DOWN = "the inbox is shutting down, retry later"


_Waiting = tuple[InboxItem, "asyncio.Future[None]"]


class BatchWriter:
    """Group commit: every activity waiting when a commit takes the write lock rides in it.

    What waits is taken once the lock is held (``Store.save_inbox_waiting``), not before
    the commit waits for it: with several processes writing one SQLite file, a commit
    waited ~4 ms for the lock on average during a flood, and what arrived meanwhile
    waited for the next one. One activity that cannot be stored (a constraint, text
    SQLite refuses) must not refuse its batch: when a batch fails for anything but the
    database itself, its activities are stored one by one and only the culprit is
    refused (400).
    """

    def __init__(self, store: Store, *, max_batch: int = 2_000, max_waiting: int = 20_000) -> None:
        self._store = store
        # A deque and an event, not an asyncio.Queue: the commit takes everything waiting
        # at once, and a Queue's bookkeeping per item was ~2 us of each POST. A deque, as
        # SQLite's commit takes from it on the writer's thread (append and popleft are
        # each atomic).
        self._waiting: deque[_Waiting] = deque()
        self._taken: list[_Waiting] = []  # by the commit under way
        self._arrived = asyncio.Event()
        self._max_batch = max_batch
        self._max_waiting = max_waiting
        self._trouble = ThrottledLog(log)
        self._stopped = False
        # Awaited before each commit: the inbox worker of this same process, when it is
        # behind, holds the next commit until it has taken its next batch (Runtime).
        self.pace: Callable[[], Awaitable[None]] | None = None

    async def submit(self, item: InboxItem) -> None:
        """Return once ``item`` is committed; raise what the commit raised."""
        if self._stopped:
            raise Overloaded(SHUTTING_DOWN)
        if len(self._waiting) >= self._max_waiting:
            raise Overloaded("the inbox is busy, retry later")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        self._arrived.set()
        await done

    async def run(self) -> None:
        try:
            while True:
                await self._arrived.wait()
                self._arrived.clear()
                while self._waiting:
                    if self.pace is not None:
                        await self.pace()
                    await self._commit_waiting()
        finally:
            # Cancelled (shutdown): nothing will commit what waits, nor the batch cut
            # short. Each request gets its 503 now, not a hang until the server dies;
            # the sender retries, and a batch that did commit is deduplicated then.
            self._stopped = True
            for _, done in [*self._taken, *self._waiting]:
                _settle(done, Overloaded(SHUTTING_DOWN))
            self._waiting.clear()

    async def _commit_waiting(self) -> None:
        self._taken = []
        waiting, limit = self._waiting, self._max_batch
        loop = asyncio.get_running_loop()

        def take() -> list[InboxItem]:  # on SQLite's writer thread, the lock held
            # Stopped: run() answers what is left 503, and a commit cut short by the
            # shutdown takes no more (what it took, run() answers too).
            taken = self._taken
            while waiting and len(taken) < limit and not self._stopped:
                taken.append(waiting.popleft())
            return [item for item, _ in taken]

        def committed() -> bool:  # on SQLite's writer thread, after each commit
            batch, self._taken = self._taken, []
            loop.call_soon_threadsafe(_settle_all, batch)
            return bool(waiting) and not self._stopped  # then the next commit, at once

        # Unpaced, one commit follows another on the writer's thread while activities
        # wait; paced, each waits for the worker (``pace``) in the event loop.
        try:
            await self._store.save_inbox_waiting(take, committed if self.pace is None else None)
        except StorageUnavailable as error:
            take()  # failed before it took them (the lock never came): theirs too
            self._refuse(self._taken, error)
        except Exception:
            take()
            for one in list(self._taken):
                await self._commit_one(one)
        else:
            _settle_all(self._taken)  # PostgreSQL's commit, and SQLite's when paced
        self._taken = []

    async def _commit_one(self, waiting: _Waiting) -> None:
        item, done = waiting
        try:
            await self._store.save_inbox_items([item])
        except StorageUnavailable as error:
            self._refuse([waiting], error)
        except Exception:
            log.info("refused an activity from %s that cannot be stored", item.actor)
            _settle(done, ActivityError("the activity cannot be stored"))
        else:
            _settle(done, None)

    def _refuse(self, batch: list[_Waiting], error: StorageUnavailable) -> None:
        # A full disk fails every request: one log line a minute, not one per request.
        self._trouble.error("store", f"storing inbox activities failed: {error}")
        for _, done in batch:
            _settle(done, Overloaded("the inbox cannot store activities now"))


def _settle_all(batch: list[_Waiting]) -> None:
    for _, done in batch:
        _settle(done, None)


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
            run_batch=self._process_batch,
            # A batch's replies commit together (an interrupted one is rolled back and
            # claimed again after the lease): a commit every 500 replies, not every one,
            # and the write lock, which accepting activities also needs, held only for
            # that commit's one trip (Store.shared_transaction). 500, not 200: in one
            # process the flood's POSTs and the worker share the event loop, and with
            # 200 the worker made 1,400 comments/s while 2,600 replies/s came in (lag
            # p99 4.6 s); with 500, 1,550/s of 1,620/s (0.7 s).
            batch=500,
            record_every=50,
            lease=timedelta(minutes=1),
        )
        self.sharing: Sharing | None = None  # set by the app: responses.Responses
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
        if self._blocked and (self.is_blocked(actor) or self.is_blocked(signed.key_id)):
            return  # 202 and nothing stored: a blocked server learns nothing
        if activity["type"] == "Delete" and id_of(activity.get("object")) == actor:
            # An account deleting itself: its URL now answers 410, so only a key we
            # already hold can verify it. Unknown (or deleted) actor: drop it, fetch nothing.
            key = await self._actors.stored_key(signed.key_id)
            if key is None:
                return
            try:
                verify_signature(signed, key.public_key_pem)
            except SignatureError as error:
                key = await self._verify_again(signed, key, error, refetch=False)
        else:
            # A key in memory needs no await (the busiest case by far).
            key = self._actors.cached_key(signed.key_id) or await self._actors.get_key(
                signed.key_id
            )
            try:
                verify_signature(signed, key.public_key_pem)
            except SignatureError as error:
                key = await self._verify_again(signed, key, error, refetch=True)
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

    async def _verify_again(
        self, signed: SignedRequest, key: ActorKey, error: SignatureError, *, refetch: bool
    ) -> ActorKey:
        """``key`` did not verify ``signed``: the key it does verify with, else ``error``.

        First the key the database holds now (a worker process stored a rotation this
        process has not heard of), then, if ``refetch``, one rate-limited refetch.
        """
        stored = await self._actors.reread_key(key)
        if stored is not None:
            try:
                verify_signature(signed, stored.public_key_pem)
                return stored
            except SignatureError:
                key = stored
        fresh = await self._actors.refresh_key(key) if refetch else None
        if fresh is None:
            raise error
        verify_signature(signed, fresh.public_key_pem)
        return fresh

    # ---- processing -------------------------------------------------------------

    async def process_once(self) -> int:
        """Act on every stored activity that is due; return how many were run."""
        return await self.worker.run_once()

    async def run(self) -> None:
        """Process forever; reread the blocks every second (`fediblog block` may run
        in another process)."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.reload_blocks())
            group.create_task(self.worker.run_forever())

    async def reload_blocks(self) -> None:
        """Reread the blocks every second, for ever (`fediblog block` and the desk may
        write them in another process)."""
        await every(1.0, self.load_blocks, "reloading blocks")

    async def _process(self, job: InboxJob) -> Outcome:
        """Run the handlers for one stored activity.

        An activity that breaks a handler for good fails alone and never stops the ones
        behind it; one that may pass later (its sender's server is down, the database
        is locked) is retried with back-off.
        """
        activity = _stored_activity(job)
        if activity is None:
            return Outcome.failed("internal error: the stored activity is not a JSON object")
        try:
            for handler in self.handlers.get(activity["type"], ()):
                await handler(activity)
        except Exception as error:
            return self._failed(job, activity, error)
        return Outcome.done()  # an activity we have no use for is simply done

    def _failed(self, job: InboxJob, activity: JsonObject, error: Exception) -> Outcome:
        transient = is_transient(error)
        if isinstance(error, ActivityError | FetchError):
            reason = str(error)
        elif transient:
            reason = describe(error)
        else:
            log.exception(
                "handling %s %s failed", activity["type"], activity.get("id"), exc_info=error
            )
            reason = f"internal error: {describe(error)}"
        return RETRY.after_error(job, reason, self.worker.clock(), transient=transient)

    async def _process_batch(self, jobs: list[InboxJob], report: Report[InboxJob]) -> None:
        """Act on a claimed batch, in claim order, reporting each outcome once final. A
        run of activities that ``sharing`` can act on without the network (replies, once
        their senders are known) shares one transaction: one commit and a few reads for
        all of them, not a few each. Every other activity runs alone, as ``_process``
        runs it."""
        sharing = self.sharing
        parsed = [_stored_activity(job) for job in jobs]
        activities = [activity or {} for activity in parsed]
        start = 0
        while start < len(jobs):
            end = start
            while (
                sharing is not None
                and end < len(jobs)
                and parsed[end] is not None
                and sharing.shareable(activities[end])
            ):
                end += 1
            if sharing is None or end == start:
                report(jobs[start], await self._process(jobs[start]))
                start += 1
                continue
            try:
                work = await sharing.prepare_shared(activities[start:end])
            except Exception as error:  # e.g. a busy database: each tries alone
                log.info("preparing %d activities failed: %s", end - start, describe(error))
                for job in jobs[start:end]:
                    report(job, await self._process(job))
                start = end
                continue
            ready, problems = list(work.ready), list(work.problems)
            index = start
            while index < end:
                stop = index
                while stop < end and ready[stop - start]:
                    stop += 1
                if stop > index:
                    await self._shared(jobs[index:stop], activities[index:stop], work, report)
                    index = stop
                    continue
                problem = problems[index - start]
                if problem is not None:
                    # Its sender could not be fetched just now: alone, it would fetch
                    # again and fail the same way (a dead host: one more wait per reply).
                    report(jobs[index], self._failed(jobs[index], activities[index], problem))
                else:
                    report(jobs[index], await self._process(jobs[index]))
                index += 1
            start = end

    async def _shared(
        self,
        jobs: list[InboxJob],
        activities: list[JsonObject],
        work: SharedWork,
        report: Report[InboxJob],
    ) -> None:
        """Act on these activities in shared transactions. One that fails before it
        wrote anything fails alone and the others commit; one that fails after it wrote
        (or with an error that may pass) rolls the transaction back: those before it are
        done again together, it runs alone (its own outcome, as ``_process`` gives it),
        and those after it go on together. A loop, not recursion: 200 poison replies
        are 200 rounds, not 200 frames."""
        todo: deque[tuple[int, int, bool]] = deque([(0, len(jobs), False)])  # lo, hi, alone
        while todo:
            lo, hi, alone = todo.popleft()
            if alone:
                for job in jobs[lo:hi]:
                    report(job, await self._process(job))
                continue
            if lo == hi:
                continue
            try:
                culprit = await self._together(jobs[lo:hi], activities[lo:hi], work, report)
            except Exception as error:  # the commit failed: each tries alone, and says why
                log.info("a shared transaction failed: %s", describe(error))
                todo.appendleft((lo, hi, True))
                continue
            if culprit is not None:
                at = lo + culprit
                todo.extendleft([(at + 1, hi, False), (at, at + 1, True), (lo, at, False)])

    async def _together(
        self,
        jobs: list[InboxJob],
        activities: list[JsonObject],
        work: SharedWork,
        report: Report[InboxJob],
    ) -> int | None:
        """One shared transaction. Committed: the listeners are told, every outcome is
        reported, and None returned; rolled back by an activity that failed after it
        wrote (or transiently): nothing is reported, and its index returned. A failed
        commit raises.

        Cancelled (shutdown) before the commit, it rolls back; from the commit on, it
        finishes first: what committed is reported (the worker records it, rather than
        re-running it as interrupted) and its listeners are told."""
        committing = False

        async def attempt() -> int | None:
            nonlocal committing
            outcomes: list[Outcome] = []
            try:
                async with work, self._store.shared_transaction() as transaction:
                    for index, (job, activity) in enumerate(zip(jobs, activities, strict=True)):
                        before = transaction.writes
                        try:
                            for handler in self.handlers.get(activity["type"], ()):
                                await handler(activity)
                        except Exception as error:
                            if transaction.writes != before or is_transient(error):
                                raise _Broken(index) from error  # rolls back
                            outcomes.append(self._failed(job, activity, error))
                            continue
                        outcomes.append(Outcome.done())
                    committing = True
            except _Broken as broken:
                return broken.index
            await work.committed()
            for job, outcome in zip(jobs, outcomes, strict=True):
                report(job, outcome)
            return None

        run = asyncio.ensure_future(attempt())
        try:
            return await asyncio.shield(run)
        except asyncio.CancelledError:
            if not committing:
                run.cancel()
            await asyncio.wait([run])
            raise

    # ---- handlers -----------------------------------------------------------------

    async def handle_follow(self, activity: JsonObject) -> None:
        if id_of(activity.get("object")) != self._urls.actor:
            return  # following someone else: not ours to answer
        actor_id = activity["actor"]
        follow_id = str(activity.get("id") or "")
        known = await self._store.get_follower(actor_id)
        again = known is not None and known.status == "accepted" and known.follow_id == follow_id
        if follow_id and again:
            # This Follow, acted on again (a batch cut off, a crash before recording):
            # it is answered already; a second Accept would be queued for nothing.
            return
        actor = await self._actors.get_actor(actor_id)
        local_id = await self._actors.save(actor)
        manual = self._settings.manually_approves_followers
        await self._store.save_follower(
            actor_id=local_id,
            follow_id=follow_id,
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
                # The embedded id may differ from the Follow's (Misskey renders its Undo
                # with another id), so it ends the follow, unless it is the Follow the
                # author removed, undone late, after a new Follow (followers.remove).
                follower = await self._store.get_follower(actor)
                old = inner.get("id")
                stale = (
                    isinstance(old, str)
                    and follower is not None
                    and old != follower.follow_id
                    and await self._store.is_removed_follow(old, actor)
                )
                if not stale:
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


class _Broken(Exception):
    """An activity in a shared transaction failed after it wrote: roll back."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


def _stored_activity(job: InboxJob) -> JsonObject | None:
    try:
        activity: Any = json.loads(job.payload)
    except ValueError:
        return None  # checked on receipt: only a damaged database holds such a row
    if not isinstance(activity, dict):
        return None
    activity["actor"] = id_of(activity.get("actor"))  # verified on receipt
    return activity


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
        if isinstance(value, str) and not is_unicode(value):
            raise ActivityError("the activity's type, id or actor is not valid Unicode")
    activity["actor"] = actor
    return activity

