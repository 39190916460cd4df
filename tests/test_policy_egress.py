"""Opt-in egress: keys held by reference, https only, audited, never logged."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from dispatch_prefect.policy import (
    ExternalEndpoint,
    SecretMissingError,
    SecretRef,
    log_egress,
)

KEY_VAR = "DISPATCH_PREFECT_TEST_GEMINI_KEY"
KEY = "sk-test-3f9a1c7e"


def gemini(
    base_url: str = "https://generativelanguage.googleapis.com/v1beta",
) -> ExternalEndpoint:
    return ExternalEndpoint("gemini", base_url, SecretRef(KEY_VAR))


# --- SecretRef ---------------------------------------------------------------


def test_secret_ref_refuses_an_empty_variable_name() -> None:
    with pytest.raises(ValueError, match="env_var"):
        SecretRef("")


def test_secret_ref_reads_the_environment_at_call_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref = SecretRef(KEY_VAR)
    monkeypatch.setenv(KEY_VAR, KEY)

    assert ref.resolve() == KEY

    monkeypatch.setenv(KEY_VAR, "rotated")
    assert ref.resolve() == "rotated"


def test_secret_ref_resolves_through_a_given_lookup() -> None:
    assert SecretRef("K").resolve({"K": KEY}.get) == KEY


def test_unset_secret_raises_secret_missing_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(KEY_VAR, raising=False)

    with pytest.raises(SecretMissingError, match=KEY_VAR):
        SecretRef(KEY_VAR).resolve()


def test_empty_secret_raises_secret_missing_error() -> None:
    with pytest.raises(SecretMissingError):
        SecretRef(KEY_VAR).resolve({KEY_VAR: ""}.get)


def test_secret_missing_error_is_a_runtime_error() -> None:
    assert issubclass(SecretMissingError, RuntimeError)


# --- ExternalEndpoint --------------------------------------------------------


def test_endpoint_refuses_an_empty_name() -> None:
    with pytest.raises(ValueError, match="name"):
        ExternalEndpoint("", "https://api.example.com", SecretRef(KEY_VAR))


@pytest.mark.parametrize(
    "base_url",
    [
        "http://api.example.com",
        "ftp://api.example.com",
        "api.example.com",
        "https://",
        "https:///v1",
        "",
    ],
)
def test_endpoint_accepts_only_https_urls_with_a_host(base_url: str) -> None:
    with pytest.raises(ValueError, match="https://"):
        gemini(base_url)


def test_host_is_the_host_name_without_port_or_path() -> None:
    assert gemini("https://api.example.com:8443/v1/models").host() == (
        "api.example.com"
    )
    assert gemini().host() == "generativelanguage.googleapis.com"


def test_bearer_is_the_key_read_at_call_time() -> None:
    assert gemini().bearer({KEY_VAR: KEY}.get) == f"Bearer {KEY}"


def test_bearer_reads_the_process_environment_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_VAR, KEY)

    assert gemini().bearer() == f"Bearer {KEY}"


@pytest.mark.parametrize("environment", [{}, {KEY_VAR: ""}])
def test_bearer_refuses_when_the_key_is_missing_or_empty(
    environment: dict[str, str],
) -> None:
    """A missing key can never become an unauthenticated call."""
    with pytest.raises(SecretMissingError):
        gemini().bearer(environment.get)


def test_endpoint_repr_leaves_out_the_secret_reference() -> None:
    assert KEY_VAR not in repr(gemini())


def test_egress_values_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        gemini().base_url = "http://evil.example"  # type: ignore[misc]


# --- log_egress --------------------------------------------------------------


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("dispatch_prefect")]


def test_log_egress_emits_one_warning_naming_endpoint_host_and_detail(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_VAR, KEY)
    endpoint = gemini()
    endpoint.bearer()

    with caplog.at_level(logging.DEBUG):
        log_egress(endpoint, detail="summarize 3 abstracts")

    records = _records(caplog)
    assert len(records) == 1
    record = records[0]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "gemini" in message
    assert "generativelanguage.googleapis.com" in message
    assert "summarize 3 abstracts" in message


def test_log_egress_never_names_the_key_or_its_variable(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_VAR, KEY)

    with caplog.at_level(logging.DEBUG):
        log_egress(gemini(), detail="summarize")

    for record in _records(caplog):
        everything = record.getMessage() + repr(vars(record))
        assert KEY not in everything
        assert KEY_VAR not in everything
    assert KEY not in caplog.text
    assert KEY_VAR not in caplog.text


def test_log_egress_without_detail_still_names_endpoint_and_host(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG):
        log_egress(gemini("https://api.example.com"))

    [record] = _records(caplog)
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "egress to gemini (api.example.com)"


def test_log_egress_does_not_need_the_key(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit record is written even when the call will then be refused."""
    monkeypatch.delenv(KEY_VAR, raising=False)

    with caplog.at_level(logging.WARNING):
        log_egress(gemini(), detail="summarize")

    assert len(_records(caplog)) == 1


@pytest.mark.parametrize(
    "url",
    [
        "https://user:sk-live-123@api.example.com",
        "https://api.example.com/v1?key=sk-live-123",
        "https://api.example.com/v1#sk-live-123",
    ],
)
def test_a_key_in_the_base_url_is_refused_without_repeating_it(url: str) -> None:
    with pytest.raises(ValueError, match="secret reference") as caught:
        ExternalEndpoint("api", url, SecretRef("API_KEY"))

    assert "sk-live-123" not in str(caught.value)
    assert "https://api.example.com" in str(caught.value)
