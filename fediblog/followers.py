"""Followers: answering Follow requests, now (open blog) or after approval (manual).

The inbox answers a Follow as soon as it is stored; with
``FEDIBLOG_MANUALLY_APPROVES_FOLLOWERS`` the request waits as ``pending`` until
``fediblog followers approve`` (Accept) or ``reject`` (Reject). An accepted follower
can be removed (``remove``): a Reject of its Follow tells its server. Either way the
answer is a queued delivery to the follower's own inbox, signed when it is sent.
"""

from __future__ import annotations

import json

from fediblog.activitystreams import build_accept
from fediblog.config import Settings
from fediblog.errors import FediblogError
from fediblog.models import Follower, JsonObject, OutgoingActivity, utcnow
from fediblog.store import Store


class NoSuchFollower(FediblogError):
    """No follow request from that actor."""


async def queue_answer(
    settings: Settings, store: Store, follow: JsonObject, inbox: str, *, reject: bool = False
) -> None:
    """Queue an Accept (or Reject) of ``follow`` to ``inbox``."""
    answer = build_accept(settings, follow, reject=reject)
    await store.save_activity_for(
        OutgoingActivity(
            ap_id=answer["id"],
            type=answer["type"],
            payload=json.dumps(answer, separators=(",", ":")),
            public=False,
        ),
        inbox,
    )


def _follow_of(follower: Follower) -> JsonObject:
    return {"id": follower.follow_id, "type": "Follow", "actor": follower.actor}


async def _pending(store: Store, actor: str) -> Follower:
    follower = await store.get_follower(actor)
    if follower is None or follower.status != "pending":
        raise NoSuchFollower(f"no pending follow request from {actor}")
    return follower


async def approve(settings: Settings, store: Store, actor: str) -> None:
    follower = await _pending(store, actor)
    await store.set_follower_status(actor, "accepted")
    await queue_answer(settings, store, _follow_of(follower), follower.inbox)


async def reject(settings: Settings, store: Store, actor: str) -> None:
    follower = await _pending(store, actor)
    await store.delete_follower(actor)
    await queue_answer(settings, store, _follow_of(follower), follower.inbox, reject=True)


async def remove(settings: Settings, store: Store, actor: str) -> None:
    """Remove an accepted follower: its row goes (no more posts reach it) and its
    server is sent a Reject of its Follow, as Mastodon's "remove follower" does.
    Mastodon and Misskey then drop the follow: the account no longer shows as following.
    GoToSocial (as of this writing) takes a Reject only as the refusal of a pending
    request and ignores it here: the account keeps showing "following", receiving
    nothing, until it unfollows and follows again."""
    follower = await store.get_follower(actor)
    if follower is None or follower.status != "accepted":
        raise NoSuchFollower(f"{actor} does not follow this blog")
    # Mastodon answers the Reject with an Undo of that Follow: should it arrive after a
    # new Follow, the inbox knows it by the id kept here and leaves the new follow be.
    await store.delete_removed_follower(actor, follower.follow_id, utcnow())
    await queue_answer(settings, store, _follow_of(follower), follower.inbox, reject=True)
