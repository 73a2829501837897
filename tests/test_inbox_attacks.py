"""The inbox under attack: the identity and signature cases of security/ATTACKS.md
(1, 13-21, 25-27, 30) and the inbox rules of INTEROP.md, through the real app.

Every request is a POST to the real app (``/inbox`` or ``/users/blog/inbox``, through
httpx's ASGITransport, the lifespan running, the workers off) signed by pyhttpsig, an
independent draft-cavage implementation; where a case needs a header pyhttpsig cannot
make, the test edits pyhttpsig's header by hand and says so. The remote servers are
``tests.fediverse.Fediverse`` serving actor and key documents copied from Mastodon,
Misskey and GoToSocial (tests/fixtures/) with throwaway keys put in; it records every
request the blog makes.

Each rejection is checked three ways: the status and its one-line reason; no row added
or changed (``Harness.assert_nothing_stored``); the follower and the activity stored
before the attack still there.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import http_message_signatures as hms
import pytest
from http_message_signatures import algorithms as hms_algorithms
from httpsig import HeaderVerifier

from fediblog.models import utcnow
from tests.conftest import BASE_URL
from tests.inbox_kit import (
    AP,
    AS_CONTEXT,
    HOST,
    LD_JSON,
    PERSONAL_INBOX,
    SHARED_INBOX,
    Account,
    Harness,
    actor_row,
    assert_answer,
    body_of,
    fixture_bytes,
    follow,
    gotosocial,
    gotosocial_key_stub,
    mastodon,
    misskey,
    public_pem,
    pyhttpsig_headers,
    rsa_key,
    running,
    signed_by,
)

pytestmark = pytest.mark.anyio

NOT_VERIFIED = "signature does not verify with the signer's key"
# What was wrong is logged; the 401 says no more (tests/test_outbound_isolation.py).
NOT_A_KEY = "the signing key is not a valid key document"
TOO_LARGE = "the body is larger than 1000000 bytes"


@pytest.fixture
async def inbox(tmp_path: Path) -> AsyncIterator[Harness]:
    """Production rules: https only."""
    async with running(tmp_path) as harness:
        yield harness


@pytest.fixture
async def gts_inbox(tmp_path: Path) -> AsyncIterator[Harness]:
    """For GoToSocial's fixtures, which come from its http://localhost:8080 test rig."""
    async with running(tmp_path, allow_http=True) as harness:
        yield harness


@pytest.fixture
def alice(inbox: Harness) -> Account:
    """A Mastodon user, whose actor document her server serves."""
    account = mastodon()
    inbox.serve_actor(account)
    return account


@pytest.fixture
def mallory(inbox: Harness) -> Account:
    """A Misskey user with a valid key of her own, who attacks alice."""
    account = misskey()
    inbox.serve_actor(account)
    return account


async def send(
    harness: Harness, account: Account, activity: dict[str, Any], path: str = SHARED_INBOX
) -> int:
    body = body_of(activity)
    response = await harness.post(body, signed_by(account, body, path=path), path)
    return response.status_code


def nth_follow(account: Account, number: int) -> dict[str, Any]:
    return follow(account.id, activity_id=f"{account.id}#follows/{number}")


# ---- what must work: the baseline every attack is measured against ----------------------


@pytest.mark.parametrize("path", [SHARED_INBOX, PERSONAL_INBOX])
async def test_signed_follow_is_stored_then_followed_and_accepted(
    inbox: Harness, alice: Account, path: str
) -> None:
    activity = follow(alice.id)
    body = body_of(activity)

    response = await inbox.post(body, signed_by(alice, body, path=path), path)

    assert response.status_code == 202, response.text
    assert response.content == b""
    assert await inbox.services.store.count_inbox() == {"queued": 2}
    assert inbox.fetched() == [alice.id]  # the keyId: for Mastodon, the actor itself
    [get] = inbox.sent
    assert f'keyId="{BASE_URL}/actor#main-key"' in get.headers["signature"]
    verifier = HeaderVerifier(  # pyhttpsig checks the instance actor's signature
        dict(get.headers),
        inbox.services.instance_public_pem,
        required_headers=["(request-target)", "host", "date"],
        method="GET",
        path=get.url.raw_path.decode(),
        sign_header="signature",
    )
    assert verifier.verify() is True
    assert await inbox.services.store.get_follower(alice.id) is None  # not yet processed

    assert await inbox.services.inbox.process_once() == 2

    follower = await inbox.services.store.get_follower(alice.id)
    assert follower is not None
    assert follower.status == "accepted"
    assert follower.follow_id == activity["id"]
    assert follower.inbox == alice.document["inbox"]
    assert follower.shared_inbox == alice.document["endpoints"]["sharedInbox"]
    [accept] = await inbox.services.store.list_deliveries(("queued",))
    assert accept.type == "Accept"
    assert accept.inbox == alice.document["inbox"]  # the follower's own inbox
    assert inbox.fetched() == [alice.id]  # the actor came from the cache
    assert await inbox.services.store.count_inbox() == {"done": 2}


async def test_gotosocial_ld_json_post_with_key_stub_accepted(gts_inbox: Harness) -> None:
    """GoToSocial: ld+json content type, hs2019, and a keyId ``…/main-key`` that
    answers a stub whose owner must then publish that key id (INTEROP 10, 25)."""
    zork = gotosocial()
    gts_inbox.serve_actor(zork)
    gts_inbox.serve(zork.key_id, gotosocial_key_stub(zork))
    body = body_of(follow(zork.id))
    headers = signed_by(zork, body, content_type=LD_JSON)
    # hs2019 is RSA-SHA256 for an RSA key; pyhttpsig only writes rsa-sha256, so relabel it.
    headers["signature"] = headers["signature"].replace('"rsa-sha256"', '"hs2019"')

    response = await gts_inbox.post(body, headers)

    assert response.status_code == 202, response.text
    assert gts_inbox.fetched() == [zork.key_id, zork.id]
    await gts_inbox.services.inbox.process_once()
    follower = await gts_inbox.services.store.get_follower(zork.id)
    assert follower is not None
    assert follower.shared_inbox == "http://localhost:8080/sharedInbox"


async def test_misskey_4096_bit_key_accepted(inbox: Harness, mallory: Account) -> None:
    assert await send(inbox, mallory, follow(mallory.id)) == 202
    assert await inbox.services.store.count_inbox() == {"queued": 2}


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", None])
async def test_not_activitypub_content_type_is_415(
    inbox: Harness, alice: Account, content_type: str | None
) -> None:
    body = body_of(follow(alice.id))
    headers = signed_by(alice, body)
    del headers["content-type"]
    if content_type is not None:
        headers["content-type"] = content_type

    response = await inbox.post(body, headers)

    assert_answer(response, 415, "send application/activity+json")
    assert inbox.fetched() == []
    await inbox.assert_nothing_stored()


async def test_malformed_json_is_400(inbox: Harness, alice: Account) -> None:
    body = body_of(follow(alice.id))[:-5]

    response = await inbox.post(body, signed_by(alice, body))

    assert_answer(response, 400, "the body is not acceptable JSON: body is not valid JSON")
    assert inbox.fetched() == []
    await inbox.assert_nothing_stored()


@pytest.mark.parametrize(
    "actor", [None, "", 42, ["https://a.example/u"], {"type": "Person"}, "mailto:a@b.example"]
)
async def test_missing_actor_is_400(inbox: Harness, alice: Account, actor: object) -> None:
    activity = follow(alice.id)
    if actor is None:
        del activity["actor"]
    else:
        activity["actor"] = actor
    body = body_of(activity)

    response = await inbox.post(body, signed_by(alice, body))

    assert_answer(response, 400, "the activity has no actor")
    assert inbox.fetched() == []
    await inbox.assert_nothing_stored()


async def test_inbox_of_another_handle_is_404(inbox: Harness, alice: Account) -> None:
    body = body_of(follow(alice.id))
    path = "/users/someone/inbox"

    response = await inbox.post(body, signed_by(alice, body, path=path), path)

    assert_answer(response, 404, "no such inbox")
    await inbox.assert_nothing_stored()


async def test_delete_of_unknown_actor_is_202_and_fetches_nothing(inbox: Harness) -> None:
    """INTEROP 15: the account is gone (its URL answers 410), so only a key we already
    hold could verify it; with none, drop it quietly and fetch nothing."""
    body = fixture_bytes("mastodon/delete_actor.json")
    actor = json.loads(body)["actor"]

    response = await inbox.post(body, pyhttpsig_headers(rsa_key("gone"), actor + "#main-key", body))

    assert response.status_code == 202
    assert inbox.fetched() == []
    await inbox.assert_nothing_stored()


# ---- 1: the signer is not the actor ------------------------------------------------------


async def test_attack_1_actor_is_not_key_owner(
    inbox: Harness, alice: Account, mallory: Account
) -> None:
    # Mallory's own, valid signature over a Follow that claims to come from alice.
    body = body_of(follow(alice.id))

    response = await inbox.post(body, signed_by(mallory, body))

    assert_answer(response, 401, "the signer is not the activity's actor")
    assert inbox.fetched() == [mallory.id]  # alice's server is never asked
    assert actor_row(inbox.database, alice.id) is None
    await inbox.assert_nothing_stored()


async def test_attack_1_embedded_actor_is_not_key_owner(
    inbox: Harness, alice: Account, mallory: Account
) -> None:
    body = body_of(follow(alice.id) | {"actor": {"id": alice.id, "type": "Person"}})

    response = await inbox.post(body, signed_by(mallory, body, path=PERSONAL_INBOX), PERSONAL_INBOX)

    assert_answer(response, 401, "the signer is not the activity's actor")
    await inbox.assert_nothing_stored()


# ---- 13: replays -------------------------------------------------------------------------


async def test_attack_13_replayed_post_processed_once(inbox: Harness, alice: Account) -> None:
    body = body_of(follow(alice.id))
    headers = signed_by(alice, body)

    first = await inbox.post(body, headers)
    replay = await inbox.post(body, headers)

    assert (first.status_code, replay.status_code) == (202, 202)
    assert await inbox.services.store.count_inbox() == {"queued": 2}
    assert await inbox.services.inbox.process_once() == 2
    # Replayed again after it was processed: still nothing new to do.
    assert (await inbox.post(body, headers)).status_code == 202
    assert await inbox.services.inbox.process_once() == 0
    assert await inbox.services.store.count_inbox() == {"done": 2}
    assert len(await inbox.services.store.list_deliveries(("queued",))) == 1  # one Accept
    assert await inbox.services.store.count_followers() == 2


async def test_attack_13_squatting_another_actors_activity_id(
    inbox: Harness, alice: Account, mallory: Account
) -> None:
    """Mallory sends first, under the id Alice's server will use: Alice's Follow still counts."""
    genuine = follow(alice.id)
    squatter = follow(mallory.id) | {"id": genuine["id"]}
    squatter_body, genuine_body = body_of(squatter), body_of(genuine)

    assert (await inbox.post(squatter_body, signed_by(mallory, squatter_body))).status_code == 202
    assert (await inbox.post(genuine_body, signed_by(alice, genuine_body))).status_code == 202
    await inbox.services.inbox.process_once()

    assert await inbox.services.store.get_follower(alice.id) is not None


async def test_attack_13_activity_without_id_deduplicated_by_body(gts_inbox: Harness) -> None:
    """GoToSocial's Delete has no id (INTEROP 14): the same body is the same activity."""
    body = fixture_bytes("gotosocial/delete_note_no_id.json")  # byte for byte
    admin = gotosocial("admin")
    gts_inbox.serve_actor(admin)
    gts_inbox.serve(admin.key_id, gotosocial_key_stub(admin))

    for _ in range(3):
        response = await gts_inbox.post(body, signed_by(admin, body))
        assert response.status_code == 202, response.text

    assert await gts_inbox.services.store.count_inbox() == {"queued": 2}
    # Another body (another status) from the same actor is another activity.
    other = body.replace(b"01FF25D5Q0DH7CHD57CTRS6WK0", b"01FF25D5Q0DH7CHD57CTRS6WK1")
    assert (await gts_inbox.post(other, signed_by(admin, other))).status_code == 202
    assert await gts_inbox.services.store.count_inbox() == {"queued": 3}


# ---- 14: the time window -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "reason"),
    [
        (timedelta(hours=-2), r"Date is 720\d s old \(the limit is 3900 s\)"),
        (timedelta(hours=2), r"Date is 7[12]\d\d s in the future \(limit 3600 s\)"),
    ],
    ids=["two_hours_old", "two_hours_ahead"],
)
async def test_attack_14_date_outside_window_401(
    inbox: Harness, alice: Account, offset: timedelta, reason: str
) -> None:
    body = body_of(follow(alice.id))

    response = await inbox.post(body, signed_by(alice, body, date_offset=offset))

    assert_answer(response, 401, re.compile(reason))
    assert inbox.fetched() == []  # refused before any key is looked up
    await inbox.assert_nothing_stored()


async def test_attack_14_thirty_minutes_old_accepted(inbox: Harness, alice: Account) -> None:
    body = body_of(follow(alice.id))

    response = await inbox.post(body, signed_by(alice, body, date_offset=timedelta(minutes=-30)))

    assert response.status_code == 202
    assert await inbox.services.store.count_inbox() == {"queued": 2}


# ---- 15: what must be signed -------------------------------------------------------------


@pytest.mark.parametrize(
    ("parts", "reason"),
    [
        (("(request-target)", "host", "date"), "digest must be signed on a request with a body"),
        (("(request-target)", "date", "digest"), "host must be signed"),
        (("(request-target)", "host", "digest"), "date must be signed"),
        (("host", "date", "digest"), "(request-target) must be signed"),
    ],
    ids=["no_digest", "no_host", "no_date", "no_request_target"],
)
async def test_attack_15_required_part_not_signed_401(
    inbox: Harness, alice: Account, parts: tuple[str, ...], reason: str
) -> None:
    body = body_of(follow(alice.id))

    response = await inbox.post(body, signed_by(alice, body, parts=parts))

    assert_answer(response, 401, reason)
    assert inbox.fetched() == []
    await inbox.assert_nothing_stored()


async def test_attack_15_no_date_header_at_all_401(inbox: Harness, alice: Account) -> None:
    body = body_of(follow(alice.id))
    headers = signed_by(alice, body)
    del headers["date"]  # signed, then dropped on the way

    response = await inbox.post(body, headers)

    assert_answer(response, 401, "Date header is missing or not an HTTP date")
    await inbox.assert_nothing_stored()


async def test_attack_15_unsigned_401(inbox: Harness, alice: Account) -> None:
    body = body_of(follow(alice.id))
    headers = signed_by(alice, body)
    del headers["signature"]

    response = await inbox.post(body, headers)

    assert_answer(response, 401, "request is not signed (no Signature header)")
    assert inbox.fetched() == []
    await inbox.assert_nothing_stored()


# ---- 16: the body and its digest ---------------------------------------------------------


async def test_attack_16_body_changed_after_signing_401(inbox: Harness, alice: Account) -> None:
    headers = signed_by(alice, body_of(follow(alice.id)))
    tampered = body_of(follow(alice.id) | {"object": "https://elsewhere.example/users/x"})

    response = await inbox.post(tampered, headers)

    assert_answer(response, 401, "Digest does not match the body")
    assert inbox.fetched() == []
    await inbox.assert_nothing_stored()


async def test_attack_16_sha512_digest_only_401(inbox: Harness, alice: Account) -> None:
    body = body_of(follow(alice.id))
    sha512 = "SHA-512=" + base64.b64encode(hashlib.sha512(body).digest()).decode()

    response = await inbox.post(body, signed_by(alice, body, digest=sha512))

    assert_answer(response, 401, "Digest has no SHA-256 value (the only algorithm accepted)")
    await inbox.assert_nothing_stored()


async def test_attack_16_malformed_base64_digest_401(inbox: Harness, alice: Account) -> None:
    body = body_of(follow(alice.id))

    response = await inbox.post(body, signed_by(alice, body, digest="SHA-256=not*base64!"))

    assert_answer(response, 401, "Digest is not valid base64")
    await inbox.assert_nothing_stored()


async def test_attack_16_malformed_base64_signature_401(inbox: Harness, alice: Account) -> None:
    # By hand: pyhttpsig always writes valid base64, so its header is edited.
    body = body_of(follow(alice.id))
    headers = signed_by(alice, body)
    headers["signature"] = headers["signature"].replace('signature="', 'signature="%*')

    response = await inbox.post(body, headers)

    assert_answer(response, 401, "signature is not valid base64")
    assert inbox.fetched() == []
    await inbox.assert_nothing_stored()


# ---- 17: the host ------------------------------------------------------------------------


async def test_attack_17_signed_for_another_server_401(inbox: Harness, alice: Account) -> None:
    # A request alice really sent to other.example, replayed here unchanged.
    body = body_of(follow(alice.id))

    response = await inbox.post(body, signed_by(alice, body, host="other.example"))

    assert_answer(response, 401, f"signed Host is not this server (expected {HOST})")
    assert inbox.fetched() == []
    await inbox.assert_nothing_stored()


async def test_attack_17_replayed_with_our_host_header_401(inbox: Harness, alice: Account) -> None:
    # The same replay with the Host header rewritten to ours: the signature breaks.
    body = body_of(follow(alice.id))
    headers = signed_by(alice, body, host="other.example")
    headers["host"] = HOST

    response = await inbox.post(body, headers)

    assert_answer(response, 401, NOT_VERIFIED)
    await inbox.assert_nothing_stored()


# ---- 18: the request target --------------------------------------------------------------


async def test_attack_18_signed_for_another_path_401(inbox: Harness, alice: Account) -> None:
    body = body_of(follow(alice.id))

    response = await inbox.post(body, signed_by(alice, body, path=PERSONAL_INBOX), SHARED_INBOX)

    assert_answer(response, 401, NOT_VERIFIED)
    await inbox.assert_nothing_stored()


async def test_attack_18_signed_for_another_method_401(inbox: Harness, alice: Account) -> None:
    body = body_of(follow(alice.id))

    response = await inbox.post(body, signed_by(alice, body, method="PUT"))

    assert_answer(response, 401, NOT_VERIFIED)
    await inbox.assert_nothing_stored()


# ---- 19: algorithms ----------------------------------------------------------------------


async def test_attack_19_hmac_sha256_401(inbox: Harness, alice: Account) -> None:
    body = body_of(follow(alice.id))
    headers = signed_by(alice, body, algorithm="hmac-sha256", secret=b"a shared secret")

    response = await inbox.post(body, headers)

    assert_answer(response, 401, "algorithm hmac-sha256 is not supported (use rsa-sha256)")
    assert inbox.fetched() == []
    await inbox.assert_nothing_stored()


async def test_attack_19_cavage_ed25519_claimed_for_rsa_key_401(
    inbox: Harness, alice: Account
) -> None:
    # By hand: pyhttpsig cannot sign ed25519, so its RSA header is relabelled.
    body = body_of(follow(alice.id))
    headers = signed_by(alice, body)
    headers["signature"] = headers["signature"].replace('"rsa-sha256"', '"ed25519"')

    response = await inbox.post(body, headers)

    assert_answer(response, 401, "algorithm ed25519 is not supported (use rsa-sha256)")
    await inbox.assert_nothing_stored()


@dataclass
class _Message:
    """The request shape http-message-signatures (RFC 9421, third party) signs."""

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)


async def test_attack_19_rfc9421_ed25519_claimed_for_rsa_key_401(
    inbox: Harness, alice: Account
) -> None:
    body = body_of(follow(alice.id))
    message = _Message("POST", f"https://{HOST}{SHARED_INBOX}", {"Host": HOST, "Content-Type": AP})
    resolver = hms.MappingKeyResolver(public_keys={}, private_keys={alice.key_id: alice.key})
    signer = hms.HTTPMessageSigner(
        signature_algorithm=hms_algorithms.RSA_V1_5_SHA256, key_resolver=resolver
    )
    signer.sign(
        message,
        key_id=alice.key_id,
        created=utcnow(),
        covered_component_ids=("@method", "@target-uri"),
        body=body,
    )
    # The honest RFC 9421 request is accepted ...
    assert (await inbox.post(body, message.headers)).status_code == 202
    inbox.mark()
    # ... and the same, relabelled ed25519 by hand, is not.
    forged = message.headers | {
        "Signature-Input": message.headers["Signature-Input"].replace("rsa-v1_5-sha256", "ed25519")
    }

    response = await inbox.post(body, forged)

    assert_answer(response, 401, "algorithm ed25519 does not fit the signer's RSA key")
    await inbox.assert_nothing_stored()


# ---- 20: whose key is it? ----------------------------------------------------------------

EVIL_KEY = "https://evil.example/keys/alice"


def _key_document(key_id: str, owner: str, pem: str) -> dict[str, Any]:
    return {
        "@context": [AS_CONTEXT, "https://w3id.org/security/v1"],
        "id": key_id,
        "type": "Key",
        "owner": owner,
        "publicKeyPem": pem,
    }


@pytest.mark.parametrize("shape", ["key_document", "gotosocial_stub"])
async def test_attack_20_key_document_naming_victim_as_owner(
    inbox: Harness, alice: Account, shape: str
) -> None:
    evil = rsa_key("evil")
    if shape == "key_document":
        document = _key_document(EVIL_KEY, alice.id, public_pem(evil))
    else:  # GoToSocial's stub shape, on the attacker's server, claiming alice
        document = gotosocial_key_stub(alice)
        document["id"] = "https://evil.example/users/alice"
        document["publicKey"] = {
            "id": EVIL_KEY,
            "owner": alice.id,
            "publicKeyPem": public_pem(evil),
        }
    inbox.serve(EVIL_KEY, document)
    body = body_of(follow(alice.id))

    response = await inbox.post(body, pyhttpsig_headers(evil, EVIL_KEY, body))

    assert_answer(response, 401, NOT_A_KEY)
    assert inbox.fetched(alice.id) == []  # alice's server is not even asked
    assert actor_row(inbox.database, alice.id) is None
    await inbox.assert_nothing_stored()


@pytest.mark.parametrize(
    "key_id",
    [
        # A file uploaded to alice's own server (the trick of Misskey CVE-2024-25636) ...
        "https://masto.qa.urbanwildlife.biz/system/media_attachments/evil-key.json",
        # ... or another fragment of alice's own actor document.
        "https://masto.qa.urbanwildlife.biz/users/mastodon#evil-key",
    ],
    ids=["uploaded_key_document", "other_fragment"],
)
async def test_attack_20_owner_publishes_other_key_id(
    inbox: Harness, alice: Account, key_id: str
) -> None:
    assert await send(inbox, alice, nth_follow(alice, 0)) == 202  # alice is known
    await inbox.services.inbox.process_once()
    inbox.mark()
    known = actor_row(inbox.database, alice.id)
    evil = rsa_key("evil")
    if "#" not in key_id:
        inbox.serve(key_id, _key_document(key_id, alice.id, public_pem(evil)))
    inbox.remote.requests.clear()
    body = body_of(nth_follow(alice, 1))

    response = await inbox.post(body, pyhttpsig_headers(evil, key_id, body))

    assert_answer(response, 401, NOT_A_KEY)
    assert inbox.fetched(alice.id) == [alice.id]  # the owner was asked, once
    await inbox.assert_nothing_stored()
    assert actor_row(inbox.database, alice.id) == known  # her cached key is untouched
    # And alice herself still gets in with her real key.
    assert await send(inbox, alice, nth_follow(alice, 2)) == 202


async def test_attack_20_gotosocial_stub_owner_publishes_other_key_id(gts_inbox: Harness) -> None:
    zork = gotosocial()
    gts_inbox.serve_actor(zork)
    other_key_id = zork.id + "/other-key"
    evil = rsa_key("evil")
    stub = gotosocial_key_stub(zork)
    stub["publicKey"] = {"id": other_key_id, "owner": zork.id, "publicKeyPem": public_pem(evil)}
    gts_inbox.serve(other_key_id, stub)
    body = body_of(follow(zork.id))

    response = await gts_inbox.post(body, pyhttpsig_headers(evil, other_key_id, body))

    assert_answer(response, 401, NOT_A_KEY)
    assert actor_row(gts_inbox.database, zork.id) is None
    await gts_inbox.assert_nothing_stored()


# ---- 21: key rotation and refresh floods ---------------------------------------------------


async def _known_from_yesterday(harness: Harness, account: Account, pem: str) -> None:
    """``account`` as an earlier fetch left it: cached with ``pem``, never refreshed."""
    await harness.services.store.save_actor(
        ap_id=account.id,
        username=account.document["preferredUsername"],
        domain="masto.qa.urbanwildlife.biz",
        name=account.document["name"],
        url=None,
        icon_url=None,
        inbox=account.document["inbox"],
        shared_inbox=account.document["endpoints"]["sharedInbox"],
        key_id=account.key_id,
        public_key_pem=pem,
        fetched=utcnow() - timedelta(days=1),
    )


async def test_attack_21_key_rotation_refreshes_once(inbox: Harness) -> None:
    old, rotated = mastodon("mastodon"), mastodon("mastodon-rotated")
    await _known_from_yesterday(inbox, old, public_pem(old.key))
    inbox.serve_actor(rotated)  # her server now publishes the new key

    statuses = [await send(inbox, rotated, nth_follow(rotated, n)) for n in range(4)]

    assert statuses == [202] * 4
    assert inbox.fetched() == [rotated.id]  # one refresh, then the new key is cached
    row = actor_row(inbox.database, rotated.id)
    assert row is not None
    assert row[2] == public_pem(rotated.key)
    # The old key no longer works, and trying it costs no further fetch.
    inbox.mark()
    body = body_of(nth_follow(old, 9))
    assert_answer(await inbox.post(body, signed_by(old, body)), 401, NOT_VERIFIED)
    assert inbox.fetched() == [rotated.id]
    await inbox.assert_nothing_stored()


async def test_attack_21_bad_signature_flood_fetches_once(
    inbox: Harness, alice: Account, mallory: Account
) -> None:
    await _known_from_yesterday(inbox, alice, public_pem(alice.key))
    inbox.mark()

    for n in range(20):
        body = body_of(nth_follow(alice, n))
        # Mallory's key, alice's keyId.
        response = await inbox.post(body, pyhttpsig_headers(mallory.key, alice.key_id, body))
        assert_answer(response, 401, NOT_VERIFIED)

    assert inbox.fetched() == [alice.id]  # one refresh for the whole flood
    await inbox.assert_nothing_stored()


async def test_attack_21_bad_signature_flood_on_a_new_key_fetches_once(
    inbox: Harness, alice: Account, mallory: Account
) -> None:
    """A key fetched a moment ago cannot have rotated since: it is not fetched again."""
    for n in range(20):
        body = body_of(nth_follow(alice, n))
        response = await inbox.post(body, pyhttpsig_headers(mallory.key, alice.key_id, body))
        assert_answer(response, 401, NOT_VERIFIED)

    assert inbox.fetched() == [alice.id]
    await inbox.assert_nothing_stored()


async def test_attack_21_unfetchable_key_flood_fetches_once(inbox: Harness) -> None:
    ghost = mastodon("ghost")  # its server answers 404: the actor is never served

    for n in range(20):
        body = body_of(nth_follow(ghost, n))
        response = await inbox.post(body, signed_by(ghost, body))
        assert response.status_code == 401

    assert inbox.fetched() == [ghost.id]  # one fetch, then the failure is remembered
    await inbox.assert_nothing_stored()


async def test_attack_21_made_up_key_ids_on_one_host_are_fetched_once_each(
    inbox: Harness,
) -> None:
    ghost = mastodon("ghost")

    for n in range(20):
        body = body_of(nth_follow(ghost, n))
        key_id = f"{ghost.id}-{n}#main-key"  # a different unfetchable key every time
        response = await inbox.post(body, pyhttpsig_headers(ghost.key, key_id, body))
        assert response.status_code == 401

    # Each once; 404s never cool the host down, or anyone could lock its users out
    # (fetches are capped in number at once instead: tests/test_outbound_isolation.py).
    assert len(inbox.fetched()) == 20
    await inbox.assert_nothing_stored()


# ---- 25, 26: size ------------------------------------------------------------------------


async def test_attack_25_body_over_cap_413(inbox: Harness, alice: Account) -> None:
    body = body_of(follow(alice.id) | {"content": "x" * 1_000_000})

    response = await inbox.post(body, signed_by(alice, body))

    assert_answer(response, 413, TOO_LARGE)
    assert inbox.fetched() == []
    await inbox.assert_nothing_stored()


async def test_attack_25_streamed_body_over_cap_413(inbox: Harness, alice: Account) -> None:
    body = body_of(follow(alice.id) | {"content": "x" * 2_000_000})
    headers = signed_by(alice, body)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: sent chunked
        for start in range(0, len(body), 65_536):
            yield body[start : start + 65_536]

    response = await inbox.client.post(SHARED_INBOX, content=chunks(), headers=headers)

    assert "content-length" not in response.request.headers
    assert_answer(response, 413, TOO_LARGE)
    await inbox.assert_nothing_stored()


async def test_attack_26_gzip_bomb_body_413(inbox: Harness, alice: Account) -> None:
    bomb = gzip.compress(b'{"type":"Follow","content":"' + b"0" * 50_000_000, compresslevel=9)
    assert len(bomb) < 100_000
    started = time.perf_counter()

    response = await inbox.post(bomb, signed_by(alice, bomb, content_encoding="gzip"))

    assert time.perf_counter() - started < 5  # linear work; a blow-up takes minutes
    assert_answer(response, 413, TOO_LARGE)
    await inbox.assert_nothing_stored()


async def test_attack_26_corrupt_gzip_400_unknown_encoding_415(
    inbox: Harness, alice: Account
) -> None:
    body = body_of(follow(alice.id))
    corrupt = gzip.compress(body)[:10] + b"\xff" * 64  # a gzip header, then no deflate data
    response = await inbox.post(corrupt, signed_by(alice, corrupt, content_encoding="gzip"))
    assert_answer(response, 400, "the gzip body is corrupt")
    response = await inbox.post(body, signed_by(alice, body, content_encoding="br"))
    assert_answer(response, 415, "content encoding 'br' is not supported")
    assert inbox.fetched() == []
    await inbox.assert_nothing_stored()


async def test_gzip_body_within_cap_accepted(inbox: Harness, alice: Account) -> None:
    # The digest covers the body the activity is read from: the decompressed one.
    body = body_of(follow(alice.id))

    response = await inbox.post(
        gzip.compress(body), signed_by(alice, body, content_encoding="gzip")
    )

    assert response.status_code == 202, response.text


# ---- 27: shape limits --------------------------------------------------------------------


async def test_attack_27_deep_nesting_400(inbox: Harness, alice: Account) -> None:
    body = body_of(follow(alice.id))[:-1] + b', "tag": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    started = time.perf_counter()

    response = await inbox.post(body, signed_by(alice, body))

    assert time.perf_counter() - started < 5  # linear work; a blow-up takes minutes
    assert_answer(
        response, 400, "the body is not acceptable JSON: JSON nested deeper than 64 levels"
    )
    assert inbox.fetched() == []
    await inbox.assert_nothing_stored()


@pytest.mark.parametrize("name", ["tag", "to", "cc", "attachment"])
async def test_attack_27_huge_arrays_rejected(inbox: Harness, alice: Account, name: str) -> None:
    item: object = {} if name in ("tag", "attachment") else 0
    body = json.dumps(follow(alice.id) | {name: [item] * 100_000}, separators=(",", ":")).encode()
    assert len(body) < 1_000_000  # under the size cap: the array cap must catch it
    started = time.perf_counter()

    response = await inbox.post(body, signed_by(alice, body))

    assert time.perf_counter() - started < 5  # linear work; a blow-up takes minutes
    assert_answer(
        response, 400, "the body is not acceptable JSON: JSON array longer than 10000 items"
    )
    assert inbox.fetched() == []
    await inbox.assert_nothing_stored()


# ---- 30: JSON-LD tricks ------------------------------------------------------------------

EVIL_CONTEXT = "https://masto.qa.urbanwildlife.biz/contexts/remap.jsonld"


async def test_attack_30_context_is_never_fetched(inbox: Harness, alice: Account) -> None:
    # A context on alice's server that would make the Follow a Block, and swap roles.
    inbox.serve(EVIL_CONTEXT, {"@context": {"Follow": "as:Block", "object": "as:actor"}})
    activity = follow(alice.id) | {"@context": [AS_CONTEXT, EVIL_CONTEXT, {"actor": "as:object"}]}

    assert await send(inbox, alice, activity) == 202
    await inbox.services.inbox.process_once()

    assert inbox.fetched(EVIL_CONTEXT) == []
    assert inbox.fetched() == [alice.id]
    # Read as plain JSON: a Follow of the blog by alice.
    assert await inbox.services.store.get_follower(alice.id) is not None


async def test_attack_30_embedded_ld_signature_is_ignored(
    inbox: Harness, alice: Account, mallory: Account
) -> None:
    ld_signature = {
        "type": "RsaSignature2017",
        "creator": alice.key_id,
        "created": "2025-01-01T00:00:00Z",
        "signatureValue": base64.b64encode(b"x" * 256).decode(),
    }
    body = body_of(follow(alice.id) | {"signature": ld_signature})
    # No HTTP signature: the LD signature does not stand in for one ...
    unsigned = {k: v for k, v in signed_by(alice, body).items() if k != "signature"}
    response = await inbox.post(body, unsigned)
    assert_answer(response, 401, "request is not signed (no Signature header)")
    # ... and with mallory's HTTP signature, it is still mallory speaking.
    response = await inbox.post(body, signed_by(mallory, body))
    assert_answer(response, 401, "the signer is not the activity's actor")
    assert inbox.fetched(alice.id) == []
    await inbox.assert_nothing_stored()
