"""Signing keys stay current when another process handles the actor's news (issue 12).

``fediblog serve --web-only`` answers the inbox; ``fediblog worker`` processes what it
stored, including key rotations (Update) and self-Deletes, and tells only its own
memory. Here two real apps share one database: a web-only one that receives real
signed POSTs, and one whose inbox processor stands in for the worker. The web app's
key memory runs on a clock the test drives, so "later than the key's max age" needs no
sleeping.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from fediblog.actors import KEY_MAX_AGE, ActorDirectory
from fediblog.config import Settings
from fediblog.web.deps import Services
from tests.conftest import BASE_URL
from tests.fediverse import Fediverse, RemoteActor, remote_key, signed_headers
from tests.helpers import publish, running

pytestmark = pytest.mark.anyio

AS = "https://www.w3.org/ns/activitystreams"


class Split:
    """A web-only app (``web``, ``web_ctx``) and a worker (``worker_ctx``) on one database."""

    def __init__(self, web: httpx.AsyncClient, web_ctx: Services, worker_ctx: Services) -> None:
        self.web, self.web_ctx, self.worker_ctx = web, web_ctx, worker_ctx
        self.now = 1_000.0
        self.actors: ActorDirectory = web_ctx.inbox._actors
        self.actors.clock = lambda: self.now
        self.reads = 0  # key reads from the database by the web app
        store = web_ctx.store
        read = store.get_actor_key_state

        async def counted(key_id: str) -> Any:
            self.reads += 1
            return await read(key_id)

        store.get_actor_key_state = counted  # type: ignore[method-assign]

    async def post(self, activity: dict[str, Any], signer: RemoteActor, key: Any) -> httpx.Response:
        body = json.dumps(activity).encode()
        headers = signed_headers(signer.key_id, key, BASE_URL + "/inbox", body)
        return await self.web.post("/inbox", content=body, headers=headers)

    async def queued(self) -> int:
        return sum((await self.web_ctx.store.count_inbox()).values())


@asynccontextmanager
async def split(settings: Settings, fediverse: Fediverse) -> AsyncIterator[Split]:
    transport = fediverse.transport()
    async with (
        running(settings, transport=transport, web_only=True) as web_app,
        running(settings, transport=transport, run_workers=False) as worker_app,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=web_app), base_url=BASE_URL) as web,
    ):
        yield Split(web, web_app.state.services, worker_app.state.services)


def _update(actor: RemoteActor) -> dict[str, Any]:
    return {
        "@context": AS,
        "id": f"{actor.id}#updates/1",
        "type": "Update",
        "actor": actor.id,
        "object": actor.document(),
    }


def _self_delete(actor: RemoteActor) -> dict[str, Any]:
    return {"@context": AS, "id": f"{actor.id}#delete", "type": "Delete", "actor": actor.id,
            "object": actor.id}  # fmt: skip


async def _rotated(s: Split, fediverse: Fediverse) -> tuple[RemoteActor, Any, str]:
    """Ann, known to the web app, rotates her key; the worker processes the Update.
    Returns ann (signing with the new key), her old key, and the post's id."""
    target = s.web_ctx.blog.object_id((await publish(s.web_ctx, "Split")).uid)
    ann = fediverse.add("social.example", "ann", key_index=0)
    assert (await s.post(ann.create(ann.note(1, target, "hello")), ann, ann.key)).status_code == 202
    old = ann.key
    ann.key = remote_key(2)
    assert (await s.post(_update(ann), ann, old)).status_code == 202
    assert await s.worker_ctx.inbox.process_once() == 2
    return ann, old, target


async def test_a_rotated_key_works_at_once_and_the_old_one_ends_within_the_max_age(
    settings: Settings, fediverse: Fediverse
) -> None:
    async with split(settings, fediverse) as s:
        ann, old, target = await _rotated(s, fediverse)
        fetches, reads = fediverse.asked(ann.id), s.reads

        # The web app still holds the old key, fresh: the new one fails with it, and
        # the database (where the worker put the new one) is read, nothing fetched.
        new = await s.post(ann.create(ann.note(2, target, "new key")), ann, ann.key)
        assert new.status_code == 202
        assert fediverse.asked(ann.id) == fetches
        assert s.reads == reads + 1
        again = await s.post(ann.create(ann.note(3, target, "again")), ann, ann.key)
        assert again.status_code == 202
        assert s.reads == reads + 1  # from memory now

        stale = await s.post(ann.create(ann.note(4, target, "old key")), ann, old)
        assert stale.status_code == 401


async def test_the_old_key_is_refused_once_its_max_age_passes(
    settings: Settings, fediverse: Fediverse
) -> None:
    async with split(settings, fediverse) as s:
        ann, old, target = await _rotated(s, fediverse)
        reads = s.reads
        queued = await s.queued()

        # Within the max age the key in memory is trusted without a database read:
        # the hot path. (The worker's news has not reached the web app yet.)
        s.now += KEY_MAX_AGE - 1
        early = await s.post(ann.create(ann.note(2, target, "early")), ann, old)
        assert early.status_code == 202
        assert s.reads == reads

        s.now += 1  # the max age has passed: the key is read from the database again
        late = await s.post(ann.create(ann.note(3, target, "late")), ann, old)
        assert late.status_code == 401
        assert s.reads > reads
        new = await s.post(ann.create(ann.note(4, target, "new key")), ann, ann.key)
        assert new.status_code == 202
        assert await s.queued() == queued + 2  # the early one and the new key's


async def test_after_a_self_delete_in_the_worker_the_key_is_refused_unfetched(
    settings: Settings, fediverse: Fediverse
) -> None:
    async with split(settings, fediverse) as s:
        target = s.web_ctx.blog.object_id((await publish(s.web_ctx, "Split")).uid)
        bob = fediverse.add("other.example", "bob", key_index=1)
        hello = await s.post(bob.create(bob.note(1, target, "hello")), bob, bob.key)
        assert hello.status_code == 202
        assert (await s.post(_self_delete(bob), bob, bob.key)).status_code == 202
        assert await s.worker_ctx.inbox.process_once() == 2
        assert s.worker_ctx.inbox._actors.cached_key(bob.key_id) is None  # forgot at once
        fediverse.actors.pop(bob.id)  # his server now answers 404
        fetches, queued = fediverse.asked(bob.id), await s.queued()

        s.now += KEY_MAX_AGE
        after = await s.post(bob.create(bob.note(2, target, "after")), bob, bob.key)

        assert after.status_code == 401
        assert after.text == "401: the signer's account was deleted\n"
        assert fediverse.asked(bob.id) == fetches  # refused from the database, unfetched
        assert await s.queued() == queued
        again = await s.post(_self_delete(bob), bob, bob.key)  # the Delete, retried
        assert again.status_code == 202
        assert await s.queued() == queued  # dropped: nothing to delete any more
