"""Responses from the fediverse: replies become comments, likes and boosts reactions.

The inbox has verified who sent each activity; this module decides what it may do
(ATTACKS.md cases in brackets):

* a reply is a ``Create`` of a Note whose ``inReplyTo`` is one of our posts (its id
  or its page) or a comment already under one, at any depth; replies to anything
  else are ignored. Its id must be on the sender's host [2], its ``attributedTo``
  the sender [3], it must not claim one of our ids [36] or a deleted id [9];
* only its author may edit it, only forward in time, never its ``published`` [11];
  only its author may delete it [8], and a tombstone stays so a late Create cannot
  bring it back [9];
* a copy embedded by a third party (a Lemmy community's Announce) is never
  trusted: the object is fetched again from its origin [7];
* a reply the crawler (``crawl.py``) fetched from its origin is saved the same way, if
  public or unlisted, its author being its ``attributedTo`` on the object's host; a
  refetch applies an edit as an Update would, and a crawled reply gone from its
  origin becomes a placeholder as a Delete would make it;
* a Like, a Misskey emoji reaction and an Announce of one of our posts count once
  per actor; their Undo only by the same actor [12].

Content goes through ``render.sanitize_remote_html``; the handle shown for an
author always takes its host from the actor id, never from a claimed name [34].

Replies the inbox acts on many to a transaction (``prepare_shared``) are *drafted*
first, outside it: checked, sanitized, their images proxied (without the write),
searched for held keywords. The transaction, which holds the write lock that accepting
inbox POSTs also needs, then only looks up what its own writes may change (a reply
delivered twice, a reply to one of the same batch, tombstones, first-time moderation)
in one read, and keeps its rows for one executemany (``Store.save_comment_later``).
"""

from __future__ import annotations

import asyncio
import html
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

from fediblog.activitystreams import (
    PUBLIC_ALIASES,
    Urls,
    as_list,
    host_of,
    id_of,
    is_public,
    is_unicode,
    plain_text,
    require_http_url,
)
from fediblog.actors import ACTOR_MAX_AGE, ActorDirectory
from fediblog.config import Settings
from fediblog.errors import ActivityError, FetchError
from fediblog.inbox import Handler
from fediblog.models import JsonObject, Visibility, parse_ts, utcnow
from fediblog.proxy import MediaProxy
from fediblog.remote import Fetcher
from fediblog.render import html_to_text, sanitize_remote_html
from fediblog.store import Store

log = logging.getLogger("fediblog.responses")

# A tuple, not a set: a JSON ``type`` may be a list, and ``[...] in a_set`` raises TypeError.
NOTE_TYPES = ("Note", "Article", "Page", "Question")
MAX_CONTENT = 50_000
MAX_ATTACHMENTS = 8
MAX_EMOJI = 50
FETCH_SENDERS = 8  # senders fetched at once before a shared transaction
# Drafting a batch of replies is CPU only: the event loop gets a turn every PAUSE_AFTER
# seconds of it (accepted POSTs wait meanwhile), not more often: under a flood, each
# turn the processor gives away costs it a whole round of the requests then ready.
PAUSE_AFTER = 0.025
# Why a reply is held (comments.held_reason), as the author's desk shows it.
HELD_ALL = "every response waits for approval (FEDIBLOG_MODERATION=all)"
HELD_FIRST = "first response from this account (FEDIBLOG_MODERATION=first)"


def held_for_keyword(keyword: str) -> str:
    return f"contains the held keyword “{keyword}” (FEDIBLOG_HOLD_KEYWORDS)"


class Responses:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        actors: ActorDirectory,
        fetcher: Fetcher,
        proxy: MediaProxy,
    ) -> None:
        self._settings = settings
        self._proxy = proxy  # readers load remote images from us only (proxy.py)
        self._store = store
        self._actors = actors
        self._fetcher = fetcher
        self._urls = Urls.of(settings)
        # Told (comment id, found by crawling) after each reply is saved: crawl.py.
        self.reply_listeners: list[Callable[[int, bool], Awaitable[None]]] = []

    def handlers(self) -> Mapping[str, Handler]:
        return {
            "Create": self.handle_create,
            "Update": self.handle_update,
            "Delete": self.handle_delete,
            "Like": self.handle_like,
            "EmojiReact": self.handle_like,
            "Announce": self.handle_announce,
            "Undo": self.handle_undo,
        }

    # ---- replies ----------------------------------------------------------------------

    async def handle_create(self, activity: JsonObject) -> None:
        obj = activity.get("object")
        actor = activity["actor"]
        if isinstance(obj, str):
            obj = await self._fetch_from_origin(obj)
        if not isinstance(obj, dict) or obj.get("type") not in NOTE_TYPES:
            return
        # In a shared transaction, its draft was made before it (prepare_shared).
        draft = _drafted(activity) if _shared_replies() is not None else None
        await self._save_reply(obj, actor, draft=draft)

    async def _save_reply(
        self, obj: JsonObject, actor: str, *, crawled: bool = False, draft: _Draft | None = None
    ) -> int | None:
        """Save this note as a comment if it answers us; ``draft`` is its ``_draft``
        if one was made already (for ``obj`` and ``actor``)."""
        shared = _shared_replies()
        if draft is None:
            draft = self._draft(obj, actor)
        note_id = draft.note_id
        if await self._is_tombstoned(shared, note_id, actor):
            raise ActivityError("that object was deleted")
        if await self._place(shared, note_id) is not None:
            return None  # already here (the same reply, delivered twice)
        target = await self._find_target(draft.in_reply_to)
        if target is None:
            return None  # not a reply to us: nothing to do
        post_id, parent_id = target
        actor_id, icon_url = await self._author(shared, actor)
        if draft.problem is not None:
            raise draft.problem  # its content cannot be shown: before anything is written
        held = await self._hold_reason(shared, actor_id, draft.keyword)
        proxied = draft.images
        if icon_url and (shared is None or icon_url not in shared.avatars):
            proxied = [*self._proxy.rows([icon_url], "avatar"), *proxied]
            if shared is not None:
                shared.avatars.add(icon_url)
        if proxied:
            await self._store.save_proxied_later(proxied)
        now = utcnow()
        comment_id = await self._store.save_comment_later(
            post_id=post_id,
            parent_id=parent_id,
            content_html=draft.content,
            summary=draft.summary,
            sensitive=draft.sensitive,
            published=min(draft.published or now, now),
            received=now,
            ap_id=note_id,
            url=draft.url,
            actor_id=actor_id,
            visibility=draft.visibility,
            status="pending" if held is not None else "published",
            held_reason=held,
        )
        if shared is not None:
            shared.places[note_id] = (comment_id, post_id)
            if held is None:
                shared.published.add(actor_id)
            shared.saved.append((comment_id, crawled))  # told once it is committed
            return comment_id
        await self.tell_listeners([(comment_id, crawled)])
        return comment_id

    def _draft(self, obj: JsonObject, actor: str) -> _Draft:
        """What saving this reply needs that is only CPU work (checks, sanitizing, the
        proxy's rewrite, the keyword search): done before its transaction, not in it.
        Raises what ``_check_note`` raises; a content that cannot be shown is kept as
        ``problem``, raised where rendering used to be (after the duplicate checks)."""
        note_id = self._check_note(obj, actor)
        draft = _Draft(note_id, id_of(obj.get("inReplyTo")))
        try:
            content, summary, sensitive, images = self._render(obj)
            url = _html_url(obj, self._settings.allow_http) or note_id
            if not all(is_unicode(text) for text in (content, summary or "", url, note_id)):
                raise ActivityError("the reply is not valid Unicode")
            draft.keyword = self._keyword_in(content, summary)
        except Exception as error:  # this reply's outcome alone
            draft.problem = error
            return draft
        draft.content, draft.summary, draft.sensitive = content, summary, sensitive
        draft.images = self._proxy.rows(images)
        draft.published = _moment(obj.get("published"))
        draft.url = url
        draft.visibility = _visibility(obj)
        return draft

    def _check_note(self, obj: JsonObject, actor: str) -> str:
        note_id = require_http_url(obj.get("id"), "object id", allow_http=self._settings.allow_http)
        if note_id.startswith(self._urls.base + "/") or host_of(note_id) == self._settings.host:
            raise ActivityError("a remote object cannot use one of our ids")
        if host_of(note_id) != host_of(actor):
            raise ActivityError("the object is on another host than its actor")
        authors = [id_of(a) for a in as_list(obj.get("attributedTo"))]
        if not authors or any(author != actor for author in authors):
            raise ActivityError("the object is attributed to someone other than its sender")
        return note_id

    async def _find_target(self, in_reply_to: Any) -> tuple[int, int | None] | None:
        """(post id, parent comment id) if the reply belongs under one of our posts."""
        parent = id_of(in_reply_to)
        if parent is None:
            return None
        shared = _shared_replies()
        if shared is not None and parent in shared.posts:
            post_id = shared.posts[parent]
        else:
            post_id = await self.find_post_id(parent)
            if shared is not None:
                shared.posts[parent] = post_id
        if post_id is not None:
            return post_id, None
        # A reply under a deleted reply still belongs in that thread, under its placeholder.
        place = await self._place(shared, parent)
        return (place[1], place[0]) if place is not None else None

    # ---- replies that share one transaction (inbox.py) --------------------------------

    @property
    def first_replies_held(self) -> bool:
        """Whether a sender's first reply waits for approval (FEDIBLOG_MODERATION=first)."""
        return self._settings.moderation == "first"

    def shareable(self, activity: JsonObject) -> bool:
        """Whether this activity's handlers here may join a shared transaction once its
        actor is known: a Create of an embedded note (a Create naming its object by id
        fetches it, so it runs alone)."""
        obj = activity.get("object")
        return (
            activity.get("type") == "Create"
            and isinstance(obj, dict)
            and obj.get("type") in NOTE_TYPES
        )

    async def prepare_shared(self, activities: Sequence[JsonObject]) -> SharedReplies:
        """Before a shared transaction, outside it: know each sender (fetching new or
        stale ones now, a few at once, so that nothing in the transaction waits on the
        network). A sender whose fetch fails gives that error as its activities'
        outcome: each run alone would only fetch it again, and wait again."""
        actors = list(dict.fromkeys(a["actor"] for a in activities if self.shareable(a)))
        rows = await self._store.get_cached_actors(actors)
        now = utcnow()
        authors: dict[str, tuple[int, str | None]] = {}
        stale: list[str] = []
        for actor in actors:
            row = rows.get(actor)
            # As ActorDirectory.get_actor: a cached profile is used while it is fresh.
            if (
                row is not None
                and row.inbox
                and now - row.fetched < ACTOR_MAX_AGE
            ):
                authors[actor] = (row.id, row.icon_url)
            else:
                stale.append(actor)
        problems: dict[str, Exception] = {}
        fetching = asyncio.Semaphore(FETCH_SENDERS)

        async def fetch(actor: str) -> None:
            async with fetching:
                try:
                    author = await self._actors.get_actor(actor)
                    row = await self._store.get_cached_actor(author.ap_id)
                except Exception as error:  # its activities get this as their outcome
                    log.debug("sender %s not ready for a shared transaction: %s", actor, error)
                    problems[actor] = error
                    return
            if row is not None:
                authors[actor] = (row.id, author.icon_url)

        await asyncio.gather(*(fetch(actor) for actor in stale))
        notes: list[str] = []
        for activity in activities:
            obj = activity.get("object")
            if isinstance(obj, dict):
                notes.extend(ref for ref in (id_of(obj), id_of(obj.get("inReplyTo"))) if ref)
        ready = [self.shareable(a) and a["actor"] in authors for a in activities]
        why = [problems.get(a["actor"]) if self.shareable(a) else None for a in activities]
        shared = SharedReplies(self, ready, why, authors, notes)
        # The CPU work of every reply, here and not in the transaction, which holds the
        # write lock that accepting inbox POSTs waits on (PAUSE_AFTER).
        paused = time.monotonic()
        for activity, joins in zip(activities, ready, strict=True):
            if not joins:
                continue
            draft: _Draft | Exception
            try:
                draft = self._draft(activity["object"], activity["actor"])
            except Exception as error:  # raised by its handler, for its outcome alone
                draft = error
            # On the activity itself: the inbox hands its handlers these same objects,
            # in every transaction it tries them in (an activity run alone is parsed
            # again from its stored payload, so it drafts again).
            activity[_DRAFT] = draft
            if time.monotonic() - paused >= PAUSE_AFTER:
                await asyncio.sleep(0)
                paused = time.monotonic()
        return shared

    async def _is_tombstoned(self, shared: SharedReplies | None, note_id: str, actor: str) -> bool:
        if shared is None or not await shared.loaded(self._store, note_id):
            return await self._store.is_tombstoned(note_id, actor)
        if note_id not in shared.tombstones:
            return False
        return shared.tombstones[note_id] in (None, actor)  # as Store.is_tombstoned

    async def _place(self, shared: SharedReplies | None, ap_id: str) -> tuple[int, int] | None:
        """(comment id, post id) of the comment with this id, if it is here."""
        if shared is not None and await shared.loaded(self._store, ap_id):
            return shared.places.get(ap_id)
        row = await self._store.get_comment_by_ap_id(ap_id)
        place = (row.id, row.post_id) if row is not None else None
        if shared is not None:
            shared.places[ap_id] = place
        return place

    async def _author(self, shared: SharedReplies | None, actor: str) -> tuple[int, str | None]:
        """The sender's local id and avatar, fetching the actor if new or stale."""
        if shared is not None and actor in shared.authors:
            return shared.authors[actor]
        author = await self._actors.get_actor(actor)
        row = await self._store.get_cached_actor(author.ap_id)
        assert row is not None  # get_actor saved it
        return row.id, author.icon_url

    async def tell_listeners(self, saved: Sequence[tuple[int, bool]]) -> None:
        """Tell every listener of these saved replies. A listener that fails is logged
        and fails nothing else: the reply is saved, and the other listeners (and the
        other replies' listeners) are still told."""
        for comment_id, crawled in saved:
            for listener in self.reply_listeners:
                try:
                    await listener(comment_id, crawled)
                except Exception:
                    log.exception("telling %r of comment %d failed", listener, comment_id)

    async def find_post_id(self, ref: str) -> int | None:
        """One of our live posts by its id (``/p/uid``) or its page (``/posts/slug``).

        Only the number: loading the whole post would count its comments, a cost that
        grows with every reply it gets.
        """
        base = self._urls.base + "/"
        if not ref.startswith(base):
            return None
        path = urlsplit(ref).path.rstrip("/")
        if path.startswith("/p/"):
            return await self._store.get_post_id(uid=path.removeprefix("/p/"))
        if path.startswith("/posts/"):
            return await self._store.get_post_id(slug=unquote(path.removeprefix("/posts/")))
        return None

    def _render(self, obj: JsonObject) -> tuple[str, str | None, bool, list[str]]:
        """Content, content warning and sensitivity as shown, and the remote images the
        content shows through the proxy (to register when it is stored). CPU only."""
        raw = obj.get("content")
        raw = raw if isinstance(raw, str) else ""
        if len(raw) > MAX_CONTENT:
            raise ActivityError("the reply is too long")
        if not is_unicode(raw):
            raise ActivityError("the reply is not valid Unicode")
        emoji = _emoji_map(obj.get("tag"), self._settings.allow_http)
        content = sanitize_remote_html(raw, emoji) + _attachments_html(
            obj.get("attachment"), self._settings.allow_http
        )
        content, images = self._proxy.rewrite(content)  # emoji and images: /proxy/…
        summary = plain_text(obj.get("summary"), 500) or None
        sensitive = bool(obj.get("sensitive")) or summary is not None
        if sensitive and summary is None:
            summary = "Sensitive content"  # marked sensitive without a warning: still collapse
        return content, summary, sensitive, images

    def _keyword_in(self, content: str, summary: str | None) -> str | None:
        keywords = self._settings.keywords
        if not keywords:
            return None  # no text to extract (a second HTML parse) for nothing
        # The content warning is shown too: a keyword there holds the reply as well.
        text = f"{summary or ''} {html_to_text(content)}".lower()
        return next((keyword for keyword in keywords if keyword in text), None)

    async def _hold_reason(
        self, shared: SharedReplies | None, actor_id: int, keyword: str | None
    ) -> str | None:
        """Why a new reply waits for approval, in words for the author (the desk's queue
        shows it), or None: it is published at once."""
        if keyword is not None:
            return held_for_keyword(keyword)
        mode = self._settings.moderation
        if mode == "all":
            return HELD_ALL
        if mode == "first":
            # Its first reply: it has no published comment (Store.has_published_comment,
            # for a whole batch at once in a shared transaction: SharedReplies.published).
            if shared is not None:
                await shared.loaded(self._store, "")
                first = actor_id not in shared.published
            else:
                first = not await self._store.has_published_comment(actor_id)
            if first:
                return HELD_FIRST
        return None

    async def _fetch_from_origin(self, object_id: str) -> JsonObject | None:
        try:
            document = await self._fetcher.fetch_document(object_id)
        except FetchError as error:
            raise ActivityError(f"cannot fetch {object_id}: {error}") from None
        return document

    # ---- replies the crawler fetched from their origin (crawl.py) ----------------------

    async def save_fetched_reply(self, document: JsonObject) -> int | None:
        """Save a reply fetched from its origin like a delivered one; a followers-only
        or direct one is not stored at all. Returns the new comment's id, if saved."""
        if document.get("type") not in NOTE_TYPES or not is_public(document):
            return None
        author = _fetched_author(document, "fetched")
        return await self._save_reply(document, author, crawled=True)

    async def refresh_fetched_reply(self, document: JsonObject) -> None:
        """A comment fetched again from its origin: an edit applies as an Update would."""
        author = _fetched_author(document, "fetched")
        await self.handle_update({"type": "Update", "actor": author, "object": document})

    async def delete_gone_reply(self, object_id: str) -> None:
        """A comment whose origin answers 404/410: a placeholder, as a Delete makes it."""
        comment = await self._store.get_comment_by_ap_id(object_id)
        if comment is not None and comment.actor is not None:
            delete = {"type": "Delete", "actor": comment.actor, "object": object_id}
            await self.handle_delete(delete)

    # ---- edits and deletions ----------------------------------------------------------

    async def handle_update(self, activity: JsonObject) -> None:
        obj = activity.get("object")
        actor = activity["actor"]
        if not isinstance(obj, dict) or obj.get("type") not in NOTE_TYPES:
            return
        note_id = self._check_note(obj, actor)
        comment = await self._store.get_comment_by_ap_id(note_id)
        if comment is None or comment.actor != actor or comment.status == "deleted":
            return
        updated = _moment(obj.get("updated"))
        known = comment.updated or comment.published
        if updated is None or updated <= known:
            return  # not newer than what we show
        published = _moment(obj.get("published"))
        # Stored to the second (Pleroma and Misskey send fractions: …35.602455Z) and
        # never later than its arrival (a sender's clock may run a little fast).
        if published is not None and min(
            published.replace(microsecond=0), comment.received
        ) != comment.published:
            return  # an edit never moves a reply in time
        content, summary, sensitive, images = self._render(obj)
        await self._proxy.register(images)
        await self._store.save_comment_edit(
            comment.id,
            content_html=content,
            summary=summary,
            sensitive=sensitive,
            updated=min(updated, utcnow()),
        )
        keyword = self._keyword_in(content, summary)
        if comment.status in ("published", "pending") and keyword is not None:
            # An edit must not slip a held keyword past the filter, and one still held
            # (for another reason) now says the reason that matters most.
            await self._store.set_comment_held(
                comment.id, held_for_keyword(keyword) + " (added by an edit)"
            )

    async def handle_delete(self, activity: JsonObject) -> None:
        actor = activity["actor"]
        object_id = id_of(activity.get("object"))
        if object_id is None or object_id == actor:
            return  # an actor deleting itself is the inbox's business
        comment = await self._store.get_comment_by_ap_id(object_id)
        if comment is not None:
            if comment.actor == actor:
                await self._store.delete_comment(
                    comment.id, ap_id=object_id, actor=actor, when=utcnow()
                )
            return
        if host_of(object_id) == host_of(actor):
            # Delete before Create (they crossed on the way): remember, so the late
            # Create is refused.
            await self._store.save_tombstone(object_id, actor, utcnow())

    # ---- likes and boosts -------------------------------------------------------------

    async def handle_like(self, activity: JsonObject) -> None:
        reaction = activity.get("_misskey_reaction") or activity.get("content")
        await self._react(activity, "Like", plain_text(reaction, 64) or None)

    async def handle_announce(self, activity: JsonObject) -> None:
        obj = activity.get("object")
        if isinstance(obj, dict) and obj.get("type") == "Create":
            # A Lemmy community relays a comment: trust only the origin's copy.
            inner = id_of(obj.get("object"))
            if inner is not None:
                await self._relayed_reply(inner)
            return
        await self._react(activity, "Announce", None)

    async def _relayed_reply(self, object_id: str) -> None:
        document = await self._fetch_from_origin(object_id)
        if not isinstance(document, dict) or document.get("type") not in NOTE_TYPES:
            return
        await self._save_reply(document, _fetched_author(document, "relayed"))

    async def _react(self, activity: JsonObject, kind: str, content: str | None) -> None:
        target = id_of(activity.get("object"))  # an embedded copy is never trusted
        post_id = await self.find_post_id(target) if target else None
        if post_id is None:
            return
        author = await self._actors.get_actor(activity["actor"])
        row = await self._store.get_cached_actor(author.ap_id)
        assert row is not None
        await self._proxy.register([author.icon_url] if author.icon_url else [], "avatar")
        await self._store.save_reaction(
            post_id=post_id,
            actor_id=row.id,
            kind=kind,
            ap_id=activity.get("id") if isinstance(activity.get("id"), str) else None,
            content=content,
            when=utcnow(),
        )

    async def handle_undo(self, activity: JsonObject) -> None:
        inner = activity.get("object")
        actor = activity["actor"]
        if isinstance(inner, dict):
            kind = "Like" if inner.get("type") in ("Like", "EmojiReact") else inner.get("type")
            if kind not in ("Like", "Announce") or id_of(inner.get("actor")) != actor:
                return  # not a reaction, or someone else's (ATTACKS.md 12)
            target = id_of(inner.get("object"))
            post_id = await self.find_post_id(target) if target else None
            await self._store.delete_reaction(
                actor=actor, kind=kind, ap_id=id_of(inner), post_id=post_id
            )
        elif isinstance(inner, str):
            for kind in ("Like", "Announce"):
                await self._store.delete_reaction(actor=actor, kind=kind, ap_id=inner, post_id=None)


class SharedReplies:
    """Replies acted on in one shared transaction (inbox.py): their senders, known
    beforehand; what they look up, read in one query each at the first need; the
    replies saved, told to the listeners only once committed (``committed()``, called
    by the inbox). Entered (``async with``) around each transaction, by the task that
    runs it."""

    def __init__(
        self,
        responses: Responses,
        ready: list[bool],
        problems: list[Exception | None],
        authors: dict[str, tuple[int, str | None]],
        notes: list[str],
    ) -> None:
        self.ready = ready  # which activities may join: their handlers need no network
        self.problems = problems  # why one may not: its sender's fetch failed
        self.authors = authors  # actor -> (local id, avatar URL)
        self.task: asyncio.Task[object] | None = None
        self._responses = responses
        self._notes = notes  # object ids and inReplyTo targets of these activities
        self._token: Token[SharedReplies | None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.tombstones: dict[str, str | None] = {}  # ap_id -> who deleted it
        self.places: dict[str, tuple[int, int] | None] = {}  # ap_id -> (comment, post)
        self.posts: dict[str, int | None] = {}  # inReplyTo -> our post's id
        self.avatars: set[str] = set()  # registered with the proxy in this transaction
        self.published: set[int] = set()  # senders with a published comment (moderation)
        self.saved: list[tuple[int, bool]] = []
        self._known: set[str] | None = None

    async def loaded(self, store: Store, ap_id: str) -> bool:
        """Whether ``tombstones`` and ``places`` answer for ``ap_id``; the first call
        reads them for every id of these activities, and ``published`` for their
        senders, in one query (in the transaction: it sees what the activities before
        wrote)."""
        if self._known is None:
            self._known = set(self._notes)
            first = self._responses.first_replies_held
            senders = [local for local, _ in self.authors.values()] if first else []
            self.tombstones, places, self.published = await store.get_reply_context(
                self._notes, senders
            )
            for note in self._notes:
                self.places.setdefault(note, places.get(note))
        return ap_id in self._known

    async def __aenter__(self) -> SharedReplies:
        self._reset()  # what activities run alone in between did is read afresh
        self.task = asyncio.current_task()
        self._token = _current.set(self)
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._token is not None:
            _current.reset(self._token)
        self.task, self._token = None, None

    async def committed(self) -> None:
        """The transaction just left committed: tell the listeners what it saved."""
        saved, self.saved = self.saved, []
        await self._responses.tell_listeners(saved)


@dataclass(slots=True)
class _Draft:
    """A reply's CPU work, done before its transaction (``Responses._draft``)."""

    note_id: str
    in_reply_to: str | None
    problem: Exception | None = None  # its content cannot be shown: its outcome
    content: str = ""
    summary: str | None = None
    sensitive: bool = False
    images: list[tuple[str, str, str, str]] = field(default_factory=list)  # proxy rows
    keyword: str | None = None  # a held keyword it contains
    published: datetime | None = None
    url: str = ""
    visibility: Visibility = "public"


# Where prepare_shared leaves a reply's draft (or what making it raised) on its Create.
_DRAFT = "fediblog:draft"


def _drafted(activity: JsonObject) -> _Draft | None:
    """The draft prepare_shared left on this activity (None: none); raises what making
    it raised, as the reply's own outcome. A sender's JSON may use the same key, but
    never holds a _Draft or an exception."""
    draft = activity.get(_DRAFT)
    if isinstance(draft, Exception):
        raise draft
    return draft if isinstance(draft, _Draft) else None


_current: ContextVar[SharedReplies | None] = ContextVar("fediblog_shared_replies", default=None)


def _shared_replies() -> SharedReplies | None:
    """The shared transaction this task is running replies in, if any (a task it
    started is not part of it)."""
    shared = _current.get()
    return shared if shared is not None and shared.task is asyncio.current_task() else None


def _fetched_author(document: JsonObject, what: str) -> str:
    """The author of an object fetched from its origin: its ``attributedTo``, which must
    be on the object's own host (the origin answers only for its own users)."""
    authors = [id_of(a) for a in as_list(document.get("attributedTo"))]
    author = authors[0] if authors else None
    if author is None or host_of(author) != host_of(str(document.get("id"))):
        raise ActivityError(f"the {what} object's author is on another host")
    return author



def _moment(value: Any) -> datetime | None:
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        return parse_ts(value)
    except ValueError:
        return None


def _visibility(obj: JsonObject) -> Visibility:
    """Public: Public in ``to``; unlisted: Public only in ``cc``; else never shown."""
    to = as_list(obj.get("to"))
    if any(isinstance(item, str) and item in PUBLIC_ALIASES for item in to):
        return "public"
    if is_public(obj):
        return "unlisted"
    addressed = [item for item in to + as_list(obj.get("cc")) if isinstance(item, str)]
    return "followers" if any(item.endswith("/followers") for item in addressed) else "direct"


def _html_url(obj: JsonObject, allow_http: bool) -> str | None:
    url = obj.get("url")
    if isinstance(url, list):
        url = next((u for u in url if isinstance(u, str | dict)), None)
    if isinstance(url, dict):
        url = url.get("href")
    try:
        return require_http_url(url, "url", allow_http=allow_http)
    except ActivityError:
        return None


def _emoji_map(tags: Any, allow_http: bool) -> dict[str, str]:
    """Custom emoji of this object: shortcode -> https icon, from its own ``tag`` list
    only, so no server's emoji can stand in another's text (ATTACKS.md 32)."""
    found: dict[str, str] = {}
    for tag in as_list(tags)[: MAX_EMOJI * 4]:
        if not isinstance(tag, dict) or tag.get("type") != "Emoji":
            continue
        name = tag.get("name")
        icon = tag.get("icon")
        url = icon.get("url") if isinstance(icon, dict) else None
        if not isinstance(name, str) or not isinstance(url, str):
            continue
        shortcode = name.strip(":")
        if not shortcode or not all(c.isascii() and (c.isalnum() or c == "_") for c in shortcode):
            continue
        try:  # https (http only if allowed), never javascript: or data: (ATTACKS.md 32)
            found[shortcode] = require_http_url(url, "emoji icon", allow_http=allow_http)
        except ActivityError:
            continue
        if len(found) >= MAX_EMOJI:
            break
    return found


def _attachments_html(attachments: Any, allow_http: bool) -> str:
    """Image attachments, shown with their alt text; other media as a link."""
    parts: list[str] = []
    for item in as_list(attachments)[:MAX_ATTACHMENTS]:
        if not isinstance(item, dict):
            continue
        url = item.get("url")
        if isinstance(url, list):
            url = url[0] if url else None
        if isinstance(url, dict):
            url = url.get("href")
        try:
            url = require_http_url(url, "attachment", allow_http=allow_http)
        except ActivityError:
            continue
        alt = html.escape(plain_text(item.get("name"), 1500))
        media = str(item.get("mediaType") or "")
        src = html.escape(url)
        if media.startswith("image/") or item.get("type") == "Image":
            parts.append(
                f'<a href="{src}" rel="nofollow ugc noopener"><img src="{src}" alt="{alt}"'
                ' loading="lazy" decoding="async" referrerpolicy="no-referrer"></a>'
            )
        else:
            label = alt or "attachment"
            parts.append(f'<a href="{src}" rel="nofollow ugc noopener">{label}</a>')
    return f'<p class="attachments">{"".join(parts)}</p>' if parts else ""
