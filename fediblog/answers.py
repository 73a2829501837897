"""The blog's author joins the conversation: publish, edit and delete an answer to a response.

The one service for it: ``fediblog reply`` calls it, and so will a web admin. An answer
is a comment of the blog's own (``by_author``) under the response it answers, shown in
that thread and counted with the others, with an id of ours,
``{base}/p/{uid}/answers/{token}``, that serves it as a Note. It federates from the blog
actor as ``Create{Note}`` (then ``Update``, ``Delete``): in reply to the response,
mentioning its author (a ``Mention`` tag and Mastodon's h-card link at the start of the
content), addressed like the response (public, or unlisted), and delivered to that
author's inbox (their shared inbox if they have one) and to every follower's inbox, one
request per distinct inbox.

A response from the local form has no id and no account to tell: the answer shows under
it on the page and federates as a reply to the post itself, to the followers.

A response is named as the page numbers it, ``SLUG#N`` (the visible responses in page
order: threads flattened depth-first, oldest first at each level, from 1), or by its
ActivityPub id. Only a published public or unlisted response can be answered. Everything
is checked before anything is written: a bad command stores and sends nothing.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

from fediblog.activitystreams import (
    Urls,
    build_answer_create,
    build_answer_delete,
    build_answer_update,
    mention_html,
)
from fediblog.blog import read_text_file
from fediblog.comments import build_threads
from fediblog.config import Settings
from fediblog.errors import FediblogError
from fediblog.models import (
    AuthorAnswer,
    Comment,
    CommentState,
    JsonObject,
    Mentioned,
    OutgoingActivity,
    Post,
    StoredComment,
    Thread,
    utcnow,
)
from fediblog.render import html_to_text, markdown_to_html
from fediblog.store import Store

MAX_ANSWER_CHARS = 50_000
# A response's permalink, as its number links to it: /posts/SLUG/comments/ID.
_PERMALINK = re.compile(r"^/posts/([a-z0-9-]+)/comments/([0-9]{1,18})/?$")
MAX_FILE_BYTES = 1_000_000


class AnswerError(FediblogError):
    """An answer command names nothing that can be answered, or has nothing to say."""


def flatten(threads: Iterable[Thread]) -> list[Comment]:
    """The responses in the order the page shows and numbers them: depth-first, oldest
    first at each level, deleted placeholders left out (they have no number)."""
    found: list[Comment] = []
    for thread in threads:
        if not thread.deleted:
            found.append(thread.comment)
        found.extend(flatten(thread.children))  # as deep as build_threads nests: bounded
    return found


async def list_in_page_order(store: Store, post_id: int) -> list[Comment]:
    """A post's visible responses, numbered as on its page: ``[0]`` is response #1."""
    return flatten(build_threads(await store.list_visible_comments(post_id)))


def read_answer_file(path: Path) -> str:
    """An answer written in a Markdown file (no front matter)."""
    return read_text_file(path, error=AnswerError, max_bytes=MAX_FILE_BYTES)


@dataclass(frozen=True, slots=True)
class Answered:
    """A published answer, and the response it answers as the page numbers it."""

    answer: AuthorAnswer
    target: str  # "slug#N"


class Answers:
    """Publishing, editing and deleting the author's answers, and telling who must know.

    The answer and its activity (with one queued delivery per inbox) commit together.
    """

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.urls = Urls.of(settings)

    async def publish(self, target: str, text: str) -> Answered:
        body_html = _render(text)
        comment, post, number = await self.find_response(target)
        mentioned = await self.store.get_comment_author(comment.id) if comment.ap_id else None
        published = utcnow()
        ap_id = self.urls.answer_id(post.uid, secrets.token_hex(8))
        content = _with_mention(body_html, mentioned)

        def create(comment_id: int) -> OutgoingActivity:
            answer = AuthorAnswer(
                id=comment_id,
                ap_id=ap_id,
                post_id=post.id,
                post_uid=post.uid,
                post_slug=post.slug,
                parent_id=comment.id,
                parent_ap_id=comment.ap_id,
                mentioned=mentioned,
                content_html=content,
                visibility=comment.visibility,
                status="published",
                published=published,
                updated=None,
                gone_at=None,
            )
            return _outgoing(build_answer_create(self.settings, answer))

        answer_id = await self.store.save_author_answer(
            post_id=post.id,
            parent_id=comment.id,
            ap_id=ap_id,
            page_url=self.urls.post_url(post.slug),
            content_html=content,
            visibility=comment.visibility,
            author_name=self.settings.author,
            author_url=self.urls.base + "/about",
            published=published,
            activity=create,
            inboxes=_inboxes(mentioned),
        )
        answer = await self.store.get_author_answer(comment_id=answer_id)
        assert answer is not None
        return Answered(answer, f"{post.slug}#{number}")

    async def edit(self, ref: str, text: str) -> AuthorAnswer:
        body_html = _render(text)
        answer = await self.find_answer(ref)
        # Strictly later than the last version: servers ignore an Update that is not newer.
        updated = max(utcnow(), (answer.updated or answer.published) + timedelta(seconds=1))
        edited = replace(
            answer, content_html=_with_mention(body_html, answer.mentioned), updated=updated
        )
        await self.store.save_author_answer_edit(
            answer,
            content_html=edited.content_html,
            updated=updated,
            activity=_outgoing(build_answer_update(self.settings, edited)),
            inboxes=_inboxes(answer.mentioned),
        )
        return edited

    async def delete(self, ref: str) -> AuthorAnswer:
        answer = await self.find_answer(ref)
        deleted = utcnow()
        await self.store.delete_author_answer(
            answer,
            deleted=deleted,
            activity=_outgoing(build_answer_delete(self.settings, answer, deleted)),
            inboxes=_inboxes(answer.mentioned),
        )
        return answer

    async def find_response(self, target: str) -> tuple[Comment, Post, int]:
        """(the response, its post, its number on the page) for ``SLUG#N`` or an id."""
        target = target.strip()
        permalink = _PERMALINK.match(target.removeprefix(self.settings.base_url))
        if permalink is not None:  # stable, unlike SLUG#N, which a new reply can shift
            stored = await self.store.get_stored_comment(int(permalink[2]))
            if stored is None or stored.slug != permalink[1]:
                raise AnswerError(f"no response is at {target}")
            return await self._response_of(stored, target)
        if target.startswith(("https://", "http://")):
            state = await self.store.get_comment_by_ap_id(target)
            if state is None:
                raise AnswerError(f"no response here has the id {target}")
            return await self._response_of(state, target)
        slug, mark, number = target.rpartition("#")
        if not mark or not slug:
            raise AnswerError(
                f"{target!r} names no response: give SLUG#N (N as numbered on the post's"
                " page) or the response's ActivityPub id"
            )
        post = await self.store.get_post_by_slug(slug)
        if post is None:
            raise AnswerError(f"no post has the slug {slug!r}")
        shown = await list_in_page_order(self.store, post.id)
        if not number.isdigit() or not 1 <= int(number) <= len(shown):
            count = f"{len(shown)} response{'' if len(shown) == 1 else 's'}"
            raise AnswerError(f"{slug} shows {count}: there is no response #{number}")
        comment = shown[int(number) - 1]
        _check_answerable(comment, target)
        return comment, post, int(number)

    async def _response_of(
        self, row: StoredComment | CommentState, ap_id: str
    ) -> tuple[Comment, Post, int]:
        """The response stored as ``row`` (named ``ap_id`` by the user), if answerable."""
        status, visibility = row.status, row.visibility
        if status != "published":
            reason = {
                "pending": "is held for approval (`fediblog comments approve` shows it)",
                "rejected": "was rejected",
                "deleted": "was deleted",
            }.get(status, f"is {status}")
            raise AnswerError(f"the response {ap_id} {reason}: it cannot be answered")
        if visibility not in ("public", "unlisted"):
            raise AnswerError(
                f"the response {ap_id} is {visibility}-only, not on the page: an answer is"
                " public, so it cannot answer it"
            )
        post = await self.store.get_post_by_id(row.post_id)
        if post is None:
            raise AnswerError(f"the post of the response {ap_id} was deleted")
        shown = await list_in_page_order(self.store, post.id)
        for number, comment in enumerate(shown, start=1):
            if comment.id == row.id:
                _check_answerable(comment, ap_id)
                return comment, post, number
        raise AnswerError(f"the response {ap_id} is not shown (its author is blocked)")

    async def find_answer(self, ref: str) -> AuthorAnswer:
        """One of the author's live answers, by its number (as ``reply`` prints it) or id."""
        ref = ref.strip()
        if ref.isdigit():
            answer = await self.store.get_author_answer(comment_id=int(ref))
        elif ref.startswith(("https://", "http://")):
            answer = await self.store.get_author_answer(ap_id=ref)
        else:
            raise AnswerError(f"{ref!r} is neither an answer's number nor its id")
        if answer is None:
            raise AnswerError(
                f"{ref} is not one of your answers (only what `fediblog reply` published)"
            )
        if answer.status == "deleted":
            raise AnswerError(f"the answer {ref} was deleted")
        if answer.gone_at is not None:
            raise AnswerError(f"the post of the answer {ref} was deleted")
        return answer


def _check_answerable(comment: Comment, named: str) -> None:
    if comment.by_author:
        raise AnswerError(f"{named} is your own answer: change it with `fediblog reply edit`")


def _render(text: str) -> str:
    if len(text) > MAX_ANSWER_CHARS:
        raise AnswerError(f"the answer is longer than {MAX_ANSWER_CHARS} characters")
    body_html = markdown_to_html(text) if text.strip() else ""
    if not html_to_text(body_html) and "<img" not in body_html:
        raise AnswerError("the answer is empty")
    return body_html


def _with_mention(body_html: str, mentioned: Mentioned | None) -> str:
    """The mention first, inside the first paragraph, as Mastodon writes a reply."""
    if mentioned is None:
        return body_html
    link = mention_html(mentioned)
    if body_html.startswith("<p>"):
        return f"<p>{link} {body_html.removeprefix('<p>')}"
    return f"<p>{link}</p>\n{body_html}"


def _inboxes(mentioned: Mentioned | None) -> list[str]:
    return [mentioned.inbox] if mentioned is not None and mentioned.inbox else []


def _outgoing(activity: JsonObject) -> OutgoingActivity:
    return OutgoingActivity(
        ap_id=activity["id"],
        type=activity["type"],
        payload=json.dumps(activity, ensure_ascii=False, separators=(",", ":")),
    )
