"""Run a real, throwaway Prefect server for tests, demos and local trials.

The server is the same ``prefect server start`` a team runs, on a free loopback
port with its own ``PREFECT_HOME``, so nothing touches the user's profile.

```python
from dispatch_prefect.testing import local_prefect_server

with local_prefect_server() as server:
    print(server.api_url)
```
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

__all__ = [
    "LocalPrefectServer",
    "free_port",
    "local_prefect_server",
    "prefect_worker",
]


@dataclass(frozen=True)
class LocalPrefectServer:
    """Where a running throwaway server answers, and the environment to reach it."""

    api_url: str
    ui_url: str
    home: Path
    log_path: Path
    env: dict[str, str] = field(repr=False)


def free_port() -> int:
    """Return a TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]

        return port


def prefect_executable() -> str:
    """The ``prefect`` command of the running interpreter's environment."""
    beside = Path(sys.executable).parent / "prefect"
    if beside.exists():
        return str(beside)

    found = shutil.which("prefect")
    if found is None:
        raise FileNotFoundError(
            "the 'prefect' command is not installed next to "
            f"{sys.executable}; install dispatch-prefect into this environment"
        )

    return found


@contextlib.contextmanager
def local_prefect_server(
    *,
    home: Path | None = None,
    ui: bool = False,
    port: int | None = None,
    startup_timeout_s: float = 120.0,
) -> Iterator[LocalPrefectServer]:
    """Start ``prefect server start`` on a free port; stop it on exit.

    Args:
        home: ``PREFECT_HOME`` of the server (and of processes given its
            ``env``); a temporary folder, removed on exit, when None.
        ui: serve the Prefect UI too (slower to start).
        port: the loopback port to listen on; a free one when None.
        startup_timeout_s: how long to wait for ``/api/health``.

    Raises:
        TimeoutError: the server did not answer in time; the message names
            the log file that says why.
    """
    owned_home = home is None
    home_path = (
        Path(tempfile.mkdtemp(prefix="dispatch-prefect-")) if home is None else home
    )
    home_path.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home_path),
        "PREFECT_API_URL": api_url,
        "PREFECT_UI_API_URL": api_url,
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "true" if ui else "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING"),
    }
    log_path = home_path / "server.log"

    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [prefect_executable(), "server", "start", "--no-prompt"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    try:
        _wait_until(
            lambda: httpx.get(f"{api_url}/health", timeout=2).status_code == 200,
            process,
            what=f"prefect server at {api_url}",
            log_path=log_path,
            timeout_s=startup_timeout_s,
        )
        yield LocalPrefectServer(
            api_url=api_url,
            ui_url=f"http://127.0.0.1:{port}",
            home=home_path,
            log_path=log_path,
            env=env,
        )
    finally:
        _stop(process)
        if owned_home:
            shutil.rmtree(home_path, ignore_errors=True)


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies, so none is orphaned."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _wait_until(
    ready: Callable[[], bool],
    process: subprocess.Popen[bytes],
    *,
    what: str,
    log_path: Path,
    timeout_s: float,
) -> None:
    """Poll ``ready`` until it says yes; fail fast if ``process`` dies."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{what} exited with code {process.returncode}; see {log_path}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if ready():
                return
        time.sleep(0.5)

    raise TimeoutError(f"{what} was not ready within {timeout_s:.0f} s; see {log_path}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return

    # The server runs in its own session: signal the whole group so its
    # uvicorn children go too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextlib.contextmanager
def prefect_worker(
    pool: str,
    *,
    env: dict[str, str],
    cwd: Path | None = None,
    worker_type: str = "process",
    log_path: Path | None = None,
    startup_timeout_s: float = 60.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``prefect worker start --pool POOL`` until the block exits.

    The pool is created if missing. Waits until the server has seen the
    worker's first heartbeat, so work submitted next is picked up.
    """
    log_file = log_path or Path(tempfile.mkstemp(prefix=f"worker-{pool}-")[1])
    with open(log_file, "wb") as log:
        process = subprocess.Popen(
            [
                prefect_executable(),
                "worker",
                "start",
                "--pool",
                pool,
                "--type",
                worker_type,
                "--prefetch-seconds",
                "5",
            ],
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    try:
        workers_url = f"{env['PREFECT_API_URL']}/work_pools/{pool}/workers/filter"

        def worker_seen() -> bool:
            response = httpx.post(workers_url, json={}, timeout=2)
            return response.status_code == 200 and bool(response.json())

        _wait_until(
            worker_seen,
            process,
            what=f"worker for pool {pool!r}",
            log_path=log_file,
            timeout_s=startup_timeout_s,
        )
        yield process
    finally:
        _stop(process)
