"""Remote actors and their keys: find, confirm, cache, refresh (INTEROP.md 10).

A keyId resolves to a key in three ways, cheapest first: the in-memory caches, the
actors table, and a signed fetch. A fetched keyId may be the actor itself
(Mastodon's ``…#main-key``) or a stand-alone key document (GoToSocial's
``…/main-key``), whose ``owner`` we then fetch and require to publish the very
same key id (ATTACKS.md 20). A key that fails to verify is refetched once, at most
every ``refresh_interval`` per actor, so a flood of bad signatures costs no flood
of fetches (ATTACKS.md 21).

Another process may change what a key in memory stands for: with ``fediblog serve
--web-only`` the worker process handles Updates (a rotated key) and self-Deletes, and
only its own memory is told (``forget``). So a key in memory is trusted for
``key_max_age`` seconds after it was read, then read from the database again (the
worker wrote the news there; no fetch); a key that fails to verify is read from the
database before any refetch; and the key of an actor marked deleted is refused, never
fetched. The old key of a rotation is thus refused, and a self-Delete heeded, at most
``key_max_age`` after the worker stored it; the new key works at once.

A fetched key is unconfirmed until a signature made with it verifies (``confirm``):
until then it is kept in a small in-memory cache only, so requests that are unsigned
or badly signed store nothing, and a flood of them naming a real keyId costs one fetch.

Whoever sends a POST chooses which keyId we fetch, so key fetches are bounded: at most
``max_fetches`` at once and ``max_fetches_per_host`` per host. Past that, ``FetchBusy``
(the inbox answers 503, the sender retries later) rather than a queue that a tarpit
would fill. Requests naming a keyId already being fetched share that fetch, which runs
as a task of its own: a request that gives up never cancels it. A keyId that failed is
not fetched again for a while; nor, after a few failures, are keys on a host that is
unwell (timeouts, refused connections, 5xx). 404s and bad documents never count
against a host: anyone can make those up, and so lock the host's real users out.

What went wrong with a fetch is logged; the SignatureError says only "could not be
fetched" or "not a valid key document", never what we saw on our network. A host whose
TLS certificate we do not trust is a warning (once an hour per host): the operator can
fix it (a CA missing from the trust store or SSL_CERT_FILE), and nothing else says so.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta

from fediblog.activitystreams import (
    RemoteActor,
    host_of,
    parse_actor,
    parse_key_document,
    strip_fragment,
)
from fediblog.errors import (
    ActivityError,
    BadDocument,
    FetchBusy,
    FetchError,
    FetchStatus,
    FetchTimeout,
    FetchTooLarge,
    FetchUnreachable,
    SignatureError,
)
from fediblog.models import ActorKey, JsonObject, utcnow
from fediblog.netguard import untrusted_certificate
from fediblog.remote import Fetcher
from fediblog.store import Store

log = logging.getLogger("fediblog.actors")

REFRESH_INTERVAL = timedelta(minutes=5)
# Seconds a key held in memory is trusted before it is read from the database again:
# how long another process's news of a rotation or a self-Delete may take to reach us.
KEY_MAX_AGE = 15.0
FAILURE_COOLDOWN = 60.0  # seconds a key (or, after a few, a host) that failed is not fetched
HOST_FAILURE_LIMIT = 5
MAX_KEY_FETCHES = 16  # key fetches under way at once, in all ...
MAX_KEY_FETCHES_PER_HOST = 2  # ... and per host
UNCONFIRMED_KEYS = 1_000  # fetched keys no signature has verified with yet
TLS_WARNING_INTERVAL = 3600.0  # seconds between two warnings of an untrusted certificate
NOT_FETCHED = "the signing key could not be fetched"
NOT_A_KEY = "the signing key is not a valid key document"
DELETED = "the signer's account was deleted"
ACTOR_MAX_AGE = timedelta(
    days=1
)  # cached profiles (name, avatar, inboxes) older than this are refetched


class ActorDirectory:
    def __init__(
        self,
        store: Store,
        fetcher: Fetcher,
        *,
        allow_http: bool,
        cache_size: int = 10_000,
        refresh_interval: timedelta = REFRESH_INTERVAL,
        max_fetches: int = MAX_KEY_FETCHES,
        max_fetches_per_host: int = MAX_KEY_FETCHES_PER_HOST,
        unconfirmed_size: int = UNCONFIRMED_KEYS,
        key_max_age: float = KEY_MAX_AGE,
    ) -> None:
        self._store = store
        self._fetcher = fetcher
        self._allow_http = allow_http
        # Confirmed keys, each with when (``clock``) it was read from the database or
        # confirmed: trusted for ``key_max_age`` seconds from then.
        self._keys: OrderedDict[str, tuple[ActorKey, float]] = OrderedDict()
        self._key_max_age = key_max_age
        self.clock: Callable[[], float] = time.monotonic  # tests drive it
        self._cache_size = cache_size
        self._refresh_interval = refresh_interval
        self._failed_keys: OrderedDict[str, float] = OrderedDict()
        self._failed_hosts: dict[str, list[float]] = {}
        # Fetched, not yet confirmed: the key and the actor to store once it is.
        self._unconfirmed: OrderedDict[str, tuple[ActorKey, RemoteActor]] = OrderedDict()
        self._unconfirmed_size = unconfirmed_size
        self._fetching: dict[str, asyncio.Task[ActorKey]] = {}
        self._fetching_per_host: Counter[str] = Counter()
        self._max_fetches = max_fetches
        self._max_fetches_per_host = max_fetches_per_host
        self._tls_warned: OrderedDict[str, float] = OrderedDict()  # host: when

    async def get_key(self, key_id: str) -> ActorKey:
        """The key for ``key_id``, fetched if we have never seen it.

        Raises SignatureError (the request cannot be verified) when the key cannot be
        found or confirmed, FetchBusy (retry later) when too many keys are being fetched.
        """
        cached = self.cached_key(key_id)
        if cached is not None:
            return cached
        pending = self._unconfirmed.get(key_id)
        if pending is not None:
            return pending[0]
        stored, deleted = await self._read_stored(key_id)
        if deleted:
            raise SignatureError(DELETED)  # nothing fetched: its server answers 410
        if stored is not None:
            return stored
        return await self._fetch_new_key(key_id)

    async def stored_key(self, key_id: str) -> ActorKey | None:
        """The key held in memory or in the database, never fetched; None if there is
        none or its actor deleted itself."""
        cached = self.cached_key(key_id)
        if cached is not None:
            return cached
        stored, _ = await self._read_stored(key_id)
        return stored

    async def reread_key(self, key: ActorKey) -> ActorKey | None:
        """``key`` failed to verify: the key the database holds now, if it differs (a
        worker process handled the actor's Update), else None.

        Raises SignatureError if the actor deleted itself. One indexed read, as an
        unknown keyId costs: no fetch, so a flood of bad signatures fetches nothing.
        A key fetched and not yet confirmed is newer than the database's: not reread,
        or a rotation's old key would verify again until the new one is confirmed.
        """
        if key.key_id in self._unconfirmed:
            return None
        stored, deleted = await self._read_stored(key.key_id)
        if deleted:
            raise SignatureError(DELETED)
        if stored is None or stored.public_key_pem == key.public_key_pem:
            return None
        return stored

    async def _read_stored(self, key_id: str) -> tuple[ActorKey | None, bool]:
        """The stored key (kept in memory from now) and whether its actor deleted
        itself. A key the database no longer holds leaves memory too."""
        state = await self._store.get_actor_key_state(key_id)
        if state is None or state[1]:
            self._keys.pop(key_id, None)
            return None, state is not None
        key = state[0]
        held = self._keys.get(key_id)
        if held is not None and held[0].public_key_pem == key.public_key_pem:
            # A fetch's freshness lives in memory only: keep it, or the next bad
            # signature would fetch the key just fetched again.
            key = replace(key, refreshed_at=_latest(key.refreshed_at, held[0].refreshed_at))
        self._remember(key)
        return key, False

    async def confirm(self, key: ActorKey) -> None:
        """A signature made with ``key`` verified: store it (and its actor) if it was
        fetched unconfirmed. Cheap for a key that is already stored."""
        pending = self._unconfirmed.get(key.key_id)
        if pending is None or pending[0].public_key_pem != key.public_key_pem:
            return
        del self._unconfirmed[key.key_id]
        self._remember(pending[0])  # first: no request in between fetches it again
        await self.save(pending[1])

    async def _fetch_new_key(self, key_id: str) -> ActorKey:
        """Fetch a key never seen, unless it (or its host) failed just now.

        Without this, a flood of requests naming unfetchable keys (a dead host, made-up
        key ids) would cost one fetch each (ATTACKS.md 21).
        """
        if key_id not in self._fetching:
            now = time.monotonic()
            if now - self._failed_keys.get(key_id, -FAILURE_COOLDOWN) < FAILURE_COOLDOWN:
                raise SignatureError(f"{NOT_FETCHED} recently")
            if len(self._recent_host_failures(host_of(key_id), now)) >= HOST_FAILURE_LIMIT:
                raise SignatureError(f"{NOT_FETCHED} recently")
        return await self._fetch_shared(key_id, new=True)

    def cached_key(self, key_id: str) -> ActorKey | None:
        """A confirmed key held in memory and read or confirmed less than ``key_max_age``
        ago, or None: no await, the busiest case by far.

        Past that age the caller reads the database again (``get_key``): another
        process (``fediblog worker``) may have stored a rotated key or a self-Delete.
        """
        entry = self._keys.get(key_id)
        if entry is None or self.clock() - entry[1] >= self._key_max_age:
            return None
        self._keys.move_to_end(key_id)
        return entry[0]

    async def refresh_key(self, key: ActorKey) -> ActorKey | None:
        """Refetch a key that failed (it may have rotated); None if refreshed too recently.

        The fresh key is unconfirmed, like a new one, until a signature verifies with it.
        """
        now = utcnow()
        if key.refreshed_at is not None and now - key.refreshed_at < self._refresh_interval:
            return None
        try:
            fresh = await self._fetch_shared(key.key_id, new=False)
        except SignatureError:
            # Marked as refreshed even so: a dead actor costs one fetch per interval.
            await self._store.mark_key_refreshed(key.actor, now)
            self._remember(ActorKey(key.actor, key.key_id, key.public_key_pem, refreshed_at=now))
            raise
        await self._store.mark_key_refreshed(key.actor, now)
        self._keys.pop(key.key_id, None)  # the fresh, unconfirmed key answers from now on
        return fresh

    def forget(self, actor: str) -> None:
        """This process handled the actor's Update or Delete: its keys leave memory at
        once (another process's copy ages out within ``key_max_age``)."""
        for key_id in [k for k, (v, _) in self._keys.items() if v.actor == actor]:
            del self._keys[key_id]
        for key_id in [k for k, (v, _) in self._unconfirmed.items() if v.actor == actor]:
            del self._unconfirmed[key_id]

    async def aclose(self) -> None:
        """Cancel the key fetches under way: at shutdown only."""
        for task in list(self._fetching.values()):
            task.cancel()
        await asyncio.gather(*self._fetching.values(), return_exceptions=True)

    # ---- fetching keys: shared, bounded, failures remembered ---------------------------

    async def _fetch_shared(self, key_id: str, *, new: bool) -> ActorKey:
        """The key fetched (or being fetched) for ``key_id``, as an unconfirmed key.

        Raises FetchBusy past the caps, SignatureError when the key cannot be had.
        """
        task = self._fetching.get(key_id)
        if task is None:
            host = host_of(key_id)
            if (
                len(self._fetching) >= self._max_fetches
                or self._fetching_per_host[host] >= self._max_fetches_per_host
            ):
                raise FetchBusy("too many signing keys are being fetched, retry later")
            task = asyncio.create_task(self._fetch_unconfirmed(key_id, new=new))
            self._fetching[key_id] = task
            self._fetching_per_host[host] += 1
            task.add_done_callback(functools.partial(self._fetch_done, key_id, host))
        try:
            # Shielded: a request that gives up leaves the fetch to the others waiting.
            return await asyncio.shield(task)
        except FetchBusy:
            raise
        except (ActivityError, BadDocument, FetchTooLarge):
            raise SignatureError(NOT_A_KEY) from None
        except FetchError:
            raise SignatureError(NOT_FETCHED) from None

    def _fetch_done(self, key_id: str, host: str, task: asyncio.Task[ActorKey]) -> None:
        del self._fetching[key_id]
        self._fetching_per_host[host] -= 1
        if self._fetching_per_host[host] <= 0:
            del self._fetching_per_host[host]
        if not task.cancelled():
            task.exception()  # retrieved: every request waiting on it may have given up

    async def _fetch_unconfirmed(self, key_id: str, *, new: bool) -> ActorKey:
        try:
            # A GoToSocial keyId answers a stub with its owner's id: any id on the host.
            document = await self._fetcher.fetch_document(strip_fragment(key_id), exact_id=False)
            actor = await self._actor_for_key(key_id, document)
        except FetchBusy:
            raise  # nothing was asked of the host
        except (FetchError, ActivityError) as error:
            # Here, not in the 401: what our network said is for our own log only.
            log.info("cannot use the signing key %s: %s", key_id, error)
            self._warn_if_untrusted(key_id, error)
            self._remember_failure(key_id, error, new=new)
            raise
        # Just fetched: as fresh as a refresh could make it, so a bad signature right
        # after costs no second fetch of the same document.
        key = ActorKey(actor.ap_id, actor.key_id, actor.public_key_pem, refreshed_at=utcnow())
        self._unconfirmed[key_id] = (key, actor)
        self._unconfirmed.move_to_end(key_id)
        while len(self._unconfirmed) > self._unconfirmed_size:
            self._unconfirmed.popitem(last=False)
        return key

    def _remember_failure(
        self, key_id: str, error: FetchError | ActivityError, *, new: bool
    ) -> None:
        now = time.monotonic()
        if new:
            self._failed_keys[key_id] = now
            self._failed_keys.move_to_end(key_id)
            while len(self._failed_keys) > self._cache_size:
                self._failed_keys.popitem(last=False)
        if _host_unwell(error):
            host = host_of(key_id)
            self._failed_hosts[host] = [*self._recent_host_failures(host, now), now]
            if len(self._failed_hosts) > self._cache_size:
                self._failed_hosts.clear()

    def _warn_if_untrusted(self, key_id: str, error: FetchError | ActivityError) -> None:
        """A warning the operator sees (INFO may not reach the journal), at most once an
        hour per host and for the 1,000 hosts seen last: strangers choose the hosts."""
        if untrusted_certificate(error) is None:
            return
        host, now = host_of(key_id), time.monotonic()
        if now - self._tls_warned.get(host, -TLS_WARNING_INTERVAL) < TLS_WARNING_INTERVAL:
            return
        self._tls_warned[host] = now
        self._tls_warned.move_to_end(host)
        while len(self._tls_warned) > 1_000:
            self._tls_warned.popitem(last=False)
        log.warning("requests signed by %s are refused: %s", host, error)

    def _recent_host_failures(self, host: str, now: float) -> list[float]:
        return [t for t in self._failed_hosts.get(host, []) if now - t < FAILURE_COOLDOWN]

    async def get_actor(self, ap_id: str) -> RemoteActor:
        """An actor, from the cache while it is fresh, else fetched (signed) and cached.

        A failed refetch of a stale actor falls back to the cached copy: a server that
        is down for a day should not make its users' replies disappear.
        """
        cached = await self._cached_actor(ap_id)
        if cached is not None and utcnow() - cached[1] < ACTOR_MAX_AGE:
            return cached[0]
        try:
            return await self.fetch_actor(ap_id)
        except ActivityError:
            if cached is None:
                raise
            return cached[0]

    async def _cached_actor(self, ap_id: str) -> tuple[RemoteActor, datetime] | None:
        row = await self._store.get_cached_actor(ap_id)
        if row is None or not row.inbox:
            return None
        actor = RemoteActor(
            ap_id=row.ap_id,
            type=row.type,
            username=row.username,
            domain=row.domain,
            name=row.name,
            url=row.url,
            icon_url=row.icon_url,
            inbox=row.inbox,
            shared_inbox=row.shared_inbox,
            key_id=row.key_id or "",
            public_key_pem=row.public_key_pem or "",
        )
        return actor, row.fetched

    async def fetch_actor(self, ap_id: str) -> RemoteActor:
        """Fetch (signed) and cache an actor document."""
        try:
            document = await self._fetcher.fetch_document(ap_id)
            actor = parse_actor(document, allow_http=self._allow_http)
        except (FetchError, ActivityError) as error:
            raise ActivityError(f"cannot fetch the actor {ap_id}: {error}") from None
        if actor.ap_id != ap_id:
            raise ActivityError(f"the actor at {ap_id} claims to be {actor.ap_id}")
        await self.save(actor)
        return actor

    async def save(self, actor: RemoteActor) -> int:
        return await self._store.save_actor(
            ap_id=actor.ap_id,
            username=actor.username,
            domain=actor.domain,
            name=actor.name,
            url=actor.url,
            icon_url=actor.icon_url,
            inbox=actor.inbox,
            shared_inbox=actor.shared_inbox,
            key_id=actor.key_id,
            public_key_pem=actor.public_key_pem,
            fetched=utcnow(),
            actor_type=actor.type,
        )

    async def _actor_for_key(self, key_id: str, document: JsonObject) -> RemoteActor:
        if document.get("id") == strip_fragment(key_id) and "inbox" in document:
            actor_document = document  # the key is a fragment of the actor (Mastodon)
        else:
            # A key document or GoToSocial's stub: only its owner is read from it.
            owner, _ = parse_key_document(document)
            if host_of(owner) != host_of(key_id):
                raise ActivityError("the key's owner is on another host")
            actor_document = await self._fetcher.fetch_document(owner)
        actor = parse_actor(actor_document, allow_http=self._allow_http)
        if actor.key_id != key_id:
            raise ActivityError("the key's owner does not publish this key id")
        return actor

    def _remember(self, key: ActorKey) -> None:
        self._keys[key.key_id] = (key, self.clock())
        self._keys.move_to_end(key.key_id)
        while len(self._keys) > self._cache_size:
            self._keys.popitem(last=False)


def _latest(one: datetime | None, other: datetime | None) -> datetime | None:
    if one is None or other is None:
        return one or other
    return max(one, other)


def _host_unwell(error: FetchError | ActivityError) -> bool:
    """A failure that says the host is unwell, whatever the URL: no answer, or a 5xx.

    Never a 404, a 410 or a bad document: a stranger gets those at will with made-up
    keyIds, and must not be able to make us shun the host's real users.
    """
    if isinstance(error, FetchStatus):
        return error.status >= 500
    return isinstance(error, FetchTimeout | FetchUnreachable)
