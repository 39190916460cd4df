"""Saving, loading and applying blocks against a real Prefect server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import BlockDocumentUpdate
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

from dispatch_prefect.blocks import (
    APPLY_COMMAND,
    ApplyAction,
    BackendBlock,
    BlockDocumentsInvalid,
    BlockInvalid,
    BlockNotFound,
    BudgetBlock,
    LedgerBlock,
    RatesBlock,
    SecretRefBlock,
    aload_block,
    apply_block_documents,
    find_saved_block,
    load_block,
    read_block_documents,
)
from dispatch_prefect.policy import SecretMissingError

pytestmark = pytest.mark.usefixtures("prefect_server", "saved_blocks_removed")

# Referring documents first, so nothing is deleted while still pointed at.
_CLEANUP_ORDER = (BackendBlock, SecretRefBlock, RatesBlock, BudgetBlock, LedgerBlock)


def _dispatch_document_ids() -> dict[str, list[uuid.UUID]]:
    ids: dict[str, list[uuid.UUID]] = {}
    with get_client(sync_client=True) as client:
        for block_class in _CLEANUP_ORDER:
            slug = block_class.get_block_type_slug()
            try:
                documents = client.read_block_documents_by_type(
                    slug, offset=0, limit=200, include_secrets=False
                )
            except PrefectHTTPStatusError as exc:
                if exc.response.status_code != 404:
                    raise
                documents = []  # the type is not registered yet
            ids[slug] = [document.id for document in documents]

    return ids


@pytest.fixture
def saved_blocks_removed(prefect_server: object) -> Iterator[None]:
    """Delete the Dispatch documents a test saved.

    The server is shared by the session and the gate routes over every saved
    backend, so a backend left behind here would steer other tests.
    """
    before = _dispatch_document_ids()

    yield

    after = _dispatch_document_ids()
    with get_client(sync_client=True) as client:
        for slug, ids in after.items():
            for document_id in ids:
                if document_id not in before.get(slug, []):
                    with contextlib.suppress(ObjectNotFound):
                        client.delete_block_document(document_id)


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _stored_data(block_class: type[Any], name: str, *, secrets: bool) -> Any:
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(
            name=name,
            block_type_slug=block_class.get_block_type_slug(),
            include_secrets=secrets,
        )

    return document


def test_rates_round_trip_exactly_as_decimal_text() -> None:
    name = _unique("l4")
    RatesBlock(
        gpu_usd_per_s=Decimal("0.0001867"),
        vcpu_usd_per_s=Decimal("0.000018"),
        gib_usd_per_s=Decimal("0.0000020"),
        idle_tail_s=Decimal("60"),
        source_url="https://cloud.google.com/run/pricing",
    ).save(name)

    stored = _stored_data(RatesBlock, name, secrets=True).data
    loaded = load_block(RatesBlock, name)

    assert stored["gpu_usd_per_s"] == "0.0001867"
    assert stored["gib_usd_per_s"] == "0.0000020"
    assert loaded.gpu_usd_per_s == Decimal("0.0001867")
    assert str(loaded.gib_usd_per_s) == "0.0000020"
    assert loaded.to_cost_rates().idle_tail_s == Decimal(60)


def test_budget_round_trips_with_its_time_zone() -> None:
    name = _unique("budget")
    BudgetBlock(
        run_usd="5.00",
        month_usd="100",
        time_zone="Europe/Paris",
        auto_approve_below_usd="0.25",
        approval_timeout_s=900,
    ).save(name)

    loaded = load_block(BudgetBlock, name)

    assert loaded.to_cap().run_usd == Decimal("5.00")
    assert loaded.auto_approve_below_usd == Decimal("0.25")
    assert loaded.time_zone == "Europe/Paris"
    assert loaded.approval_timeout_s == 900


def test_backend_rates_stay_a_reference_to_the_saved_rates() -> None:
    """A change to the rates block reaches every backend that names it."""
    rates_name, backend_name = _unique("rates"), _unique("cloud")
    RatesBlock(
        gpu_usd_per_s="0.0001867", vcpu_usd_per_s="0.000018", gib_usd_per_s="0"
    ).save(rates_name)
    BackendBlock(
        kind="cloud_worker",
        has_gpu=True,
        available_vram_gb=24,
        rates=load_block(RatesBlock, rates_name),
        work_pool="cloud-run-l4",
    ).save(backend_name)

    rates = load_block(RatesBlock, rates_name)
    rates.gpu_usd_per_s = Decimal("0.0002909")
    rates.save(rates_name, overwrite=True)
    backend = load_block(BackendBlock, backend_name)

    document = _stored_data(BackendBlock, backend_name, secrets=False)
    assert "rates" in document.block_document_references
    cost_rates = backend.cost_rates()
    assert cost_rates is not None
    assert cost_rates.gpu_usd_per_s == Decimal("0.0002909")


def test_a_missing_block_is_refused_with_the_command_that_creates_it() -> None:
    name = _unique("absent")

    with pytest.raises(BlockNotFound) as exc:
        load_block(BudgetBlock, name)

    message = str(exc.value)
    assert "Dispatch Budget" in message
    assert repr(name) in message
    assert APPLY_COMMAND in message
    assert "Prefect UI" in message
    assert find_saved_block(BudgetBlock, name) is None


def test_a_missing_block_is_refused_in_async_code_too() -> None:
    name = _unique("absent")

    with pytest.raises(BlockNotFound, match="Dispatch Backend"):
        asyncio.run(aload_block(BackendBlock, name))


def test_a_saved_block_that_no_longer_validates_is_named() -> None:
    name = _unique("budget")
    block_id = BudgetBlock(run_usd="1").save(name)
    with get_client(sync_client=True) as client:
        client.update_block_document(
            block_id,
            BlockDocumentUpdate(data={"run_usd": "-1"}, merge_existing_data=True),
        )

    with pytest.raises(BlockInvalid, match=f"Dispatch Budget block '{name}'"):
        load_block(BudgetBlock, name)


def test_prefect_secret_reference_resolves_at_call_time() -> None:
    secret_name, ref_name = _unique("key"), _unique("ref")
    secret_value = "sk-from-a-prefect-secret-" + uuid.uuid4().hex
    SecretRefBlock(source="prefect_secret", name=secret_name).save(ref_name)
    reference = load_block(SecretRefBlock, ref_name)

    with pytest.raises(SecretMissingError, match=secret_name):
        reference.resolve()

    Secret(value=secret_value).save(secret_name)
    assert reference.resolve() == secret_value


def test_an_empty_prefect_secret_fails_closed() -> None:
    secret_name = _unique("key")
    Secret(value="").save(secret_name)
    reference = SecretRefBlock(source="prefect_secret", name=secret_name)

    with pytest.raises(SecretMissingError, match="unset or empty"):
        reference.resolve()


def test_no_secret_value_lands_in_any_block_document(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key_value = "sk-env-" + uuid.uuid4().hex
    password = "pw-" + uuid.uuid4().hex
    monkeypatch.setenv("DISPATCH_TEST_API_KEY", key_value)
    ref_name, backend_name, ledger_name = (
        _unique("ref"),
        _unique("sdk"),
        _unique("ledger"),
    )
    SecretRefBlock(source="env", name="DISPATCH_TEST_API_KEY").save(ref_name)
    reference = load_block(SecretRefBlock, ref_name)
    BackendBlock(
        kind="sdk",
        base_url="https://api.example.com",
        secret=reference,
        rates=RatesBlock(input_usd_per_mtok="1", output_usd_per_mtok="5"),
    ).save(backend_name)
    LedgerBlock(url=f"postgresql://gate:{password}@db.internal/ledger").save(
        ledger_name
    )

    assert load_block(BackendBlock, backend_name).secret is not None
    assert reference.resolve() == key_value
    for block_class, name in (
        (SecretRefBlock, ref_name),
        (BackendBlock, backend_name),
    ):
        stored = _stored_data(block_class, name, secrets=True)
        assert key_value not in json.dumps(stored.model_dump(mode="json"))
    ledger_shown = _stored_data(LedgerBlock, ledger_name, secrets=False)
    assert password not in json.dumps(ledger_shown.model_dump(mode="json"))
    assert load_block(LedgerBlock, ledger_name).url is not None


# -- apply ------------------------------------------------------------------


def _write_folder(folder: Path, suffix: str, *, gpu_usd_per_s: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "team.toml").write_text(
        f"""
[budget.team-{suffix}]
run_usd = 5.00
month_usd = 100.00

[rates.l4-{suffix}]
gpu_usd_per_s = {gpu_usd_per_s}
vcpu_usd_per_s = 0.000018
gib_usd_per_s = 0.000002
idle_tail_s = 60
source_url = "https://cloud.google.com/run/pricing"
source_date = 2026-12-03

[secret.key-{suffix}]
name = "GEMINI_API_KEY"

[backend.cloud-{suffix}]
kind = "cloud_worker"
has_gpu = true
available_vram_gb = 24
rates = "l4-{suffix}"
work_pool = "cloud-run-l4"
job_variables = {{ region = "us-central1", cpu = "4", memory = "16Gi" }}

[backend.gemini-{suffix}]
kind = "sdk"
base_url = "https://generativelanguage.googleapis.com"
secret = "key-{suffix}"

[ledger.team-{suffix}]
"""
    )


def _actions(folder: Path, *, dry_run: bool = False) -> dict[str, ApplyAction]:
    outcomes = apply_block_documents(read_block_documents(folder), dry_run=dry_run)

    return {outcome.spec.label(): outcome.action for outcome in outcomes}


def test_apply_creates_then_leaves_alone_then_changes_one(tmp_path: Path) -> None:
    suffix = uuid.uuid4().hex[:8]
    _write_folder(tmp_path, suffix, gpu_usd_per_s="0.0001867")

    first = _actions(tmp_path)
    second = _actions(tmp_path)
    _write_folder(tmp_path, suffix, gpu_usd_per_s="0.0002909")
    planned = _actions(tmp_path, dry_run=True)
    third = _actions(tmp_path)

    assert set(first.values()) == {ApplyAction.CREATED}
    assert len(first) == 6
    assert set(second.values()) == {ApplyAction.UNCHANGED}
    changed = {label for label, action in third.items() if action != "unchanged"}
    assert changed == {f"Dispatch Rates 'l4-{suffix}'"}
    assert planned == third
    backend = load_block(BackendBlock, f"cloud-{suffix}")
    cost_rates = backend.cost_rates()
    assert cost_rates is not None
    assert cost_rates.gpu_usd_per_s == Decimal("0.0002909")
    assert backend.job_variables == {
        "region": "us-central1",
        "cpu": "4",
        "memory": "16Gi",
    }
    gemini = load_block(BackendBlock, f"gemini-{suffix}")
    assert gemini.secret is not None
    assert gemini.secret.name == "GEMINI_API_KEY"


def test_apply_writes_nothing_when_one_document_is_invalid(tmp_path: Path) -> None:
    suffix = uuid.uuid4().hex[:8]
    _write_folder(tmp_path, suffix, gpu_usd_per_s="0.0001867")
    (tmp_path / "broken.toml").write_text(
        f'[budget.broken-{suffix}]\ntime_zone = "Atlantis/Capital"\n'
    )

    with pytest.raises(BlockDocumentsInvalid) as exc:
        read_block_documents(tmp_path)

    assert len(exc.value.problems) == 1
    assert "broken.toml: Dispatch Budget" in exc.value.problems[0]
    assert "Atlantis/Capital" in exc.value.problems[0]
    assert find_saved_block(BudgetBlock, f"team-{suffix}") is None
    assert find_saved_block(RatesBlock, f"l4-{suffix}") is None


def test_apply_refers_to_rates_already_saved_on_the_server(tmp_path: Path) -> None:
    rates_name, backend_name = _unique("saved-rates"), _unique("lan")
    RatesBlock(gpu_usd_per_s="0", vcpu_usd_per_s="0.00001", gib_usd_per_s="0").save(
        rates_name
    )
    (tmp_path / "lan.toml").write_text(
        f'[backend.{backend_name}]\nkind = "lan_worker"\nrates = "{rates_name}"\n'
    )

    assert _actions(tmp_path) == {
        f"Dispatch Backend '{backend_name}'": ApplyAction.CREATED
    }
    assert _actions(tmp_path) == {
        f"Dispatch Backend '{backend_name}'": ApplyAction.UNCHANGED
    }
    rates = load_block(BackendBlock, backend_name).rates
    assert rates is not None
    assert rates.vcpu_usd_per_s == Decimal("0.00001")


def test_apply_keeps_the_ledger_url_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = _unique("ledger")
    password = "pw-" + uuid.uuid4().hex
    monkeypatch.setenv("DISPATCH_TEST_LEDGER_URL", f"postgresql://g:{password}@db/l")
    (tmp_path / "ledger.toml").write_text(
        f'[ledger.{name}]\nurl = {{ env = "DISPATCH_TEST_LEDGER_URL" }}\n'
    )

    assert _actions(tmp_path) == {f"Dispatch Ledger '{name}'": ApplyAction.CREATED}
    assert _actions(tmp_path) == {f"Dispatch Ledger '{name}'": ApplyAction.UNCHANGED}
    monkeypatch.setenv("DISPATCH_TEST_LEDGER_URL", "postgresql://g@db/other")
    assert _actions(tmp_path) == {f"Dispatch Ledger '{name}'": ApplyAction.CHANGED}

    shown = _stored_data(LedgerBlock, name, secrets=False)
    assert password not in json.dumps(shown.model_dump(mode="json"))
    url = load_block(LedgerBlock, name).url
    assert url is not None
    assert url.get_secret_value() == "postgresql://g@db/other"


def test_a_ledger_block_pointed_elsewhere_is_followed_by_a_running_process(
    tmp_path: Path,
) -> None:
    # A long-lived worker must not keep writing to the database a block no
    # longer names: the cap would be checked against half the spend.
    from dispatch_prefect.config import open_ledger
    from dispatch_prefect.ledger import ReservationKey
    from dispatch_prefect.policy import BudgetCap

    name = f"moving-ledger-{uuid.uuid4().hex[:8]}"
    first, second = tmp_path / "first.db", tmp_path / "second.db"
    LedgerBlock(url=f"sqlite:///{first}").save(name)
    before = open_ledger(name)
    assert open_ledger(name) is before

    LedgerBlock(url=f"sqlite:///{second}").save(name, overwrite=True)
    after = open_ledger(name)
    cap = BudgetCap(run_usd=Decimal(1), month_usd=Decimal(1))
    after.reserve(
        ReservationKey("run-1", "task-1", 1),
        budget="team",
        bound_usd=Decimal("0.25"),
        cap=cap,
    )

    assert after is not before
    assert [r.bound_usd for r in after.reservations("team")] == [Decimal("0.25")]
    assert before.reservations("team") == []
    assert second.exists()
