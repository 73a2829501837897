"""The desk's Responses section: what readers and the fediverse said, and the author's
answers to it.

* ``GET /admin/responses``: the queue of held responses, each with why it was held
  (``comments.held_reason``), and the most recent responses whatever their status.
* ``GET /admin/responses/posts/{slug}``: a post's thread as the author sees it: held,
  rejected, private and blocked responses too, the published ones numbered as the
  public page numbers them, each with its actions and, if answerable, an answer form.
* ``POST /admin/responses/{id}/approve|reject|delete``: moderation.set_status, as
  ``fediblog comments approve|reject|delete`` does.
* ``POST /admin/responses/{id}/block-author|block-domain``: moderation.block_author_of,
  as ``fediblog block`` does with the author's actor URL or server.
* ``POST /admin/responses/{id}/answer``: answers.Answers.publish, as ``fediblog reply``
  does: Markdown, federated to the response's author (signed when delivered) and to
  the followers.
* ``POST /admin/responses/{id}/delete-answer``: answers.Answers.delete, as ``fediblog
  reply delete`` does: the author's own answer goes, and a Delete follows its copies.

An author's answer stays on the post when the response it answers is rejected or its
author blocked: the author decides (an answer may still read well alone). The page
after such an action says so and points at the answer, which the thread page marks as
out of context, with its delete button. A response under a deleted post cannot be
acted on (404): nobody sees it, and the dashboard does not count it.

Every POST answers with a 303 back to the page it came from (``back``, a path under
/admin), which says what was done; a refusal is a 4xx page saying why.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from fediblog import moderation
from fediblog.answers import AnswerError, Answers, list_in_page_order
from fediblog.comments import build_threads
from fediblog.models import Comment, ResponseEntry, Thread
from fediblog.web.admin.guard import safe_next
from fediblog.web.admin.page import read_form, render
from fediblog.web.deps import Services, services
from fediblog.web.paths import row_id

QUEUE = "/admin/responses"
RECENT = 30
# What the page says after each action (the 303 carries the key in ``?done=``).
DONE = {
    "approved": "Approved: the response is on the post now.",
    "rejected": "Rejected: readers no longer see it (approve it to bring it back).",
    "deleted": "Deleted: the response is gone from the post; its id will not come back.",
    "blocked-author": "Blocked the author: their responses are hidden and what they send"
    " next is dropped.",
    "blocked-domain": "Blocked the server: every response from it is hidden and what it"
    " sends next is dropped.",
    "answered": "Answered: your answer is under the response, and on its way to its author"
    " and to your followers.",
    "answer-deleted": "Deleted your answer: it is gone from the post, and a Delete is on its"
    " way to your followers and to the person it answered.",
}
# After these, an answer of the author's under what readers no longer see stays on the
# post: the page says so (``?done=KEY-answer``) and shows the answer.
_HIDING = ("rejected", "blocked-author", "blocked-domain")
for _key in _HIDING:
    DONE[f"{_key}-answer"] = DONE[_key] + (
        " Your answer under it is still on the post, where it now reads out of context:"
        " delete it too below if it does not stand alone."
    )


@dataclass(frozen=True, slots=True)
class Shown:
    """A response as the desk lists it."""

    comment: Comment
    post_slug: str
    post_title: str
    reason: str | None  # why it is held, if it is
    blocked: bool  # a block hides it from readers
    number: int | None = None  # its number on the public page, if readers see it
    out_of_context: bool = False  # an answer of the author's to what readers no longer see

    @property
    def answerable(self) -> bool:
        c = self.comment
        return (
            self.number is not None
            and c.status == "published"
            and not c.by_author
            and c.visibility in ("public", "unlisted")
        )


@dataclass(slots=True)
class Node:
    """A response and the replies under it, for the thread page."""

    shown: Shown
    children: list[Node] = field(default_factory=list)


def _shown(found: tuple[ResponseEntry, str | None, bool], number: int | None = None) -> Shown:
    entry, reason, blocked = found
    return Shown(entry.comment, entry.post_slug, entry.post_title, reason, blocked, number)


def _hidden(s: Shown) -> bool:
    """Whether readers no longer see a response: held, rejected, private or blocked."""
    c = s.comment
    return (
        s.blocked
        or c.status not in ("published", "deleted")
        or c.visibility not in ("public", "unlisted")
    )


def _in_context(shown: dict[int, Shown]) -> dict[int, Shown]:
    """``shown`` (a post's responses by id), the author's live answers to a response
    readers no longer see marked ``out_of_context``."""

    def mark(s: Shown) -> Shown:
        c = s.comment
        parent = shown.get(c.parent_id) if c.parent_id is not None else None
        if c.by_author and c.status == "published" and parent is not None and _hidden(parent):
            return replace(s, out_of_context=True)
        return s

    return {comment_id: mark(s) for comment_id, s in shown.items()}


async def _post_responses(ctx: Services, post_id: int) -> dict[int, Shown]:
    found = await ctx.store.list_responses_for_author(post_id)
    return _in_context({f[0].comment.id: _shown(f) for f in found})


def _done(request: Request) -> str | None:
    return DONE.get(request.query_params.get("done", ""))


async def queue(request: Request) -> Response:
    ctx = services(request)
    held = [_shown(found) for found in await ctx.store.list_held_responses()]
    held_total = await ctx.store.count_held_comments()  # the list stops at 200
    recent = [_shown(found) for found in await ctx.store.list_recent_responses(RECENT)]
    return render(
        request,
        "admin/responses.html",
        title="Responses",
        held=held,
        held_total=held_total,
        recent=recent,
        done=_done(request),
        back=QUEUE,
    )


async def thread(request: Request) -> Response:
    ctx = services(request)
    post = await ctx.store.get_post_by_slug(request.path_params["slug"])
    if post is None:
        return _problem(request, "No post has that address.", status=404)
    numbers = {c.id: n for n, c in enumerate(await list_in_page_order(ctx.store, post.id), 1)}
    found = await ctx.store.list_responses_for_author(post.id)
    shown = _in_context({f[0].comment.id: _shown(f, numbers.get(f[0].comment.id)) for f in found})

    def nodes(threads: list[Thread]) -> list[Node]:
        return [Node(shown[t.comment.id], nodes(t.children)) for t in threads]

    held = sum(1 for s in shown.values() if s.comment.status == "pending")
    return render(
        request,
        "admin/responses_thread.html",
        title=f"Responses to “{post.title}”",
        post=post,
        threads=nodes(build_threads(f[0].comment for f in found)),
        published=len(numbers),
        held=held,
        done=_done(request),
        back=f"{QUEUE}/posts/{post.slug}",
    )


def _problem(request: Request, message: str, *, status: int, back: str = QUEUE) -> Response:
    return render(
        request,
        "admin/responses_problem.html",
        title="That cannot be done",
        message=message,
        back=back,
        status=status,
    )


Action = Callable[[Services, int, dict[str, str]], Awaitable[None]]


async def _approve(ctx: Services, comment_id: int, form: dict[str, str]) -> None:
    await moderation.set_status(ctx.store, comment_id, "published")


async def _reject(ctx: Services, comment_id: int, form: dict[str, str]) -> None:
    await moderation.set_status(ctx.store, comment_id, "rejected")


async def _delete(ctx: Services, comment_id: int, form: dict[str, str]) -> None:
    await moderation.set_status(ctx.store, comment_id, "deleted")


async def _block_author(ctx: Services, comment_id: int, form: dict[str, str]) -> None:
    await moderation.block_author_of(ctx.store, comment_id, own_host=ctx.settings.host)
    await ctx.inbox.load_blocks()  # this process drops their next activity at once


async def _block_domain(ctx: Services, comment_id: int, form: dict[str, str]) -> None:
    await moderation.block_author_of(
        ctx.store, comment_id, own_host=ctx.settings.host, whole_domain=True
    )
    await ctx.inbox.load_blocks()


async def _answer(ctx: Services, comment_id: int, form: dict[str, str]) -> None:
    row = await ctx.store.get_stored_comment(comment_id)
    assert row is not None  # _act checked
    # The permalink names the response whatever new replies do to the page's numbers.
    await Answers(ctx.settings, ctx.store).publish(
        f"/posts/{row.slug}/comments/{comment_id}", form.get("text", "")
    )
    ctx.deliverer.wake()


async def _delete_answer(ctx: Services, comment_id: int, form: dict[str, str]) -> None:
    await Answers(ctx.settings, ctx.store).delete(str(comment_id))
    ctx.deliverer.wake()


ACTIONS: dict[str, tuple[Action, str]] = {
    "approve": (_approve, "approved"),
    "reject": (_reject, "rejected"),
    "delete": (_delete, "deleted"),
    "block-author": (_block_author, "blocked-author"),
    "block-domain": (_block_domain, "blocked-domain"),
    "answer": (_answer, "answered"),
    "delete-answer": (_delete_answer, "answer-deleted"),
}


def _back(value: str | None) -> str:
    """Where the form came from: a path under /admin (never elsewhere), no query."""
    return urlsplit(safe_next(value)).path


async def _act(request: Request) -> Response:
    ctx = services(request)
    name = request.url.path.rsplit("/", 1)[-1]
    action, done = ACTIONS[name]
    form = {k: v for k, v in (await read_form(request)).items() if isinstance(v, str)}
    back = _back(form.get("back"))
    comment_id: int = request.path_params["comment_id"]
    row = await ctx.store.get_stored_comment(comment_id)
    if row is None:
        return _problem(request, f"No response has the number {comment_id}.", status=404, back=back)
    if await ctx.store.get_desk_response(comment_id) is None:
        message = f"Response {comment_id} cannot be changed: its post was deleted."
        return _problem(request, message, status=404, back=back)
    try:
        await action(ctx, comment_id, form)
    except (moderation.ModerationError, AnswerError) as error:
        return _problem(request, str(error), status=400, back=back)
    if done in _HIDING:
        stranded = [
            s.comment.id
            for s in (await _post_responses(ctx, row.post_id)).values()
            if s.out_of_context
        ]
        if stranded:  # shown where the answer is, with its delete button
            where = f"{QUEUE}/posts/{row.slug}?done={done}-answer#response-{stranded[0]}"
            return RedirectResponse(where, status_code=303)
    return RedirectResponse(f"{back}?done={done}#response-{comment_id}", status_code=303)


routes = [
    Route(QUEUE, queue, methods=["GET"]),
    Route(QUEUE + "/posts/{slug}", thread, methods=["GET"]),
    *[Route(f"{QUEUE}/{row_id('comment_id')}/{name}", _act, methods=["POST"]) for name in ACTIONS],
]
