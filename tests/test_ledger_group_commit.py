"""SQLite group commit: the writer holding the lock commits for the others.

The load tests (test_ledger_concurrency) show that no money is lost or
doubled with many processes at once. These tests stand in for the leader by
hand, with the ledger's own socket and steps, to show what a writer does
when its leader fails it: the step is never run twice, never run after its
writer gave up, and a leader that died before answering costs nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from dispatch_prefect.ledger import (
    Ledger,
    LedgerUnavailable,
    ReservationKey,
    UnknownReservation,
    group_commit,
)
from dispatch_prefect.ledger.group_commit import Leadership, Request, WriteGroup
from dispatch_prefect.policy import BudgetCap

pytestmark = pytest.mark.skipif(
    not WriteGroup.possible(), reason="group commit needs Linux's abstract sockets"
)

CAP = BudgetCap(run_usd=Decimal("10"), month_usd=Decimal("100"))
KEY = ReservationKey("run-a", "task-1", 1)


@pytest.fixture
def ledger_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "ledger.db"
    Ledger.open(f"sqlite:///{path}").close()
    yield path


def group_of(path: Path) -> WriteGroup:
    found = os.stat(path)
    return WriteGroup((found.st_dev, found.st_ino))


@contextlib.contextmanager
def a_writer_under_a_held_leader(
    path: Path, *, lock_timeout_s: float = 10.0
) -> Iterator[tuple[Leadership, Future[Any]]]:
    """The test leads; another writer calls ``reserve(KEY)`` in a thread."""
    leadership = group_of(path).lead()
    assert leadership is not None
    pool = ThreadPoolExecutor(max_workers=1)
    ledger = Ledger.open(f"sqlite:///{path}", lock_timeout_s=lock_timeout_s)
    try:
        yield (
            leadership,
            pool.submit(
                ledger.reserve, KEY, budget="team", bound_usd=Decimal("1.25"), cap=CAP
            ),
        )
    finally:
        leadership.close()
        pool.shutdown(wait=True)
        ledger.close()


def first_request(leadership: Leadership, timeout_s: float = 10.0) -> Request:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        requests = leadership.collect()
        if requests:
            [request] = requests
            return request
        time.sleep(0.005)
    raise AssertionError("no writer sent a request to the leader")


def commit_as_leader(path: Path, batch: list[Request]) -> list[dict[str, Any]]:
    """Commit ``batch`` in one transaction the way a leading writer does."""
    with Ledger.open(f"sqlite:///{path}") as ledger:
        sessions = ledger._sessions
        assert sessions is not None
        return sessions._commit_round(sessions._connection(), batch)


def test_a_writer_sends_its_step_to_the_leader_and_takes_its_answer(
    ledger_file: Path,
) -> None:
    with a_writer_under_a_held_leader(ledger_file) as (leadership, future):
        request = first_request(leadership)
        assert request.step == "reserve"
        assert request.body["row"]["task_run_id"] == "task-1"
        assert not future.done()  # it waits for the leader's answer

        [outcome] = commit_as_leader(ledger_file, [request])
        leadership.answer(request, outcome)

        made = future.result(timeout=10)
    assert made.key == KEY
    assert made.bound_usd == Decimal("1.25")
    with Ledger.open(f"sqlite:///{ledger_file}") as ledger:
        run, month = ledger.window_states("team", "run-a")
    assert run.reserved_usd == month.reserved_usd == Decimal("1.25")


def test_a_leader_that_stops_before_running_a_step_lets_its_writer_run_it(
    ledger_file: Path,
) -> None:
    with a_writer_under_a_held_leader(ledger_file) as (leadership, future):
        first_request(leadership)
        leadership.close()  # gone without running it

        made = future.result(timeout=10)
    assert made.key == KEY
    with Ledger.open(f"sqlite:///{ledger_file}") as ledger:
        run, _month = ledger.window_states("team", "run-a")
    assert run.reserved_usd == Decimal("1.25")


def test_a_leader_that_dies_after_its_commit_costs_nothing_twice(
    ledger_file: Path,
) -> None:
    with a_writer_under_a_held_leader(ledger_file) as (leadership, future):
        request = first_request(leadership)
        [outcome] = commit_as_leader(ledger_file, [request])
        assert outcome == {"ok": ["made"]}
        leadership.close()  # committed, never answered

        made = future.result(timeout=10)
    # The writer ran its step again: it found its reservation, not a second.
    assert made.key == KEY
    with Ledger.open(f"sqlite:///{ledger_file}") as ledger:
        run, month = ledger.window_states("team", "run-a")
        assert len(ledger.reservations()) == 1
    assert run.reserved_usd == month.reserved_usd == Decimal("1.25")


def test_a_step_reached_after_its_writer_gave_up_is_not_run(
    ledger_file: Path,
) -> None:
    held = a_writer_under_a_held_leader(ledger_file, lock_timeout_s=0.3)
    with held as (leadership, future):
        request = first_request(leadership)
        time.sleep(0.5)  # the leader waited for its turn too long

        [outcome] = commit_as_leader(ledger_file, [request])
        leadership.answer(request, outcome)

        with pytest.raises(LedgerUnavailable, match="nothing was changed"):
            future.result(timeout=10)
    assert outcome == {"expired": True}
    with (
        Ledger.open(f"sqlite:///{ledger_file}") as ledger,
        pytest.raises(UnknownReservation),
    ):
        ledger.reservation(KEY)


def test_a_failing_step_is_rolled_back_alone(ledger_file: Path) -> None:
    def broken(cursor: Any, body: Any) -> Any:
        cursor.execute(
            "UPDATE dispatch_ledger_totals SET spent_usd = '999' WHERE budget = 'team'"
        )
        raise RuntimeError("a step that fails after writing")

    with Ledger.open(f"sqlite:///{ledger_file}") as ledger:
        ledger.reserve(KEY, budget="team", bound_usd=Decimal("1.25"), cap=CAP)
        sessions = ledger._sessions
        assert sessions is not None
        sessions._steps["broken"] = broken
        other = ReservationKey("run-a", "task-2", 1)
        row = {**ledger._params(ledger.reservation(KEY)), "task_run_id": "task-2"}
        body = {"row": row, "run_cap": "10", "month_cap": "100"}
        deadline = time.monotonic() + 10

        outcomes = sessions._commit_round(
            sessions._connection(),
            [Request("broken", {}, deadline), Request("reserve", body, deadline)],
        )

        assert outcomes[0]["error"] == "a step that fails after writing"
        assert outcomes[1] == {"ok": ["made"]}
        run, _month = ledger.window_states("team", "run-a")
        assert run.spent_usd == 0
        assert run.reserved_usd == Decimal("2.50")
        assert ledger.reservation(other).bound_usd == Decimal("1.25")


def test_a_forked_child_does_not_keep_the_leaders_sockets(
    ledger_file: Path,
) -> None:
    group = group_of(ledger_file)
    leadership = group.lead()
    assert leadership is not None
    started, tell = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.write(tell, b"up")
        time.sleep(3)
        os._exit(0)
    try:
        assert os.read(started, 2) == b"up"
        leadership.close()
        # Had the child kept the listening socket, the name would be taken.
        again = group.lead()
        assert again is not None
        again.close()
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)


@pytest.mark.skipif(
    sys.platform != "linux" or os.getuid() != 0,
    reason="needs root to connect as another user",
)
def test_the_leader_serves_only_its_own_user(ledger_file: Path) -> None:
    group = group_of(ledger_file)
    leadership = group.lead()
    assert leadership is not None
    name = group._name
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
                connection.settimeout(5)
                connection.connect(name)
                connection.sendall(
                    group_commit._frame(
                        {"id": 1, "step": "reserve", "body": {}, "deadline": 1e12}
                    )
                )
                # The leader hangs up without reading it.
                try:
                    code = 0 if connection.recv(1) == b"" else 2
                except ConnectionResetError:
                    code = 0
        finally:
            os._exit(code)
    try:
        time.sleep(0.5)
        assert leadership.collect() == []
        _pid, status = os.waitpid(child, 0)
        assert os.WEXITSTATUS(status) == 0
    finally:
        leadership.close()


@pytest.mark.parametrize("groups", [True, False], ids=["in-groups", "taking-turns"])
def test_threads_of_one_process_settle_exactly(
    ledger_file: Path, monkeypatch: pytest.MonkeyPatch, groups: bool
) -> None:
    if not groups:
        monkeypatch.setattr(WriteGroup, "possible", staticmethod(lambda: False))
    with Ledger.open(f"sqlite:///{ledger_file}") as ledger:
        errors: list[BaseException] = []

        def pairs(index: int) -> None:
            try:
                for attempt in range(20):
                    key = ReservationKey("run-a", f"t{index}-{attempt}", 1)
                    ledger.reserve(
                        key, budget="team", bound_usd=Decimal("0.10"), cap=CAP
                    )
                    ledger.reconcile(key, Decimal("0.07"))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=pairs, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert errors == []
        run, _month = ledger.window_states("team", "run-a")
        assert run.reserved_usd == 0
        assert run.spent_usd == Decimal("5.60")
