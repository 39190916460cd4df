"""SDK calls through the gate, against a real HTTPS API on 127.0.0.1.

The gate routes an opted-in call to an SDK backend, reserves the call's
token bound, and the body reaches the API through ``sdk_client`` with a key
read from the environment at call time; the reported usage reconciles it.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from conftest import saved_ledger
from https_api import USAGE, LlmApi, https_llm_api
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.events.filters import (
    EventAnyResourceFilter,
    EventFilter,
    EventNameFilter,
)

from dispatch_prefect import gated_task
from dispatch_prefect.blocks import (
    BackendBlock,
    BudgetBlock,
    RatesBlock,
    SecretRefBlock,
)
from dispatch_prefect.egress import EgressRefused, report_usage, sdk_client
from dispatch_prefect.gate import NoBackendFitsError
from dispatch_prefect.ledger import Ledger, Reservation, ReservationStatus
from dispatch_prefect.policy import (
    SecretMissingError,
    TokenRates,
    estimate_token_cost,
    token_cost,
)
from dispatch_prefect.testing import LocalPrefectServer

pytestmark = pytest.mark.prefect_server

LEDGER = "egress-sdk-tests"
BACKEND = "egress-llm"
KEY_VAR = "DISPATCH_EGRESS_TEST_LLM_KEY"
INPUT_TOKENS = 8_000
MAX_OUTPUT_TOKENS = 1_000

# Odd figures, so a rounding or a float anywhere shows in the exact checks.
RATES = TokenRates(
    input_usd_per_mtok=Decimal("1.25"),
    output_usd_per_mtok=Decimal("10.0"),
    cached_input_usd_per_mtok=Decimal("0.3125"),
)
BOUND_USD = estimate_token_cost(
    RATES, input_tokens=INPUT_TOKENS, max_output_tokens=MAX_OUTPUT_TOKENS
)


@pytest.fixture(scope="module")
def ledger(prefect_server: LocalPrefectServer, tmp_path_factory: Any) -> Ledger:
    return saved_ledger(LEDGER, tmp_path_factory.mktemp("egress-ledger"))


@pytest.fixture(scope="module")
def served_api(
    prefect_server: LocalPrefectServer, tmp_path_factory: Any
) -> Iterator[LlmApi]:
    """The HTTPS API, and the SDK backend block that points at it."""
    with https_llm_api(tmp_path_factory.mktemp("https-api")) as api:
        RatesBlock(
            input_usd_per_mtok=RATES.input_usd_per_mtok,
            output_usd_per_mtok=RATES.output_usd_per_mtok,
            cached_input_usd_per_mtok=RATES.cached_input_usd_per_mtok,
        ).save("egress-llm-rates", overwrite=True)
        SecretRefBlock(source="env", name=KEY_VAR).save(
            "egress-llm-key", overwrite=True
        )
        BackendBlock(
            kind="sdk",
            rates=RatesBlock.load("egress-llm-rates"),
            base_url=api.base_url,
            secret=SecretRefBlock.load("egress-llm-key"),
        ).save(BACKEND, overwrite=True)
        yield api


@pytest.fixture
def api(served_api: LlmApi) -> LlmApi:
    """The API with no requests remembered from an earlier test."""
    served_api.forget()

    return served_api


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh key in the variable the secret reference names."""
    key = f"sk-egress-{secrets.token_hex(16)}"
    monkeypatch.setenv(KEY_VAR, key)

    return key


def budget(name: str) -> str:
    """A budget that holds the bound and approves it without a person."""
    BudgetBlock(
        run_usd=Decimal(1),
        month_usd=Decimal(10),
        auto_approve_below_usd=Decimal("0.5"),
    ).save(name, overwrite=True)

    return name


def run_in_flow(call: Callable[[], Any]) -> tuple[Any, UUID]:
    """Run ``call`` in a fresh flow run; its result and the run's id."""

    @flow
    def pipeline() -> Any:
        return call()

    state = pipeline(return_state=True)
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None

    return state.result(), flow_run_id


def summarize_with(
    api: LlmApi, *, report: bool, **gate: Any
) -> Callable[[str], dict[str, Any]]:
    """A gated summarizer that posts to ``api``; reports its usage if told."""

    def summarize(text: str) -> dict[str, Any]:
        with sdk_client(verify=str(api.ca_path)) as client:
            reply: dict[str, Any] = (
                client.post("/v1/generate", json={"prompt": text})
                .raise_for_status()
                .json()
            )
        if report:
            report_usage(**reply["usage"])

        return reply

    return gated_task(  # type: ignore[no-any-return]
        tool_id="summarize",
        input_tokens=INPUT_TOKENS,
        max_output_tokens=MAX_OUTPUT_TOKENS,
        max_runtime_s=60,
        ledger=LEDGER,
        backends=[BACKEND],
        **gate,
    )(summarize)


def only_reservation(ledger: Ledger, budget_name: str) -> Reservation:
    [row] = ledger.reservations(budget_name)

    return row


def assert_charged_whole_bound(ledger: Ledger, budget_name: str) -> None:
    row = only_reservation(ledger, budget_name)
    assert row.status is ReservationStatus.SPENT
    assert row.actual_usd == row.bound_usd == BOUND_USD


def artifacts_of(flow_run_id: UUID) -> list[Any]:
    with get_client(sync_client=True) as client:
        return list(
            client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
                )
            )
        )


def events_of(flow_run_id: UUID, *, waiting_for: str, timeout_s: float = 20) -> Any:
    """Every event naming the run, once ``waiting_for`` has arrived.

    Events travel in the background; the last one the gate sends is awaited
    so the scan sees the whole run.
    """
    related = EventAnyResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"])
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            last = client.read_events(
                filter=EventFilter(
                    event=EventNameFilter(name=[waiting_for]), any_resource=related
                ),
                limit=5,
            ).events
            if last:
                page = client.read_events(
                    filter=EventFilter(any_resource=related), limit=50
                )
                events = list(page.events)
                while page.next_page is not None:
                    page = client.read_events_page(str(page.next_page))
                    events.extend(page.events)
                return events
            time.sleep(0.3)

    raise AssertionError(f"no {waiting_for} event for flow run {flow_run_id}")


def test_opted_in_call_sends_the_key_and_is_reconciled_at_its_reported_usage(
    ledger: Ledger,
    api: LlmApi,
    api_key: str,
    caplog: pytest.LogCaptureFixture,
    recwarn: pytest.WarningsRecorder,
) -> None:
    caplog.set_level(logging.DEBUG)
    name = budget("egress-reported")
    summarize = summarize_with(api, budget=name, report=True, allow_sdk=True)

    reply, flow_run_id = run_in_flow(lambda: summarize("the minutes"))

    assert reply["reply"] == "summary of the minutes"
    [request] = api.requests()
    assert request.path == "/v1/generate"
    assert request.headers["Authorization"] == f"Bearer {api_key}"
    # The CA path is taken as a context, not through httpx's deprecated str.
    assert not [w for w in recwarn if "verify" in str(w.message)]

    row = only_reservation(ledger, name)
    assert row.label == f"summarize on {BACKEND}"
    assert row.bound_usd == BOUND_USD == Decimal("0.02")
    assert row.status is ReservationStatus.SPENT
    assert row.actual_usd == token_cost(RATES, **USAGE)
    assert not row.overrun

    [egress] = [r for r in caplog.records if r.name == "dispatch_prefect.egress"]
    assert egress.levelno == logging.WARNING
    assert egress.getMessage() == (
        f"egress to {BACKEND} ({api.host}): summarize: POST /v1/generate"
    )
    assert api_key not in caplog.text
    assert not [r for r in caplog.records if api_key in r.getMessage()]

    artifacts = artifacts_of(flow_run_id)
    assert artifacts, "the run records its approval and spend as artifacts"
    for artifact in artifacts:
        assert api_key not in artifact.model_dump_json()
    events = events_of(flow_run_id, waiting_for="dispatch.reservation.reconciled")
    assert {"dispatch.reservation.reserved", "dispatch.reservation.reconciled"} <= {
        event.event for event in events
    }
    for event in events:
        assert api_key not in event.model_dump_json()


def test_a_call_that_did_not_opt_in_is_refused_by_the_router(
    ledger: Ledger, api: LlmApi, api_key: str
) -> None:
    name = budget("egress-no-opt-in")
    summarize = summarize_with(api, budget=name, report=True)

    with pytest.raises(NoBackendFitsError) as caught:
        run_in_flow(lambda: summarize("the minutes"))

    assert f"{BACKEND} (sdk): SDK backends need allow_sdk=True" in str(caught.value)
    assert ledger.reservations(name) == []
    assert api.requests() == []


def test_an_unset_key_refuses_the_call_before_anything_is_reserved(
    ledger: Ledger,
    api: LlmApi,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv(KEY_VAR, raising=False)
    name = budget("egress-no-key")
    summarize = summarize_with(api, budget=name, report=True, allow_sdk=True)

    with pytest.raises(SecretMissingError) as caught:
        run_in_flow(lambda: summarize("the minutes"))

    message = str(caught.value)
    assert f"(environment variable {KEY_VAR!r}) is unset or empty" in message
    assert "Bearer" not in message
    assert api.requests() == []
    assert not [r for r in caplog.records if r.name == "dispatch_prefect.egress"]
    # Refused at admission: nobody was asked, nothing was held or charged.
    assert ledger.reservations(name) == []
    assert any(
        "refused summarize" in r.getMessage() and KEY_VAR in r.getMessage()
        for r in caplog.records
    )


def test_a_call_that_reports_no_usage_is_charged_its_whole_bound(
    ledger: Ledger, api: LlmApi, api_key: str
) -> None:
    name = budget("egress-unreported")
    summarize = summarize_with(api, budget=name, report=False, allow_sdk=True)

    reply, _ = run_in_flow(lambda: summarize("the minutes"))

    assert reply["usage"] == USAGE
    assert len(api.requests()) == 1
    assert_charged_whole_bound(ledger, name)


def test_sdk_client_refuses_a_call_routed_to_this_machine(
    ledger: Ledger, api: LlmApi, api_key: str
) -> None:
    name = budget("egress-local")

    def tokenize(text: str) -> list[str]:
        with sdk_client(verify=str(api.ca_path)) as client:
            client.post("/v1/generate", json={"prompt": text})

        return text.split()

    local_call = gated_task(
        tool_id="tokenize",
        max_runtime_s=30,
        budget=name,
        ledger=LEDGER,
        backends=["local"],
    )(tokenize)

    with pytest.raises(EgressRefused, match=r"runs on local \(local\), not an SDK"):
        run_in_flow(lambda: local_call("a b"))

    assert api.requests() == []
    assert only_reservation(ledger, name).bound_usd == 0


@pytest.mark.parametrize("route", ["absolute-url", "redirect"])
def test_the_key_never_leaves_the_backends_origin(
    ledger: Ledger, api: LlmApi, api_key: str, tmp_path: Path, route: str
) -> None:
    """Another server the client would trust gets nothing: no request, no key."""
    name = budget(f"egress-elsewhere-{route}")

    with https_llm_api(tmp_path, (api.ca_path, api.key_path)) as other:
        elsewhere = f"{other.base_url}/v1/generate"

        def leak(text: str) -> None:
            # x-api-key, unlike Authorization, survives httpx's redirects.
            with sdk_client(auth_header="x-api-key", verify=str(api.ca_path)) as c:
                if route == "redirect":
                    c.post(f"/v1/moved?to={elsewhere}", follow_redirects=True)
                else:
                    c.post(elsewhere, json={"prompt": text})

        gated = gated_task(
            tool_id="leak",
            input_tokens=INPUT_TOKENS,
            max_output_tokens=MAX_OUTPUT_TOKENS,
            max_runtime_s=60,
            budget=name,
            ledger=LEDGER,
            backends=[BACKEND],
            allow_sdk=True,
        )(leak)

        with pytest.raises(
            EgressRefused, match="may only reach egress-llm at"
        ) as caught:
            run_in_flow(lambda: gated("the minutes"))

        assert other.requests() == []

    assert api_key not in str(caught.value)
    expected = 1 if route == "redirect" else 0
    assert len(api.requests()) == expected


def test_the_served_certificate_is_trusted_only_through_its_ca_path(
    api: LlmApi,
) -> None:
    """The API really is TLS: a client without the certificate is turned away."""
    import httpx

    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.post(f"{api.base_url}/v1/generate", json={"prompt": "x"})

    assert api.requests() == []
