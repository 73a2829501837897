"""The report of `python -m tests.bench` (tests/bench/report.py): met or missed, the ratio
to the hello-world ceiling, the JSON it writes and the table it prints, and the run's
shape it records (database, web and worker processes). Figures are made up here:
nothing is timed. Also the benches' plumbing that needs no server: where a bench blog's
database is (tests/bench/common.py) and how a bench reads it while the server writes."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from pathlib import Path

import pytest

from tests.bench import common, report
from tests.bench.__main__ import main, meta, parse_only
from tests.bench.bench_processing import _NewRows
from tests.bench.common import Reader, parse_wrk
from tests.bench.report import Target
from tests.conftest import make_settings
from tests.pgcluster import BACKEND, TEST_POSTGRES

CEILING = {"identity_rps": 10_000.0, "gzip_rps": 8_000.0}


def target(**changes: object) -> Target:
    fields: dict[str, object] = {
        "benchmark": "page",
        "figure": "gzip_rps_1000",
        "label": "a page",
        "op": ">=",
        "threshold": 0.6,
        "unit": "req/s",
        "ceiling": "gzip",
        "on_ratio": True,
    }
    fields.update(changes)
    return Target(**fields)  # type: ignore[arg-type]


def row(rows: list[dict[str, object]], figure: str) -> dict[str, object]:
    return next(r for r in rows if r["figure"] == figure)


def test_a_minimum_is_met_at_the_threshold_and_missed_below_it() -> None:
    minimum = target(on_ratio=False, ceiling=None, threshold=5000, unit="/s")
    assert report.verdict(minimum, 5000, None) is True
    assert report.verdict(minimum, 4999.9, None) is False


def test_a_maximum_is_met_at_the_threshold_and_missed_above_it() -> None:
    maximum = target(op="<=", threshold=20, unit="ms", on_ratio=False, ceiling=None)
    assert report.verdict(maximum, 20, None) is True
    assert report.verdict(maximum, 20.1, None) is False
    assert report.verdict(target(op="<=", threshold=0, on_ratio=False), 0, None) is True
    assert report.verdict(target(op="<=", threshold=0, on_ratio=False), 1, None) is False


def test_a_target_on_the_ceiling_is_judged_on_the_ratio_not_the_figure() -> None:
    on_ratio = target(threshold=0.6)
    assert report.verdict(on_ratio, 4800, 0.6) is True
    assert report.verdict(on_ratio, 1_000_000, 0.59) is False
    assert report.verdict(on_ratio, 4800, None) is None  # no ceiling measured: unknown


def test_a_missing_or_non_finite_figure_is_neither_met_nor_missed() -> None:
    minimum = target(on_ratio=False)
    assert report.verdict(minimum, None, None) is None
    assert report.verdict(minimum, math.nan, None) is None


def test_the_ratio_is_the_figure_over_the_ceiling_when_both_are_there() -> None:
    assert report.ratio(2500, 10_000) == 0.25
    assert report.ratio(None, 10_000) is None
    assert report.ratio(2500, None) is None
    assert report.ratio(2500, 0) is None
    assert report.ratio(math.inf, 10_000) is None


def test_rows_use_the_ceiling_each_target_names() -> None:
    results = {
        "page": {"gzip_rps_1000": 4800, "identity_rps_1000": 2900, "p99_ms_1000": 25.0},
        "inbox": {"accepted_rps": 5200, "p99_ms": 80, "non_202": 0, "lost": 0},
    }
    rows = report.rows(results, CEILING)
    gzip = row(rows, "gzip_rps_1000")
    assert gzip["ceiling_rps"] == 8000
    assert gzip["ratio"] == 0.6
    assert gzip["met"] is True
    identity = row(rows, "identity_rps_1000")
    assert identity["ceiling_rps"] == 10_000
    assert identity["ratio"] == 0.29
    assert identity["met"] is False
    assert row(rows, "p99_ms_1000")["met"] is False
    assert row(rows, "p99_ms_1000")["ratio"] is None  # a latency has no ratio
    accepted = row(rows, "accepted_rps")
    assert accepted["met"] is True
    assert accepted["ratio"] == 0.52
    # A figure the benchmark did not return: a row, neither met nor missed.
    assert row(rows, "not_modified_rps_1000")["met"] is None
    # Only the benchmarks that ran have rows.
    assert {r["benchmark"] for r in rows} == {"page", "inbox"}


def test_a_boolean_figure_counts_as_a_number() -> None:
    rows = report.rows({"inbox": {"non_202": False}}, None)
    assert row(rows, "non_202")["result"] == 0.0
    assert row(rows, "non_202")["met"] is True


def test_the_json_report_has_its_shape_and_is_strict_json() -> None:
    built = report.build(
        results={"memory": {"idle_rss_mb": 90.5, "odd": math.nan, "sizes": (1, 2)}},
        errors={"delivery": "RuntimeError: the receiver did not start"},
        ceiling={"identity_rps": 9000.0, "gzip_rps": math.nan},
        meta={"started": "2026-12-01T18:00:00Z", "commit": "abc1234", "quick": True},
    )
    document = json.loads(json.dumps(report.clean(built), allow_nan=False))
    assert document["schema"] == report.SCHEMA
    assert document["commit"] == "abc1234"
    assert document["quick"] is True
    assert document["ceiling"] == {"identity_rps": 9000.0, "gzip_rps": None}
    assert document["benchmarks"]["memory"] == {"idle_rss_mb": 90.5, "odd": None, "sizes": [1, 2]}
    assert document["errors"] == {"delivery": "RuntimeError: the receiver did not start"}
    assert document["summary"] == {"met": 0, "missed": 1, "unknown": 0, "errors": 1}
    (only,) = document["rows"]
    assert set(only) >= {
        "benchmark", "figure", "label", "target", "result", "unit", "ceiling",
        "ceiling_rps", "ratio", "met",
    }  # fmt: skip
    assert only["figure"] == "idle_rss_mb"
    assert only["result"] == 90.5
    assert only["met"] is False


def test_the_table_says_met_missed_and_what_failed() -> None:
    built = report.build(
        results={"page": {"gzip_rps_1000": 6000, "identity_rps_1000": 1000}},
        errors={"inbox": "RuntimeError: wrk printed no result\nmore lines"},
        ceiling=CEILING,
        meta={"quick": False},
    )
    text = report.table(report.clean(built))
    lines = text.splitlines()
    assert lines[0] == (  # a report from before the shape was recorded
        "sqlite, 1 web process, no worker process (the web process does the background work)"
    )
    assert lines[1] == ""
    assert lines[2].split("|")[1:-1] == [
        " benchmark ", " figure ", " target ", " result ", " ceiling ", " ratio ", " verdict ",
    ]  # fmt: skip
    gzip_line = next(line for line in lines if "1,000 comments, gzip" in line)
    assert ">= 0.6 of the gzip ceiling" in gzip_line
    assert "| 0.75 |" in gzip_line
    assert gzip_line.endswith("| met |")
    identity_line = next(line for line in lines if "1,000 comments, identity" in line)
    assert "| 0.10 |" in identity_line
    assert identity_line.endswith("| MISSED |")
    assert any(line.endswith("| not measured |") for line in lines)
    error_line = next(line for line in lines if line.startswith("| inbox |"))
    assert "wrk printed no result" in error_line
    assert "more lines" not in error_line
    assert "2 met" not in text
    assert "1 met, 1 missed" in text


def test_a_quick_run_marks_the_targets_it_ran_at_smaller_sizes() -> None:
    built = report.build(
        results={"delivery": {"seconds": 4.5, "wrong": 0, "cpu_ms_per_delivery": 2.4}},
        errors={},
        ceiling=CEILING,
        meta={"quick": True},
    )
    text = report.table(built)
    assert next(line for line in text.splitlines() if "100,000 followers" in line).endswith(
        "| met (quick sizes) |"
    )
    assert next(line for line in text.splitlines() if "CPU per delivery" in line).endswith(
        "| MISSED |"
    )
    assert "--quick" in text


def test_every_target_reads_a_known_benchmark_and_a_ratio_target_has_a_ceiling() -> None:
    for each in report.TARGETS:
        assert each.benchmark in report.BENCHMARKS
        assert not each.on_ratio or each.ceiling is not None
    figures = [(each.benchmark, each.figure) for each in report.TARGETS]
    assert len(figures) == len(set(figures))


def test_only_takes_names_and_aliases_and_refuses_the_unknown() -> None:
    assert parse_only(None) == list(report.BENCHMARKS)
    assert parse_only("pages, fanout,page") == ["page", "delivery"]
    with pytest.raises(SystemExit, match="no benchmark 'speed'"):
        parse_only("inbox,speed")


WRK_OUTPUT = """Running 2s test @ http://127.0.0.1:4000/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     7.12ms    2.04ms  31.20ms   80.00%
    Req/Sec     4.50k   300.00     5.00k    70.00%
  Latency Distribution
     50%  635.91us
     75%    7.50ms
     90%    9.10ms
     99%    1.20s
  8964 requests in 2.00s, 7.62GB read
Requests/sec:   4479.12
Transfer/sec:      3.81GB
"""


def test_wrk_output_gives_the_rate_and_the_percentiles_in_milliseconds() -> None:
    parsed = parse_wrk(WRK_OUTPUT)
    assert parsed.rps == 4479.12
    assert parsed.requests == 8964
    assert parsed.p50_ms == pytest.approx(0.63591)
    assert parsed.p99_ms == 1200.0


def test_wrk_output_with_error_answers_is_refused() -> None:
    with pytest.raises(RuntimeError, match="12 error responses"):
        parse_wrk(WRK_OUTPUT.replace("Requests/sec", "Non-2xx or 3xx responses: 12\nRequests/sec"))


POSTGRES_ENV, SPLIT_ENV = common.POSTGRES, common.SPLIT
WEB_ENV, WORKERS_ENV = common.WEB_PROCESSES, common.WORKER_PROCESSES


@pytest.fixture
def bench_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The run's settings as `python -m tests.bench` leaves them in the environment,
    emptied (and put back after the test, whatever main() set)."""
    for name in (POSTGRES_ENV, SPLIT_ENV, WEB_ENV, WORKERS_ENV):
        monkeypatch.setenv(name, "")
    return monkeypatch


@pytest.mark.parametrize(
    ("env", "first_line"),
    [
        ({}, "sqlite, 1 web process, no worker process (the web process does the background"
             " work), commit abc1234, quick"),
        ({WEB_ENV: "4"}, "sqlite, 4 web processes, 1 worker process (serve's own), commit"
                         " abc1234, quick"),
        ({POSTGRES_ENV: "postgresql://u@db.example/postgres", SPLIT_ENV: "1", WEB_ENV: "2",
          WORKERS_ENV: "2"},
         "postgresql, 2 web processes, 2 worker processes (separate `fediblog worker`),"
         " commit abc1234, quick"),
        ({SPLIT_ENV: "1"}, "sqlite, 1 web process, 1 worker process (separate `fediblog"
                           " worker`), commit abc1234, quick"),
    ],
)  # fmt: skip
def test_the_report_records_the_database_and_the_processes_and_says_them_first(
    bench_env: pytest.MonkeyPatch, env: dict[str, str], first_line: str
) -> None:
    for name, value in env.items():
        bench_env.setenv(name, value)
    info = meta(argparse.Namespace(quick=True), ["inbox"])
    assert info["backend"] == ("postgresql" if POSTGRES_ENV in env else "sqlite")
    assert info["web_processes"] == int(env.get(WEB_ENV, 1))
    info.update(commit="abc1234", dirty=False)
    document = json.loads(json.dumps(report.build(results={}, errors={}, ceiling=None,
                                                  meta=info)))  # fmt: skip
    assert report.table(document).splitlines()[0] == first_line


def test_more_worker_processes_need_the_split_and_a_postgres_url_is_checked(
    bench_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, error in [
        (["--worker-processes", "2"], "--worker-processes needs --split"),
        (["--split", "--worker-processes", "0"], "take 1 or more"),
        (["--postgres", "/tmp/blog.db"], "--postgres takes a postgresql:// URL"),
    ]:
        bench_env.setattr(sys, "argv", ["python -m tests.bench", *argv])
        with pytest.raises(SystemExit) as exit_:
            main()
        assert exit_.value.code == 2
        assert error in capsys.readouterr().err


def test_a_bench_blog_is_a_file_in_its_folder_without_postgres(
    bench_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = common.bench_settings(tmp_path, 4321)
    assert settings.store_location == tmp_path / "bench.db"
    assert common.server_env(settings)["FEDIBLOG_DATABASE"] == str(tmp_path / "bench.db")
    assert common.backend() == "sqlite"


async def _database_names(admin: str) -> set[str]:
    import asyncpg

    connection = await asyncpg.connect(admin)
    try:
        return {row[0] for row in await connection.fetch("SELECT datname FROM pg_database")}
    finally:
        await connection.close()


@pytest.mark.skipif(BACKEND != "postgresql", reason="needs a PostgreSQL server (.ci/run)")
def test_with_postgres_each_bench_folder_has_a_database_of_its_own_dropped_with_it(
    bench_env: pytest.MonkeyPatch,
) -> None:
    assert TEST_POSTGRES is not None
    bench_env.setenv(POSTGRES_ENV, TEST_POSTGRES)
    with common.bench_folder("bench-test-") as tmp:
        folder = Path(tmp)
        settings = common.bench_settings(folder, 4321)
        url = settings.database_url
        assert url.startswith("postgresql://")
        assert common.server_env(settings)["FEDIBLOG_DATABASE"] == url
        assert common.bench_settings(folder, 4321).database_url == url  # the same blog
        with common.bench_folder("bench-test-") as other:
            assert common.bench_settings(Path(other), 4321).database_url != url
        name = url.rsplit("/", 1)[1]
        assert name in asyncio.run(_database_names(TEST_POSTGRES))
        with Reader(settings) as db:
            assert db.one("SELECT current_database()") == name
    assert name not in asyncio.run(_database_names(TEST_POSTGRES))


def test_new_rows_include_those_committed_after_a_higher_id(tmp_path: Path) -> None:
    """On PostgreSQL a row can commit after one with a higher id was read: the poller
    asks for the skipped ids again until they show, then gives up on them."""
    settings = make_settings(tmp_path)  # on the backend of this run
    settings.database.parent.mkdir(exist_ok=True)  # SQLite's file is made, not its folder
    with Reader(settings) as db:
        db.rows("CREATE TABLE bench_rows (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        db.rows("INSERT INTO bench_rows (id, v) VALUES (1, 'old')")
        rows = _NewRows(db, "bench_rows", "v")
        assert rows.read(db) == []  # what was there before is not new
        db.rows("INSERT INTO bench_rows (id, v) VALUES (2, 'a'), (5, 'b')")
        assert sorted(rows.read(db)) == [(2, "a"), (5, "b")]
        assert set(rows.gaps) == {3, 4}
        db.rows("INSERT INTO bench_rows (id, v) VALUES (4, 'late'), (6, 'c')")
        assert sorted(rows.read(db)) == [(4, "late"), (6, "c")]
        assert rows.read(db) == []  # each row once
        rows.GAP_WAIT = -1.0  # 3 never comes (an insert rolled back): given up
        assert rows.read(db) == []
        assert rows.gaps == {}
        db.rows("INSERT INTO bench_rows (id, v) VALUES (3, 'too late')")
        assert rows.read(db) == []
