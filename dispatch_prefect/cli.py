"""The ``dispatch-prefect`` command.

Built on cyclopts, as Prefect's own CLI is, so it adds no dependency. Each
area is a sub-app (``blocks`` today); a new area is one more
``app.command(<sub-app>)``.

```
dispatch-prefect blocks register
dispatch-prefect blocks apply blocks/ [--dry-run]
```
"""

from __future__ import annotations

import sys
from pathlib import Path

import cyclopts
import httpx

__all__ = ["app", "blocks_app", "main"]

app = cyclopts.App(
    name="dispatch-prefect",
    help="A fail-closed budget, router and approval gate for Prefect.",
)

blocks_app = cyclopts.App(
    name="blocks",
    help="The gate's Prefect Blocks: register their types, apply documents.",
)
app.command(blocks_app)


@blocks_app.command
def register() -> int:
    """Register every Dispatch block type with the Prefect API.

    The same as ``prefect block register -m dispatch_prefect.blocks``; the
    types then appear in the UI with their forms.
    """
    from dispatch_prefect.blocks import BLOCK_CLASSES

    try:
        for cls in BLOCK_CLASSES:
            cls.register_type_and_schema(_sync=True)  # type: ignore[call-arg]
            print(f"registered {cls.get_block_type_name()}")
    except httpx.HTTPError as exc:
        return _unreachable(exc)

    return 0


@blocks_app.command
def apply(folder: Path, /, *, dry_run: bool = False) -> int:
    """Validate every block document in FOLDER, then create or update each.

    Nothing is written when any document is invalid. Applying the same
    folder twice changes nothing the second time.

    Parameters
    ----------
    folder
        The folder of ``*.toml`` block documents, for example ``blocks/``.
    dry_run
        Validate and say what would change, without writing.
    """
    from dispatch_prefect.blocks import (
        BlockDocumentsInvalid,
        apply_block_documents,
        read_block_documents,
    )

    try:
        specs = read_block_documents(folder)
        outcomes = apply_block_documents(specs, dry_run=dry_run)
    except BlockDocumentsInvalid as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(
            f"{len(exc.problems)} problem(s); nothing was written",
            file=sys.stderr,
        )
        return 1
    except httpx.HTTPError as exc:
        return _unreachable(exc)

    prefix = "would be " if dry_run else ""
    for outcome in outcomes:
        print(f"{prefix}{outcome.action.value:<9} {outcome.spec.label()}")

    return 0


def _unreachable(exc: httpx.HTTPError) -> int:
    from prefect.settings import PREFECT_API_URL

    print(
        f"cannot reach the Prefect API at {PREFECT_API_URL.value()} "
        f"({exc.__class__.__name__}); start it or set PREFECT_API_URL",
        file=sys.stderr,
    )

    return 1


def main() -> None:
    """Entry point of the ``dispatch-prefect`` console script."""
    result = app(result_action="return_value")

    raise SystemExit(result if isinstance(result, int) else 0)
