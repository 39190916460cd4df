"""The Block classes on their own: validation, conversion, exact money."""

from __future__ import annotations

import json
import logging
from decimal import Decimal
from pathlib import Path

import pytest
from prefect.blocks.core import Block
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from pydantic import ValidationError

from dispatch_prefect.blocks import (
    BLOCK_CLASSES,
    BackendBlock,
    BlockDocumentsInvalid,
    BudgetBlock,
    LedgerBlock,
    MissingRatesError,
    RatesBlock,
    SecretRefBlock,
    read_block_documents,
)
from dispatch_prefect.policy import (
    BackendCapabilities,
    BackendKind,
    BudgetCap,
    CostRates,
    SecretMissingError,
    TokenRates,
    ToolRequirements,
    estimate_cost,
    select_backend,
)

REPO_BLOCKS = Path(__file__).resolve().parent.parent / "blocks"


class TestEveryBlockMeetsPrefectStandards(BlockStandardTestSuite):
    @pytest.fixture(params=BLOCK_CLASSES, ids=lambda cls: cls.__name__)
    def block(self, request: pytest.FixtureRequest) -> type[Block]:
        block_class: type[Block] = request.param
        return block_class


@pytest.mark.parametrize(
    ("block_class", "type_name"),
    [
        (BudgetBlock, "Dispatch Budget"),
        (RatesBlock, "Dispatch Rates"),
        (SecretRefBlock, "Dispatch Secret Reference"),
        (BackendBlock, "Dispatch Backend"),
        (LedgerBlock, "Dispatch Ledger"),
    ],
)
def test_block_types_carry_the_names_shown_in_the_ui(
    block_class: type[Block], type_name: str
) -> None:
    assert block_class.get_block_type_name() == type_name
    assert str(block_class._logo_url).startswith("https://")


def _error_text(exc: pytest.ExceptionInfo[ValidationError]) -> str:
    return str(exc.value)


# -- budget ------------------------------------------------------------------


def test_budget_defaults_turn_paid_work_off() -> None:
    budget = BudgetBlock()

    assert budget.to_cap() == BudgetCap(run_usd=Decimal(0), month_usd=Decimal(0))
    assert budget.time_zone == "UTC"
    assert budget.auto_approve_below_usd == 0
    assert budget.approval_timeout_s > 0


def test_budget_turns_into_the_policy_cap() -> None:
    budget = BudgetBlock(run_usd="5.00", month_usd=Decimal("100"))

    assert budget.to_cap() == BudgetCap(run_usd=Decimal("5.00"), month_usd=Decimal(100))


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("run_usd", "-1", "-1"),
        ("month_usd", Decimal("-0.01"), "-0.01"),
        ("auto_approve_below_usd", "-5", "-5"),
        ("approval_timeout_s", 0, "0"),
        ("time_zone", "Mars/Olympus_Mons", "Mars/Olympus_Mons"),
    ],
)
def test_bad_budget_names_block_field_and_value(
    field: str, value: object, shown: str
) -> None:
    with pytest.raises(ValidationError) as exc:
        BudgetBlock(**{field: value})

    text = _error_text(exc)
    assert "BudgetBlock" in text
    assert field in text
    assert shown in text


def test_money_refuses_floats() -> None:
    """A float has already lost the exact figure; money is Decimal or text."""
    with pytest.raises(ValidationError, match="float"):
        BudgetBlock(run_usd=0.1)


def test_budget_time_zone_is_a_real_zone() -> None:
    assert BudgetBlock(time_zone="Europe/Paris").zone().key == "Europe/Paris"


# -- rates -------------------------------------------------------------------


L4 = {
    "gpu_usd_per_s": "0.0001867",
    "vcpu_usd_per_s": "0.000018",
    "gib_usd_per_s": "0.000002",
    "idle_tail_s": "60",
}


def test_compute_rates_turn_into_exact_policy_rates() -> None:
    rates = RatesBlock(**L4).to_cost_rates()

    assert rates == CostRates(
        gpu_usd_per_s=Decimal("0.0001867"),
        vcpu_usd_per_s=Decimal("0.000018"),
        gib_usd_per_s=Decimal("0.000002"),
        idle_tail_s=Decimal(60),
    )
    bound = estimate_cost(rates, max_runtime_s=540, vcpus=4, memory_gib=16)
    assert bound == Decimal("600") * (
        Decimal("0.0001867") + 4 * Decimal("0.000018") + 16 * Decimal("0.000002")
    )


def test_token_rates_turn_into_policy_rates() -> None:
    rates = RatesBlock(
        input_usd_per_mtok="1.25",
        output_usd_per_mtok="10",
        cached_input_usd_per_mtok="0.125",
    )

    assert rates.to_token_rates() == TokenRates(
        input_usd_per_mtok=Decimal("1.25"),
        output_usd_per_mtok=Decimal(10),
        cached_input_usd_per_mtok=Decimal("0.125"),
    )


def test_token_only_rates_refuse_compute_pricing_naming_the_block() -> None:
    rates = RatesBlock(input_usd_per_mtok="1", output_usd_per_mtok="2")
    rates._block_document_name = "gemini-flash"

    with pytest.raises(MissingRatesError, match="Dispatch Rates block 'gemini-flash'"):
        rates.to_cost_rates()


def test_compute_only_rates_refuse_token_pricing() -> None:
    with pytest.raises(MissingRatesError, match="no token rates"):
        RatesBlock(**L4).to_token_rates()


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"gpu_usd_per_s": "-0.0001"}, "gpu_usd_per_s"),
        ({"gib_usd_per_s": None}, "gib_usd_per_s"),
        ({"idle_tail_s": "-1"}, "idle_tail_s"),
        ({"source_url": "http://example.com/pricing"}, "http://example.com"),
    ],
)
def test_bad_rates_name_the_field_and_value(
    changes: dict[str, object], needle: str
) -> None:
    with pytest.raises(ValidationError) as exc:
        RatesBlock(**{**L4, **changes})

    assert "RatesBlock" in _error_text(exc)
    assert needle in _error_text(exc)


def test_rates_need_compute_or_token_figures() -> None:
    with pytest.raises(ValidationError, match="neither"):
        RatesBlock()


def test_decimal_figures_serialize_as_exact_text() -> None:
    """Stored documents hold decimal text, never a JSON number or 1E-7."""
    rates = RatesBlock(
        input_usd_per_mtok=Decimal("0.0000001"), output_usd_per_mtok="2.50"
    )

    dumped = rates.model_dump(mode="json")
    assert dumped["input_usd_per_mtok"] == "0.0000001"
    assert dumped["output_usd_per_mtok"] == "2.50"
    again = RatesBlock.model_validate(json.loads(json.dumps(dumped)))
    assert again.input_usd_per_mtok == Decimal("0.0000001")
    assert str(again.output_usd_per_mtok) == "2.50"


# -- secret references ------------------------------------------------------


@pytest.mark.parametrize("name", ["", "   "])
def test_secret_reference_needs_a_name(name: str) -> None:
    with pytest.raises(ValidationError) as exc:
        SecretRefBlock(source="env", name=name)

    assert "SecretRefBlock" in _error_text(exc)
    assert "name" in _error_text(exc)


def test_secret_reference_refuses_an_unknown_source() -> None:
    with pytest.raises(ValidationError, match="vault"):
        SecretRefBlock(source="vault", name="KEY")


def test_env_secret_resolves_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    reference = SecretRefBlock(source="env", name="DISPATCH_TEST_KEY")
    monkeypatch.setenv("DISPATCH_TEST_KEY", "sk-resolved-later")

    assert reference.resolve() == "sk-resolved-later"


@pytest.mark.parametrize("value", [None, ""])
def test_absent_or_empty_env_secret_fails_closed(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("DISPATCH_TEST_KEY", raising=False)
    else:
        monkeypatch.setenv("DISPATCH_TEST_KEY", value)
    reference = SecretRefBlock(source="env", name="DISPATCH_TEST_KEY")

    with pytest.raises(SecretMissingError, match="DISPATCH_TEST_KEY"):
        reference.resolve()


def test_resolving_a_secret_logs_and_stores_nothing_of_its_value(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret_value = "sk-live-0123456789abcdef"
    monkeypatch.setenv("DISPATCH_TEST_KEY", secret_value)
    reference = SecretRefBlock(source="env", name="DISPATCH_TEST_KEY")
    caplog.set_level(logging.DEBUG)

    assert reference.resolve() == secret_value
    assert secret_value not in caplog.text
    assert secret_value not in repr(reference)
    assert secret_value not in json.dumps(reference.model_dump(mode="json"))


def test_unreadable_gcp_secret_fails_closed_naming_the_reference() -> None:
    """No network or no permission refuses the call; the name, never a value."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from prefect_gcp.credentials import GcpCredentials

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    credentials = GcpCredentials(
        service_account_info={
            "type": "service_account",
            "project_id": "dispatch-test",
            "private_key_id": "0",
            "private_key": pem,
            "client_email": "gate@dispatch-test.iam.gserviceaccount.com",
            "client_id": "0",
            # Nothing listens here: the token exchange fails at once.
            "token_uri": "https://127.0.0.1:9/token",
        }
    )
    reference = SecretRefBlock(
        source="gcp_secret_manager",
        name="gemini-api-key",
        gcp_credentials=credentials,
        gcp_timeout_s=2,
    )

    with pytest.raises(SecretMissingError) as exc:
        reference.resolve()

    assert "GCP Secret Manager secret 'gemini-api-key'" in str(exc.value)
    assert "PRIVATE KEY" not in str(exc.value)


def test_gcp_secret_without_any_credentials_fails_closed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "none.json"))
    reference = SecretRefBlock(source="gcp_secret_manager", name="gemini-api-key")

    with pytest.raises(SecretMissingError, match="needs GCP credentials"):
        reference.resolve()


# -- backends ---------------------------------------------------------------


def _sdk_backend(**changes: object) -> BackendBlock:
    fields: dict[str, object] = {
        "kind": "sdk",
        "base_url": "https://generativelanguage.googleapis.com",
        "secret": SecretRefBlock(source="env", name="GEMINI_API_KEY"),
        "rates": RatesBlock(input_usd_per_mtok="0.30", output_usd_per_mtok="2.50"),
    }
    fields.update(changes)

    return BackendBlock(**fields)


def test_backend_turns_into_router_capabilities() -> None:
    backend = BackendBlock(
        kind="cloud_worker",
        has_gpu=True,
        available_vram_gb=24,
        images=["ghcr.io/team/cofold:1"],
        tool_ids=["cofold"],
        rates=RatesBlock(**L4),
        work_pool="cloud-run-l4",
        job_variables={"region": "us-central1"},
    )

    assert backend.to_capabilities() == BackendCapabilities(
        has_gpu=True,
        available_vram_gb=24.0,
        images=("ghcr.io/team/cofold:1",),
        tool_ids=("cofold",),
    )
    assert backend.cost_rates() == RatesBlock(**L4).to_cost_rates()
    assert backend.token_rates() is None


def test_backend_blocks_are_routable() -> None:
    local = BackendBlock(kind="local")
    cloud = BackendBlock(kind="cloud_worker", has_gpu=True, available_vram_gb=24)

    chosen = select_backend([cloud, local], ToolRequirements("cofold", 16.0))

    assert chosen is cloud


def test_backend_without_rates_declares_none() -> None:
    backend = BackendBlock(kind="lan_worker", has_gpu=True, available_vram_gb=12)

    assert backend.cost_rates() is None
    assert backend.token_rates() is None


def test_sdk_backend_carries_token_rates() -> None:
    backend = _sdk_backend()

    assert backend.kind is BackendKind.SDK
    assert backend.token_rates() == TokenRates(Decimal("0.30"), Decimal("2.50"))
    assert backend.cost_rates() is None


def test_unknown_backend_kind_is_refused() -> None:
    with pytest.raises(ValidationError) as exc:
        BackendBlock(kind="mainframe")

    assert "BackendBlock" in _error_text(exc)
    assert "kind" in _error_text(exc)
    assert "mainframe" in _error_text(exc)


def test_sdk_endpoint_must_be_https() -> None:
    with pytest.raises(ValidationError) as exc:
        _sdk_backend(base_url="http://generativelanguage.googleapis.com")

    assert "base_url" in _error_text(exc)
    assert "http://generativelanguage.googleapis.com" in _error_text(exc)


@pytest.mark.parametrize("missing", ["base_url", "secret"])
def test_sdk_backend_needs_endpoint_and_key_reference(missing: str) -> None:
    with pytest.raises(ValidationError, match=missing):
        _sdk_backend(**{missing: None})


def test_vram_without_a_gpu_is_refused() -> None:
    with pytest.raises(ValidationError, match="has_gpu"):
        BackendBlock(kind="lan_worker", available_vram_gb=12)


def test_negative_vram_is_refused() -> None:
    with pytest.raises(ValidationError, match="available_vram_gb"):
        BackendBlock(kind="lan_worker", has_gpu=True, available_vram_gb=-1)


# -- ledger -----------------------------------------------------------------


def test_ledger_defaults_to_the_embedded_file() -> None:
    assert LedgerBlock().url is None


def test_ledger_url_is_hidden_and_never_echoed() -> None:
    password = "pg-pass-7f3a"

    block = LedgerBlock(url=f"postgresql://gate:{password}@db.internal/ledger")
    assert password not in repr(block)
    assert password not in json.dumps(block.model_dump(mode="json"))

    with pytest.raises(ValidationError) as exc:
        LedgerBlock(url=f"mysql://gate:{password}@db.internal/ledger")
    assert "mysql" in str(exc.value)
    assert password not in str(exc.value)


def test_ledger_block_opens_a_real_ledger(tmp_path: Path) -> None:
    from dispatch_prefect.ledger import Ledger

    block = LedgerBlock(url=f"sqlite:///{tmp_path / 'ledger.db'}")

    ledger = block.open_ledger()

    assert isinstance(ledger, Ledger)
    assert (tmp_path / "ledger.db").exists()


# -- block documents as code (no server needed when nothing is missing) ------


def _no_saved_blocks(cls: type[Block], name: str) -> Block | None:
    return None


def test_the_team_folder_validates_with_every_kind_of_document() -> None:
    specs = read_block_documents(REPO_BLOCKS, lookup=_no_saved_blocks)

    kinds = {type(spec.block) for spec in specs}
    assert kinds == set(BLOCK_CLASSES)
    backends = {
        spec.block.kind for spec in specs if isinstance(spec.block, BackendBlock)
    }
    assert {
        BackendKind.LOCAL,
        BackendKind.LAN_WORKER,
        BackendKind.CLOUD_WORKER,
    } <= backends
    l4 = next(
        spec.block
        for spec in specs
        if isinstance(spec.block, RatesBlock) and spec.name == "cloud-run-l4"
    )
    assert l4.gpu_usd_per_s == Decimal("0.0001867")
    assert l4.source_url == "https://cloud.google.com/run/pricing"
    assert l4.source_date is not None
    token_rates = [
        spec.block
        for spec in specs
        if isinstance(spec.block, RatesBlock) and spec.block.has_token_rates()
    ]
    assert len(token_rates) >= 3
    assert all(rates.source_url and rates.source_date for rates in token_rates)


def _invalid_problems(tmp_path: Path, text: str) -> list[str]:
    (tmp_path / "team.toml").write_text(text)

    with pytest.raises(BlockDocumentsInvalid) as exc:
        read_block_documents(tmp_path, lookup=_no_saved_blocks)

    return exc.value.problems


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[budget.default]\nrun_usd = -1\n",
            "team.toml: Dispatch Budget 'default': run_usd = -1",
        ),
        (
            '[budget.default]\ntime_zone = "Nowhere/Land"\n',
            "team.toml: Dispatch Budget 'default': time_zone = 'Nowhere/Land'",
        ),
        (
            '[backend.edge]\nkind = "mainframe"\n',
            "team.toml: Dispatch Backend 'edge': kind = 'mainframe'",
        ),
        (
            '[secret.key]\nsource = "env"\nname = ""\n',
            "team.toml: Dispatch Secret Reference 'key': name = ''",
        ),
        (
            "[rates.cheap]\ngpu_usd_per_s = 0\nvcpu_usd_per_s = -0.5\n"
            "gib_usd_per_s = 0\n",
            "team.toml: Dispatch Rates 'cheap': vcpu_usd_per_s = -0.5",
        ),
        (
            '[backend.api]\nkind = "sdk"\nbase_url = "http://api.example.com"\n',
            "team.toml: Dispatch Backend 'api': base_url = 'http://api.example.com'",
        ),
        (
            "[budget.default]\nrun_cap = 5\n",
            "team.toml: Dispatch Budget 'default': unknown field 'run_cap'",
        ),
        (
            '[backend.cloud]\nkind = "cloud_worker"\nrates = "nowhere"\n',
            "no Dispatch Rates named 'nowhere'",
        ),
        ("[pools.cloud]\nsize = 1\n", "[pools] is not a block table"),
    ],
)
def test_invalid_documents_are_named_by_file_block_field_and_value(
    tmp_path: Path, text: str, expected: str
) -> None:
    problems = _invalid_problems(tmp_path, text)

    assert any(expected in problem for problem in problems), problems


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    problems = _invalid_problems(
        tmp_path,
        "[budget.a]\nrun_usd = -1\n[budget.b]\nmonth_usd = -2\n",
    )

    assert len(problems) == 2


def test_a_secret_written_into_a_file_is_refused(tmp_path: Path) -> None:
    problems = _invalid_problems(
        tmp_path,
        '[ledger.team]\nurl = "postgresql://gate:pg-pass-7f3a@db/ledger"\n',
    )

    assert any('url = { env = "VARIABLE" }' in problem for problem in problems)
    assert not any("pg-pass-7f3a" in problem for problem in problems)


def test_a_secret_field_reads_its_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISPATCH_TEST_LEDGER_URL", "postgresql://gate:pw@db/l")
    (tmp_path / "team.toml").write_text(
        '[ledger.team]\nurl = { env = "DISPATCH_TEST_LEDGER_URL" }\n'
    )

    (spec,) = read_block_documents(tmp_path, lookup=_no_saved_blocks)

    assert isinstance(spec.block, LedgerBlock)
    assert spec.block.url is not None
    assert spec.block.url.get_secret_value() == "postgresql://gate:pw@db/l"


def test_an_invalid_ledger_url_from_the_environment_stays_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISPATCH_TEST_LEDGER_URL", "mysql://gate:pg-pass-7f3a@db/l")

    problems = _invalid_problems(
        tmp_path, '[ledger.team]\nurl = { env = "DISPATCH_TEST_LEDGER_URL" }\n'
    )

    assert any("url (value hidden)" in problem for problem in problems)
    assert not any("pg-pass-7f3a" in problem for problem in problems)


def test_a_document_defined_twice_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("[budget.default]\nrun_usd = 1\n")

    problems = _invalid_problems(tmp_path, "[budget.default]\nrun_usd = 2\n")

    assert any("also defined in" in problem for problem in problems)


def test_broken_toml_names_the_file(tmp_path: Path) -> None:
    problems = _invalid_problems(tmp_path, "[budget.default\n")

    assert any("team.toml: not valid TOML" in problem for problem in problems)


def test_toml_numbers_are_read_as_exact_decimals(tmp_path: Path) -> None:
    (tmp_path / "team.toml").write_text(
        "[rates.l4]\ngpu_usd_per_s = 0.0001867\nvcpu_usd_per_s = 0.000018\n"
        "gib_usd_per_s = 0.000002\n"
    )

    (spec,) = read_block_documents(tmp_path, lookup=_no_saved_blocks)

    assert isinstance(spec.block, RatesBlock)
    assert spec.block.gpu_usd_per_s == Decimal("0.0001867")
