"""Shared fixtures: a real Prefect server, real databases, no user state touched."""

from __future__ import annotations

import os
import tempfile

# Before Prefect is imported anywhere: keep tests away from ~/.prefect.
os.environ.setdefault(
    "PREFECT_HOME", tempfile.mkdtemp(prefix="dispatch-prefect-tests-")
)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from dispatch_prefect.testing import (
    LocalPrefectServer,
    free_port,
    local_prefect_server,
)

# The session's server answers on this port once the `prefect_server`
# fixture has started it. Setting the URL before Prefect is imported makes
# every thread and child process of the test session use it, not only the
# code that runs inside a settings context.
SERVER_PORT = free_port()
os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{SERVER_PORT}/api"

if TYPE_CHECKING:
    from dispatch_prefect.ledger import Ledger

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[LocalPrefectServer]:
    """One real ``prefect server start`` (with its UI) for the whole session.

    The test process and its threads reach it through ``PREFECT_API_URL``,
    set when this file is loaded; child processes (workers) get
    ``server.env``.
    """
    with local_prefect_server(ui=True, port=SERVER_PORT) as server:
        yield server
        drain_prefect_clients()


def drain_prefect_clients() -> None:
    """Send what Prefect's background services still hold before the server goes."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (EventsWorker, APILogWorker):
        service.drain_all(timeout=10)


@pytest.fixture(scope="session")
def pg_url() -> str:
    """A reachable PostgreSQL URL; under CI an unreachable server fails the run."""
    import sqlalchemy

    url = os.environ.get("DISPATCH_PREFECT_TEST_PG_URL", DEFAULT_PG_URL)
    sa_url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        engine = sqlalchemy.create_engine(sa_url)
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("select 1"))
        engine.dispose()
    except Exception as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL at {url} is unreachable under CI: {exc}")
        pytest.skip(
            f"PostgreSQL at {url} is unreachable ({exc.__class__.__name__}); "
            "start one or set DISPATCH_PREFECT_TEST_PG_URL to run these tests"
        )

    return url


def saved_ledger(block_name: str, folder: Path) -> Ledger:
    """A SQLite ledger in ``folder``, saved as the ledger block ``block_name``.

    Returns the test's own handle on the same file the gate opens by name.
    """
    from dispatch_prefect.blocks import LedgerBlock
    from dispatch_prefect.ledger import Ledger

    url = f"sqlite:///{folder / 'ledger.db'}"
    LedgerBlock(url=url).save(block_name, overwrite=True)

    return Ledger.open(url)


@pytest.fixture(params=["sqlite", "postgres"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    """An empty ledger on each database (a fresh PostgreSQL schema per test)."""
    from dispatch_prefect.ledger import Ledger

    if request.param == "sqlite":
        with Ledger.open(f"sqlite:///{tmp_path}/ledger.db") as opened:
            yield opened
        return

    with ledger_in_a_fresh_schema(request.getfixturevalue("pg_url")) as opened:
        yield opened


@contextlib.contextmanager
def ledger_in_a_fresh_schema(pg_url: str) -> Iterator[Ledger]:
    """A PostgreSQL ledger in a schema of its own, dropped afterwards."""
    import psycopg

    from dispatch_prefect.ledger import Ledger

    schema = f"ledger_test_{uuid.uuid4().hex[:10]}"
    try:
        with Ledger.open(pg_url, schema=schema) as opened:
            yield opened
    finally:
        with psycopg.connect(pg_url, autocommit=True) as connection:
            connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
