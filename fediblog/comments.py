"""Responses under a post: how they thread and what a reader sees of them.

``build_threads`` is pure: it turns the flat, oldest-first list the store returns into
a tree in one pass. Page order is that tree's, depth first, oldest first at every
level; the numbers readers see count the responses in that order (``SLUG#N``).

A post's page of responses holds at most ``per_page`` of them, whatever the threads'
shape: page k shows responses (k-1)·per_page+1 to k·per_page. A thread cut by the end
of a page ends with a link to the next page, which starts by naming the responses its
first replies continue (``Thread.continued``). ``load_page`` reads only the walk up to
that page (``Store.list_response_walk``) and the comments it shows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from fediblog.models import Comment, Thread
from fediblog.store import Store

MAX_DEPTH = 6  # deeper replies are shown at this depth, so a long chain stays readable


def build_threads(comments: Iterable[Comment], max_depth: int = MAX_DEPTH) -> list[Thread]:
    """Nest comments under their parents, oldest first at every level.

    A comment whose parent is not visible (held, private, or missing) is shown at
    the top level rather than lost. A deleted comment stays only as a placeholder
    for the replies under it; with none left, it disappears. Replies deeper than
    ``max_depth`` join their parent's level, which also bounds the recursion of
    whoever renders the tree.
    """
    by_id: dict[int, Comment] = {}
    for comment in comments:
        by_id[comment.id] = comment

    threads: dict[int, Thread] = {}
    depth: dict[int, int] = {}
    # A reply flattened into its parent's level never sorts before that parent, even if
    # its date says so (Store.list_response_walk orders the same way).
    moment: dict[int, datetime] = {}
    siblings_of: dict[int, list[Thread]] = {}  # comment id -> the list it was put in
    roots: list[Thread] = []
    # Ascending id is insertion order: a parent always exists before its reply, so
    # attaching only to a smaller id makes a cycle impossible whatever the data says.
    for comment_id in sorted(by_id):
        comment = by_id[comment_id]
        thread = Thread(comment)
        threads[comment_id] = thread
        parent_id = comment.parent_id
        moment[comment_id] = comment.published
        if parent_id is not None and parent_id < comment_id and parent_id in threads:
            if depth[parent_id] < max_depth:
                target = threads[parent_id].children
                depth[comment_id] = depth[parent_id] + 1
            else:
                target = siblings_of[parent_id]
                depth[comment_id] = depth[parent_id]
                moment[comment_id] = max(comment.published, moment[parent_id])
        else:
            target = roots
            depth[comment_id] = 1
        target.append(thread)
        siblings_of[comment_id] = target

    def by_date(thread: Thread) -> tuple[object, int]:
        return (moment[thread.comment.id], thread.comment.id)

    def order(level: list[Thread]) -> list[Thread]:
        level.sort(key=by_date)
        for thread in level:
            order(thread.children)
        return level

    return _prune_deleted(order(roots))


def _prune_deleted(threads: list[Thread]) -> list[Thread]:
    kept: list[Thread] = []
    for thread in threads:
        thread.children = _prune_deleted(thread.children)
        if not thread.deleted or thread.children:
            kept.append(thread)
    return kept


def count_responses(threads: Iterable[Thread]) -> int:
    """How many visible (not deleted) responses a forest of threads holds."""
    return sum(
        (0 if thread.deleted else 1) + count_responses(thread.children) for thread in threads
    )


# ---- pages of responses, by count ------------------------------------------------------

Step = tuple[int, str, str, bool]  # (id, list, path, deleted): Store.list_response_walk


def place_steps(walk: Sequence[Step]) -> list[int | None]:
    """The number each step of the walk shows with: a response its own, a placeholder
    the number of the first response under it (it shows on that response's page), and
    None for a placeholder with no response under it in the walk (not shown)."""
    places: list[int | None] = []
    number = 0
    for _, _, _, deleted in walk:
        number += not deleted
        places.append(None if deleted else number)
    next_path, next_number = None, None
    for index in range(len(walk) - 1, -1, -1):
        _, _, path, deleted = walk[index]
        if not deleted:
            next_path, next_number = path, places[index]
        elif next_path is not None and next_path.startswith(path):
            # Depth first: what lies under a placeholder follows it directly. A reply
            # flattened at MAX_DEPTH is not under it (build_threads prunes it too).
            places[index] = next_number
    return places


def page_of(number: int, per_page: int) -> int:
    return (number - 1) // per_page + 1


@dataclass(frozen=True, slots=True)
class ResponsesPage:
    """One page of a post's responses, as ``post.html`` shows them."""

    threads: list[Thread]  # top level of the page; ``continued`` ones hold its first replies
    continues: int | None  # the next page's first response, when it goes on with a thread


async def load_page(
    store: Store, post_id: int, page: int, per_page: int
) -> ResponsesPage | None:
    """Page ``page`` of a post's responses, or None past the last one (page 1 is never
    None). Reads the walk up to one response past the page, then the comments shown."""
    needed = page * per_page  # and one more: does the page's last thread go on?
    walk = await _walk_until(store, post_id, lambda w: _responses(w) > needed, needed + 64)
    places = place_steps(walk)
    shown = [i for i, place in enumerate(places) if place and page_of(place, per_page) == page]
    if not shown:
        return ResponsesPage([], None) if page == 1 else None
    by_path = {walk[i][2]: i for i in range(shown[0])}
    context: list[int] = []
    parent = walk[shown[0]][1]
    while parent in by_path:  # the first response's ancestors shown on earlier pages
        context.insert(0, by_path[parent])
        parent = walk[by_path[parent]][1]
    following = next((i for i in range(shown[-1] + 1, len(walk)) if places[i]), None)
    continues = walk[following][0] if following is not None and walk[following][1] else None
    comments = await store.list_comments_by_ids([walk[i][0] for i in context + shown])
    nodes: dict[str, Thread] = {}
    top: list[Thread] = []
    for index in context + shown:
        step_id, list_path, path, _ = walk[index]
        comment = comments.get(step_id)
        if comment is None:  # deleted for good since the walk: one response less shown
            continue
        node = Thread(comment, number=places[index] if comment.status != "deleted" else None)
        node.continued = index in context
        nodes[path] = node
        holder = nodes.get(list_path)
        (holder.children if holder is not None else top).append(node)
    return ResponsesPage(top, continues)


async def find_page(store: Store, post_id: int, comment_id: int, per_page: int) -> int | None:
    """The page of responses that shows this comment, or None if no reader sees it
    under that post (or it is a placeholder with nothing left under it)."""
    if not await store.is_visible_comment(post_id, comment_id):
        return None

    def where(walk: Sequence[Step]) -> int | None:
        return next((i for i, step in enumerate(walk) if step[0] == comment_id), None)

    def enough(walk: Sequence[Step]) -> bool:
        # A placeholder shows with the first response under it: walk on to it.
        found = where(walk)
        return found is not None and _responses(walk[found:]) > 0

    walk = await _walk_until(store, post_id, enough, 256)
    found = where(walk)
    place = None if found is None else place_steps(walk)[found]
    return None if place is None else page_of(place, per_page)


def _responses(walk: Sequence[Step]) -> int:
    return sum(not step[3] for step in walk)


async def _walk_until(
    store: Store, post_id: int, enough: Callable[[Sequence[Step]], bool], limit: int
) -> list[Step]:
    """The walk from the start, long enough for ``enough`` or whole: from ``limit``
    steps, then twice as many each time (placeholders make a page longer), so reading
    it all costs at most about twice one walk."""
    while True:
        walk = await store.list_response_walk(post_id, limit, max_depth=MAX_DEPTH)
        if len(walk) < limit or enough(walk):
            return walk
        limit *= 2
