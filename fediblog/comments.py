"""Responses under a post: how they thread and what a reader sees of them.

``build_threads`` is pure: it turns the flat, oldest-first list the store returns
(one query per page, whatever the number of comments) into a tree in one pass.
"""

from __future__ import annotations

from collections.abc import Iterable

from fediblog.models import Comment, Thread

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
    siblings_of: dict[int, list[Thread]] = {}  # comment id -> the list it was put in
    roots: list[Thread] = []
    # Ascending id is insertion order: a parent always exists before its reply, so
    # attaching only to a smaller id makes a cycle impossible whatever the data says.
    for comment_id in sorted(by_id):
        comment = by_id[comment_id]
        thread = Thread(comment)
        threads[comment_id] = thread
        parent_id = comment.parent_id
        if parent_id is not None and parent_id < comment_id and parent_id in threads:
            if depth[parent_id] < max_depth:
                target = threads[parent_id].children
                depth[comment_id] = depth[parent_id] + 1
            else:
                target = siblings_of[parent_id]
                depth[comment_id] = depth[parent_id]
        else:
            target = roots
            depth[comment_id] = 1
        target.append(thread)
        siblings_of[comment_id] = target

    def by_date(thread: Thread) -> tuple[object, int]:
        return (thread.comment.published, thread.comment.id)

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


def number_responses(threads: Iterable[Thread], first: int = 1) -> int:
    """Number the responses in page order (depth first, oldest first at every level),
    from ``first``, as ``count_responses`` counts them: a deleted placeholder gets no
    number. Returns the number the next response would get."""
    following = first
    for thread in threads:
        if not thread.deleted:
            thread.number = following
            following += 1
        following = number_responses(thread.children, following)
    return following
