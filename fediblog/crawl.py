"""Complete threads: read each fediverse comment's replies from its own server.

Mastodon delivers a reply to the people it mentions and to the replier's followers, so
when reader B answers commenter A under one of our posts, B's reply rarely reaches the
blog's inbox. The crawler reads it where it is listed: the ``replies`` collection of
A's comment (Mastodon, GoToSocial and others publish one; Misskey does not) and, where
offered, the conversation's ``context`` collection (FEP-7888, Mastodon 4.5).

What it crawls are rows (``crawls``, one per public fediverse comment) on the common
worker (``worker.py``): a comment is crawled when it is saved (delivered or crawled),
then again ``SCHEDULE`` after it arrived while its post is younger than ``RECENT``.
A round fetches the comment from its origin (a 404/410 there turns a crawled comment
into a placeholder, a newer ``updated`` edits it: the rules of a delivered Delete or
Update), reads its collections, and saves every listed reply not yet here whose
``inReplyTo`` chain reaches one of our posts or a comment we have, through
``responses`` (same checks, sanitizing, moderation and actor fetching as a delivered
reply). Each saved reply gets a row of its own, so the thread is read level by level.

Bounds (ATTACKS.md 7, 22, 28, 29), in ``CrawlLimits``:

* every object is fetched from its own origin through the guarded Fetcher; an object
  embedded in a collection is used only if it is on the collection's host;
* a collection's pages must be on its host and may not loop, it may list at most
  ``max_items`` items, and none of its URLs may be a private address. A collection
  that breaks one of these is hostile: nothing listed in it is stored, the crawl fails
  with the reason, and its host backs off (``host_cooldown``, doubling) while the rest
  of the blog is crawled as usual. Past ``max_pages`` pages a collection is not read
  further (a long thread is not an attack; an endless one costs that much);
* replies are read down to ``max_depth`` levels, an ``inReplyTo`` chain is followed at
  most ``max_depth`` steps up, and an object or collection seen twice in one crawl
  ends that branch;
* at most ``max_per_post`` comments found by crawling per post;
* at most ``per_host_per_minute`` requests per host, and ``max_fetches`` per crawl:
  past that the crawl is put back until the budget refills (not failed, its attempt
  not counted). The collections it read are kept for ``REREAD``, so it goes on from
  where it stopped without asking for a page twice.

Hosts that misbehave, the request budgets and the collections read recently live in
memory: a restart forgets them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol
from urllib.parse import urlsplit

from fediblog.activitystreams import as_list, host_of, id_of, is_public
from fediblog.config import Settings
from fediblog.errors import (
    ActivityError,
    BlockedAddress,
    FediblogError,
    FetchError,
    FetchStatus,
    StorageConflict,
)
from fediblog.models import CrawlJob, JsonObject, format_ts, utcnow
from fediblog.netguard import address_allowed
from fediblog.remote import Fetcher
from fediblog.store import Store
from fediblog.worker import Outcome, RetryPolicy, Worker, describe, every, is_transient

log = logging.getLogger("fediblog.crawl")

# Rounds, counted from the comment's arrival: at once, then while the thread is alive.
SCHEDULE = tuple(
    timedelta(minutes=m) for m in (0, 10, 60, 6 * 60, 24 * 60, 3 * 24 * 60, 7 * 24 * 60)
)
RECENT = timedelta(days=30)  # comments on older posts are crawled once, when they arrive
# A round that fails for a reason that may pass (a server down) is tried again.
RETRY = RetryPolicy(tuple(timedelta(minutes=m) for m in (1, 5, 30, 120, 360)))
MINUTE = timedelta(minutes=1)
REREAD = timedelta(minutes=10)  # a collection read is not read again sooner
NOTE_TYPES = ("Note", "Article", "Page", "Question")  # as responses.NOTE_TYPES
Ref = str | JsonObject  # a collection's item: an id, or an object embedded by its host


@dataclass(frozen=True, slots=True)
class CrawlLimits:
    max_depth: int = 10
    max_per_post: int = 500
    max_pages: int = 8  # per collection: a longer one is read that far
    max_items: int = 1000  # per collection
    per_host_per_minute: int = 30
    max_fetches: int = 100  # per crawl: past that it goes on later, where it stopped
    host_cooldown: timedelta = timedelta(hours=1)  # doubles per offence, up to a day


class ReplySink(Protocol):
    """What the crawler needs from ``responses.Responses``."""

    async def save_fetched_reply(self, document: JsonObject) -> int | None: ...

    async def refresh_fetched_reply(self, document: JsonObject) -> None: ...

    async def delete_gone_reply(self, object_id: str) -> None: ...

    async def find_post_id(self, ref: str) -> int | None: ...


class Hostile(FediblogError):
    """A collection that loops, explodes, lies about its origin or points at a private
    address: nothing listed in it is used, and its host backs off."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(reason)
        self.host = host


class _Later(FediblogError):
    """Stop this crawl and take it up again at ``until`` (budget, cooling host)."""

    def __init__(self, until: datetime, reason: str) -> None:
        super().__init__(reason)
        self.until = until


@dataclass(slots=True)
class _Round:
    """One crawl of one comment: what it has seen, so nothing is fetched twice."""

    job: CrawlJob
    seen: set[str] = field(default_factory=set)
    done: set[str] = field(default_factory=set)  # listed items handled to the end
    fetches: int = 0
    full: bool = False  # the post has its share of crawled comments


class HostBudget:
    """At most ``limit`` requests per host in each minute (a fixed window)."""

    def __init__(self, size: int = 10_000) -> None:
        self._windows: OrderedDict[str, tuple[datetime, int]] = OrderedDict()
        self._size = size

    def take(self, host: str, now: datetime, limit: int) -> datetime | None:
        """Count one request; None if allowed, else when the host's budget refills."""
        start, used = self._windows.get(host, (now, 0))
        if now - start >= MINUTE or now < start:
            start, used = now, 0
        if used >= limit:
            return start + MINUTE
        self._windows[host] = (start, used + 1)
        self._windows.move_to_end(host)
        while len(self._windows) > self._size:
            self._windows.popitem(last=False)
        return None


class CrawlQueue:
    """The crawls table, as a worker's queue; crawls scheduled in this process since the
    last claim are queued in the claim's own commit."""

    def __init__(self, crawler: Crawler) -> None:
        self._crawler = crawler

    async def claim(self, now: datetime, lease_until: datetime, limit: int) -> list[CrawlJob]:
        new = self._crawler.take_scheduled()
        try:
            return await self._crawler.store.claim_crawls(now, lease_until, limit, new=new)
        except BaseException:
            self._crawler.put_back(new)
            raise

    async def record(self, results: Sequence[tuple[CrawlJob, Outcome]]) -> None:
        now = self._crawler.worker.clock()
        await self._crawler.store.record_crawls(
            [
                (job, outcome, self._crawler.next_round(job, outcome, now))
                for job, outcome in results
            ]
        )


class Crawler:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        fetcher: Fetcher,
        replies: ReplySink,
        *,
        is_blocked: Callable[[str], bool] = lambda _: False,
        limits: CrawlLimits | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.limits = limits or CrawlLimits()
        self._settings = settings
        self._fetcher = fetcher
        self._replies = replies
        self._is_blocked = is_blocked
        self._scheduled: list[tuple[int, str]] = []
        self._budget = HostBudget()
        self._cooling: dict[str, tuple[datetime, int]] = {}  # host -> (until, offences)
        # Collections read recently: when, by which comment's crawl, what they listed.
        self._walks: OrderedDict[str, tuple[datetime, str, list[Ref]]] = OrderedDict()
        self._saving = asyncio.Lock()  # one save at a time: two crawls may list one reply
        self._tried: dict[int, set[str]] = {}  # crawl id -> ids a put-back round tried
        self.worker = Worker(
            "crawl",
            CrawlQueue(self),
            self._crawl,
            concurrency=2,
            batch=20,
            # Outcomes written 20 at a time, not one commit each: during a reply storm
            # every reply is a crawl, and one commit per crawl took most of the write
            # lock's time (a crash forgets at most 20, crawled again after the lease).
            record_every=20,
            # Longer than a crawl may take (max_fetches GETs, each with its deadline).
            lease=timedelta(minutes=30),
            clock=clock,
        )

    # ---- scheduling -------------------------------------------------------------------

    async def schedule(self, comment_id: int, crawled: bool) -> None:
        """A reply was saved: crawl it. Delivered ones are queued with the next claim
        (no commit on the inbox's path); crawled ones at once, so the per-post count
        of crawled comments is exact."""
        if crawled:
            await self.store.save_crawls([(comment_id, "crawl")], self.worker.clock())
        else:
            self._scheduled.append((comment_id, "delivery"))
        self.worker.wake()

    def take_scheduled(self) -> list[tuple[int, str]]:
        taken, self._scheduled = self._scheduled, []
        return taken

    def put_back(self, requests: list[tuple[int, str]]) -> None:
        self._scheduled[:0] = requests

    async def queue_scheduled(self) -> int:
        """Queue the crawls scheduled here since the last claim, in one commit; return
        how many. For a process whose replies another process crawls (runtime.py): no
        claim of this crawler's would ever take them."""
        requests = self.take_scheduled()
        if requests:
            try:
                await self.store.save_crawls(requests, self.worker.clock())
            except BaseException:
                self.put_back(requests)
                raise
        return len(requests)

    async def sweep(self) -> int:
        """Queue a crawl of recent comments that have none (lost in a crash)."""
        now = self.worker.clock()
        return await self.store.save_missing_crawls(now - RECENT, now)

    def next_round(self, job: CrawlJob, outcome: Outcome, now: datetime) -> datetime | None:
        """When to crawl again after this outcome ended a round; None: never again."""
        if outcome.status != "done" or outcome.error is not None:
            return None  # not a round's end, or finished for good (the note says why)
        if now - job.post_published > RECENT:
            return None
        for offset in SCHEDULE[job.rounds + 1 :]:
            if job.arrived + offset > now:
                return job.arrived + offset
        return None

    # ---- running ------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Crawl everything due now, the replies found on the way included; return how
        many crawls ran (tests call this; nothing sleeps)."""
        total = 0
        for _ in range(1000):  # each pass is a level of the threads; the cap is a backstop
            claimed = await self.worker.run_once()
            total += claimed
            if not claimed and not self._scheduled:
                break
        return total

    async def run(self) -> None:
        """Crawl forever; queue what a crash left unqueued, at start and hourly."""

        async def sweep() -> None:
            if await self.sweep():
                self.worker.wake()

        async with asyncio.TaskGroup() as group:
            group.create_task(every(3600, sweep, "queueing missed crawls"))
            group.create_task(self.worker.run_forever())

    # ---- one crawl ---------------------------------------------------------------------

    async def _crawl(self, job: CrawlJob) -> Outcome:
        now = self.worker.clock()
        if job.post_deleted:
            return _finished("the post was deleted")
        comment = await self.store.get_comment_by_ap_id(job.ap_id)
        if comment is None or comment.status in ("deleted", "rejected"):
            return _finished("the comment is no longer shown")
        if self._is_blocked(job.ap_id) or self._is_blocked(comment.actor or job.ap_id):
            return _finished("its server or author is blocked")
        # A round put back for its budget resumes past what it already tried: items that
        # failed or led nowhere are not asked again, so every round ends.
        run = _Round(job, done=self._tried.pop(job.id, set()))
        try:
            self._check_cooling(job.host, now)
            return await self._crawl_comment(run)
        except _Later as later:
            self._tried[job.id] = run.done
            while len(self._tried) > 1_000:
                self._tried.pop(next(iter(self._tried)))
            return Outcome("release", f"waiting: {later}", later.until)

    async def _crawl_comment(self, run: _Round) -> Outcome:
        job = run.job
        try:
            document = await self._get(run, job.ap_id, exact=True)
        except FetchStatus as error:
            if error.status not in (404, 410):
                return self._failed(job, error)
            return await self._gone(job, f"HTTP {error.status}")
        except FetchError as error:
            return self._failed(job, error)
        if document.get("type") == "Tombstone":
            return await self._gone(job, "a Tombstone")
        if document.get("type") not in NOTE_TYPES:
            return _finished("its origin no longer answers with a note")
        try:
            await self._replies.refresh_fetched_reply(document)
        except ActivityError as error:
            log.info("not refreshing %s: %s", job.ap_id, error)
        if job.depth >= self.limits.max_depth:
            return Outcome.done()  # deep enough: its replies are not read
        run.seen.add(job.ap_id)
        refs: list[Ref] = []
        hostile: list[str] = []
        unwell: FetchError | None = None
        for source, kind in (
            (document.get("replies"), "replies"),
            (document.get("context"), "context"),
        ):
            try:
                refs += await self._walk(run, source, kind)
            except Hostile as error:
                hostile.append(f"{kind}: {error}")
                self._cool(error.host, str(error))
            except FetchError as error:
                log.info("cannot read the %s of %s: %s", kind, job.ap_id, error)
                if is_transient(error):
                    unwell = error  # 404 and bad documents: nothing to read, and no retry
        for ref in refs:
            if run.full:
                break
            await self._take(run, ref)
        if hostile:
            return Outcome.failed("; ".join(hostile))
        if unwell is not None:
            return RETRY.after_error(job, describe(unwell), self.worker.clock(), transient=True)
        return Outcome.done()

    async def _gone(self, job: CrawlJob, how: str) -> Outcome:
        if job.found_by == "crawl":
            # Its author's server no longer has it: as if it had sent a Delete. A
            # delivered comment waits for the Delete itself (a 404 may be a refusal).
            await self._replies.delete_gone_reply(job.ap_id)
        return _finished(f"gone at its origin ({how})")

    def _failed(self, job: CrawlJob, error: FetchError) -> Outcome:
        transient = is_transient(error)
        return RETRY.after_error(job, describe(error), self.worker.clock(), transient=transient)

    # ---- collections ---------------------------------------------------------------------

    async def _walk(self, run: _Round, source: Any, kind: str) -> list[Ref]:
        """The items a ``replies`` or ``context`` collection lists, every page read and
        checked before any is used (Hostile if one is wrong, ATTACKS.md 29)."""
        home = run.job.host
        collection: JsonObject | None = None
        if isinstance(source, dict):
            # Embedded in the comment: it came from the comment's host, and must say so.
            owner, collection = home, source
            key = source.get("id") if isinstance(source.get("id"), str) else None
            if key is not None and host_of(key) != home:
                raise Hostile(home, f"an embedded collection claims {host_of(key)}")
        elif isinstance(source, str) and host_of(source):
            owner, key = host_of(source), source
            if owner == self._settings.host:
                return []
            if kind == "replies" and owner != home:
                raise Hostile(home, f"the replies collection is on another host ({owner})")
            self._check_address(owner, source)
            if self._cooling_until(owner, self.worker.clock()) is not None:
                return []  # a context elsewhere, on a host that misbehaved
        else:
            return []  # none, or not a URL (Pleroma's tag: contexts)
        if key is not None:
            if key in run.seen:
                return []
            run.seen.add(key)
            walked = self._walked_recently(key, run.job.ap_id)
            if walked is not None:
                return walked
        if collection is None:
            collection = await self._get(run, str(source), exact=False)
        items = self._items(collection, owner)
        pages: set[str] = set()  # the URLs asked and the ids answered, to see a loop
        fetched = 0
        link: Any = collection.get("first")
        while link is not None:
            if isinstance(link, dict):
                page = link  # embedded, so from the same document: checked as such
            elif isinstance(link, str):
                if host_of(link) != owner:
                    raise Hostile(owner, f"a page is on another host ({host_of(link) or link})")
                self._check_address(owner, link)
                if link in pages:
                    raise Hostile(owner, "its pages loop")
                if fetched >= self.limits.max_pages:
                    log.info("reading %s stopped after %d pages", key, fetched)
                    break  # a long thread, or an endless one: what was read is used
                pages.add(link)
                fetched += 1
                page = await self._get(run, link, exact=False)  # GoToSocial renames pages
            else:
                break
            page_id = page.get("id")
            if isinstance(page_id, str):
                if host_of(page_id) != owner:
                    raise Hostile(owner, f"a page claims another host ({host_of(page_id)})")
                pages.add(page_id)
            items += self._items(page, owner)
            if len(items) > self.limits.max_items:
                raise Hostile(owner, f"more than {self.limits.max_items} items")
            link = page.get("next")
        if key is not None:
            self._remember_walk(key, run.job.ap_id, items)
        return items

    def _items(self, page: JsonObject, owner: str) -> list[Ref]:
        found: list[Ref] = []
        for item in as_list(page.get("orderedItems", page.get("items"))):
            if isinstance(item, str):
                if self._allowed_scheme(item):
                    self._check_address(owner, item)
                    found.append(item)
            elif isinstance(item, dict) and isinstance(item.get("id"), str):
                if host_of(item["id"]) != owner:
                    # Mastodon embeds only its own statuses; a copy of another host's
                    # object is a lie about where it came from (ATTACKS.md 7).
                    raise Hostile(owner, f"it embeds an object of {host_of(item['id'])}")
                found.append(item)
        return found

    def _walked_recently(self, key: str, reader: str) -> list[Ref] | None:
        """A collection read less than ``REREAD`` ago: its items again for the crawl
        that read it (put back for its budget: no page is asked twice), nothing for
        another one (comments of one conversation share its context); else None."""
        found = self._walks.get(key)
        if found is None or self.worker.clock() - found[0] >= REREAD:
            return None
        return found[2] if found[1] == reader else []

    def _remember_walk(self, key: str, reader: str, items: list[Ref]) -> None:
        self._walks[key] = (self.worker.clock(), reader, items)
        self._walks.move_to_end(key)
        while len(self._walks) > 32:  # each may hold up to 8 pages of items
            self._walks.popitem(last=False)

    # ---- the replies listed --------------------------------------------------------------

    async def _take(self, run: _Round, ref: Ref) -> None:
        """Save a listed reply, and the ancestors it needs, if its chain reaches us."""
        item_id = ref if isinstance(ref, str) else str(ref["id"])
        if item_id in run.seen or item_id in run.done or host_of(item_id) == self._settings.host:
            return
        run.seen.add(item_id)
        await self._take_new(run, ref, item_id)
        run.done.add(item_id)  # not reached when the budget puts the round back

    async def _take_new(self, run: _Round, ref: Ref, item_id: str) -> None:
        if await self._known(item_id) or await self.store.is_tombstoned(item_id):
            return
        if isinstance(ref, dict) and ref.get("type") in NOTE_TYPES:
            document: JsonObject | None = ref  # embedded by its own host: as good as fetched
        else:
            document = await self._fetch_item(run, item_id)  # an id, or a stub of one
        if document is None:
            return
        chain = await self._chain(run, document)
        for note in chain or ():
            if not await self._save(run, note):
                return

    async def _chain(self, run: _Round, document: JsonObject) -> list[JsonObject] | None:
        """``document`` and the ancestors we lack, oldest first, if its ``inReplyTo``
        chain reaches one of our posts or a comment we have; else None (ATTACKS.md 28)."""
        chain = [document]
        for _ in range(self.limits.max_depth):
            current = chain[-1]
            if not self._acceptable(current):
                return None
            parent = id_of(current.get("inReplyTo"))
            if parent is None or self._is_blocked(parent):
                return None
            known = await self.store.get_comment_by_ap_id(parent)
            reached = known.post_id if known else await self._replies.find_post_id(parent)
            if reached is not None:
                # Only into this crawl's post: its cap of crawled comments must hold.
                return chain[::-1] if reached == run.job.post_id else None
            if host_of(parent) == self._settings.host or parent in run.seen:
                return None  # not ours after all, or a cycle
            run.seen.add(parent)
            fetched = await self._fetch_item(run, parent)
            if fetched is None:
                return None
            chain.append(fetched)
        return None

    def _acceptable(self, document: JsonObject) -> bool:
        """A note others may see (public or unlisted), not from anyone blocked."""
        if document.get("type") not in NOTE_TYPES or not is_public(document):
            return False
        authors = [id_of(a) for a in as_list(document.get("attributedTo"))]
        return bool(authors) and not any(a is None or self._is_blocked(a) for a in authors)

    async def _known(self, object_id: str) -> bool:
        return await self.store.get_comment_by_ap_id(object_id) is not None

    async def _save(self, run: _Round, document: JsonObject) -> bool:
        if await self._known(str(document.get("id"))):
            return True  # an ancestor another branch saved
        if await self.store.count_crawled(run.job.post_id) >= self.limits.max_per_post:
            run.full = True
            return False
        try:
            async with self._saving:
                saved = await self._replies.save_fetched_reply(document)
        except ActivityError as error:
            log.info("not saving %s: %s", document.get("id"), error)
            return False
        except StorageConflict:
            return True  # delivered to the inbox while we fetched it: it is here
        return saved is not None

    async def _fetch_item(self, run: _Round, object_id: str) -> JsonObject | None:
        """An object from its origin, or None if it cannot be had now (a later round
        may). A host that answers with a private address backs off."""
        if not self._allowed_scheme(object_id) or self._is_blocked(object_id):
            return None
        host = host_of(object_id)
        if self._cooling_until(host, self.worker.clock()) is not None:
            return None  # that host misbehaved: its replies wait, the others do not
        try:
            return await self._get(run, object_id, exact=True)
        except BlockedAddress as error:
            self._cool(host, str(error))
        except FetchError as error:
            log.info("cannot fetch %s: %s", object_id, error)
        return None

    # ---- requests, budgets and hosts that misbehave --------------------------------------

    async def _get(self, run: _Round, url: str, *, exact: bool) -> JsonObject:
        now = self.worker.clock()
        host = host_of(url)
        if run.fetches >= self.limits.max_fetches:
            raise _Later(now, f"more than {self.limits.max_fetches} requests; going on later")
        refill = self._budget.take(host, now, self.limits.per_host_per_minute)
        if refill is not None:
            raise _Later(
                refill, f"the request budget for {host} is used up until {format_ts(refill)}"
            )
        run.fetches += 1
        return await self._fetcher.fetch_document(url, exact_id=exact)

    def _cooling_until(self, host: str, now: datetime) -> datetime | None:
        until, _ = self._cooling.get(host, (now, 0))
        return until if until > now else None

    def _check_cooling(self, host: str, now: datetime) -> None:
        until = self._cooling_until(host, now)
        if until is not None:
            raise _Later(until, f"{host} misbehaved; crawls of it wait until {format_ts(until)}")

    def _cool(self, host: str, reason: str) -> None:
        now = self.worker.clock()
        _, offences = self._cooling.get(host, (now, 0))
        wait = min(self.limits.host_cooldown * 2**offences, timedelta(days=1))
        self._cooling[host] = (now + wait, offences + 1)
        if len(self._cooling) > 10_000:  # forget hosts whose back-off is over
            self._cooling = {h: v for h, v in self._cooling.items() if v[0] > now}
        log.warning("crawling %s backs off for %s: %s", host, wait, reason)

    def _allowed_scheme(self, url: str) -> bool:
        scheme = urlsplit(url).scheme
        return scheme == "https" or (scheme == "http" and self._settings.allow_http)

    def _check_address(self, owner: str, url: str) -> None:
        """A literal private address in a collection is hostile (ATTACKS.md 22); names
        that resolve to one are refused by the guarded transport when fetched."""
        hostname = urlsplit(url).hostname or ""
        try:
            ip = ipaddress.ip_address(hostname)
        except ValueError:
            return
        if not address_allowed(ip, allow_loopback=self._settings.allow_private_addresses):
            raise Hostile(owner, f"it points at a private address ({ip})")


def _finished(note: str) -> Outcome:
    """Done for good: no more rounds, and the note says why (see ``next_round``)."""
    return Outcome("done", note[:500])
