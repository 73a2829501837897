"""The desk's Write section: the author's posts, the editor, pinning and deleting.

* ``GET /admin/write``: every post (drafts, scheduled, published, pinned), with its
  responses and links; a form to pin or unpin, publish now, and a link to delete each.
* ``GET /admin/write/new``, ``GET /admin/write/edit/{slug}``: the editor, in Markdown,
  with the fields of a post file's front matter (blog.py). Its form posts to itself
  (multipart: it can carry an image) with one of the buttons in ``action``: Preview
  (the editor again, with the post rendered below by the same pipeline as its page),
  Upload (the image stored through the media store, its Markdown added to the text or
  made the cover), Save as draft, Schedule (a date in the future), Publish or Update.
  Whatever button is pressed, an image chosen is uploaded first. An error shows the
  form again as typed, with the reason in a sentence.
* ``POST /admin/write/pin/{slug}``, ``/unpin/{slug}``, ``/publish/{slug}``: as
  `fediblog post pin`, `unpin` and `publish`.
* ``GET /admin/write/delete/{slug}``: what deleting a post does on the fediverse, spelled
  out; its form ``POST``\\ s to the same path, which deletes as `fediblog post delete`
  if the post is still as the page described it (its uid and state), else shows the
  page again. A text field longer than a post file may be (2 MB) is a sentence too.

Every change goes through Blog (blog.py) and MediaStore (media.py), as the CLI's do.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import PurePath
from typing import Any

from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from fediblog.blog import draft_from_fields, missing_alt, preview_path
from fediblog.errors import FediblogError, PostError, PostNotFound
from fediblog.media import MAX_FILE_BYTES, MediaStore
from fediblog.models import Post, PostDraft, utcnow
from fediblog.render import local_images
from fediblog.web.admin.page import FormTooLarge, read_form, render
from fediblog.web.deps import Services, services

FIELDS = ("title", "slug", "summary", "tags", "body", "image", "image_alt", "published")
_SOURCE = "form"  # how blog.py's messages name the post: cut off, they read as sentences
# What the list says after an action (the slug is all the query carries).
DONE = {
    "deleted": "Deleted “{slug}”.",
    "pinned": "Pinned “{slug}”: first on the index, featured on your fediverse profile.",
    "unpinned": "Unpinned “{slug}”.",
}
SAVED = {
    "draft": "Saved as a draft: nobody sees it but you, and whoever you give the preview link.",
    "scheduled": "Scheduled: it goes out by itself on the date below (UTC).",
    "published": "Published: it is on the blog, and on its way to your followers.",
    "updated": "Updated: the page shows the new text, and your followers' servers are told.",
}


def actions_for(post: Post | None) -> tuple[str, ...]:
    """The editor's buttons: a published post can only be updated (it cannot become a
    draft again: blog.py); a new one, a draft or a scheduled post, saved as any."""
    if post is not None and post.state == "published":
        return ("preview", "upload", "update")
    return ("preview", "upload", "draft", "schedule", "publish")


@dataclass
class Editing:
    """The editor's form as typed, and what to say about it."""

    fields: dict[str, str]
    error: str = ""
    notice: str = ""
    warnings: list[str] = field(default_factory=list)
    preview: Post | None = None


def sentence(error: FediblogError) -> str:
    """A service's one-line error as a sentence for the page."""
    text = str(error).removeprefix(f"{_SOURCE}: ")
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "?", "!")) else text + "."


def fields_of(post: Post | None) -> dict[str, str]:
    if post is None:
        return dict.fromkeys(FIELDS, "")
    return {
        "title": post.title,
        "slug": post.slug,
        "summary": post.summary,
        "tags": ", ".join(post.tags),
        "body": post.body_md,
        "image": post.image or "",
        "image_alt": post.image_alt,
        # With its seconds: the form sends the date back, and an Update must not move
        # the post's date to the start of its minute (the input has step="1").
        "published": post.published.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _draft(typed: dict[str, str], *, is_draft: bool | None) -> PostDraft:
    """The form's fields through the same checks as a post file's front matter."""
    if not typed["title"].strip():
        raise PostError("Give the post a title.")
    meta: dict[str, Any] = {"title": typed["title"], "summary": typed["summary"]}
    for name in ("slug", "tags", "image", "published"):
        if typed[name].strip():
            meta[name] = typed[name].strip()
    meta["image_alt"] = typed["image_alt"]
    if is_draft is not None:
        meta["draft"] = is_draft
    return draft_from_fields(meta, typed["body"].replace("\r\n", "\n"), source=_SOURCE)


def _when(draft: PostDraft, action: str, now: datetime) -> PostDraft:
    """The date each button needs: Schedule one in the future; Publish none, or a past
    one (to backdate a post brought from elsewhere)."""
    if action == "schedule" and (draft.published is None or draft.published <= now):
        raise PostError("To schedule the post, give it a date and time in the future (UTC).")
    if action == "publish" and draft.published is not None and draft.published > now:
        raise PostError(
            "That date is in the future: press Schedule to publish it then,"
            " or clear the date to publish it now."
        )
    return draft


async def _upload(ctx: Services, form: FormData, typed: dict[str, str], editing: Editing) -> None:
    """Store the image chosen, if any, and put its Markdown in the text (or make it
    the cover). MediaError or PostError, with nothing changed, if it cannot be."""
    upload = form.get("upload")
    if not isinstance(upload, UploadFile) or not upload.filename:
        return
    alt = " ".join(str(form.get("upload_alt", "")).split())
    if not alt:
        raise PostError(
            "Describe the image in its alt text: readers who cannot see it hear that instead."
        )
    if "]" in alt or "[" in alt:
        raise PostError("The alt text cannot contain square brackets.")
    raw = await upload.read(MAX_FILE_BYTES + 1)
    name = PurePath(upload.filename).name or "upload"
    image = await MediaStore(ctx.settings, ctx.store).import_bytes(raw, name)
    path = image.path(image.largest[0])
    if form.get("upload_cover"):
        typed["image"], typed["image_alt"] = path, alt
        editing.notice = f"The image is uploaded and is now the cover image: {path}"
    else:
        snippet = f"![{alt}]({path})"
        typed["body"] = typed["body"].rstrip() + ("\n\n" if typed["body"].strip() else "") + snippet
        editing.notice = f"The image is uploaded and added at the end of the text: {snippet}"


def _check_images(draft: PostDraft) -> None:
    """An image named by a path the desk cannot import from: say so before saving."""
    shown = dict(draft.media)
    for src, _ in local_images(draft.body_md):
        if src not in shown:
            raise PostError(
                f"The image {src} is not on the blog yet: upload it with the form below"
                " and use the Markdown it gives."
            )


async def _editor(request: Request, post: Post | None) -> Response:
    ctx = services(request)
    typed = fields_of(post)
    editing = Editing(typed)
    saved = request.query_params.get("saved", "")
    if post is not None and saved in SAVED:
        editing.notice = SAVED[saved]
    return await _show(request, ctx, post, editing)


async def _show(
    request: Request, ctx: Services, post: Post | None, editing: Editing, status: int = 200
) -> Response:
    link = None
    if post is not None:
        if post.state == "published":
            link = ctx.blog.post_url(post)
        else:
            token = await ctx.store.get_preview_token(post.id)
            link = ctx.settings.url(preview_path(token)) if token else None
    return render(
        request,
        "admin/editor.html",
        title=f"Edit “{post.title}”" if post else "New post",
        status=status,
        post=post,
        link=link,
        f=editing.fields,
        editing=editing,
        action=f"/admin/write/edit/{post.slug}" if post else "/admin/write/new",
        max_mb=MAX_FILE_BYTES // 1_000_000,
    )


async def _submit(request: Request, post: Post | None) -> Response:
    """One press of an editor button (see the module docstring)."""
    ctx = services(request)
    try:
        form = await read_form(request)
    except FormTooLarge as error:  # nothing to show as typed: the form went unread
        editing = Editing(fields_of(post), error=error.detail)
        return await _show(request, ctx, post, editing, status=error.status_code)
    try:
        typed = {name: str(form.get(name, "")) for name in FIELDS}
        action = str(form.get("action", ""))
        editing = Editing(typed)
        if action not in actions_for(post):
            raise HTTPException(400, "press one of the editor's buttons")
        try:
            await _upload(ctx, form, typed, editing)
            if action == "upload":
                if not editing.notice:
                    raise PostError("Choose an image file to upload first.")
                return await _show(request, ctx, post, editing)
            is_draft = {"draft": True, "schedule": False, "publish": False}.get(action)
            draft = _when(_draft(typed, is_draft=is_draft), action, utcnow())
            draft = await ctx.blog.with_stored_images(draft, post)
            _check_images(draft)
            if action == "preview":
                editing.preview = ctx.blog.render_draft(draft, post)
                editing.warnings = [sentence(PostError(line)) for line in missing_alt(draft)]
                return await _show(request, ctx, post, editing)
            if action == "publish" and draft.published is None and post is not None:
                draft = replace(draft, published=utcnow())
            saved = await (
                ctx.blog.publish(draft) if post is None else ctx.blog.edit(post.slug, draft)
            )
        except FediblogError as error:
            if isinstance(error, PostNotFound):
                raise HTTPException(404, str(error)) from None
            editing.error = sentence(error)
            return await _show(request, ctx, post, editing, status=400)
    finally:
        await form.close()
    ctx.deliverer.wake()
    outcome = "updated" if action == "update" else {"draft": "draft"}.get(action, saved.state)
    return RedirectResponse(f"/admin/write/edit/{saved.slug}?saved={outcome}", status_code=303)


async def _post_of(request: Request) -> Post:
    try:
        return await services(request).blog.get(request.path_params["slug"])
    except PostNotFound:
        raise HTTPException(404, "no post has this slug (deleted, or renamed)") from None


async def posts(request: Request, *, error: str = "", status: int = 200) -> Response:
    ctx = services(request)
    listed = await ctx.store.list_authored_posts()
    links: dict[int, str] = {}
    for post in listed:
        if post.state == "published":
            links[post.id] = ctx.blog.post_url(post)
        else:
            token = await ctx.store.get_preview_token(post.id)
            links[post.id] = preview_path(token) if token else ""
    done = request.query_params.get("done", "")
    slug = request.query_params.get("slug", "")
    groups = [
        ("Drafts", [p for p in listed if p.state == "draft"]),
        (
            "Scheduled",
            sorted((p for p in listed if p.state == "scheduled"), key=lambda p: p.published),
        ),
        ("Published", [p for p in listed if p.state == "published"]),
    ]
    return render(
        request,
        "admin/posts.html",
        title="Write",
        status=status,
        groups=groups,
        links=links,
        notice=DONE[done].format(slug=slug) if done in DONE and slug else "",
        error=error,
    )


async def new_post(request: Request) -> Response:
    return await _editor(request, None)


async def create(request: Request) -> Response:
    return await _submit(request, None)


async def edit_post(request: Request) -> Response:
    return await _editor(request, await _post_of(request))


async def save(request: Request) -> Response:
    return await _submit(request, await _post_of(request))


async def _act(request: Request, done: str) -> Response:
    """Pin, unpin or publish now, from the list."""
    ctx = services(request)
    slug = request.path_params["slug"]
    await read_form(request)
    try:
        if done == "published":
            post = await ctx.blog.publish_now(slug)
            ctx.deliverer.wake()
            return RedirectResponse(
                f"/admin/write/edit/{post.slug}?saved={post.state}", status_code=303
            )
        await ctx.blog.pin(slug, pinned=done == "pinned")
    except PostNotFound:
        raise HTTPException(404, "no post has this slug (deleted, or renamed)") from None
    except PostError as error:
        return await posts(request, error=sentence(error), status=400)
    ctx.deliverer.wake()
    return RedirectResponse(f"/admin/write?done={done}&slug={slug}", status_code=303)


async def pin(request: Request) -> Response:
    return await _act(request, "pinned")


async def unpin(request: Request) -> Response:
    return await _act(request, "unpinned")


async def publish(request: Request) -> Response:
    return await _act(request, "published")


async def _confirmation(
    request: Request, post: Post, *, changed: bool = False, status: int = 200
) -> Response:
    ctx = services(request)
    followers, inboxes = await ctx.store.count_follower_inboxes()
    return render(
        request,
        "admin/posts_delete.html",
        title=f"Delete “{post.title}”?",
        status=status,
        post=post,
        url=ctx.blog.post_url(post),
        object_id=ctx.blog.object_id(post.uid),
        followers=followers,
        inboxes=inboxes,
        changed=changed,
    )


async def delete_page(request: Request) -> Response:
    return await _confirmation(request, await _post_of(request))


async def delete(request: Request) -> Response:
    """Delete, if the post is still the one the confirmation described: its form
    carries the post's uid and state, and a post published (or replaced under the same
    slug) since is shown again with what deleting it does now."""
    ctx = services(request)
    post = await _post_of(request)
    form = await read_form(request)
    if (form.get("uid"), form.get("state")) != (post.uid, post.state):
        return await _confirmation(request, post, changed=True, status=409)
    await ctx.blog.delete(post.slug)
    ctx.deliverer.wake()
    return RedirectResponse(f"/admin/write?done=deleted&slug={post.slug}", status_code=303)


routes = [
    Route("/admin/write", posts, methods=["GET"]),
    Route("/admin/write/new", new_post, methods=["GET"]),
    Route("/admin/write/new", create, methods=["POST"]),
    Route("/admin/write/edit/{slug}", edit_post, methods=["GET"]),
    Route("/admin/write/edit/{slug}", save, methods=["POST"]),
    Route("/admin/write/pin/{slug}", pin, methods=["POST"]),
    Route("/admin/write/unpin/{slug}", unpin, methods=["POST"]),
    Route("/admin/write/publish/{slug}", publish, methods=["POST"]),
    Route("/admin/write/delete/{slug}", delete_page, methods=["GET"]),
    Route("/admin/write/delete/{slug}", delete, methods=["POST"]),
]
