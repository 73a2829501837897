"""The report of ``python -m tests.bench``: issue 12's targets, met or missed, as JSON and
as a table.

Pure functions of the figures the benchmarks return (dicts of numbers): no timing here,
so tests/test_bench_report.py checks all of it. A target reads one figure of one
benchmark; when it names a ceiling ("identity" or "gzip", the hello-world endpoint's
requests/s measured in the same run), the result is also shown as a ratio of it, and a
target ``on_ratio`` is met or missed on that ratio rather than on the figure itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

SCHEMA = 1
Op = Literal[">=", "<="]
Figures = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Target:
    benchmark: str  # the name --only takes: page, inbox, processing, delivery, memory
    figure: str  # a key of the dict that benchmark returns
    label: str  # what is measured, in words
    op: Op
    threshold: float
    unit: str  # of the figure: "req/s", "ms", "s", "MB", "/s", ""
    ceiling: Literal["identity", "gzip"] | None = None  # shown as a ratio of it
    on_ratio: bool = False  # the threshold applies to the ratio to the ceiling
    sized: bool = False  # --quick runs it at smaller sizes than the target names

    def describe(self) -> str:
        if self.on_ratio:
            return f"{self.op} {_number(self.threshold)} of the {self.ceiling} ceiling"
        return f"{self.op} {_number(self.threshold)}{_unit(self.unit)}"


P, ID, GZ = "page", "identity", "gzip"

TARGETS: tuple[Target, ...] = (
    # Processing: replies turned into comments by the one worker.
    Target("processing", "rate_empty", "replies → comments, post with 0 comments", ">=",
           2500, "/s", ID),
    Target("processing", "rate_big", "replies → comments, post with 50,000 comments", ">=",
           2500, "/s", ID),
    Target("processing", "rate_big_vs_empty", "rate at 50,000 ÷ rate at 0", ">=", 0.8, ""),
    Target("processing", "lag_p99_s", "accept → visible p99 during a flood", "<=", 2, "s",
           sized=True),
    # Acceptance: signed replies stored before the 202.
    Target("inbox", "accepted_rps", "signed replies accepted and stored", ">=", 5000, "/s", ID),
    Target("inbox", "p99_ms", "acceptance latency p99", "<=", 100, "ms"),
    Target("inbox", "non_202", "answers other than 202", "<=", 0, ""),
    Target("inbox", "lost", "202s without their stored row", "<=", 0, ""),
    # Pages: the post page, its first page of responses.
    Target(P, "gzip_rps_1000", "post page, 1,000 comments, gzip", ">=", 0.6, "req/s", GZ, True),
    Target(P, "identity_rps_1000", "post page, 1,000 comments, identity", ">=", 0.3, "req/s",
           ID, True),
    Target(P, "p99_ms_1000", "post page, 1,000 comments, p99 (worst encoding)", "<=", 20,
           "ms"),
    Target(P, "not_modified_rps_1000", "post page, 1,000 comments, 304", ">=", 0.7, "req/s",
           ID, True),
    Target(P, "gzip_rps_50000", "post page, 50,000 comments, gzip", ">=", 0.6, "req/s", GZ,
           True),
    Target(P, "identity_rps_50000", "post page, 50,000 comments, identity", ">=", 0.3,
           "req/s", ID, True),
    Target(P, "p99_ms_50000", "post page, 50,000 comments, p99 (worst encoding)", "<=", 20,
           "ms"),
    Target(P, "not_modified_rps_50000", "post page, 50,000 comments, 304", ">=", 0.7,
           "req/s", ID, True),
    # Fan-out: one post to every follower's (shared) inbox.
    Target("delivery", "seconds", "one post to 100,000 followers on 10,000 inboxes", "<=",
           30, "s", sized=True),
    Target("delivery", "wrong", "inboxes missed, hit twice, or badly signed", "<=", 0, ""),
    Target("delivery", "cpu_ms_per_delivery", "server CPU per delivery", "<=", 1.5, "ms"),
    Target("delivery", "peak_rss_mb", "peak RSS during the fan-out", "<=", 200, "MB",
           sized=True),
    # Memory.
    Target("memory", "idle_rss_mb", "idle RSS, each page once (worst of empty, demo, after)",
           "<=", 80, "MB"),
)  # fmt: skip

BENCHMARKS = ("page", "inbox", "processing", "delivery", "memory")


def _number(value: float) -> str:
    if value == int(value) and abs(value) >= 1:
        return f"{int(value):,}"
    return f"{value:,.2f}".rstrip("0").rstrip(".") if abs(value) < 10 else f"{value:,.0f}"


def _unit(unit: str) -> str:
    return "" if not unit else unit if unit.startswith("/") else f" {unit}"


def ratio(value: float | None, ceiling: float | None) -> float | None:
    """value ÷ ceiling, or None when either is missing or the ceiling is not positive."""
    if value is None or ceiling is None or not ceiling > 0 or not math.isfinite(value):
        return None
    return value / ceiling


def verdict(target: Target, value: float | None, of_ceiling: float | None) -> bool | None:
    """True (met), False (missed), or None: the figure (or the ratio it is judged on) is
    missing, so nothing can be said."""
    judged = of_ceiling if target.on_ratio else value
    if judged is None or not math.isfinite(judged):
        return None
    return judged >= target.threshold if target.op == ">=" else judged <= target.threshold


def _figure(figures: Figures | None, key: str) -> float | None:
    value = (figures or {}).get(key)
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, int | float) else None


def rows(results: dict[str, Figures], ceiling: Figures | None) -> list[dict[str, Any]]:
    """One row per target of the benchmarks that ran (those in ``results``)."""
    out = []
    for target in TARGETS:
        if target.benchmark not in results:
            continue
        value = _figure(results[target.benchmark], target.figure)
        base = _figure(ceiling, f"{target.ceiling}_rps") if target.ceiling else None
        of_ceiling = ratio(value, base)
        out.append(
            {
                "benchmark": target.benchmark,
                "figure": target.figure,
                "label": target.label,
                "target": target.describe(),
                "op": target.op,
                "threshold": target.threshold,
                "on_ratio": target.on_ratio,
                "unit": target.unit,
                "result": value,
                "ceiling": target.ceiling,
                "ceiling_rps": base,
                "ratio": of_ceiling,
                "met": verdict(target, value, of_ceiling),
                "sized": target.sized,
            }
        )
    return out


def clean(value: Any) -> Any:
    """The report with what JSON cannot hold made plain: NaN and infinities become null,
    tuples lists, keys strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): clean(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [clean(item) for item in value]
    return value


def build(
    *,
    results: dict[str, Figures],
    errors: dict[str, str],
    ceiling: Figures | None,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """The JSON report: what ran where, every figure, and the targets' rows."""
    table = rows(results, ceiling)
    return {
        "schema": SCHEMA,
        **meta,
        "ceiling": ceiling,
        "benchmarks": results,
        "errors": errors,
        "rows": table,
        "summary": {
            "met": sum(1 for row in table if row["met"] is True),
            "missed": sum(1 for row in table if row["met"] is False),
            "unknown": sum(1 for row in table if row["met"] is None),
            "errors": len(errors),
        },
    }


def _result_text(row: dict[str, Any]) -> str:
    value = row["result"]
    return "—" if value is None else _number(value) + _unit(row["unit"])


def _count(number: int, what: str) -> str:
    return f"{number} {what}{'' if number == 1 else 'es'}"


def shape(report: dict[str, Any]) -> str:
    """What the run measured, in one line: the database, the web processes, the worker
    processes (the columns of a table comparing runs), then the commit and the sizes.
    A report from before these were recorded ran on SQLite, one web process."""
    web = int(report.get("web_processes") or 1)
    split = bool(report.get("split"))
    workers = report.get("worker_processes")
    if workers is None:
        workers = 1 if split or web > 1 else 0
    where = "separate `fediblog worker`" if split else "serve's own"
    work = (
        f"{_count(int(workers), 'worker process')} ({where})"
        if workers
        else "no worker process (the web process does the background work)"
    )
    parts = [str(report.get("backend") or "sqlite"), _count(web, "web process"), work]
    if report.get("commit"):
        parts.append(f"commit {report['commit']}{' + changes' if report.get('dirty') else ''}")
    if report.get("quick"):
        parts.append("quick")
    return ", ".join(parts)


def table(report: dict[str, Any]) -> str:
    """The report as a Markdown table (it reads as plain text too), after a first line
    saying what ran (``shape``)."""
    quick = bool(report.get("quick"))
    lines = [
        shape(report),
        "",
        "| benchmark | figure | target | result | ceiling | ratio | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        verdict_text = {True: "met", False: "MISSED", None: "not measured"}[row["met"]]
        if quick and row["sized"] and row["met"] is not None:
            verdict_text += " (quick sizes)"
        ceiling = (
            f"{row['ceiling']} {_number(row['ceiling_rps'])}/s"
            if row["ceiling_rps"] is not None
            else "—"
        )
        of_ceiling = "—" if row["ratio"] is None else f"{row['ratio']:.2f}"
        lines.append(
            f"| {row['benchmark']} | {row['label']} | {row['target']} | {_result_text(row)} | "
            f"{ceiling} | {of_ceiling} | {verdict_text} |"
        )
    for name, error in report["errors"].items():
        lines.append(f"| {name} | (failed) | | {error.splitlines()[0][:80]} | | | error |")
    summary = report["summary"]
    lines.append("")
    lines.append(
        f"{summary['met']} met, {summary['missed']} missed, {summary['unknown']} not measured,"
        f" {summary['errors']} benchmark(s) failed"
        + (" — a --quick run: smaller sizes and shorter runs" if quick else "")
    )
    return "\n".join(lines)
