"""Opt-in, audited calls to external APIs with keys held only by reference.

A key is named, never stored: ``SecretRef("GEMINI_API_KEY")`` reads the
environment at call time and refuses when the key is unset or empty, so a
missing key can never turn into an unauthenticated call.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = [
    "EnvLookup",
    "ExternalEndpoint",
    "SecretMissingError",
    "SecretRef",
    "https_url_problem",
    "log_egress",
    "log_egress_to",
]

logger = logging.getLogger("dispatch_prefect.egress")

EnvLookup = Callable[[str], str | None]


class SecretMissingError(RuntimeError):
    """A referenced secret is unset or empty; the call is refused."""


@dataclass(frozen=True)
class SecretRef:
    """The name of the environment variable that holds a key."""

    env_var: str

    def __post_init__(self) -> None:
        if not self.env_var:
            raise ValueError("SecretRef.env_var must name an environment variable")

    def resolve(self, env: EnvLookup = os.environ.get) -> str:
        """Read the key now.

        Raises:
            SecretMissingError: the variable is unset or empty.
        """
        value = env(self.env_var)
        if not value:
            raise SecretMissingError(
                f"environment variable {self.env_var} is unset or empty; "
                "set it where the flow runs (the call was refused)"
            )

        return value


@dataclass(frozen=True)
class ExternalEndpoint:
    """An external HTTPS API and the reference to its key."""

    name: str
    base_url: str
    secret: SecretRef = field(repr=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("ExternalEndpoint.name must not be empty")

        problem = https_url_problem(self.base_url)
        if problem is not None:
            raise ValueError(f"endpoint {self.name!r} base_url {problem}")

    def host(self) -> str:
        """The host name the endpoint's calls go to."""
        host = urlsplit(self.base_url).hostname
        assert host is not None  # checked in __post_init__

        return host

    def bearer(self, env: EnvLookup = os.environ.get) -> str:
        """An ``Authorization`` header value, read at call time.

        Raises:
            SecretMissingError: the key is unset or empty.
        """
        return f"Bearer {self.secret.resolve(env)}"


def https_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be an API's base URL, or None when it can.

    Only ``https://`` with a host; no user, password, query or fragment,
    where a key could hide. The reason shows the scheme and host only, so a
    key pasted into the URL never reaches an error message.
    """
    parts = urlsplit(url)
    shown = f"{parts.scheme}://{parts.hostname or ''}"
    if parts.scheme != "https" or not parts.hostname:
        return f"{shown}... must be an https:// URL with a host"

    if parts.username or parts.password or parts.query or parts.fragment:
        return (
            f"{shown}... must not carry a user, password, query or fragment; "
            "keys belong in a secret reference"
        )

    return None


def log_egress(endpoint: ExternalEndpoint, *, detail: str = "") -> None:
    """Record, at WARNING, that data is leaving for an external API.

    The record names the endpoint, its host and the detail; never the key and
    never the variable that holds it.
    """
    log_egress_to(endpoint.name, endpoint.host(), detail=detail)


def log_egress_to(name: str, host: str, *, detail: str = "") -> None:
    """``log_egress`` for an endpoint whose key is held elsewhere than the env."""
    logger.warning(
        "egress to %s (%s)%s",
        name,
        host,
        f": {detail}" if detail else "",
    )
