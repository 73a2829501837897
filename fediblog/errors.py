"""The one exception tree of fediblog.

Callers catch at the level they care about:

    FediblogError
    ├── ConfigError          a setting is missing or wrong (CLI: one line, exit 2)
    ├── StorageError         the database cannot be opened or used
    │   ├── StorageUnavailable  busy, locked, full, read-only or gone: retry later
    │   └── StorageConflict  a unique key refused a write (another writer was first)
    ├── PostError            a post file or command is wrong (CLI: one line, exit 1)
    │   ├── PostNotFound     no post with that slug
    │   └── DuplicateSlug    the slug is taken
    ├── SignatureError       an inbound HTTP signature does not verify (HTTP 401)
    ├── ActivityError        an inbound activity is malformed or not allowed (HTTP 400)
    ├── WorkerFailed         a task of `fediblog worker` ended (CLI: one line, exit 1)
    └── FetchError           a remote GET failed; the subclasses say why
        ├── BlockedAddress   scheme or address is not allowed (SSRF guard)
        ├── FetchTooLarge    the body passed the size cap (counted decompressed)
        ├── FetchTimeout     the total deadline passed
        ├── FetchStatus      the server answered an error status (``.status``)
        ├── BadDocument      wrong content type, id mismatch, or not JSON
        ├── FetchUnreachable no answer: refused, reset, unresolvable, or not HTTP
        └── FetchBusy        too many fetches under way here: retry later (HTTP 503)

Every error carries a short, human reason in ``str(error)``; that text is what a
user or a remote server sees, so it never contains a traceback or a secret.
"""

from __future__ import annotations


class FediblogError(Exception):
    """Root of every error fediblog raises on purpose."""


class ConfigError(FediblogError):
    """A setting is missing or malformed."""


class StorageError(FediblogError):
    """The database cannot be opened, or is not one of ours."""


class StorageUnavailable(StorageError):
    """The database cannot take this write now (locked, busy, full, read-only, removed).

    Transient from a queue's point of view: the work stays queued and is retried.
    """


class StorageConflict(StorageError):
    """A write broke one of the database's rules, a unique key mostly: another writer
    stored the same thing first (a reply delivered while the crawl fetched it)."""


class WorkerFailed(FediblogError):
    """A background task of ``fediblog worker`` ended, which it never does on its own:
    the process exits non-zero so that its supervisor restarts it."""


class PostError(FediblogError):
    """A post file or post command is invalid."""


class PostNotFound(PostError):
    """No post has the given slug."""


class DuplicateSlug(PostError):
    """Another post already uses the slug."""


class SignatureError(FediblogError):
    """An inbound HTTP signature is missing, malformed or does not verify."""


class ActivityError(FediblogError):
    """An inbound activity is malformed or not acceptable."""


class FetchError(FediblogError):
    """A remote fetch failed."""


class BlockedAddress(FetchError):
    """The URL's scheme, host or resolved address is not allowed."""


class FetchTooLarge(FetchError):
    """The response body passed the size cap."""


class FetchTimeout(FetchError):
    """The fetch took longer than its total deadline."""


class FetchStatus(FetchError):
    """The remote server answered with an error status (410 means: gone)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class BadDocument(FetchError):
    """The response is not an acceptable ActivityPub document."""


class FetchUnreachable(FetchError):
    """The connection failed: refused, reset, a name that does not resolve, or a server
    that does not speak HTTP. Like timeouts and 5xx, it says the host is unwell."""


class FetchBusy(FetchError):
    """Too many fetches are under way (in all, or for that host): nothing was asked of
    the remote server. Transient and ours, never the remote host's fault: retry later."""
