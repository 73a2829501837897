"""The author's desk: the one author account of the web admin, its password, its
sign-in sessions, and the limit on guessing.

* **The account.** There is one: its name is the blog's handle (``FEDIBLOG_HANDLE``),
  its password is set with ``fediblog admin password``. Only an argon2id hash is
  stored (argon2-cffi's ``PasswordHasher`` with the library's current defaults; a
  hash made under older defaults is replaced at the next sign-in).
* **Sessions.** A sign-in makes a random session id (256 bits) that only the browser's
  cookie holds; the database keeps its SHA-256, with when it was made, last seen and
  ends. A session ends after ``IDLE_TIMEOUT`` unused, or ``ABSOLUTE_TIMEOUT`` after the
  sign-in, whichever comes first; signing out ends it; a new password, or "sign out
  everywhere", ends them all.
* **CSRF.** Each session's token is an HMAC of its id: bound to that session, never
  stored, and not computable from a copy of the database.
* **Guessing.** Failed sign-ins are limited per address (an IPv6 /64 counts as one) and
  for the whole blog; past a limit, sign-ins are refused without checking the password.
  An attempt counts as a failure from the moment it arrives, before anything is awaited,
  and stops counting only when its password proves right: parallel guesses cannot all
  slip past a check that none of them has counted yet. The counts live in memory: one
  server process serves every sign-in, a failure then costs no database write (an
  attacker does not choose our write rate), and a restart, which no attacker can cause,
  only forgets at most one window of failures.
* **The author's way in.** Anyone can make the failures of all reach the global limit,
  so it spares an address the author signed in from in the last ``KNOWN_FOR`` (its own
  limit still applies): under attack, the author signs in from home as usual. Elsewhere
  the author waits for the window to pass, restarts the server (which forgets the
  counts), or uses the CLI, which never needs a sign-in.
* **Memory.** argon2 takes 64 MiB a check: one check runs at a time, and when
  ``MAX_WAITING`` sign-ins already wait for theirs, the next is refused at once.

Every failure says the same thing (``SIGN_IN_FAILED``), and a wrong name costs the same
password check as a wrong password, so no answer tells which part was wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from fediblog.config import Settings
from fediblog.errors import FediblogError
from fediblog.models import IDLE_TIMEOUT as IDLE_TIMEOUT  # in models for DeskSession.ends
from fediblog.models import DeskSession, utcnow
from fediblog.store import Store

MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1_024  # argon2 hashes any length; a megabyte "password" is an attack
ABSOLUTE_TIMEOUT = timedelta(days=7)
SEEN_EVERY = timedelta(minutes=1)  # last-seen is written at most this often per session
FAILURES_PER_ADDRESS = 5
FAILURES_OVERALL = 50
FAILURE_WINDOW = 900.0  # seconds
MAX_WAITING = 8  # sign-ins checking or waiting to check a password; more are refused
BUSY_RETRY = 5  # seconds a sign-in refused for MAX_WAITING is told to wait
KNOWN_FOR = timedelta(days=30)  # an address signed in from spares the global limit so long
SIGN_IN_FAILED = "Sign-in failed: the name or the password is not right."
_CSRF_CONTEXT = b"fediblog desk csrf"


class DeskError(FediblogError):
    """A desk action cannot be done (CLI: one line, exit 1)."""


class PasswordRejected(DeskError):
    """The new password is too short, too long, or the two entries differ."""


class SignInFailed(DeskError):
    """Wrong name, wrong password, or no password set: deliberately the same error."""


class SignInLimited(DeskError):
    """Too many failed sign-ins from this address, or in all: try again later."""

    def __init__(
        self, retry_after: int, message: str = "Too many failed sign-ins: try again later."
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class SignedIn:
    token: str  # the session id, for the cookie: shown once, never stored
    session: DeskSession


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise PasswordRejected(f"the password needs {MIN_PASSWORD_LENGTH} characters at least")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise PasswordRejected(f"the password may have {MAX_PASSWORD_LENGTH} characters at most")
    if not password.strip():
        raise PasswordRejected("the password cannot be only spaces")


def session_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _address_key(ip: str) -> str:
    """The unit the per-address limit counts: an IPv4 address, or an IPv6 /64 (one
    host usually holds a whole /64, and would otherwise have 2**64 addresses)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class FailureLimit:
    """At most ``per_address`` failed sign-ins per address and ``overall`` in all, in
    any ``window`` seconds. ``clock`` is for tests."""

    def __init__(
        self,
        per_address: int = FAILURES_PER_ADDRESS,
        overall: int = FAILURES_OVERALL,
        window: float = FAILURE_WINDOW,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_addresses: int = 10_000,
    ) -> None:
        self.per_address, self.overall, self.window = per_address, overall, window
        self.clock = clock
        self._max = max_addresses
        self._all: deque[float] = deque()
        self._by_address: dict[str, deque[float]] = {}

    def _trim(self, hits: deque[float], now: float) -> deque[float]:
        while hits and now - hits[0] >= self.window:
            hits.popleft()
        return hits

    def _wait(self, hits: deque[float], most: int) -> int | None:
        now = self.clock()
        if len(self._trim(hits, now)) < most:
            return None
        return max(1, int(self.window - (now - hits[0])) + 1)

    def address_wait(self, ip: str) -> int | None:
        """None if ``ip`` is under its own limit, else seconds to wait."""
        return self._wait(self._by_address.get(_address_key(ip), deque()), self.per_address)

    def overall_wait(self) -> int | None:
        """None if the failures of all are under the global limit, else seconds to wait."""
        return self._wait(self._all, self.overall)

    def retry_after(self, ip: str, *, known: bool = False) -> int | None:
        """None if a sign-in from ``ip`` may be tried now, else seconds to wait. A
        ``known`` address (the author's, lately) is spared the global limit."""
        waits = [self.address_wait(ip), None if known else self.overall_wait()]
        found = [wait for wait in waits if wait is not None]
        return max(found) if found else None

    def failed(self, ip: str) -> float:
        """Count a failure (or an attempt not yet known to succeed); returns its mark,
        for ``forget`` or ``succeeded``."""
        now = self.clock()
        if len(self._by_address) >= self._max:  # forget quiet addresses before growing
            for key in [k for k, v in self._by_address.items() if not self._trim(v, now)]:
                del self._by_address[key]
        self._all.append(now)
        self._by_address.setdefault(_address_key(ip), deque()).append(now)
        return now

    def forget(self, ip: str, mark: float) -> None:
        """Uncount the attempt ``failed`` counted as ``mark``: it was not tried."""
        for hits in (self._all, self._by_address.get(_address_key(ip), deque())):
            with contextlib.suppress(ValueError):  # already out of the window
                hits.remove(mark)

    def succeeded(self, ip: str, mark: float | None = None) -> None:
        """The right password from ``ip``: its failures are forgiven, and the attempt
        counted as ``mark`` was no failure."""
        if mark is not None:
            self.forget(ip, mark)
        self._by_address.pop(_address_key(ip), None)


class Desk:
    """The author's account and sessions, for the CLI and the web admin alike.

    ``now`` and ``limit.clock`` may be replaced by tests to move time.
    """

    def __init__(self, settings: Settings, store: Store, *, limit: FailureLimit | None = None):
        self.settings = settings
        self.store = store
        self.limit = limit or FailureLimit()
        self.now: Callable[[], datetime] = utcnow
        self._hasher = PasswordHasher()  # the library's current defaults: argon2id
        self._hashing = asyncio.Lock()  # one argon2 check at a time (64 MiB each)
        self._waiting = 0  # sign-ins between their first check and their password's
        self._dummy_hash: str | None = None

    @property
    def account(self) -> str:
        """The account's name: the blog's handle."""
        return self.settings.handle

    # ---- the password ----------------------------------------------------------------

    async def has_password(self) -> bool:
        return await self.store.get_desk_password_hash() is not None

    async def set_password(self, password: str) -> int:
        """Set the account's password and sign out everywhere; returns the sessions ended."""
        check_password(password)
        password_hash = await asyncio.to_thread(self._hasher.hash, password)
        return await self.store.save_desk_password(password_hash, self.now())

    async def _verify(self, password_hash: str | None, password: str) -> bool:
        """Check ``password`` against the hash, or against a throwaway hash when there
        is none, so that "no such account" costs as much time as a wrong password."""
        async with self._hashing:
            if password_hash is None:
                if self._dummy_hash is None:
                    self._dummy_hash = await asyncio.to_thread(
                        self._hasher.hash, secrets.token_urlsafe(32)
                    )
                password_hash = self._dummy_hash
            try:
                return await asyncio.to_thread(self._hasher.verify, password_hash, password)
            except (VerificationError, InvalidHashError):
                return False

    # ---- signing in and out ----------------------------------------------------------

    async def sign_in(self, account: str, password: str, *, ip: str, user_agent: str) -> SignedIn:
        """A new session, or SignInFailed (the same whatever was wrong) or SignInLimited."""
        # Up to the first await, parallel sign-ins run one after the other: check the
        # limits and count this attempt here, or thirty guesses sent at once would all
        # pass a check that none of them had counted yet.
        limit = self.limit
        wait = limit.address_wait(ip)
        if wait is not None:
            raise SignInLimited(wait)
        if self._waiting >= MAX_WAITING:
            raise SignInLimited(BUSY_RETRY, "Too many sign-ins at once: try again in a moment.")
        everyone_wait = limit.overall_wait()
        mark = limit.failed(ip)  # a failure until the password proves right
        self._waiting += 1
        try:
            if everyone_wait is not None and not await self._known_address(ip):
                limit.forget(ip, mark)  # refused, not tried
                raise SignInLimited(everyone_wait)
            stored = await self.store.get_desk_password_hash()
            right_password = await self._verify(stored, password[:MAX_PASSWORD_LENGTH])
        finally:
            self._waiting -= 1
        right_account = hmac.compare_digest(
            account.strip().casefold().encode(), self.account.casefold().encode()
        )
        if stored is None or not right_password or not right_account:
            raise SignInFailed(SIGN_IN_FAILED)
        limit.succeeded(ip, mark)
        if self._hasher.check_needs_rehash(stored):  # the library's defaults moved on
            rehashed = await asyncio.to_thread(self._hasher.hash, password)
            await self.store.save_desk_password(rehashed, self.now(), sign_out=False)
        signed = await self.start_session(ip=ip, user_agent=user_agent)
        now = self.now()
        await self.store.save_desk_address(_address_key(ip), now, now - KNOWN_FOR)
        return signed

    async def _known_address(self, ip: str) -> bool:
        """Whether the author signed in from ``ip`` (or its IPv6 /64) in the last
        ``KNOWN_FOR``: asked only when the global limit is reached."""
        seen = await self.store.get_desk_address_signed_in(_address_key(ip))
        return seen is not None and self.now() - seen < KNOWN_FOR

    async def start_session(self, *, ip: str, user_agent: str) -> SignedIn:
        """A new session, for a sign-in whose password was checked (``sign_in``)."""
        now = self.now()
        await self.store.delete_desk_sessions(expired_at=now, idle_since=now - IDLE_TIMEOUT)
        token = secrets.token_urlsafe(32)
        session = DeskSession(
            key=session_key(token),
            created=now,
            last_seen=now,
            expires=now + ABSOLUTE_TIMEOUT,
            ip=ip[:64],
            user_agent=user_agent[:200],
        )
        await self.store.save_desk_session(
            session.key,
            created=now,
            expires=session.expires,
            ip=session.ip,
            user_agent=session.user_agent,
        )
        return SignedIn(token, session)

    async def session_for(self, token: str | None) -> DeskSession | None:
        """The live session whose id the cookie holds, or None (no cookie, forged,
        signed out, idle too long or past its end). Notes that it was seen."""
        if not token or len(token) > 128:
            return None
        session = await self.store.get_desk_session(session_key(token))
        if session is None:
            return None
        now = self.now()
        if now >= session.ends():
            await self.store.delete_desk_session(session.key)
            return None
        if now - session.last_seen >= SEEN_EVERY:
            await self.store.mark_desk_session_seen(session.key, now)
            session = replace(session, last_seen=now)
        return session

    def csrf_token(self, token: str) -> str:
        """The CSRF token of the session whose id is ``token``."""
        return hmac.new(token.encode(), _CSRF_CONTEXT, hashlib.sha256).hexdigest()

    def csrf_matches(self, token: str, given: str) -> bool:
        return hmac.compare_digest(self.csrf_token(token).encode(), given.encode())

    async def sign_out(self, token: str) -> bool:
        return await self.store.delete_desk_session(session_key(token))

    async def sign_out_everywhere(self) -> int:
        return await self.store.delete_desk_sessions()

    async def list_sessions(self) -> list[DeskSession]:
        """The live sessions, most recently seen first (the ended ones are removed)."""
        now = self.now()
        await self.store.delete_desk_sessions(expired_at=now, idle_since=now - IDLE_TIMEOUT)
        return await self.store.list_desk_sessions()
