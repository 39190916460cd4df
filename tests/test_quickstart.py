"""The README's demo command runs its whole story offline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

pytestmark = pytest.mark.prefect_server

DEMO = Path(__file__).parent.parent / "flows" / "quickstart.py"


def test_demo_refuses_then_approves_runs_and_reconciles(tmp_path: Path) -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PREFECT_")
    }
    done = subprocess.run(
        [sys.executable, str(DEMO)],
        env={**env, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=480,
        check=False,
    )
    out = done.stdout

    assert done.returncode == 0, out + done.stderr
    assert "routed LOCAL" in out
    assert re.search(r"cofold on cloud-run-l4 refused: the run cap is \$0", out)
    assert re.search(r"approved [0-9a-f-]{36} as operator", out)
    assert "standing in for Cloud Run L4" in out
    spent = re.search(
        r"reconciled cofold on cloud-run-l4: reserved \$([\d.]+), spent \$([\d.]+)",
        out,
    )
    assert spent is not None, out
    reserved_usd, spent_usd = Decimal(spent.group(1)), Decimal(spent.group(2))
    assert 0 < spent_usd < reserved_usd
    assert "Traceback" not in out + done.stderr
