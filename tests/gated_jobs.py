"""Gated functions the gate tests run, importable by the test workers too."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path


def gpu_job(sequence: str, seconds: float = 1.0) -> dict[str, object]:
    time.sleep(seconds)
    return {"sequence": sequence, "length": len(sequence), "pid": os.getpid()}


def count_attempt(marker: str) -> int:
    """Append to a marker file and return how many calls it has seen."""
    path = Path(marker)
    with path.open("a") as handle:
        handle.write("x")

    return len(path.read_text())


def flaky(marker: str) -> str:
    """Fail on the first call, succeed on the second."""
    if count_attempt(marker) == 1:
        raise RuntimeError("first attempt fails on purpose")

    return "second attempt ran"


async def async_tokenize(text: str) -> list[str]:
    await asyncio.sleep(0.01)
    return text.split()
