"""Audited calls to a paid API from inside a gated call.

A gated function routed to an SDK backend talks to its API through
``sdk_client()``: an ``httpx.Client`` bound to the backend's HTTPS base URL,
whose key is read from the backend's secret reference when the client is
made and never logged. Every request is recorded as egress (endpoint, host,
method and path; never a header or a body). ``report_usage`` turns the
provider's reported token counts into the call's actual cost; without it the
call is charged its whole bound.

```python
from dispatch_prefect import gated_task
from dispatch_prefect.egress import report_usage, sdk_client

@gated_task(tool_id="summarize", allow_sdk=True, backends=["gemini"],
            input_tokens=8_000, max_output_tokens=1_000, max_runtime_s=120)
def summarize(text: str) -> str:
    with sdk_client(auth_header="x-goog-api-key") as api:
        reply = api.post("/v1beta/models/gemini-2.5-flash:generateContent",
                         json={"contents": [{"parts": [{"text": text}]}]}).json()
    usage = reply["usageMetadata"]
    report_usage(input_tokens=usage["promptTokenCount"],
                 output_tokens=usage["candidatesTokenCount"])
    return reply["candidates"][0]["content"]["parts"][0]["text"]
```
"""

from __future__ import annotations

import ssl
from decimal import Decimal
from urllib.parse import urlsplit

import httpx

from dispatch_prefect.hooks import current_call, record_usage_usd
from dispatch_prefect.policy import BackendKind, token_cost
from dispatch_prefect.policy.egress import log_egress_to

__all__ = ["EgressRefused", "report_usage", "sdk_client"]


class EgressRefused(PermissionError):
    """The running call may not reach an external API."""


def sdk_client(
    *,
    auth_header: str = "Authorization",
    timeout_s: float = 120.0,
    verify: bool | str | ssl.SSLContext = True,
) -> httpx.Client:
    """An HTTP client for the SDK backend the running gated call was routed to.

    Args:
        auth_header: the header that carries the key; ``Authorization``
            sends ``Bearer <key>``, any other name sends the key as is
            (``x-api-key``, ``x-goog-api-key``).
        timeout_s: per-request timeout.
        verify: TLS verification: True, an ``ssl.SSLContext``, or the path
            of a CA bundle file for a private CA; never off in production.

    Raises:
        EgressRefused: the call was not routed to an SDK backend; or, from
            a request, the request (or a redirect) leaves the backend's
            origin, which would hand the key to another server.
        SecretMissingError: the backend's key is absent or empty.
    """
    plan, _ = current_call()
    backend = plan.backend
    if backend.kind is not BackendKind.SDK or backend.base_url is None:
        raise EgressRefused(
            f"{plan.spec.tool_id} runs on {backend.name} ({backend.kind.value}), "
            "not an SDK backend: external API calls need allow_sdk=True and an "
            "sdk backend with a base_url"
        )
    key = backend.read_key()
    value = f"Bearer {key}" if auth_header.lower() == "authorization" else key
    host = urlsplit(backend.base_url).hostname or backend.base_url
    origin = httpx.URL(backend.base_url)
    allowed = (origin.scheme, origin.host, origin.port)

    def audit(request: httpx.Request) -> None:
        # The key rides on every request this client sends, so an absolute
        # URL or a redirect elsewhere would hand it to another server.
        url = request.url
        if (url.scheme, url.host, url.port) != allowed:
            raise EgressRefused(
                f"{plan.spec.tool_id} may only reach {backend.name} at "
                f"{origin.scheme}://{origin.netloc.decode()}, not "
                f"{url.scheme}://{url.netloc.decode()}; the key is not sent "
                "anywhere else"
            )

        log_egress_to(
            backend.name,
            host,
            detail=f"{plan.spec.tool_id}: {request.method} {request.url.path}",
        )

    if isinstance(verify, str):
        # httpx deprecates a path here and warns on every client; it takes
        # the context the path stands for.
        verify = ssl.create_default_context(cafile=verify)

    return httpx.Client(
        base_url=backend.base_url,
        headers={auth_header: value},
        timeout=timeout_s,
        verify=verify,
        event_hooks={"request": [audit]},
    )


def report_usage(
    *, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0
) -> Decimal:
    """Record the provider's reported usage of one request; returns its cost.

    Several requests in one call add up. The call is reconciled at the sum.

    Raises:
        RuntimeError: not inside an admitted gated call.
        ValueError: the backend has no token rates, or a count is negative.
    """
    plan, task_run_id = current_call()
    rates = plan.backend.token_rates
    if rates is None:
        raise ValueError(
            f"backend {plan.backend.name!r} has no token rates to price usage"
        )

    cost_usd = token_cost(
        rates,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_input_tokens=cached_input_tokens,
    )
    record_usage_usd(task_run_id, cost_usd)

    return cost_usd
