"""The ``fediblog`` command: init, serve, worker, demo, post, media, followers, deliveries,
inbox, comments, feeds, reply, block, backup, restore, admin and check.

Every failure a user can cause ends as one line on stderr and a non-zero exit:
2 for a wrong setting or usage, 1 for a command that could not be done. A database
that fails under a command (read-only, full, locked, damaged) is one line too.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import re
import shlex
import sqlite3
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fediblog.blog import Blog, missing_alt, read_post_file
from fediblog.config import (
    NoBaseUrl,
    Settings,
    find_blog,
    is_database_url,
    load_settings,
    without_password,
    write_config,
)
from fediblog.errors import ConfigError, FediblogError, StorageError
from fediblog.keys import ensure_keys, fingerprint, load_key
from fediblog.models import Post, PostDraft, actor_address, actor_handle, format_ts, utcnow
from fediblog.store import PostgresStore, Store, copy_blog

if TYPE_CHECKING:
    import socket

    from fediblog.server import Timeouts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fediblog",
        description="A blog whose posts live in the fediverse.",
        epilog="The blog is the folder --data names, else FEDIBLOG_CONFIG's folder, else the"
        " current one: its fediblog.toml, data/ and keys/. FEDIBLOG_* variables override"
        " fediblog.toml; see README.md.",
    )
    parser.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="the blog's folder: fediblog.toml, data/fediblog.db, data/media/, keys/",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = commands.add_parser(
        "init",
        help="create fediblog.toml, the database and the key pairs (idempotent)",
        description="Creates the blog in its folder: fediblog.toml from the options given"
        " (never overwriting a different one), data/fediblog.db and keys/.",
    )
    init.add_argument("--base-url", metavar="URL", help="the public https address, once for all")
    init.add_argument("--handle", help="the blog's username, @HANDLE@HOST (blog), once for all")
    init.add_argument("--title", help="the blog's title")
    init.add_argument("--author", help="the author's name")

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (8000)")
    serve.add_argument(
        "--web-only",
        action="store_true",
        help="serve requests only: the background work runs in `fediblog worker` processes",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="web processes serving the port (1); with more than one, a worker process runs"
        " the background work beside them (none with --web-only)",
    )
    serve.add_argument(
        "--worker-process",
        action="store_true",
        help="one web process, and the background work in a second process forked from it:"
        " replies and deliveries get a core of their own",
    )

    worker = commands.add_parser(
        "worker",
        help="run the background work (inbox, delivery, crawl, schedule, notify, prune) in its own"
        " process",
        description="Runs the background work against the blog's database until SIGTERM or"
        " SIGINT, beside `fediblog serve --web-only`. Work another process queues wakes it"
        " within a tenth of a second; what it had claimed when killed comes back to any"
        " worker once its lease ends.",
    )
    worker.add_argument(
        "--only",
        metavar="ROLES",
        help="comma-separated: inbox,delivery,crawl,schedule,notify,prune (default: all)",
    )
    # `serve --worker-process` starts a worker again with this: it stops with that process.
    worker.add_argument("--parent", type=int, metavar="PID", help=argparse.SUPPRESS)

    demo = commands.add_parser(
        "demo", help="run a local demo blog with posts and comments on http://127.0.0.1:8000"
    )
    demo.add_argument("--port", type=int, default=8000, help="port to bind (8000)")
    demo.add_argument("--database", type=Path, help="(data/demo.db in the blog's folder)")

    post = commands.add_parser("post", help="publish, edit, delete and list posts")
    post_commands = post.add_subparsers(dest="post_command", required=True, metavar="ACTION")
    new = post_commands.add_parser("new", help="publish a Markdown file with front matter")
    new.add_argument("file", type=Path)
    edit = post_commands.add_parser("edit", help="replace a post's content from a file")
    edit.add_argument("slug")
    edit.add_argument("file", type=Path)
    delete = post_commands.add_parser(
        "delete", help="delete a post (its page then answers 404, its id /p/UID 410)"
    )
    delete.add_argument("slug")
    post_commands.add_parser("list", help="list the posts: published, drafts and scheduled")
    for action, text in (
        ("preview", "print a draft's or scheduled post's secret preview URL"),
        ("publish", "publish a draft or scheduled post now (a future date: schedule it)"),
        ("pin", "pin a post: first on the index, featured on the fediverse profile"),
        ("unpin", "unpin a post"),
    ):
        post_commands.add_parser(action, help=text).add_argument("slug")

    media = commands.add_parser("media", help="the images in the media store: list, prune")
    media_commands = media.add_subparsers(dest="media_command", metavar="ACTION")
    media_commands.add_parser("list", help="hash, size, type and the posts using each (default)")
    media_commands.add_parser("prune", help="delete the images no post, avatar or header uses")

    followers = commands.add_parser("followers", help="list followers; approve or reject requests")
    follower_commands = followers.add_subparsers(dest="followers_command", metavar="ACTION")
    follower_commands.add_parser("list", help="the accepted followers (the default)")
    follower_commands.add_parser("pending", help="follow requests waiting for approval")
    for action in ("approve", "reject"):
        sub = follower_commands.add_parser(action, help=f"{action} a pending follow request")
        sub.add_argument("actor", help="the follower's actor URL, as `pending` shows it")
    remove = follower_commands.add_parser(
        "remove", help="remove a follower (its server is sent a Reject of its Follow)"
    )
    remove.add_argument("actor", help="the follower's actor URL, as `list` shows it")

    comments = commands.add_parser("comments", help="list, approve, reject or delete comments")
    comment_commands = comments.add_subparsers(dest="comments_command", metavar="ACTION")
    listing = comment_commands.add_parser("list", help="the newest comments (the default)")
    # On both, so `comments --pending` means `comments list --pending`; SUPPRESS keeps
    # one parser's default from overwriting what was given to the other.
    for lister in (comments, listing):
        lister.add_argument(
            "--pending",
            action="store_true",
            default=argparse.SUPPRESS,
            help="only those held for approval",
        )
        lister.add_argument(
            "--since",
            metavar="DURATION",
            default=argparse.SUPPRESS,
            help="only those received in the last DURATION: 45m, 2h, 3d, 1w or 1h30m",
        )
    for action, text in (
        ("approve", "publish a held comment"),
        ("reject", "hide a comment (it stays in the database)"),
        ("delete", "delete a comment (replies stay, under a placeholder)"),
    ):
        sub = comment_commands.add_parser(action, help=text)
        sub.add_argument("id", type=int, help="the comment's number, as `comments list` shows it")

    feeds = commands.add_parser(
        "feeds", help="the private feed of new and held responses, and the webhook's state"
    )
    feeds_commands = feeds.add_subparsers(dest="feeds_command", metavar="ACTION")
    feeds_commands.add_parser("show", help="print the private feed's URL (the default)")
    feeds_commands.add_parser("rotate", help="replace the private feed's URL (the old one: 404)")

    reply = commands.add_parser(
        "reply",
        help="answer a response as the blog's author; edit or delete an answer",
        usage="fediblog reply TARGET (FILE.md | --text TEXT)\n"
        "       fediblog reply edit ID (FILE.md | --text TEXT)\n"
        "       fediblog reply delete ID",
        description="TARGET is a response's permalink (/posts/SLUG/comments/ID, where its"
        " number on the page links: stable), SLUG#N (the response numbered N on the post's"
        " page: a new reply above it shifts N) or a response's ActivityPub id; ID is what"
        " `reply` printed: the answer's number or id.",
    )
    reply.add_argument("words", nargs="+", metavar="TARGET [FILE.md]", help=argparse.SUPPRESS)
    reply.add_argument("--text", help="the answer, in Markdown (instead of FILE.md)")
    reply.set_defaults(reply_usage=reply.error)

    block = commands.add_parser("block", help="block an actor URL or a whole domain")
    block.add_argument("target", help="https://server/users/name or server.example")
    unblock = commands.add_parser("unblock", help="lift a block")
    unblock.add_argument("target")
    commands.add_parser("blocks", help="list the blocks")

    deliveries = commands.add_parser(
        "deliveries", help="the delivery queue: queued, failed and dead deliveries"
    )
    deliveries.add_argument("--sent", action="store_true", help="also list sent ones")
    deliveries.add_argument("--limit", type=int, default=50, help="rows to show (50)")
    delivery_commands = deliveries.add_subparsers(dest="deliveries_command", metavar="ACTION")
    delivery_commands.add_parser(
        "hosts", help="per host: waiting, failing, failed and dead deliveries, last error"
    )
    retry = delivery_commands.add_parser(
        "retry",
        help="make failing, failed and dead deliveries due now, attempts reset",
        description="Queues the failing, failed and dead deliveries (to HOST, or the one"
        " numbered --id, or all of them) again, due now, with a new round of attempts.",
    )
    retry.add_argument("host", nargs="?", help="only those to this host (host[:port])")
    retry.add_argument("--id", type=int, help="only this delivery (the number the list shows)")

    inbox = commands.add_parser(
        "inbox", help="the inbox queue: activities waiting to retry or failed, with reasons"
    )
    inbox.add_argument("--all", action="store_true", help="also list processed ones")
    inbox.add_argument("--limit", type=int, default=50, help="rows to show (50)")

    backup = commands.add_parser(
        "backup", help="copy the database and the keys into a new folder (safe while serving)"
    )
    backup.add_argument("folder", type=Path, help="a new or empty folder")
    restore = commands.add_parser("restore", help="put a backup's database and keys back")
    restore.add_argument("folder", type=Path, help="a folder `fediblog backup` wrote")
    restore.add_argument(
        "--force",
        action="store_true",
        help="replace an existing database and keys (stop the server first)",
    )

    migrate = commands.add_parser(
        "migrate",
        help="move the blog from its SQLite file to a PostgreSQL database (keys untouched)",
        description="Copies every row of the SQLite database into an empty PostgreSQL"
        " database, ids and all, in one transaction: a failed copy leaves it empty. Stop"
        " the server first; afterwards, set FEDIBLOG_DATABASE to the URL and start it. The"
        " SQLite file is only read, and the keys stay where they are.",
    )
    migrate.add_argument(
        "--from", dest="source", type=Path, required=True, metavar="FILE",
        help="the SQLite database (data/fediblog.db)",
    )  # fmt: skip
    migrate.add_argument(
        "--to", dest="target", required=True, metavar="URL",
        help="postgresql://user:password@host/database, an empty database",
    )  # fmt: skip

    check = commands.add_parser(
        "check",
        help="test the blog through its public URL: TLS, discovery, actor, signatures, proxy",
        description="From the server, through FEDIBLOG_BASE_URL: one line per check (ok,"
        " FAIL or skip); exits 1 if any failed.",
    )
    check.add_argument(
        "--peer", metavar="URL", help="a server whose Date header to compare clocks with"
    )

    admin = commands.add_parser("admin", help="the web admin at /admin: password, sessions")
    admin_commands = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    password = admin_commands.add_parser(
        "password", help="set the author's password, asked twice (signs out everywhere)"
    )
    password.add_argument(
        "--stdin", action="store_true", help="read it from standard input (one line), for scripts"
    )
    admin_commands.add_parser("sessions", help="list the browsers signed in")
    admin_commands.add_parser("signout-all", help="sign out every browser")
    return parser


async def _with_blog(
    settings: Settings, action: Callable[[Blog], Awaitable[None]], *, create: bool = False
) -> None:
    # Only `init` and `demo` create a database: anywhere else a missing one is a wrong
    # folder, and an empty blog made there would hide the real one.
    store = await Store.open(settings.store_location, create=create)
    try:
        await action(Blog(settings, store))
    finally:
        await store.close()


# The commands that work without a database: they make one, bring one back, or look
# at the blog from outside.
_NO_DATABASE_NEEDED = ("init", "demo", "restore", "check")


def _where(settings: Settings) -> str:
    """The database, as a person is told where it is: never its password."""
    return settings.database_location_shown


def _require_blog(settings: Settings, data: Path | None) -> None:
    """One line, and nothing created, when the blog is not where we looked."""
    if settings.database_url or settings.database.exists():
        return  # a PostgreSQL server's database: opening it says what is wrong
    folder = find_blog(data).folder
    named = "the current folder" if folder == Path(".") else shlex.quote(str(folder))
    flag = f" --data {shlex.quote(str(data))}" if data is not None else ""
    raise ConfigError(
        f"no blog in {named} (no database {settings.database}): run `fediblog init` first"
        f" (`fediblog{flag} init --base-url https://YOUR.DOMAIN` makes a new blog there),"
        " or name your blog's folder with `fediblog --data DIR` or FEDIBLOG_CONFIG"
    )


def _load(args: argparse.Namespace) -> Settings:
    """The settings, or the one line that says there is no blog here at all: a folder
    with neither a database nor a base URL gets that, not "the address is not set"."""
    try:
        return load_settings(data=args.data)
    except NoBaseUrl:
        if args.command not in _NO_DATABASE_NEEDED:
            local = load_settings(data=args.data, allow_http=True)
            _require_blog(local, args.data)
        raise


def _init(args: argparse.Namespace) -> None:
    given = {"base_url": args.base_url, "handle": args.handle}
    given.update(title=args.title, author=args.author)
    values = {key: value.strip() for key, value in given.items() if value is not None}
    if values:
        for key, value in values.items():  # the environment would win over the file
            env = os.environ.get(f"FEDIBLOG_{key.upper()}")
            if env is not None and env.strip() != value:
                raise ConfigError(
                    f"FEDIBLOG_{key.upper()} is set to {env!r}, which would win over"
                    f" --{key.replace('_', '-')}: unset it, or leave the option out"
                )
        load_settings(data=args.data, **values)  # all of it valid before anything is written
        where = find_blog(args.data)
        if not where.config.exists():  # a new file names the handle: it is for good
            handle = os.environ.get("FEDIBLOG_HANDLE", "blog").strip()
            values = {"base_url": values.pop("base_url", ""), "handle": handle, **values}
            values = {key: value for key, value in values.items() if value}
        if write_config(where.config, values):
            print(f"created {where.config}")
    settings = load_settings(data=args.data)
    created = ensure_keys(settings.keys_dir)

    async def migrate(blog: Blog) -> None:
        await blog.store.migrate()

    asyncio.run(_with_blog(settings, migrate, create=True))
    print(f"database ready: {_where(settings)}")
    for path in created:
        print(f"created {path}")
    if not any(path.suffix == ".pem" for path in created):
        print(f"keys present in {settings.keys_dir} (kept as they are)")
    print(f"the blog is @{settings.acct} at {settings.base_url}")
    print(f"its key: {fingerprint(load_key(settings.keys_dir, 'blog').public_pem)}")


MAX_WEB_PROCESSES = 64


def _serve(
    settings: Settings,
    host: str,
    port: int,
    *,
    web_only: bool = False,
    workers: int = 1,
    worker_process: bool = False,
    data: Path | None = None,
) -> int:
    # Imported here: only `serve` and `demo` need uvicorn and the app.
    from fediblog.app import create_app
    from fediblog.preflight import check_before_serving
    from fediblog.server import Timeouts, bind, serve, serve_on, socket_of_its_own

    if not 1 <= workers <= MAX_WEB_PROCESSES:
        raise UsageError(f"--workers takes 1 to {MAX_WEB_PROCESSES} web processes, not {workers}")
    if worker_process and (web_only or workers > 1):
        other = "--web-only leaves it to `fediblog worker`"
        if not web_only:
            other = "--workers runs it in a worker process already"
        raise UsageError(f"--worker-process runs the background work, and {other}")
    check_before_serving(settings)
    _check_face(settings)
    timeouts = Timeouts(
        header=settings.header_timeout,
        body=settings.body_timeout,
        keep_alive=settings.keep_alive_timeout,
        shutdown=settings.shutdown_timeout,
    )
    if worker_process:
        return _serve_beside_a_worker(settings, host, port, timeouts, data)
    if workers == 1:
        what = " (web only: background work is left to `fediblog worker`)" * web_only
        print(f"fediblog: serving @{settings.acct} on http://{host}:{port}{what}", file=sys.stderr)
        serve(create_app(settings, web_only=web_only), host, port, timeouts)
        return 0

    from fediblog.supervisor import Child, Supervisor

    # Once, before the children start: each would otherwise compare the avatar and the
    # profile with what the database remembers at the same moment, and each queue an
    # Update of the actor when they changed.
    asyncio.run(_with_blog(settings, _sync_face))
    sock = bind(host, port, spread=True)

    def web() -> None:
        app = create_app(settings, web_only=True, processes=workers)
        serve_on(app, socket_of_its_own(sock), timeouts)

    children = [Child(f"web process {n}", web) for n in range(1, workers + 1)]
    if not web_only:
        children.append(Child("worker process", functools.partial(_forked_worker, settings, sock)))
    beside = " and background work left to `fediblog worker`" if web_only else " and a worker"
    print(
        f"fediblog: serving @{settings.acct} on http://{host}:{port} with {workers} web"
        f" processes{beside} (pid {os.getpid()})",
        file=sys.stderr,
        flush=True,
    )
    try:
        return Supervisor(children, grace=timeouts.shutdown).run()
    finally:
        sock.close()


def _serve_beside_a_worker(
    settings: Settings, host: str, port: int, timeouts: Timeouts, data: Path | None
) -> int:
    """`serve --worker-process`: this process serves; the worker is forked from it
    while neither holds a database connection, a thread or a running event loop
    (supervisor.Companion)."""
    from fediblog.app import create_app  # with all the worker needs: imported once, shared
    from fediblog.server import bind, prepared, serve_on
    from fediblog.supervisor import Companion
    from fediblog.web.templating import build_templates, compile_all

    sock = bind(host, port)
    # Built before the fork: the app, uvicorn's server and every template; and the
    # pages asked for most served once (app.rehearse). Done after it, by the web process
    # alone, the work would write to pages the two processes still share (reference
    # counts, code run for the first time), and each page written to is then held
    # twice (tests/bench/README.md, idle memory).
    server = prepared(create_app(settings, web_only=True), timeouts)
    compile_all(build_templates())
    _rehearse(settings)

    def respawn(parent: int) -> list[str]:
        folder = ["--data", str(data)] if data is not None else []
        return [sys.executable, "-m", "fediblog", *folder, "worker", "--parent", str(parent)]

    worker = functools.partial(_forked_worker, settings, sock)
    companion = Companion("worker process", worker, respawn, grace=timeouts.shutdown)
    print(
        f"fediblog: serving @{settings.acct} on http://{host}:{port} (pid {os.getpid()})"
        " and a worker process forked from it",
        file=sys.stderr,
        flush=True,
    )
    companion.start()
    try:
        serve_on(server, sock)
    finally:
        companion.stop()
        sock.close()
    return 1 if companion.failed else 0


async def _sync_face(blog: Blog) -> None:
    from fediblog.media import MediaStore

    await MediaStore(blog.settings, blog.store).sync_face(
        load_key(blog.settings.keys_dir, "blog").public_pem
    )


def _worker(settings: Settings, only: str | None, parent: int | None = None) -> None:
    from fediblog.preflight import check_before_serving
    from fediblog.runtime import ROLES

    if parent is not None:
        from fediblog.supervisor import die_with

        die_with(parent)

    roles: tuple[str, ...] = ROLES
    if only is not None:
        named = [part.strip().lower() for part in only.split(",") if part.strip()]
        if not named:
            raise UsageError(f"--only needs at least one of: {','.join(ROLES)}")
        unknown = [name for name in named if name not in ROLES]
        if unknown:
            given = ", ".join(repr(name) for name in unknown)
            raise UsageError(f"--only takes roles from {','.join(ROLES)}, not {given}")
        roles = tuple(role for role in ROLES if role in named)
    check_before_serving(settings)
    _run_worker(settings, roles)


def _forked_worker(settings: Settings, sock: socket.socket) -> None:
    """The worker forked by `serve --workers N` or `--worker-process`."""
    sock.close()  # it serves no request: the port is free once the web processes stop
    _run_worker(settings)


def _run_worker(settings: Settings, roles: tuple[str, ...] | None = None) -> None:
    """The worker process's work (``fediblog worker``, or ``serve --workers N``'s
    worker): ``roles``, all of them when None, until SIGTERM or SIGINT."""
    import logging

    from fediblog.runtime import ROLES, run_worker

    roles = roles or ROLES
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(
        f"fediblog: worker for @{settings.acct} running {', '.join(roles)}"
        f" on {_where(settings)} (pid {os.getpid()})",
        file=sys.stderr,
        flush=True,
    )
    _on_uvloop(run_worker(settings, roles))
    print("fediblog: worker stopped", file=sys.stderr)


def _rehearse(settings: Settings) -> None:
    """app.rehearse on its own event loop, then the threads it started waited for (a
    thread pool's workers, told to stop as the loop ended): a fork copies only the
    thread that forks, and a lock another thread held at that moment would stay held
    in the child. Not forever: a thread that does not end within 10 s is left to end."""
    from fediblog.app import rehearse

    threads = set(threading.enumerate())
    _on_uvloop(rehearse(settings))
    for thread in set(threading.enumerate()) - threads:
        thread.join(timeout=10)


def _on_uvloop(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` on uvloop, as `serve` runs (uvicorn picks it): the same event loop,
    the same costs."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # not on this platform (pyproject.toml): asyncio's own loop
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(work)


def _check_face(settings: Settings) -> None:
    """FEDIBLOG_AVATAR and FEDIBLOG_HEADER are images we can use: one line, before
    listening, rather than a failed start-up (the app imports them in its lifespan)."""
    from fediblog.media import prepare_image

    for given in (settings.avatar, settings.header):
        if given:
            prepare_image(Path(given).expanduser())


def _demo(args: argparse.Namespace) -> None:
    from fediblog.demo import seed_demo

    # The demo is local by definition: its own database, plain http on loopback.
    database = args.database or find_blog(args.data).folder / "data" / "demo.db"
    settings = load_settings(
        data=args.data,
        database=database,
        base_url=f"http://127.0.0.1:{args.port}",
        allow_http=True,
    )
    ensure_keys(settings.keys_dir)

    async def seed(blog: Blog) -> None:
        if await seed_demo(blog, blog.store):
            print(f"demo content written to {settings.database}", file=sys.stderr)

    asyncio.run(_with_blog(settings, seed, create=True))
    data = f" --data {shlex.quote(str(args.data))}" if args.data is not None else ""
    print(
        "fediblog: moderate the demo's comments with: FEDIBLOG_DATABASE="
        f"{shlex.quote(str(database))} FEDIBLOG_ALLOW_HTTP=1 fediblog{data} comments --pending",
        file=sys.stderr,
    )
    _serve(settings, "127.0.0.1", args.port)


def _post(settings: Settings, args: argparse.Namespace) -> None:
    async def run(blog: Blog) -> None:
        if args.post_command == "new":
            post = await blog.publish(await _read_post_with_images(blog, args.file))
            if post.state == "published":
                print(f"published {blog.post_url(post)}")
            else:  # nothing was sent: say so, and where to see it
                preview = await blog.preview_url(post.slug)
                print(f"{_state_of(post)}: {post.slug} (preview: {preview})")
        elif args.post_command == "edit":
            post = await blog.edit(args.slug, await _read_post_with_images(blog, args.file))
            state = "" if post.state == "published" else f" ({_state_of(post)})"
            print(f"updated {blog.post_url(post)}{state}")
        elif args.post_command == "delete":
            post = await blog.delete(args.slug)
            print(f"deleted {post.slug} ({blog.object_id(post.uid)} now answers 410)")
        elif args.post_command == "preview":
            print(await blog.preview_url(args.slug))
        elif args.post_command == "publish":
            post = await blog.publish_now(args.slug)
            print(f"{_state_of(post)}: {blog.post_url(post)}")
        elif args.post_command in ("pin", "unpin"):
            post = await blog.pin(args.slug, pinned=args.post_command == "pin")
            kind = "Add" if post.pinned else "Remove"
            print(f"{args.post_command}ned {post.slug}; the {kind} is queued for delivery")
        else:
            posts = await blog.store.list_authored_posts()
            if not posts:
                print("no posts yet")
            for post in posts:
                pinned = ", pinned" if post.pinned else ""
                responses = "response" if post.response_count == 1 else "responses"
                print(
                    f"{format_ts(post.published)}  {post.slug}  [{_state_of(post)}{pinned}]  "
                    f"({post.response_count} {responses})  {post.title}"
                )

    asyncio.run(_with_blog(settings, run))


def _state_of(post: Post) -> str:
    """How `post list` and `post new` name a post's state: published, draft, scheduled for …"""
    if post.state == "scheduled":
        return f"scheduled for {format_ts(post.published)}"
    return post.state


async def _read_post_with_images(blog: Blog, path: Path) -> PostDraft:
    """A post file with its local images imported; a warning line (stderr) for each image
    without alt text, which the post is published with all the same."""
    draft = await blog.import_images(read_post_file(path), path)
    for line in missing_alt(draft):
        print(f"fediblog: warning: {path}: {line}", file=sys.stderr)
    return draft


def _media(settings: Settings, args: argparse.Namespace) -> None:
    from fediblog.media import MediaStore, describe

    async def run(blog: Blog) -> None:
        media = MediaStore(settings, blog.store)
        if args.media_command == "prune":
            count, freed = await media.prune()
            images = "image" if count == 1 else "images"
            print(f"pruned {count} unused {images}, {freed:,} bytes freed")
            return
        entries = await media.list_entries()
        if not entries:
            print("no images yet")
        for line in describe(entries):
            print(line)

    asyncio.run(_with_blog(settings, run))


def _followers(settings: Settings, args: argparse.Namespace) -> None:
    from fediblog import followers

    async def run(blog: Blog) -> None:
        store = blog.store
        action = args.followers_command or "list"
        if action in ("approve", "reject", "remove"):
            await getattr(followers, action)(settings, store, args.actor)
            verb = {"approve": "approved", "reject": "rejected", "remove": "removed"}[action]
            print(f"{verb} {args.actor}; the answer is queued for delivery")
            return
        status = "pending" if action == "pending" else "accepted"
        found = await store.list_followers(status=status)
        if not found:
            print("no pending follow requests" if status == "pending" else "no followers yet")
        for follower in found:
            print(f"{format_ts(follower.created)}  {follower.actor}")

    asyncio.run(_with_blog(settings, run))


def _deliveries(settings: Settings, args: argparse.Namespace) -> None:
    from fediblog.delivery import list_delivery_hosts, retry_deliveries

    async def run(blog: Blog) -> None:
        if args.deliveries_command == "retry":
            count = await retry_deliveries(blog.store, host=args.host, delivery_id=args.id)
            which = f" to {args.host}" if args.host else ""
            which += f" numbered {args.id}" if args.id is not None else ""
            print(f"{count} deliveries{which} due now; the server sends them within a second")
            return
        if args.deliveries_command == "hosts":
            hosts = await list_delivery_hosts(blog.store)
            if not hosts:
                print("no deliveries waiting or failing")
            for host in hosts:
                error = f"  ({host.last_error})" if host.last_error else ""
                print(
                    f"{host.host}  waiting={host.waiting} failing={host.failing}"
                    f" failed={host.failed} dead={host.dead}{error}"
                )
            return
        counts = await blog.store.count_deliveries()
        summary = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("queued", "sent", "failed", "dead"))
        print(f"deliveries: {summary}")
        statuses = (
            ("queued", "failed", "dead", "sent") if args.sent else ("queued", "failed", "dead")
        )
        for row in await blog.store.list_deliveries(statuses, limit=max(1, args.limit)):
            when = row.next_attempt if row.status == "queued" else row.finished
            error = f"  ({row.last_error})" if row.last_error else ""
            print(
                f"{row.id:>6} {row.status:<6} {row.type:<7}"
                f" attempts={row.attempts:<2} {format_ts(when) if when else None}"
                f"  {row.inbox}{error}"
            )

    asyncio.run(_with_blog(settings, run))


def _inbox(settings: Settings, args: argparse.Namespace) -> None:
    async def run(blog: Blog) -> None:
        counts = await blog.store.count_inbox()
        summary = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("queued", "done", "failed"))
        print(f"inbox: {summary}")
        rows = await blog.store.list_inbox(problems_only=not args.all, limit=max(1, args.limit))
        for row in rows:
            if row.status == "queued" and row.error:
                retry_at = format_ts(row.next_attempt) if row.next_attempt else None
                state = f"retry  attempts={row.attempts:<2} at {retry_at}"
            else:
                state = f"{row.status:<6} attempts={row.attempts:<2} {format_ts(row.received)}"
            error = f"  ({row.error})" if row.error else ""
            print(f"{row.id:>7} {state}  {row.type:<8} {row.actor}{error}")

    asyncio.run(_with_blog(settings, run))


class UsageError(FediblogError):
    """A command line that cannot mean anything (one line, exit 2)."""


_DURATION_PART = re.compile(r"(\d{1,7})([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_duration(text: str) -> timedelta:
    """``45m``, ``2h``, ``3d``, ``1w``, or parts together (``1h30m``): a span of time."""
    value = text.strip().lower()
    if not value or _DURATION_PART.sub("", value) != "":
        raise UsageError(f"--since takes a duration like 45m, 2h or 3d, not {text!r}")
    seconds = sum(
        int(amount) * _UNIT_SECONDS[unit] for amount, unit in _DURATION_PART.findall(value)
    )
    if not 0 < seconds <= 3650 * 86_400:
        raise UsageError(f"--since takes a duration from 1s to 3650d, not {text!r}")
    return timedelta(seconds=seconds)


def _comments(settings: Settings, args: argparse.Namespace) -> None:
    from fediblog import moderation
    from fediblog.render import excerpt

    raw_since = getattr(args, "since", None)
    since = parse_duration(raw_since) if raw_since is not None else None

    async def run(blog: Blog) -> None:
        action = args.comments_command or "list"
        if action != "list":
            status = {"approve": "published", "reject": "rejected", "delete": "deleted"}[action]
            await moderation.set_status(blog.store, args.id, status)
            print(f"comment {args.id}: {status}")
            return
        pending = bool(getattr(args, "pending", False))
        if since is not None:
            rows = await blog.store.list_comments_received_since(
                utcnow() - since, pending_only=pending
            )
            if not rows:
                print(f"no comments {'waiting ' if pending else ''}in the last {args.since}")
        else:
            rows = await blog.store.list_comments_for_review(pending_only=pending)
        if not rows and since is None:
            print("no comments waiting" if pending else "no comments yet")
        for row in rows:
            who = row.author_name
            if row.actor:  # an actor without a username is named by its id, never "@@host"
                who = actor_handle(row.username or "", row.domain or "") or actor_address(
                    row.actor
                )
            print(
                f"{row.id:>6}  {row.status:<9} {row.visibility:<9} {format_ts(row.published)}"
                f"  {row.slug}  {who}: {excerpt(row.content_html, 80)}"
            )

    asyncio.run(_with_blog(settings, run))


def _feeds(settings: Settings, args: argparse.Namespace) -> None:
    from urllib.parse import urlsplit

    from fediblog import notify

    async def run(blog: Blog) -> None:
        if args.feeds_command == "rotate":
            token = await notify.rotate_feed_token(blog.store)
            print("new private feed URL (the old one now answers 404):")
        else:
            token = await notify.feed_token(blog.store)
            print("private feed of new and held responses (keep this URL to yourself):")
        print(settings.url(notify.private_feed_path(token)))
        if not settings.notify_url:
            print("webhook: off (set FEDIBLOG_NOTIFY_URL and FEDIBLOG_NOTIFY_SECRET)")
            return
        counts = await blog.store.count_notifications()
        summary = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("queued", "sent", "failed", "dead"))
        # The host only: the URL may carry a token (ntfy's ?auth=, Gotify's ?token=).
        print(f"webhook to {urlsplit(settings.notify_url).hostname}: {summary}")
        for row in await blog.store.list_notifications(limit=20):
            if row.last_error and row.status != "sent":
                print(
                    f"{row.status:<6} attempts={row.attempts:<2} comment {row.comment_id}"
                    f"  {row.event}  ({row.last_error})"
                )

    asyncio.run(_with_blog(settings, run))


def _reply(settings: Settings, args: argparse.Namespace) -> None:
    from fediblog.answers import Answers, read_answer_file

    words: list[str] = args.words
    action = words[0] if words[0] in ("edit", "delete") else "new"
    given = words[1:] if action != "new" else words  # what to answer or change [, FILE.md]
    if not given:
        args.reply_usage(f"`reply {action}` needs the answer's number or id")
    if action == "delete" and (len(given) > 1 or args.text is not None):
        args.reply_usage("`reply delete` takes the answer's number or id, nothing else")
    if action != "delete" and len(given) != (1 if args.text is not None else 2):
        args.reply_usage("give the answer as FILE.md or as --text TEXT (one of them)")
    ref = given[0]
    text = "" if action == "delete" else args.text
    if text is None:
        text = read_answer_file(Path(given[1]))

    async def run(blog: Blog) -> None:
        answers = Answers(settings, blog.store)
        if action == "delete":
            answer = await answers.delete(ref)
            print(f"deleted answer {answer.id}: {answer.ap_id} now answers 410")
        elif action == "edit":
            answer = await answers.edit(ref, text)
            print(f"updated answer {answer.id}: {answer.ap_id}")
        else:
            done = await answers.publish(ref, text)
            whom = f" ({done.answer.mentioned.handle})" if done.answer.mentioned else ""
            print(f"answered {done.target}{whom}: answer {done.answer.id}, {done.answer.ap_id}")

    asyncio.run(_with_blog(settings, run))


def _blocks(settings: Settings, args: argparse.Namespace) -> None:
    from fediblog import moderation

    async def run(blog: Blog) -> None:
        if args.command == "blocks":
            found = await blog.store.list_blocks()
            if not found:
                print("no blocks")
            for target, kind in found:
                print(f"{kind:<6}  {target}")
        elif args.command == "block":
            target, kind, added = await moderation.block(
                blog.store, args.target, own_host=settings.host
            )
            print(f"blocked {kind} {target}" if added else f"{target} was already blocked")
        else:
            await moderation.unblock(blog.store, args.target)
            print(f"unblocked {args.target}")

    asyncio.run(_with_blog(settings, run))


def _admin(settings: Settings, args: argparse.Namespace) -> None:
    from fediblog.desk import Desk, PasswordRejected, check_password

    password = ""
    if args.admin_command == "password":
        if args.stdin:  # the whole line but its end: spaces may be part of a password
            password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
        else:
            import getpass

            password = getpass.getpass("New password for the web admin: ")
            check_password(password)  # before asking again
            if getpass.getpass("The same again: ") != password:
                raise PasswordRejected("the two passwords differ; nothing was changed")

    async def run(blog: Blog) -> None:
        desk = Desk(settings, blog.store)
        if args.admin_command == "password":
            ended = await desk.set_password(password)
            print(
                f"password set: sign in at {settings.url('/admin')} as {desk.account}"
                f" ({ended} session(s) signed out)"
            )
        elif args.admin_command == "signout-all":
            print(f"signed out everywhere ({await desk.sign_out_everywhere()} session(s) ended)")
        else:
            sessions = await desk.list_sessions()
            if not sessions:
                print("nobody is signed in")
            for session in sessions:
                print(
                    f"{format_ts(session.created)}  last seen {format_ts(session.last_seen)}"
                    f"  ends by {format_ts(session.ends())}  {session.ip or '-'}"
                    f"  {session.user_agent or '-'}"
                )

    asyncio.run(_with_blog(settings, run))


def _backup(settings: Settings, args: argparse.Namespace) -> None:
    from fediblog.backup import backup, restore

    if args.command == "backup":
        done = backup(settings, args.folder)
        print(
            f"backup written to {done.folder} in {done.seconds:.1f} s: {settings.database}"
            f" (schema {done.schema_version}, {done.database_bytes:,} bytes) and the keys"
            f" in {settings.keys_dir}"
        )
        return
    manifest = restore(settings, args.folder, force=args.force)
    print(
        f"restored {settings.database} and the keys in {settings.keys_dir} from the backup"
        f" of {manifest['created_at']} (schema {manifest['schema_version']})"
    )


def _database_failure(database: Path | None, error: BaseException) -> str | None:
    """One line for a database failure that escaped a command, or None if it is not one."""
    from fediblog.preflight import database_hint, database_problem

    if isinstance(error, sqlite3.Error):
        return database_problem(database or Path("(the database)"), error)
    # The store raises its own errors `from None`; the SQLite error is still the context.
    cause = error.__cause__ or error.__context__
    if isinstance(error, StorageError) and isinstance(cause, sqlite3.Error):
        hint = database_hint(cause)
        return str(error) if hint in str(error) else f"{error} ({hint})"
    return None


def _check(settings: Settings, peer: str | None) -> int:
    from fediblog.check import run_checks

    if peer is not None and (
        urlsplit(peer).scheme not in ("http", "https") or not urlsplit(peer).hostname
    ):
        raise UsageError(f"--peer must be an http(s) URL, not {peer!r}")
    results = asyncio.run(run_checks(settings, peer=peer))
    for result in results:
        print(result.line)
    return 1 if any(result.status == "FAIL" for result in results) else 0


def _migrate(source: Path, target: str) -> None:
    if not is_database_url(target):
        raise UsageError(f"--to must be a postgresql:// URL, not {target!r}")
    shown = without_password(target)

    async def run() -> dict[str, int]:
        old = await Store.open(source, create=False)
        try:
            new = await Store.open(target)
            try:
                assert isinstance(new, PostgresStore)
                return await copy_blog(old, new)
            finally:
                await new.close()
        finally:
            await old.close()

    started = time.monotonic()
    copied = asyncio.run(run())
    rows = ", ".join(f"{count:,} {table}" for table, count in copied.items() if count)
    print(f"copied {source} to {shown} in {time.monotonic() - started:.1f} s: {rows}")
    print(f"next: set FEDIBLOG_DATABASE={shown} (with its password) and start fediblog")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    database: Path | None = args.database if args.command == "demo" else None
    try:
        if args.command == "demo":
            _demo(args)
            return 0
        if args.command == "init":
            _init(args)
            return 0
        if args.command == "migrate":
            database = args.source
            _migrate(args.source, args.target)
            return 0
        settings = _load(args)
        database = settings.database
        if args.command not in _NO_DATABASE_NEEDED:
            _require_blog(settings, args.data)
        if args.command == "serve":
            return _serve(
                settings,
                args.host,
                args.port,
                web_only=args.web_only,
                workers=args.workers,
                worker_process=args.worker_process,
                data=args.data,
            )
        elif args.command == "worker":
            _worker(settings, args.only, args.parent)
        elif args.command == "post":
            _post(settings, args)
        elif args.command == "followers":
            _followers(settings, args)
        elif args.command == "media":
            _media(settings, args)
        elif args.command == "deliveries":
            _deliveries(settings, args)
        elif args.command == "inbox":
            _inbox(settings, args)
        elif args.command == "comments":
            _comments(settings, args)
        elif args.command == "feeds":
            _feeds(settings, args)
        elif args.command == "reply":
            _reply(settings, args)
        elif args.command in ("block", "unblock", "blocks"):
            _blocks(settings, args)
        elif args.command in ("backup", "restore"):
            _backup(settings, args)
        elif args.command == "check":
            return _check(settings, args.peer)
        elif args.command == "admin":
            _admin(settings, args)
    except ConfigError as error:
        print(f"fediblog: configuration error: {error}", file=sys.stderr)
        return 2
    except UsageError as error:
        print(f"fediblog: error: {error}", file=sys.stderr)
        return 2
    except (FediblogError, sqlite3.Error) as error:
        message = _database_failure(database, error) or str(error)
        print(f"fediblog: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`fediblog comments | head`): stop quietly, and keep
        # Python from complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
