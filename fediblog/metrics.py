"""What operators count: the inbox's answers, its recent refusals, and the Prometheus text.

The inbox answers thousands of POSTs a second, so counting one costs an integer
addition (``InboxStats.accepted``) or, for a refusal, one dictionary update and one
entry in a bounded ring (``InboxStats.recent``): the admin desk shows the recent
refusals by reason from it, and ``/metrics`` (web/health.py) exposes the counts.

Each refusal is logged once, as one line with its status, reason and signer, within a
budget (``LogBudget``: a burst, then a few lines a minute): a flood of bad requests
cannot fill the disk, and the next line says how many were left out. Values a remote
server chose (its keyId, its reason text) are quoted with ``repr`` and shortened, so
they can neither forge log lines nor make them long.

``exposition`` writes the Prometheus text format (version 0.0.4) for a handful of
families: a few lines, where a client library would add a lock per increment and a
process-wide registry to the hot path.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from fediblog.models import QueueStats, utcnow

log = logging.getLogger("fediblog.inbox")

RECENT_REFUSALS = 500  # the ring the admin desk reads: enough for a morning's trouble
MAX_SHOWN = 200  # characters of a remote-chosen value in a log line or the ring


@dataclass(frozen=True, slots=True)
class Refusal:
    """One refused inbox POST: when, the status and a short kind (the metric's label),
    the reason sent back, who signed it (keyId) and the actor it named, when known."""

    at: datetime
    status: int
    kind: str
    reason: str
    key_id: str | None
    actor: str | None
    path: str


class LogBudget:
    """A token bucket for log lines: ``burst`` at once, then ``per_minute`` a minute."""

    def __init__(
        self,
        burst: int = 20,
        per_minute: float = 12.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._burst = float(burst)
        self._rate = per_minute / 60.0
        self._tokens = float(burst)
        self._clock = clock
        self._stamp = clock()
        self.skipped = 0  # lines left out since the last one logged

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens < 1.0:
            self.skipped += 1
            return False
        self._tokens -= 1.0
        return True


def shown(value: str | None) -> str:
    """A remote-chosen value fit for a log line: quoted (no newlines), at most MAX_SHOWN."""
    if value is None:
        return "unknown"
    return repr(value[:MAX_SHOWN] + ("…" if len(value) > MAX_SHOWN else ""))


class InboxStats:
    """The inbox's answers since the process started, and its last refusals."""

    __slots__ = ("_budget", "accepted", "recent", "refused")

    def __init__(self, *, ring: int = RECENT_REFUSALS, budget: LogBudget | None = None) -> None:
        self.accepted = 0
        self.refused: dict[tuple[int, str], int] = {}
        self.recent: deque[Refusal] = deque(maxlen=ring)
        self._budget = budget or LogBudget()

    def refuse(
        self,
        status: int,
        kind: str,
        reason: str,
        *,
        path: str,
        key_id: str | None = None,
        actor: str | None = None,
    ) -> None:
        """Count one refusal, remember it, and log it if the budget allows."""
        key = (status, kind)
        self.refused[key] = self.refused.get(key, 0) + 1
        reason = reason[:MAX_SHOWN]
        key_id = key_id[:MAX_SHOWN] if key_id else None
        actor = actor[:MAX_SHOWN] if actor else None
        self.recent.append(Refusal(utcnow(), status, kind, reason, key_id, actor, path[:MAX_SHOWN]))
        if not self._budget.take():
            return
        skipped, self._budget.skipped = self._budget.skipped, 0
        log.warning(
            "inbox refused POST %s: %d %s: %s (keyId %s, actor %s)%s",
            shown(path),
            status,
            kind,
            shown(reason),
            shown(key_id),
            shown(actor),
            f" ({skipped} more refusals not logged)" if skipped else "",
        )

    def recent_by_reason(self) -> list[tuple[int, str, str, int, datetime]]:
        """(status, kind, reason, how many, last seen) over the ring, most frequent first."""
        groups: dict[tuple[int, str, str], tuple[int, datetime]] = {}
        for refusal in self.recent:
            key = (refusal.status, refusal.kind, refusal.reason)
            count, _ = groups.get(key, (0, refusal.at))
            groups[key] = (count + 1, refusal.at)
        rows = [(s, k, r, n, at) for (s, k, r), (n, at) in groups.items()]
        return sorted(rows, key=lambda row: (-row[3], row[0], row[2]))


@dataclass(frozen=True, slots=True)
class Backlog:
    """The queues now, from ``Store.get_queue_stats``: for /metrics and the desk."""

    inbox_queued: int  # activities accepted, not processed yet
    deliveries_queued: int  # deliveries waiting or waiting to try again
    lag: float  # seconds the oldest activity not yet tried has waited (0: none waits)
    last_lag: float  # accepted to processed, in seconds, for the activity processed last


def backlog(queues: QueueStats, now: datetime) -> Backlog:
    oldest, received, processed = queues.oldest_waiting, queues.last_received, queues.last_processed
    last_lag = (processed - received).total_seconds() if processed and received else 0.0
    return Backlog(
        inbox_queued=queues.inbox_queued,
        deliveries_queued=queues.deliveries_queued,
        lag=max(0.0, (now - oldest).total_seconds()) if oldest else 0.0,
        last_lag=max(0.0, last_lag),
    )


# ---- the Prometheus text format ----------------------------------------------------------

Labels = Mapping[str, str]
Sample = tuple[Labels, float]


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: name (a counter's ends in ``_total``), type (counter or
    gauge), help text, samples."""

    name: str
    kind: str
    help: str
    samples: tuple[Sample, ...]


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def exposition(families: Iterable[Family]) -> str:
    """The text exposition format (``text/plain; version=0.0.4``)."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {family.help}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for labels, value in family.samples:
            text = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
            sample = f"{family.name}{{{text}}}" if text else family.name
            lines.append(f"{sample} {_number(value)}")
    return "\n".join(lines) + "\n"
