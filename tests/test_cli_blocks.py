"""The ``dispatch-prefect blocks`` commands and Prefect's own registration."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from test_blocks_server import saved_blocks_removed  # noqa: F401  (a fixture)

from dispatch_prefect.blocks import BLOCK_CLASSES, BudgetBlock, find_saved_block
from dispatch_prefect.testing import LocalPrefectServer

# The session server is shared: what these tests save is deleted after each.
pytestmark = pytest.mark.usefixtures("saved_blocks_removed")

REPO_BLOCKS = Path(__file__).resolve().parent.parent / "blocks"
BIN = Path(sys.executable).parent


def _run(server: LocalPrefectServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, env=server.env, capture_output=True, text=True, timeout=180
    )


def _suffixed_team_folder(folder: Path, suffix: str) -> int:
    """Copy blocks/team.toml, every document name and reference suffixed.

    The session server is shared with other tests; unique names keep this
    test from touching their 'default' documents.
    """
    text = (REPO_BLOCKS / "team.toml").read_text()
    text, documents = re.subn(
        r"^\[(budget|rates|secret|backend|ledger)\.([\w-]+)\]$",
        rf"[\1.\2-{suffix}]",
        text,
        flags=re.MULTILINE,
    )
    text = re.sub(
        r"^\[backend\.([\w-]+)\.job_variables\]$",
        rf"[backend.\1-{suffix}.job_variables]",
        text,
        flags=re.MULTILINE,
    )
    text = re.sub(
        r'^(rates|secret) = "([\w-]+)"',
        rf'\1 = "\2-{suffix}"',
        text,
        flags=re.MULTILINE,
    )
    folder.mkdir()
    (folder / "team.toml").write_text(text)

    return documents


def test_apply_the_team_folder_twice(
    prefect_server: LocalPrefectServer, tmp_path: Path
) -> None:
    """First every document is created, then every one is left alone."""
    suffix = uuid.uuid4().hex[:8]
    folder = tmp_path / "blocks"
    documents = _suffixed_team_folder(folder, suffix)

    first = _run(
        prefect_server, str(BIN / "dispatch-prefect"), "blocks", "apply", str(folder)
    )
    second = _run(
        prefect_server, str(BIN / "dispatch-prefect"), "blocks", "apply", str(folder)
    )

    assert first.returncode == 0, first.stderr
    first_lines = first.stdout.splitlines()
    assert len(first_lines) == documents
    assert all(line.startswith("created ") for line in first_lines)
    assert f"created   Dispatch Rates 'cloud-run-l4-{suffix}'" in first_lines
    assert second.returncode == 0, second.stderr
    second_lines = second.stdout.splitlines()
    assert len(second_lines) == documents
    assert all(line.startswith("unchanged ") for line in second_lines)


def test_apply_an_invalid_folder_writes_nothing_and_says_why(
    prefect_server: LocalPrefectServer, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:8]
    (tmp_path / "good.toml").write_text(f"[budget.good-{suffix}]\nrun_usd = 1\n")
    (tmp_path / "bad.toml").write_text(f"[budget.bad-{suffix}]\nmonth_usd = -3.50\n")

    result = _run(
        prefect_server, str(BIN / "dispatch-prefect"), "blocks", "apply", str(tmp_path)
    )

    assert result.returncode == 1
    assert (
        f"bad.toml: Dispatch Budget 'bad-{suffix}': month_usd = -3.50" in result.stderr
    )
    assert "nothing was written" in result.stderr
    assert result.stdout == ""
    assert find_saved_block(BudgetBlock, f"good-{suffix}") is None


@pytest.mark.parametrize(
    "command",
    [
        ("prefect", "block", "register", "-m", "dispatch_prefect"),
        ("dispatch-prefect", "blocks", "register"),
    ],
    ids=["prefect-block-register", "dispatch-prefect-blocks-register"],
)
def test_registration_makes_every_block_type_known(
    prefect_server: LocalPrefectServer, command: tuple[str, ...]
) -> None:
    result = _run(prefect_server, str(BIN / command[0]), *command[1:])

    assert result.returncode == 0, result.stderr
    for block_class in BLOCK_CLASSES:
        assert block_class.get_block_type_name() in result.stdout


def test_prefect_finds_a_dispatch_block_by_its_slug_alone(
    prefect_server: LocalPrefectServer,
) -> None:
    """``Block.load("dispatch-budget/x")`` in a process that never imported us."""
    name = f"by-slug-{uuid.uuid4().hex[:8]}"
    BudgetBlock(run_usd="2.50").save(name)
    code = (
        "from prefect.blocks.core import Block; "
        f"block = Block.load('dispatch-budget/{name}'); "
        "print(type(block).__name__, block.run_usd)"
    )

    result = _run(prefect_server, sys.executable, "-c", code)

    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["BudgetBlock", "2.50"]
