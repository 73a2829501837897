"""The inbox's hot path, made cheaper (issue 12), checks the same things: headers read
once (``HeaderFields``), keys answered from memory without an await, base64 decoded
strictly, JSON parsed by one decoder built once, and the group commit fed from a list.

The real app and real signatures (pyhttpsig, tests/fediverse.py) where a request is
involved; the signature and JSON helpers directly where the point is their contract.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from fediblog import httpsig
from fediblog.errors import BadDocument, SignatureError
from fediblog.httpsig import HeaderFields, parse_signature, sign_request, verify_signature
from fediblog.inbox import BatchWriter, Overloaded
from fediblog.models import utcnow
from fediblog.remote import parse_json
from fediblog.store import Store
from fediblog.web.deps import Services
from tests.conftest import BASE_URL, database_for, deliver
from tests.fediverse import Fediverse, public_pem, remote_key, signed_headers
from tests.helpers import inbox_items, publish

pytestmark = pytest.mark.anyio

INBOX = BASE_URL + "/inbox"
HOST = httpx.URL(BASE_URL).netloc.decode()


async def _post(
    web: httpx.AsyncClient, activity: dict[str, Any], key_id: str, key: Any
) -> httpx.Response:
    body = json.dumps(activity).encode()
    return await web.post("/inbox", content=body, headers=signed_headers(key_id, key, INBOX, body))


# ---- keys: the in-memory answer never outlives a rotation, never crosses actors ------------


async def test_an_update_with_a_new_key_is_used_at_once_and_the_old_key_no_more(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    target = ctx.blog.object_id((await publish(ctx, "Rotating")).uid)
    ann = fediverse.add("social.example", "ann", key_index=0)
    first = await deliver(web, ctx, ann, ann.create(ann.note(1, target, "before")))
    assert first.status_code == 202
    assert ctx.inbox._actors.cached_key(ann.key_id) is not None  # in memory from here on
    old = ann.key
    ann.key = remote_key(2)  # her server rotates her key and tells us, signed by the old one
    update = {
        "@context": "https://www.w3.org/ns/activitystreams",
        "id": f"{ann.id}#updates/1",
        "type": "Update",
        "actor": ann.id,
        "object": ann.document(),
    }
    assert (await _post(web, update, ann.key_id, old)).status_code == 202
    await ctx.inbox.process_once()
    fetches = fediverse.asked(ann.id)

    fresh = await _post(web, ann.create(ann.note(2, target, "after")), ann.key_id, ann.key)
    assert fresh.status_code == 202  # the Update's key, with no fetch
    assert fediverse.asked(ann.id) == fetches
    cached = ctx.inbox._actors.cached_key(ann.key_id)
    assert cached is not None
    assert cached.public_key_pem == public_pem(ann.key)
    stale = await _post(web, ann.create(ann.note(3, target, "old key")), ann.key_id, old)
    assert stale.status_code == 401


async def test_a_cached_key_signs_only_for_its_own_actor(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    target = ctx.blog.object_id((await publish(ctx, "Two voices")).uid)
    ann = fediverse.add("social.example", "ann", key_index=0)
    bob = fediverse.add("other.example", "bob", key_index=1)
    for number, actor in enumerate((ann, bob)):
        response = await deliver(web, ctx, actor, actor.create(actor.note(number, target, "hi")))
        assert response.status_code == 202
    assert ctx.inbox._actors.cached_key(ann.key_id) is not None
    assert ctx.inbox._actors.cached_key(bob.key_id) is not None
    before = await ctx.store.count_inbox()

    # Bob's own (cached) key and keyId, on an activity that says it is ann's.
    as_ann = await _post(web, ann.create(ann.note(7, target, "not me")), bob.key_id, bob.key)
    # Bob's key under ann's (cached) keyId.
    under_her_key = await _post(web, ann.create(ann.note(8, target, "nor me")), ann.key_id, bob.key)

    assert as_ann.status_code == 401
    assert as_ann.text == "401: the signer is not the activity's actor\n"
    assert under_her_key.status_code == 401
    assert await ctx.store.count_inbox() == before


async def test_a_key_refetched_but_unconfirmed_is_not_undone_by_the_stored_one(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    target = ctx.blog.object_id((await publish(ctx, "Quiet rotation")).uid)
    ann = fediverse.add("social.example", "ann", key_index=0)
    assert (await deliver(web, ctx, ann, ann.create(ann.note(1, target, "a")))).status_code == 202
    ctx.inbox._actors._refresh_interval = timedelta(0)  # as if fetched long ago
    old = ann.key
    ann.key = remote_key(2)  # rotated on her server, no Update sent (yet)
    # A bad signature under her keyId has us refetch her key: the new one, unconfirmed.
    forged = await _post(web, ann.create(ann.note(2, target, "b")), ann.key_id, remote_key(1))
    assert forged.status_code == 401
    assert (await ctx.store.get_actor_key_state(ann.key_id)) is not None  # the old one, stored

    stale = await _post(web, ann.create(ann.note(3, target, "c")), ann.key_id, old)

    assert stale.status_code == 401  # the database's (older) key is not read back
    fresh = await _post(web, ann.create(ann.note(4, target, "d")), ann.key_id, ann.key)
    assert fresh.status_code == 202


# ---- headers read once ------------------------------------------------------------------


def test_header_fields_from_raw_headers_read_as_any_mapping_is() -> None:
    raw = [
        (b"Host", b"blog.example"),
        (b"x-thing", b" one \t"),
        (b"X-Thing", b"two"),
        (b"date", b"Tue, 01 Dec 2026 10:00:00 GMT"),
    ]

    fields = HeaderFields.from_raw(raw)

    assert fields == {
        "host": "blog.example",
        "x-thing": "one, two",  # several lines: joined, as both specs say
        "date": "Tue, 01 Dec 2026 10:00:00 GMT",
    }
    mapping = {name.decode(): value.decode() for name, value in raw[:2] + raw[3:]}
    mapping["X-THING"] = "two"
    assert httpsig._header_fields(mapping) == fields


def _signed(body: bytes) -> tuple[dict[str, str], Any]:
    key = remote_key(0)
    headers = sign_request(
        "POST",
        INBOX,
        body=body,
        key_id="https://social.example/users/ann#main-key",
        private_key=key,
        now=utcnow(),
        headers={"Content-Type": "application/activity+json", "X-Extra": "a"},
    )
    return headers, key


def _check(headers: Any, body: bytes) -> httpsig.SignedRequest:
    return parse_signature("POST", "/inbox", headers, body, expected_host=HOST, now=utcnow())


def test_header_fields_and_a_plain_mapping_give_the_same_signed_request() -> None:
    body = b'{"type": "Like"}'
    headers, key = _signed(body)
    raw = [(name.encode(), value.encode()) for name, value in headers.items()]

    from_raw = _check(HeaderFields.from_raw(raw), body)
    from_mapping = _check({name.upper(): value for name, value in headers.items()}, body)

    assert from_raw == from_mapping
    verify_signature(from_raw, public_pem(key))
    # A signed header sent again on a second line is a different signed value.
    twice = HeaderFields.from_raw([*raw, (b"date", headers["Date"].encode())])
    with pytest.raises(SignatureError):
        verify_signature(_check(twice, body), public_pem(key))


@pytest.mark.parametrize(
    "tamper",
    [
        lambda value: value + "QQ==",  # data after the padding
        lambda value: value[:10] + " " + value[10:],  # a space inside
        lambda value: value[:-2] + "=",  # padding cut short
        lambda value: value[:10] + "é" + value[10:],  # not ASCII
    ],
)
def test_a_signature_that_is_not_strict_base64_is_refused(tamper: Any) -> None:
    body = b'{"type": "Like"}'
    headers, _ = _signed(body)
    value = headers["Signature"].split('signature="')[1].rstrip('"')
    headers["Signature"] = headers["Signature"].replace(value, tamper(value))

    with pytest.raises(SignatureError, match="signature is not valid base64"):
        _check(headers, body)


def test_header_fields_are_built_only_from_raw_headers() -> None:
    with pytest.raises(TypeError):
        HeaderFields({"Host": " blog.example "})  # type: ignore[call-arg]
    assert HeaderFields.from_raw([(b"Host", b" blog.example ")]) == {"host": "blog.example"}


async def test_a_date_header_too_long_is_refused_before_it_is_parsed_or_cached(
    web: httpx.AsyncClient,
) -> None:
    body = b'{"type": "Like"}'
    headers, _ = _signed(body)
    date = headers["Date"]
    headers["Date"] = f"{date}, {date}, {date}"  # say, Date on three lines, joined
    cached = httpsig._http_date.cache_info().currsize

    response = await web.post("/inbox", content=body, headers=headers)

    assert response.status_code == 401
    assert response.text == "401: Date header is too long (over 64 characters)\n"
    assert httpsig._http_date.cache_info().currsize == cached
    headers["Date"] = date  # one Date, as sent: read
    assert _check(headers, body).created is not None


# ---- one JSON decoder ---------------------------------------------------------------------


def test_parse_json_reads_text_as_it_reads_bytes() -> None:
    document = {"type": "Note", "content": "é ü \u2603", "tag": [[]]}
    text = json.dumps(document, ensure_ascii=False)

    assert parse_json(text) == parse_json(text.encode()) == document
    assert parse_json(bytearray(text.encode())) == document  # as json.loads reads it
    assert parse_json(text.encode("utf-16")) == document  # as json.loads reads bytes
    assert parse_json("\ufeff{}".encode()) == {}  # bytes may start with a BOM, as there
    for bad in ("[NaN]", '{"a": Infinity}', "[1,"):
        with pytest.raises(BadDocument):
            parse_json(bad)
        with pytest.raises(BadDocument):
            parse_json(bad.encode())
    with pytest.raises(BadDocument):
        parse_json("\ufeff{}")  # text may not
    with pytest.raises(BadDocument):
        parse_json(b'{"a": "\xff"}')  # not UTF-8


# ---- the group commit, fed from a list -------------------------------------------------------


async def test_the_writer_commits_more_than_a_batch_in_batches(tmp_path: Path) -> None:
    store = await Store.open(database_for(tmp_path, "inbox.db"))
    writer = BatchWriter(store, max_batch=3)
    running = asyncio.create_task(writer.run())
    try:
        first = await asyncio.gather(*(writer.submit(i) for i in inbox_items(10)))
        later = await asyncio.gather(*(writer.submit(i) for i in inbox_items(4, "later")))

        assert first == [None] * 10
        assert later == [None] * 4
        assert await store.count_inbox() == {"queued": 14}
    finally:
        running.cancel()
        await store.close()


async def test_the_writer_refuses_past_its_waiting_room(tmp_path: Path) -> None:
    store = await Store.open(database_for(tmp_path, "inbox.db"))
    writer = BatchWriter(store, max_waiting=2)
    waiting = [asyncio.create_task(writer.submit(i)) for i in inbox_items(2)]
    await asyncio.sleep(0)  # both wait: the writer is not running yet
    try:
        with pytest.raises(Overloaded):
            await writer.submit(inbox_items(1, "third")[0])
        running = asyncio.create_task(writer.run())
        assert await asyncio.gather(*waiting) == [None, None]  # those waiting are stored
        running.cancel()
        assert await store.count_inbox() == {"queued": 2}
    finally:
        await store.close()


async def test_a_writer_stopped_answers_every_request_waiting_on_it(tmp_path: Path) -> None:
    store = await Store.open(database_for(tmp_path, "inbox.db"))
    committing, never = asyncio.Event(), asyncio.Event()

    async def stuck(take: Any, committed: Any) -> None:  # a commit shutdown cuts short
        take()  # as the writer's thread does once it holds the lock
        committing.set()
        await never.wait()

    store.save_inbox_waiting = stuck  # type: ignore[method-assign]
    writer = BatchWriter(store, max_batch=2)
    waiting = [asyncio.create_task(writer.submit(i)) for i in inbox_items(5)]
    running = asyncio.create_task(writer.run())
    try:
        await committing.wait()  # two in the batch being committed, three waiting
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        done, pending = await asyncio.wait(waiting, timeout=10)  # a guard: never reached

        assert not pending
        assert [type(task.exception()) for task in done] == [Overloaded] * 5
        with pytest.raises(Overloaded, match="shutting down"):
            await writer.submit(inbox_items(1, "late")[0])
    finally:
        await store.close()
