"""Remote actors and their keys: find, confirm, cache, refresh (INTEROP.md 10).

A keyId resolves to a key in three ways, cheapest first: the in-memory cache, the
actors table, and a signed fetch. A fetched keyId may be the actor itself
(Mastodon's ``…#main-key``) or a stand-alone key document (GoToSocial's
``…/main-key``), whose ``owner`` we then fetch and require to publish the very
same key id (ATTACKS.md 20). A key that fails to verify is refetched once, at most
every ``refresh_interval`` per actor, so a flood of bad signatures costs no flood
of fetches (ATTACKS.md 21).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from datetime import datetime, timedelta

from fediblog.activitystreams import (
    RemoteActor,
    host_of,
    parse_actor,
    parse_key_document,
    strip_fragment,
)
from fediblog.errors import ActivityError, FetchError, SignatureError
from fediblog.models import ActorKey, JsonObject, parse_ts, utcnow
from fediblog.remote import Fetcher
from fediblog.store import Store

REFRESH_INTERVAL = timedelta(minutes=5)
FAILURE_COOLDOWN = 60.0  # seconds a key (or, after a few, a host) that failed is not fetched
HOST_FAILURE_LIMIT = 5
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
    ) -> None:
        self._store = store
        self._fetcher = fetcher
        self._allow_http = allow_http
        self._keys: OrderedDict[str, ActorKey] = OrderedDict()
        self._cache_size = cache_size
        self._refresh_interval = refresh_interval
        self._failed_keys: OrderedDict[str, float] = OrderedDict()
        self._failed_hosts: dict[str, list[float]] = {}

    async def get_key(self, key_id: str) -> ActorKey:
        """The key for ``key_id``, fetched if we have never seen it.

        Raises SignatureError (the request cannot be verified) when the key cannot be
        found or confirmed.
        """
        cached = self._keys.get(key_id)
        if cached is not None:
            self._keys.move_to_end(key_id)
            return cached
        stored = await self._store.get_actor_key(key_id)
        if stored is None:
            stored = await self._fetch_new_key(key_id)
        self._remember(stored)
        return stored

    async def _fetch_new_key(self, key_id: str) -> ActorKey:
        """Fetch a key never seen, unless it (or its host) failed just now.

        Without this, a flood of requests naming unfetchable keys (a dead host, made-up
        key ids) would cost one fetch each (ATTACKS.md 21).
        """
        now = time.monotonic()
        host = host_of(key_id)
        if now - self._failed_keys.get(key_id, -FAILURE_COOLDOWN) < FAILURE_COOLDOWN:
            raise SignatureError(f"the signing key {key_id} could not be fetched recently")
        recent = [t for t in self._failed_hosts.get(host, []) if now - t < FAILURE_COOLDOWN]
        if len(recent) >= HOST_FAILURE_LIMIT:
            raise SignatureError(f"keys on {host} could not be fetched recently")
        try:
            return await self._fetch_key(key_id)
        except SignatureError:
            self._failed_keys[key_id] = now
            self._failed_hosts[host] = [*recent, now]
            while len(self._failed_keys) > self._cache_size:
                self._failed_keys.popitem(last=False)
            if len(self._failed_hosts) > self._cache_size:
                self._failed_hosts.clear()
            raise

    def cached_key(self, key_id: str) -> ActorKey | None:
        return self._keys.get(key_id)

    async def refresh_key(self, key: ActorKey) -> ActorKey | None:
        """Refetch a key that failed (it may have rotated); None if refreshed too recently."""
        now = utcnow()
        if key.refreshed_at is not None and now - key.refreshed_at < self._refresh_interval:
            return None
        await self._store.mark_key_refreshed(key.actor, now)
        self._keys.pop(key.key_id, None)
        try:
            fresh = await self._fetch_key(key.key_id)
        except SignatureError:
            # Marked as refreshed even so: a dead actor costs one fetch per interval.
            self._remember(ActorKey(key.actor, key.key_id, key.public_key_pem, refreshed_at=now))
            raise
        fresh = ActorKey(fresh.actor, fresh.key_id, fresh.public_key_pem, refreshed_at=now)
        self._remember(fresh)
        return fresh

    def forget(self, actor: str) -> None:
        for key_id in [k for k, v in self._keys.items() if v.actor == actor]:
            del self._keys[key_id]

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
        row = await self._store.get_actor_row(ap_id)
        if row is None or not row["inbox"]:
            return None
        actor = RemoteActor(
            ap_id=row["ap_id"],
            type=row["type"],
            username=row["username"],
            domain=row["domain"],
            name=row["name"],
            url=row["url"],
            icon_url=row["icon_url"],
            inbox=row["inbox"],
            shared_inbox=row["shared_inbox"],
            key_id=row["key_id"] or "",
            public_key_pem=row["public_key_pem"] or "",
        )
        return actor, parse_ts(row["fetched_at"])

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

    async def _fetch_key(self, key_id: str) -> ActorKey:
        try:
            # A GoToSocial keyId answers a stub with its owner's id: any id on the host.
            document = await self._fetcher.fetch_document(strip_fragment(key_id), exact_id=False)
            actor = await self._actor_for_key(key_id, document)
        except (FetchError, ActivityError) as error:
            raise SignatureError(f"cannot get the signing key {key_id}: {error}") from None
        await self.save(actor)
        # Just fetched: as fresh as a refresh could make it, so a bad signature right
        # after costs no second fetch of the same document.
        return ActorKey(actor.ap_id, actor.key_id, actor.public_key_pem, refreshed_at=utcnow())

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
        self._keys[key.key_id] = key
        self._keys.move_to_end(key.key_id)
        while len(self._keys) > self._cache_size:
            self._keys.popitem(last=False)
