"""Authoring: read a Markdown post file, publish it, edit it, delete it.

A post file is Markdown with YAML front matter::

    ---
    title: Hello, fediverse        # required
    slug: hello-fediverse          # optional, from the title otherwise
    summary: What this post is.    # optional; shown in cards, feeds and on Mastodon
    tags: [python, fediverse]      # optional; a list or "a, b"
    published: 2026-11-28 10:00    # optional; now otherwise
    image: https://…/cover.jpg     # optional
    image_alt: A cat on a sofa     # optional; the cover's alt text
    draft: true                    # optional; stored unlisted, unfederated, until published
    ---
    The body, in Markdown.

A ``published`` date in the future schedules the post: nobody sees it, and nothing is
sent, until the scheduler (schedule.py) publishes it then. A draft has a secret
preview URL (``/preview/{token}``); ``publish_now`` publishes it (or schedules it, if
dated in the future).

Everything is checked before anything is written, so a bad file changes nothing.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from fediblog.activitystreams import Urls, build_create, build_delete, build_pin, build_update
from fediblog.config import Settings
from fediblog.errors import FediblogError, PostError, PostNotFound
from fediblog.media import MediaStore
from fediblog.models import JsonObject, OutgoingActivity, Post, PostDraft, PostState, utcnow
from fediblog.render import (
    blog_path,
    images_without_alt,
    markdown_to_html,
    normalize_tag,
    slugify,
    web_url,
)
from fediblog.store import Store

FRONT_MATTER_KEYS = (
    "title", "slug", "summary", "tags", "published", "image", "image_alt", "draft"
)  # fmt: skip
MAX_TITLE = 300
MAX_SUMMARY = 2_000
MAX_TAGS = 30
MAX_FILE_BYTES = 2_000_000
MIN_YEAR, MAX_YEAR = 1900, 9999  # for `published`
_SLUG = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,118}[a-z0-9])?$")


def read_text_file(
    path: Path, *, error: type[FediblogError] = PostError, max_bytes: int = MAX_FILE_BYTES
) -> str:
    """A UTF-8 text file the author wrote; ``error`` with one readable line if it is not."""
    try:
        raw = path.read_bytes()
    except OSError as cause:
        raise error(f"cannot read {path}: {cause.strerror or cause}") from None
    if len(raw) > max_bytes:
        raise error(f"{path} is larger than {max_bytes / 1_000_000:g} MB")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise error(f"{path} is not UTF-8 text") from None


def read_post_file(path: Path) -> PostDraft:
    """Parse and validate a post file; raise PostError with one readable line."""
    text = read_text_file(path)
    return parse_post(text, source=str(path))


def parse_post(text: str, *, source: str = "post") -> PostDraft:
    """Parse Markdown with front matter into a validated draft."""
    # Imported on first use: the server reads post files only when told to.
    import frontmatter
    import yaml

    try:
        document = frontmatter.loads(text)
    except yaml.YAMLError as error:
        first_line = str(error).splitlines()[0] if str(error) else "invalid YAML"
        raise PostError(f"{source}: the front matter is not valid YAML ({first_line})") from None
    return draft_from_fields(dict(document.metadata), document.content, source=source)


def draft_from_fields(meta: Mapping[str, Any], body_md: str, *, source: str = "post") -> PostDraft:
    """A validated draft from front matter fields (a post file's, or the desk's editor
    form's: the same keys) and its Markdown body; PostError with one readable line."""
    unknown = sorted(set(meta) - set(FRONT_MATTER_KEYS))
    if unknown:
        raise PostError(
            f"{source}: unknown front matter key(s) {', '.join(unknown)}"
            f" (allowed: {', '.join(FRONT_MATTER_KEYS)})"
        )

    title = meta.get("title")
    if not isinstance(title, str | int | float) or not str(title).strip():
        raise PostError(f"{source}: the front matter needs a title")
    title = " ".join(str(title).split())
    if len(title) > MAX_TITLE:
        raise PostError(f"{source}: the title is longer than {MAX_TITLE} characters")

    slug = meta.get("slug")
    slug_given = slug is not None
    if slug is None:
        slug = slugify(title)
        if not slug:
            raise PostError(f"{source}: no slug can be made from the title; set 'slug:'")
    elif not isinstance(slug, str) or not _SLUG.match(slug):
        raise PostError(
            f"{source}: the slug must be lower-case letters, digits and '-', not {slug!r}"
        )

    summary = meta.get("summary", "")
    if not isinstance(summary, str):
        raise PostError(f"{source}: the summary must be text")
    summary = " ".join(summary.split())
    if len(summary) > MAX_SUMMARY:
        raise PostError(f"{source}: the summary is longer than {MAX_SUMMARY} characters")

    is_draft = meta.get("draft")
    if is_draft is not None and not isinstance(is_draft, bool):
        raise PostError(f"{source}: draft must be true or false, not {is_draft!r}")

    image = meta.get("image")
    if image is not None:
        # Checked, and kept, as a browser reads it: "//evil.example/x.png" and
        # "/\evil.example/x.png" start with "/" but are on another host.
        image = (web_url(image) or blog_path(image)) if isinstance(image, str) else None
        if image is None:
            raise PostError(
                f"{source}: the image must be an http(s) URL or a path on this blog"
                " (starting with one /)"
            )
    image_alt = meta.get("image_alt", "")
    if not isinstance(image_alt, str):
        raise PostError(f"{source}: image_alt must be text")

    return PostDraft(
        title=title,
        slug=slug,
        body_md=body_md.strip() + "\n",
        summary=summary,
        tags=_parse_tags(meta.get("tags"), source),
        image=image,
        published=_parse_published(meta.get("published"), source),
        slug_given=slug_given,
        draft=is_draft,
        image_alt=" ".join(image_alt.split()),
    )


def _parse_tags(value: object, source: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        items: list[object] = [part for part in value.split(",")]
    elif isinstance(value, list):
        items = value
    else:
        raise PostError(f"{source}: tags must be a list or comma-separated text")
    tags: list[str] = []
    for item in items:
        if not isinstance(item, str | int):
            raise PostError(f"{source}: every tag must be text, not {item!r}")
        tag = normalize_tag(str(item))
        if tag and tag not in tags:
            tags.append(tag)
    if len(tags) > MAX_TAGS:
        raise PostError(f"{source}: at most {MAX_TAGS} tags")
    return tuple(tags)


def _parse_published(value: object, source: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise PostError(
                f"{source}: published must be a date like 2026-11-28 or 2026-11-28T10:00:00Z"
            ) from None
    else:
        raise PostError(f"{source}: published must be a date")
    out_of_range = PostError(
        f"{source}: published must be between the years {MIN_YEAR} and {MAX_YEAR}"
        f" (in UTC), not {value}"
    )
    try:
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        # Year 1 with a positive offset, or 9999-12-31 with a negative one, leaves
        # datetime's range when converted to UTC.
        moment = moment.astimezone(UTC).replace(microsecond=0)
    except OverflowError:
        raise out_of_range from None
    # Stored as text and compared as text: years before 1000 would sort wrongly and
    # not parse back; no real post predates 1900.
    if not MIN_YEAR <= moment.year <= MAX_YEAR:
        raise out_of_range
    return moment


def missing_alt(draft: PostDraft) -> list[str]:
    """A line for each image of the post without alt text (the cover's too): it is
    published all the same, but the author should hear of it (CLI and desk alike)."""
    lines = [f"the image {src} has no alt text" for src in images_without_alt(draft.body_md)]
    if draft.image and not draft.image_alt:
        lines.append("the cover image has no alt text (image_alt)")
    return lines


def _outgoing(activity: JsonObject) -> OutgoingActivity:
    return OutgoingActivity(
        ap_id=activity["id"],
        type=activity["type"],
        payload=json.dumps(activity, ensure_ascii=False, separators=(",", ":")),
    )


class Blog:
    """Publishing, editing and deleting posts, and telling every follower about it.

    The post change and the activity (with one queued delivery per follower inbox)
    commit together: a post is never published without its Create on the way.
    """

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.urls = Urls.of(settings)

    def post_url(self, post: Post) -> str:
        return self.urls.post_url(post.slug)

    def object_id(self, uid: str) -> str:
        """The post's ActivityPub id: built from the uid, so a new slug keeps it."""
        return self.urls.object_id(uid)

    async def import_images(self, draft: PostDraft, post_file: Path) -> PostDraft:
        """The draft with its local images (paths relative to ``post_file``) imported
        into the media store; MediaError, with nothing stored, if one cannot be."""
        found = await MediaStore(self.settings, self.store).import_post_images(
            draft.body_md, post_file.parent
        )
        return replace(draft, media=tuple(found.items()))

    async def with_stored_images(self, draft: PostDraft, previous: Post | None = None) -> PostDraft:
        """The draft with the images it shows from the media store (the desk's editor has
        no folder to import from): ``/media/`` paths, and, when editing ``previous``, the
        local paths its post file named, as imported then."""
        found = await MediaStore(self.settings, self.store).known_images(draft.body_md, previous)
        return replace(draft, media=tuple(found.items()))

    def render_draft(self, draft: PostDraft, previous: Post | None = None) -> Post:
        """The post as its page would show it, stored nowhere: the desk's preview, through
        the same Markdown pipeline as ``publish`` and ``edit``."""
        published = draft.published or (previous.published if previous else utcnow())
        post = _as_post(
            draft,
            uid=previous.uid if previous else "preview",
            body_html=markdown_to_html(draft.body_md, dict(draft.media)),
            published=published,
            updated=None,
        )
        return replace(post, state=previous.state if previous else "draft")

    async def publish(self, draft: PostDraft) -> Post:
        published = draft.published or utcnow()
        uid = secrets.token_hex(8)
        body_html = markdown_to_html(draft.body_md, dict(draft.media))
        post = _as_post(draft, uid=uid, body_html=body_html, published=published, updated=None)
        state = new_state(draft.draft, published, utcnow())
        return await self.store.save_new_post(
            replace(draft, published=published),
            uid=uid,
            body_html=body_html,
            published=published,
            activity=_outgoing(build_create(self.settings, post)) if state == "published" else None,
            state=state,
            preview_token=None if state == "published" else _preview_token(),
        )

    async def edit(self, slug: str, draft: PostDraft) -> Post:
        old = await self.get(slug)
        if not draft.slug_given:
            draft = replace(draft, slug=old.slug)
        if old.state != "published":
            return await self._edit_unpublished(old, draft)
        if draft.draft:
            raise PostError(
                f"{old.slug!r} is published: it cannot become a draft again (delete it instead)"
            )
        updated = utcnow()
        body_html = markdown_to_html(draft.body_md, dict(draft.media))
        post = _as_post(
            draft,
            uid=old.uid,
            body_html=body_html,
            published=draft.published or old.published,
            updated=updated,
        )
        return await self.store.save_post_edit(
            old,
            draft,
            body_html=body_html,
            updated=updated,
            activity=_outgoing(build_update(self.settings, post, updated)),
        )

    async def delete(self, slug: str) -> Post:
        post = await self.get(slug)
        deleted = utcnow()
        await self.store.delete_post(
            post,
            object_id=self.object_id(post.uid),
            deleted=deleted,
            # A draft or scheduled post was never sent anywhere: nobody to tell.
            activity=_outgoing(build_delete(self.settings, post.uid, deleted))
            if post.state == "published"
            else None,
        )
        return post

    async def get(self, slug: str) -> Post:
        """The author's post by its slug, whatever its state (drafts too)."""
        post = await self.store.get_authored_post(slug)
        if post is None:
            raise PostNotFound(f"no post has the slug {slug!r}")
        return post

    # ---- drafts, schedules and pinned posts -----------------------------------------

    async def _edit_unpublished(self, old: Post, draft: PostDraft) -> Post:
        """A draft stays a draft unless the file says ``draft: false``; a scheduled post
        moves with its date, or goes out now if the date has passed."""
        now = utcnow()
        is_draft = draft.draft if draft.draft is not None else old.state == "draft"
        state = new_state(is_draft, draft.published or old.published, now)
        # Going out now: dated now, as `post publish` does (it was never seen before).
        published = now if state == "published" else draft.published or old.published
        draft = replace(draft, published=published)
        body_html = markdown_to_html(draft.body_md, dict(draft.media))
        post = _as_post(draft, uid=old.uid, body_html=body_html, published=published, updated=None)
        return await self.store.save_post_edit(
            old,
            draft,
            body_html=body_html,
            updated=now,
            activity=_outgoing(build_create(self.settings, post)) if state == "published" else None,
            state=state,
        )

    async def publish_now(self, slug: str) -> Post:
        """`post publish`: a draft or scheduled post goes out now, with its Create; a draft
        dated in the future is scheduled for that date instead."""
        post = await self.get(slug)
        if post.state == "published":
            raise PostError(f"{slug!r} is already published")
        now = utcnow()
        future = post.state == "draft" and post.published > now
        published = post.published if future else now
        state: PostState = "scheduled" if future else "published"
        live = replace(post, published=published, updated=None, state=state)
        await self.store.save_post_publish(
            post,
            published=published,
            state=state,
            activity=None if future else _outgoing(build_create(self.settings, live)),
        )
        return await self.get(slug)

    async def publish_due(self, post_id: int, now: datetime) -> datetime | None:
        """The scheduler's job: publish a scheduled post whose time has come, with its
        Create. Returns when to look again (its time has not come), or None (done: it
        was published, by this or by hand, or it is a draft now, or deleted)."""
        post = await self.store.get_authored_post_by_id(post_id)
        if post is None or post.state != "scheduled":
            return None
        if post.published > now:
            return post.published
        live = replace(post, updated=None, state="published")
        done = await self.store.save_post_publish(
            post,
            published=post.published,
            state="published",
            activity=_outgoing(build_create(self.settings, live)),
            only_if_scheduled=True,
        )
        return None if done else now  # changed meanwhile: look at it again

    async def pin(self, slug: str, *, pinned: bool = True) -> Post:
        """Pin a published post to the actor's featured collection (or unpin it), and
        send followers the Add (or Remove), as Mastodon does."""
        post = await self.get(slug)
        if post.state != "published":
            raise PostError(f"{slug!r} is not published ({post.state}): publish it first")
        if post.pinned == pinned:
            raise PostError(f"{slug!r} is {'already' if pinned else 'not'} pinned")
        activity = build_pin(self.settings, post.uid, secrets.token_hex(8), pinned=pinned)
        await self.store.set_post_pinned(post, utcnow() if pinned else None, _outgoing(activity))
        return await self.get(slug)

    async def preview_url(self, slug: str) -> str:
        """The secret address of a draft's or scheduled post's preview."""
        post = await self.get(slug)
        if post.state == "published":
            raise PostError(f"{slug!r} is published: its page is {self.post_url(post)}")
        token = await self.store.get_preview_token(post.id)
        assert token is not None  # every unpublished post is stored with one
        return self.settings.url(preview_path(token))


def preview_path(token: str) -> str:
    return f"/preview/{token}"


def _preview_token() -> str:
    return secrets.token_urlsafe(24)


def new_state(is_draft: bool | None, published: datetime, now: datetime) -> PostState:
    """What a post not yet seen becomes: a draft, scheduled (dated later), or published."""
    if is_draft:
        return "draft"
    return "scheduled" if published > now else "published"


def _as_post(
    draft: PostDraft, *, uid: str, body_html: str, published: datetime, updated: datetime | None
) -> Post:
    """The post as it will be once stored, to build its activity in the same transaction."""
    return Post(
        id=0,
        uid=uid,
        slug=draft.slug,
        title=draft.title,
        summary=draft.summary,
        body_md=draft.body_md,
        body_html=body_html,
        tags=tuple(sorted(draft.tags)),
        image=draft.image,
        image_alt=draft.image_alt,
        published=published,
        updated=updated,
    )
