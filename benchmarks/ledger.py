"""How fast the ledger admits, what it prevents, and that history costs nothing.

Run from the repository root (PostgreSQL as in the tests; ``--quick`` runs a
quarter of the load with 1 s raw samples and skips ``scale``, for iterating):

    .venv/bin/python benchmarks/ledger.py

For SQLite and for PostgreSQL, in one run:

- ``raw_commits_per_s``: 8 processes each looping over bare single-row
  read-then-update transactions on the same database with the same
  durability (SQLite WAL + ``synchronous=FULL``; PostgreSQL with its
  defaults). One row, so they serialize like the ledger's month window.
  The ledger load runs in four slices and the raw loop is measured before,
  between and after them; the median of the five rates is used (disk
  latency on a shared machine swings by several times within a minute).
- ``pairs_per_s``: 8 processes each making reserve + reconcile pairs
  against one budget whose caps refuse some: the processes share each run
  window, which admits about 9 in 10 of its attempts, and the month cap
  stops the last tenth of the load.
- ``efficiency = 2 * pairs_per_s / raw_commits_per_s``: a pair is two
  transactions, so 1.0 would mean the ledger costs no more than the bare
  loop.
- ``overspend_usd``: what the committed total of any window is above its
  cap; ``admitted``: the pairs admitted. The committed month total is also
  checked to equal the sum of what the processes were admitted.

``naive_sqlite`` runs the same load through check-then-act (``check``, then
a write that does not decide again) and shows the overspend the ledger's
single transaction prevents.

``scale`` is the median time of one ``check`` against a ledger with 1,000
and with 1,000,000 reservations in history, measured in alternating rounds.

The last line printed is one JSON object with all the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

from dispatch_prefect.ledger import BudgetExceeded, Ledger, ReservationKey
from dispatch_prefect.policy import BudgetCap

PROCESSES = 8
SLICES = 4
ATTEMPTS_PER_RUN = 10
BOUND_USD = Decimal("0.10")
ACTUAL_USD = Decimal("0.08")
# All processes share each run window, 80 attempts a run: one after another,
# 72 pairs of $0.08 and one more bound of $0.10 fit; the rest are refused.
RUN_CAP_USD = Decimal("5.86")
UNLIMITED = BudgetCap(run_usd=Decimal(10) ** 12, month_usd=Decimal(10) ** 12)
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sqlite-attempts", type=int, default=400)
    parser.add_argument("--pg-attempts", type=int, default=120)
    parser.add_argument("--raw-seconds", type=float, default=3.0)
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="for iterating: a quarter of the load, 1 s raw samples, no scale part",
    )
    parser.add_argument(
        "--only",
        default="sqlite,postgres,naive_sqlite,scale",
        help="comma-separated parts to run (all by default)",
    )
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("DISPATCH_PREFECT_TEST_PG_URL", DEFAULT_PG_URL),
    )
    args = parser.parse_args()
    if args.quick:
        args.sqlite_attempts //= 4
        args.pg_attempts //= 4
        args.raw_seconds = min(args.raw_seconds, 1.0)

    context = multiprocessing.get_context("spawn")
    wanted = set(args.only.split(","))
    if args.quick:
        wanted.discard("scale")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as folder:
        if "sqlite" in wanted:
            results["sqlite"] = contention(
                context,
                f"sqlite:///{folder}/ledger.db",
                None,
                args.sqlite_attempts,
                args.raw_seconds,
            )
        if "postgres" in wanted:
            results["postgres"] = postgres_contention(context, args)
        if "naive_sqlite" in wanted:
            results["naive_sqlite"] = naive(
                context, f"sqlite:///{folder}/naive.db", args
            )
        if "scale" in wanted:
            results["scale"] = scale(Path(folder), args.history)

    print(json.dumps(results))


def contention(
    context: Any, url: str, schema: str | None, attempts: int, raw_seconds: float
) -> dict[str, Any]:
    """The ledger load in slices, with the raw loop before, between and after.

    Disk latency on a shared machine swings by several times within a
    minute, so the raw rate is sampled around every slice; the median is
    used.
    """
    Ledger.open(url, schema=schema).close()
    prepare_counter(url, schema)

    raw_rates: list[float] = []
    load = run_load(
        context,
        url,
        schema,
        attempts,
        naive=False,
        between=lambda: raw_rates.append(raw_rate(context, url, schema, raw_seconds)),
    )
    # The median: one sample taken while the shared disk had a fast moment
    # would otherwise stand for all of them.
    raw = statistics.median(raw_rates)
    pairs_per_s = load["admitted"] / load["seconds"]
    log(
        f"{url.split(':')[0]}: raw {[round(rate) for rate in raw_rates]} "
        f"commits/s, {pairs_per_s:.0f} pairs/s, {load['admitted']} admitted, "
        f"{load['refused']} refused"
    )

    return {
        "processes": PROCESSES,
        "pairs_per_s": round(pairs_per_s, 1),
        "raw_commits_per_s": round(raw, 1),
        "efficiency": round(2 * pairs_per_s / raw, 3),
        "overspend_usd": str(load["overspend_usd"]),
        "admitted": load["admitted"],
    }


def postgres_contention(context: Any, args: argparse.Namespace) -> dict[str, Any]:
    schema = f"ledger_bench_{uuid.uuid4().hex[:8]}"
    try:
        return contention(
            context, args.pg_url, schema, args.pg_attempts, args.raw_seconds
        )
    finally:
        drop_schema(args.pg_url, schema)


def naive(context: Any, url: str, args: argparse.Namespace) -> dict[str, Any]:
    Ledger.open(url).close()
    load = run_load(context, url, None, args.sqlite_attempts, naive=True)
    log(f"naive sqlite: overspend ${load['overspend_usd']}")

    return {"overspend_usd": str(load["overspend_usd"]), "admitted": load["admitted"]}


def run_load(
    context: Any,
    url: str,
    schema: str | None,
    attempts: int,
    *,
    naive: bool,
    between: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """8 processes of reserve + reconcile pairs; checks the windows after.

    With ``between``, the load runs in SLICES parts and ``between`` runs
    before, between and after them (outside the timed part).
    """
    budget = f"bench-{uuid.uuid4().hex[:8]}"
    slices = 1 if between is None else SLICES
    per_slice = attempts // slices
    attempts = per_slice * slices
    # Run caps admit about 9 in 10; the month cap stops the last tenth.
    admissible = PROCESSES * attempts * 9 // ATTEMPTS_PER_RUN
    month_cap = ACTUAL_USD * (admissible * 9 // 10)
    cap = BudgetCap(run_usd=RUN_CAP_USD, month_usd=month_cap)
    spec = {
        "url": url,
        "schema": schema,
        "budget": budget,
        "attempts": per_slice,
        "run_cap": str(cap.run_usd),
        "month_cap": str(cap.month_usd),
        "naive": naive,
    }

    outcomes: list[dict[str, Any]] = []
    seconds = 0.0
    for part in range(slices):
        if between is not None:
            between()
        done = run_processes(context, load_worker, {**spec, "first": part * per_slice})
        seconds += max(outcome["seconds"] for outcome in done)
        outcomes.extend(done)
    if between is not None:
        between()

    admitted = sum(outcome["admitted"] for outcome in outcomes)
    admitted_usd = sum(
        (Decimal(outcome["spent_usd"]) for outcome in outcomes), Decimal(0)
    )

    with Ledger.open(url, schema=schema) as ledger:
        months = ledger.month_totals(budget)
        committed = sum((month.committed_usd for month in months), Decimal(0))
        overspend = max(committed - month_cap, Decimal(0))
        for run_id in {run_id for outcome in outcomes for run_id in outcome["runs"]}:
            run_state, _month = ledger.window_states(budget, run_id)
            overspend += max(run_state.committed() - cap.run_usd, Decimal(0))
    if not naive and committed != admitted_usd:
        raise SystemExit(
            f"the ledger committed ${committed} but the processes were "
            f"admitted ${admitted_usd}"
        )

    return {
        "admitted": admitted,
        "refused": sum(outcome["refused"] for outcome in outcomes),
        "seconds": seconds,
        "overspend_usd": overspend,
    }


def load_worker(spec: dict[str, Any], index: int) -> dict[str, Any]:
    """One process of the load: reserve, then reconcile what was admitted."""
    cap = BudgetCap(
        run_usd=Decimal(spec["run_cap"]), month_usd=Decimal(spec["month_cap"])
    )
    budget = spec["budget"]
    admitted, refused = 0, 0
    spent = Decimal(0)
    runs: set[str] = set()
    with Ledger.open(spec["url"], schema=spec["schema"], lock_timeout_s=60) as ledger:
        started = wait_for_start(spec)
        first = spec.get("first", 0)
        for attempt in range(first, first + spec["attempts"]):
            run_id = f"{budget}-run{attempt // ATTEMPTS_PER_RUN}"
            key = ReservationKey(run_id, f"p{index}-task{attempt}", 1)
            runs.add(run_id)
            try:
                if spec["naive"]:
                    decision = ledger.check(budget, run_id, BOUND_USD, cap)
                    if not decision.admitted:
                        raise BudgetExceeded(decision.reason, decision)
                    # Acts on a decision another process may have made stale.
                    ledger.reserve(
                        key, budget=budget, bound_usd=BOUND_USD, cap=UNLIMITED
                    )
                else:
                    ledger.reserve(key, budget=budget, bound_usd=BOUND_USD, cap=cap)
            except BudgetExceeded:
                refused += 1
                continue
            ledger.reconcile(key, ACTUAL_USD)
            admitted += 1
            spent += ACTUAL_USD
        seconds = time.time() - started
        wait_for_all_done(spec)

    return {
        "admitted": admitted,
        "refused": refused,
        "spent_usd": str(spent),
        "runs": sorted(runs),
        "seconds": seconds,
    }


def raw_rate(context: Any, url: str, schema: str | None, seconds: float) -> float:
    spec = {"url": url, "schema": schema, "seconds": seconds}
    outcomes = run_processes(context, raw_worker, spec)

    return sum(outcome["commits"] for outcome in outcomes) / seconds


def raw_worker(spec: dict[str, Any], index: int) -> dict[str, Any]:
    """Bare read-then-update transactions on one row, for ``seconds``."""
    connection, begin, select, update = raw_connection(spec["url"], spec["schema"])
    commits = 0
    try:
        wait_for_start(spec)
        deadline = time.monotonic() + spec["seconds"]
        while time.monotonic() < deadline:
            cursor = connection.cursor()
            if begin:
                cursor.execute(begin)
            cursor.execute(select)
            (value,) = cursor.fetchone()
            cursor.execute(update, (str(int(value) + 1),))
            connection.commit()
            commits += 1
        wait_for_all_done(spec)
    finally:
        connection.close()

    return {"commits": commits}


def raw_connection(url: str, schema: str | None) -> tuple[Any, str, str, str]:
    """A driver connection with the ledger's durability, and its statements."""
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")
        connection = sqlite3.connect(path, timeout=60, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        return (
            connection,
            "BEGIN IMMEDIATE",
            "SELECT v FROM bench_counter WHERE id = 1",
            "UPDATE bench_counter SET v = ? WHERE id = 1",
        )

    import psycopg

    connection = psycopg.connect(url, options=f"-c search_path={schema}")
    return (
        connection,
        "",
        "SELECT v FROM bench_counter WHERE id = 1 FOR UPDATE",
        "UPDATE bench_counter SET v = %s WHERE id = 1",
    )


def prepare_counter(url: str, schema: str | None) -> None:
    connection, _begin, _select, _update = raw_connection(url, schema)
    try:
        connection.execute(
            "CREATE TABLE IF NOT EXISTS bench_counter "
            "(id INTEGER PRIMARY KEY, v VARCHAR NOT NULL)"
        )
        connection.execute("DELETE FROM bench_counter")
        connection.execute("INSERT INTO bench_counter (id, v) VALUES (1, '0')")
        connection.commit()
    finally:
        connection.close()


def drop_schema(url: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def run_processes(context: Any, target: Any, spec: dict[str, Any]) -> list[Any]:
    """Start PROCESSES workers, let them go at once, collect their results."""
    ready = context.Barrier(PROCESSES + 1)
    done = context.Barrier(PROCESSES)
    results = context.Queue()
    spec = {**spec, "ready": ready, "done": done}
    workers = [
        context.Process(target=_child, args=(target, spec, index, results))
        for index in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    ready.wait(timeout=120)
    outcomes = [results.get(timeout=900) for _worker in workers]
    for worker in workers:
        worker.join(timeout=60)
    failures = [outcome for outcome in outcomes if "error" in outcome]
    if failures:
        raise SystemExit(f"a worker failed: {failures[0]['error']}")

    return outcomes


def _child(target: Any, spec: dict[str, Any], index: int, results: Any) -> None:
    # Refusals are expected here by the thousand; keep stderr readable.
    logging.getLogger("dispatch_prefect.ledger").setLevel(logging.ERROR)
    try:
        results.put(target(spec, index))
    except BaseException as exc:
        spec["done"].abort()  # the others stop waiting for this one
        results.put({"error": f"{exc.__class__.__name__}: {exc}"})
        raise


def wait_for_start(spec: dict[str, Any]) -> float:
    spec["ready"].wait(timeout=120)

    return time.time()


def wait_for_all_done(spec: dict[str, Any]) -> None:
    """Stay until every worker has finished its timed part.

    A worker that closed its connections and exited while others still
    ran would take CPU from them for its teardown (about 65 ms of
    interpreter shutdown, on a 2-core machine), and that would be counted
    against whatever they measure.
    """
    spec["done"].wait(timeout=900)


def scale(folder: Path, history: int) -> dict[str, float]:
    """Median ``check`` time with 1,000 and with ``history`` rows behind it."""
    ledgers = {}
    for name, rows in (("small", 1_000), ("large", history)):
        path = folder / f"scale-{name}.db"
        Ledger.open(f"sqlite:///{path}").close()
        fill(path, rows)
        ledgers[name] = Ledger.open(f"sqlite:///{path}")

    cap = BudgetCap(run_usd=Decimal(100), month_usd=Decimal(10**6))
    timings: dict[str, list[float]] = {"small": [], "large": []}
    try:
        for _round in range(20):
            for name, ledger in ledgers.items():
                for _check in range(100):
                    started = time.perf_counter()
                    ledger.check("scale", "run-7", Decimal("0.25"), cap)
                    timings[name].append(time.perf_counter() - started)
    finally:
        for ledger in ledgers.values():
            ledger.close()

    check_us_1k = statistics.median(timings["small"]) * 1e6
    check_us_1m = statistics.median(timings["large"]) * 1e6
    log(f"scale: check {check_us_1k:.0f} us at 1k rows, {check_us_1m:.0f} us at 1m")

    return {"check_us_1k": round(check_us_1k, 1), "check_us_1m": round(check_us_1m, 1)}


def fill(path: Path, rows: int) -> None:
    """``rows`` settled reservations over two years, ten to a run, and totals.

    Written in bulk by SQLite itself (the ledger's own path would take an
    hour for a million rows on a small machine); the totals are the exact
    sums of the rows, as the ledger would have kept them.
    """
    moment = "'now', '-' || (i % 730) || ' days', '-' || (i % 86400) || ' seconds'"
    cents = "CAST(REPLACE(bound_usd, '.', '') AS INTEGER)"
    usd = f"printf('%d.%02d', SUM({cents}) / 100, SUM({cents}) % 100)"
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA synchronous=OFF")
        connection.execute(
            f"""
            WITH RECURSIVE n(i) AS (
                SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < {rows}
            )
            INSERT INTO dispatch_ledger_reservations (
                root_run_id, task_run_id, attempt, budget, month, time_zone,
                bound_usd, actual_usd, status, overrun, swept, unverified,
                created_at, settled_at, label
            )
            SELECT 'run-' || (i / 10), 'task-' || i, 1, 'scale',
                strftime('%Y-%m', {moment}), 'UTC',
                printf('%d.%02d', i % 97, i % 100),
                printf('%d.%02d', i % 97, i % 100),
                'spent', 0, 0, 0,
                strftime('%Y-%m-%d %H:%M:%S.000000', {moment}),
                strftime('%Y-%m-%d %H:%M:%S.000000', {moment}), ''
            FROM n
            """
        )
        for kind, column in (("run", "root_run_id"), ("month", "month")):
            connection.execute(
                f"""
                INSERT INTO dispatch_ledger_totals
                SELECT budget, '{kind}', {column}, '0', {usd}
                FROM dispatch_ledger_reservations GROUP BY budget, {column}
                """
            )
    log(f"scale: {rows} reservations in history")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
