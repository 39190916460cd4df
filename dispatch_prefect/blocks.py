"""Prefect Blocks that hold every setting of the gate.

A team saves these in the Prefect UI, in code, or with
``dispatch-prefect blocks apply blocks/``; flows load them by name. Each
Block turns into the pure policy objects of ``dispatch_prefect.policy`` and
never re-implements a rule.

```python
from dispatch_prefect.blocks import BudgetBlock, load_block

cap = load_block(BudgetBlock, "default").to_cap()
```

Money is ``Decimal`` end to end: it is stored in block documents as exact
decimal text (``"0.0001867"``), never as a JSON number, so a saved and loaded
rate compares equal to the one written.
"""

from __future__ import annotations

import copy
import enum
import os
import tomllib
import zoneinfo
from abc import ABC
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, cast, get_args
from urllib.parse import urlsplit

from google.api_core.retry import Retry
from prefect.blocks.core import Block
from prefect.blocks.system import Secret
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.exceptions import ObjectNotFound
from prefect_gcp.credentials import GcpCredentials
from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import GenerateJsonSchema

from dispatch_prefect.policy import (
    BackendCapabilities,
    BackendKind,
    BudgetCap,
    CostRates,
    SecretMissingError,
    TokenRates,
    ToolRequirements,
)
from dispatch_prefect.policy.egress import https_url_problem

if TYPE_CHECKING:
    from dispatch_prefect.ledger import Ledger

__all__ = [
    "APPLY_COMMAND",
    "BLOCK_CLASSES",
    "TABLES",
    "ApplyAction",
    "ApplyOutcome",
    "BackendBlock",
    "BlockDocumentSpec",
    "BlockDocumentsInvalid",
    "BlockInvalid",
    "BlockNotFound",
    "BudgetBlock",
    "LedgerBlock",
    "MissingRatesError",
    "RatesBlock",
    "SecretRefBlock",
    "SecretSource",
    "aload_block",
    "apply_block_documents",
    "find_saved_block",
    "load_block",
    "read_block_documents",
]

APPLY_COMMAND = "dispatch-prefect blocks apply blocks/"

_DOCS_URL = "https://docs.prefect.io/v3/develop/blocks"
_LOGOS = (
    "https://raw.githubusercontent.com/PrefectHQ/prefect/"
    "420d0d6a78bb6df1fc18bcf188fdad43c1d22ea9/assets/block-logos/"
)
# Prefect's own block logos; the project hosts none of its own yet.
_LOGO_WORK = _LOGOS + "process.png"
_LOGO_SECRET = _LOGOS + "secret.png"
_LOGO_STORE = _LOGOS + "filesystem.png"


def _decimal_text(value: Decimal) -> str:
    # Fixed-point text is exact and never scientific ("1E-7"), so the
    # stored document reads like the figure a person typed.
    return format(value, "f")


_DECIMAL_JSON_SCHEMA = {
    "type": "string",
    "pattern": r"^\d+(\.\d+)?$",
    "examples": ["0", "25.00", "0.0001867"],
}


def _no_float(value: object) -> object:
    # A float has already lost the figure a person typed; money and
    # durations come in as Decimal, int or decimal text only.
    if isinstance(value, float):
        raise ValueError(
            f"got the float {value!r}; pass Decimal('{value}') or the text "
            f"'{value}' so the amount stays exact"
        )

    return value


UsdAmount = Annotated[
    Decimal,
    BeforeValidator(_no_float),
    Field(ge=0, allow_inf_nan=False),
    PlainSerializer(_decimal_text, return_type=str, when_used="json"),
    WithJsonSchema(_DECIMAL_JSON_SCHEMA),
]
"""A non-negative, exact amount of USD, stored as decimal text."""

Seconds = UsdAmount
"""A non-negative, exact number of seconds, stored as decimal text."""


class MissingRatesError(ValueError):
    """A rates block lacks the kind of rates the caller asked for."""


class BlockNotFound(LookupError):
    """No block document of that type and name exists on the Prefect server."""

    def __init__(self, block_type_name: str, block_name: str) -> None:
        self.block_type_name = block_type_name
        self.block_name = block_name
        super().__init__(
            f"no {block_type_name} block named {block_name!r} exists on the "
            f"Prefect server; create it with `{APPLY_COMMAND}` or in the "
            f"Prefect UI (Blocks, then add a {block_type_name} block)"
        )


class BlockInvalid(ValueError):
    """A saved block document no longer validates against its Block class."""


def _display(block: Block) -> str:
    name = block._block_document_name
    label = repr(name) if name else "(unsaved)"

    return f"{block.get_block_type_name()} block {label}"


class _DispatchBlock(Block, ABC):
    """What every Dispatch block shares; abstract, so never registered."""

    _documentation_url = _DOCS_URL  # type: ignore[assignment]

    @classmethod
    def model_json_schema(  # type: ignore[override]
        cls,
        by_alias: bool = True,
        ref_template: str = "#/definitions/{model}",
        schema_generator: type[GenerateJsonSchema] = GenerateJsonSchema,
        mode: Literal["validation", "serialization"] = "validation",
    ) -> dict[str, Any]:
        # Prefect rebuilds a block's schema for every field of every save
        # (to find secret fields); a class's schema never changes, and
        # rebuilding it was most of the time `blocks apply` took.
        key = (cls, by_alias, ref_template, schema_generator, mode)
        schema = _SCHEMAS.get(key)
        if schema is None:
            schema = super().model_json_schema(
                by_alias, ref_template, schema_generator, mode
            )
            _SCHEMAS[key] = schema

        return copy.deepcopy(schema)


_SCHEMAS: dict[tuple[object, ...], dict[str, Any]] = {}


class BudgetBlock(_DispatchBlock):
    """The dollar caps of paid work: per run, per calendar month, and approval.

    Both caps default to $0, so paid work is off until someone sets a
    budget. A job whose upper-bound cost is below ``auto_approve_below_usd``
    needs no person; every other paid job waits for an approval that times
    out (a rejection) after ``approval_timeout_s``.

    Example:
        Load a saved budget and turn it into the policy cap:
        ```python
        from dispatch_prefect.blocks import BudgetBlock

        budget = BudgetBlock.load("BLOCK_NAME")
        cap = budget.to_cap()
        ```
    """

    _block_type_name = "Dispatch Budget"
    _logo_url = _LOGO_WORK  # type: ignore[assignment]

    run_usd: UsdAmount = Field(
        default=Decimal(0),
        title="Run cap (USD)",
        description=(
            "The most one root flow run may commit, in USD; 0 turns paid work off."
        ),
    )
    month_usd: UsdAmount = Field(
        default=Decimal(0),
        title="Month cap (USD)",
        description=(
            "The most one calendar month may commit, in USD; 0 turns paid work off."
        ),
    )
    time_zone: str = Field(
        default="UTC",
        title="Time zone",
        description=(
            "The IANA time zone whose calendar month is the month window, "
            "for example UTC or Europe/Paris."
        ),
    )
    auto_approve_below_usd: UsdAmount = Field(
        default=Decimal(0),
        title="Auto-approve below (USD)",
        description=(
            "A paid job whose upper-bound cost is below this needs no "
            "person; 0 means every paid job needs an approval."
        ),
    )
    approval_timeout_s: int = Field(
        default=3600,
        gt=0,
        title="Approval timeout (seconds)",
        description=(
            "How long a paid job waits for a person before it counts as "
            "rejected, in seconds."
        ),
    )

    @field_validator("time_zone")
    @classmethod
    def _known_time_zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"time_zone {value!r} is not a known IANA time zone; use a "
                "name such as 'UTC' or 'Europe/Paris'"
            ) from exc

        return value

    def to_cap(self) -> BudgetCap:
        """The policy cap of both windows."""
        return BudgetCap(run_usd=self.run_usd, month_usd=self.month_usd)

    def zone(self) -> zoneinfo.ZoneInfo:
        """The time zone whose calendar month is the month window."""
        return zoneinfo.ZoneInfo(self.time_zone)


_COMPUTE_FIELDS = ("gpu_usd_per_s", "vcpu_usd_per_s", "gib_usd_per_s")
_TOKEN_FIELDS = ("input_usd_per_mtok", "output_usd_per_mtok")


class RatesBlock(_DispatchBlock):
    """What a backend costs: per-second compute rates, token rates, or both.

    Compute rates price a job by the second (GPU, vCPU, GiB of memory) plus
    the idle tail a backend keeps billing after the work ends. Token rates
    price a paid LLM or SDK call per million tokens. ``source_url`` and
    ``source_date`` say where the figures come from, so anyone can check
    them.

    Example:
        Load Cloud Run L4 rates and price a job's upper bound:
        ```python
        from dispatch_prefect.blocks import RatesBlock
        from dispatch_prefect.policy import estimate_cost

        rates = RatesBlock.load("BLOCK_NAME")
        bound_usd = estimate_cost(
            rates.to_cost_rates(), max_runtime_s=600, vcpus=4, memory_gib=16
        )
        ```
    """

    _block_type_name = "Dispatch Rates"
    _logo_url = _LOGO_WORK  # type: ignore[assignment]

    gpu_usd_per_s: UsdAmount | None = Field(
        default=None,
        title="GPU (USD per second)",
        description=(
            "The price of the GPU per second of runtime, in USD; 0 for a "
            "CPU-only backend, empty when the backend is priced by token."
        ),
    )
    vcpu_usd_per_s: UsdAmount | None = Field(
        default=None,
        title="vCPU (USD per vCPU-second)",
        description="The price of one vCPU per second, in USD.",
    )
    gib_usd_per_s: UsdAmount | None = Field(
        default=None,
        title="Memory (USD per GiB-second)",
        description="The price of one GiB of memory per second, in USD.",
    )
    idle_tail_s: Seconds = Field(
        default=Decimal(0),
        title="Idle tail (seconds)",
        description=(
            "Seconds the backend keeps billing after a job ends, added to "
            "every compute estimate."
        ),
    )
    input_usd_per_mtok: UsdAmount | None = Field(
        default=None,
        title="Input tokens (USD per million)",
        description="The price of one million input tokens, in USD.",
    )
    output_usd_per_mtok: UsdAmount | None = Field(
        default=None,
        title="Output tokens (USD per million)",
        description="The price of one million output tokens, in USD.",
    )
    cached_input_usd_per_mtok: UsdAmount | None = Field(
        default=None,
        title="Cached input tokens (USD per million)",
        description=(
            "The price of one million input tokens served from the "
            "provider's cache, in USD; empty when it has no cache price."
        ),
    )
    source_url: str | None = Field(
        default=None,
        title="Source URL",
        description="The public page the figures were read from.",
    )
    source_date: date | None = Field(
        default=None,
        title="Source date",
        description="The day the figures were read from the source.",
    )

    @field_validator("source_url")
    @classmethod
    def _https_source(cls, value: str | None) -> str | None:
        if value is not None:
            _require_https("source_url", value)

        return value

    @model_validator(mode="after")
    def _complete_groups(self) -> RatesBlock:
        _require_all_or_none(self, _COMPUTE_FIELDS, "compute")
        _require_all_or_none(self, _TOKEN_FIELDS, "token")
        if self.cached_input_usd_per_mtok is not None and not self.has_token_rates():
            raise ValueError(
                "cached_input_usd_per_mtok is set but input_usd_per_mtok and "
                "output_usd_per_mtok are not; set them too"
            )

        if not self.has_compute_rates() and not self.has_token_rates():
            raise ValueError(
                "a rates block needs compute rates ("
                + ", ".join(_COMPUTE_FIELDS)
                + ") or token rates ("
                + ", ".join(_TOKEN_FIELDS)
                + "); it has neither"
            )

        return self

    def has_compute_rates(self) -> bool:
        """Whether the block prices work by the second."""
        return all(getattr(self, name) is not None for name in _COMPUTE_FIELDS)

    def has_token_rates(self) -> bool:
        """Whether the block prices calls by the token."""
        return all(getattr(self, name) is not None for name in _TOKEN_FIELDS)

    def to_cost_rates(self) -> CostRates:
        """The per-second policy rates.

        Raises:
            MissingRatesError: the block has no compute rates.
        """
        if (
            self.gpu_usd_per_s is None
            or self.vcpu_usd_per_s is None
            or self.gib_usd_per_s is None
        ):
            raise MissingRatesError(
                f"{_display(self)} has no compute rates ("
                + ", ".join(_COMPUTE_FIELDS)
                + "); set them on the block, or price this work by the token"
            )

        return CostRates(
            gpu_usd_per_s=self.gpu_usd_per_s,
            vcpu_usd_per_s=self.vcpu_usd_per_s,
            gib_usd_per_s=self.gib_usd_per_s,
            idle_tail_s=self.idle_tail_s,
        )

    def to_token_rates(self) -> TokenRates:
        """The per-token policy rates.

        Raises:
            MissingRatesError: the block has no token rates.
        """
        if self.input_usd_per_mtok is None or self.output_usd_per_mtok is None:
            raise MissingRatesError(
                f"{_display(self)} has no token rates ("
                + ", ".join(_TOKEN_FIELDS)
                + "); set them on the block, or price this work by the second"
            )

        return TokenRates(
            input_usd_per_mtok=self.input_usd_per_mtok,
            output_usd_per_mtok=self.output_usd_per_mtok,
            cached_input_usd_per_mtok=self.cached_input_usd_per_mtok,
        )


def _require_all_or_none(block: Block, names: tuple[str, ...], group: str) -> None:
    missing = [name for name in names if getattr(block, name) is None]
    if missing and len(missing) < len(names):
        present = [name for name in names if name not in missing]
        raise ValueError(
            f"{', '.join(present)} set but {', '.join(missing)} not: set all "
            f"{group} rates ({', '.join(names)}; 0 where a part is free) or "
            "none"
        )


def _require_https(field_name: str, url: str) -> None:
    problem = https_url_problem(url)
    if problem is not None:
        raise ValueError(f"{field_name} {problem}")


class SecretSource(enum.StrEnum):
    """Where a referenced secret lives."""

    ENV = "env"
    PREFECT_SECRET = "prefect_secret"
    GCP_SECRET_MANAGER = "gcp_secret_manager"


class SecretRefBlock(_DispatchBlock):
    """Where an API key lives, by name; never the key itself.

    The key is read when it is needed (``resolve()``): from an environment
    variable of the process that runs the flow, from a Prefect ``Secret``
    block, or from a GCP Secret Manager secret through prefect-gcp. An
    absent or empty key refuses the call.

    Example:
        Read the key a paid API call needs, at call time:
        ```python
        from dispatch_prefect.blocks import SecretRefBlock

        reference = SecretRefBlock.load("BLOCK_NAME")
        api_key = reference.resolve()
        ```
    """

    _block_type_name = "Dispatch Secret Reference"
    _logo_url = _LOGO_SECRET  # type: ignore[assignment]

    source: SecretSource = Field(
        default=SecretSource.ENV,
        title="Source",
        description=(
            "Where the secret lives: env (an environment variable), "
            "prefect_secret (a Prefect Secret block) or gcp_secret_manager."
        ),
    )
    name: str = Field(
        default=...,
        title="Name",
        description=(
            "The name of the environment variable, Prefect Secret block or "
            "GCP secret; never the secret itself."
        ),
    )
    gcp_credentials: GcpCredentials | None = Field(
        default=None,
        title="GCP credentials",
        description=(
            "The prefect-gcp credentials that read the GCP secret; empty "
            "uses the machine's application default credentials."
        ),
    )
    gcp_project: str | None = Field(
        default=None,
        title="GCP project",
        description=(
            "The GCP project that holds the secret; empty uses the "
            "credentials' project."
        ),
    )
    gcp_version: str = Field(
        default="latest",
        title="GCP secret version",
        description="The version of the GCP secret to read.",
    )
    gcp_timeout_s: float = Field(
        default=30,
        gt=0,
        title="GCP timeout (seconds)",
        description=(
            "How long to keep trying to read the GCP secret, retries "
            "included, in seconds."
        ),
    )

    @field_validator("name")
    @classmethod
    def _non_empty_name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(
                f"name {value!r} is empty; name the environment variable, "
                "Prefect Secret block or GCP secret that holds the key"
            )

        return value

    def describe(self) -> str:
        """Where the secret lives, for messages; never its value."""
        where = {
            SecretSource.ENV: "environment variable",
            SecretSource.PREFECT_SECRET: "Prefect Secret block",
            SecretSource.GCP_SECRET_MANAGER: "GCP Secret Manager secret",
        }[self.source]

        return f"{_display(self)} ({where} {self.name!r})"

    def resolve(self) -> str:
        """Read the secret now.

        Raises:
            SecretMissingError: the secret is absent, empty or unreadable;
                the message names the reference, never a value.
        """
        if self.source is SecretSource.ENV:
            value = os.environ.get(self.name)
        elif self.source is SecretSource.PREFECT_SECRET:
            value = self._read_prefect_secret()
        else:
            value = self._read_gcp_secret()

        if not value:
            raise SecretMissingError(
                f"{self.describe()} is unset or empty where this runs; "
                "set it there (the call was refused)"
            )

        return value

    def _read_prefect_secret(self) -> str | None:
        try:
            secret = cast("Secret[Any]", Secret.load(self.name, _sync=True))  # type: ignore[call-arg]
        except ValueError as exc:
            raise SecretMissingError(
                f"{self.describe()} does not exist; create it in the Prefect "
                "UI or with Secret(value=...).save(...) (the call was refused)"
            ) from _not_found_cause(exc)

        value = secret.value.get_secret_value()
        if not isinstance(value, str):
            raise SecretMissingError(
                f"{self.describe()} holds a {type(value).__name__}, not a "
                "string key (the call was refused)"
            )

        return value

    def _read_gcp_secret(self) -> str | None:
        try:
            credentials = self.gcp_credentials or GcpCredentials()
        except Exception as exc:
            # Without a credentials block prefect-gcp looks for application
            # default credentials, and raises when the machine has none.
            raise SecretMissingError(
                f"{self.describe()} needs GCP credentials "
                f"({exc.__class__.__name__}); set gcp_credentials on the "
                "block or give the machine application default credentials "
                "(the call was refused)"
            ) from exc

        project = self.gcp_project or credentials.project
        if not project:
            raise SecretMissingError(
                f"{self.describe()} names no GCP project; set gcp_project or "
                "the project of its credentials (the call was refused)"
            )

        path = f"projects/{project}/secrets/{self.name}/versions/{self.gcp_version}"
        try:
            client = credentials.get_secret_manager_client()
            response = client.access_secret_version(
                name=path,
                timeout=self.gcp_timeout_s,
                retry=Retry(timeout=self.gcp_timeout_s),
            )
            data: bytes = response.payload.data
        except Exception as exc:
            # The Google error says what went wrong (no permission, no
            # network, no such secret); none carries the secret's value.
            raise SecretMissingError(
                f"{self.describe()} could not be read from project {project} "
                f"({exc.__class__.__name__}); check that it exists and that "
                "the credentials may access it (the call was refused)"
            ) from exc

        return data.decode("utf-8")


def _not_found_cause(exc: ValueError) -> BaseException | None:
    # Block.load wraps ObjectNotFound in a ValueError; keep that as the
    # cause, drop anything else that might say more than "not found".
    cause = exc.__cause__

    return cause if isinstance(cause, ObjectNotFound) else None


class BackendBlock(_DispatchBlock):
    """A place work can run: its kind, what it offers, its rates and pool.

    The router walks local, LAN, cloud and (only when a call opts in) SDK
    backends in that order and picks the first one that can satisfy a job.
    ``rates`` is a reference to a saved Dispatch Rates block, so one set of
    rates serves many backends and a change to it reaches all of them.
    An SDK backend also names its HTTPS endpoint and the reference to its
    key.

    Example:
        Load the backends and pick where a job runs:
        ```python
        from dispatch_prefect.blocks import BackendBlock
        from dispatch_prefect.policy import ToolRequirements, select_backend

        cloud = BackendBlock.load("BLOCK_NAME")
        backend = select_backend([cloud], ToolRequirements("cofold", 24.0))
        ```
    """

    _block_type_name = "Dispatch Backend"
    _logo_url = _LOGO_WORK  # type: ignore[assignment]

    kind: BackendKind = Field(
        default=...,
        title="Kind",
        description=(
            "local (this machine), lan_worker (a machine on the LAN), "
            "cloud_worker (a cloud work pool) or sdk (a paid external API)."
        ),
    )
    has_gpu: bool = Field(
        default=False,
        title="Has a GPU",
        description="Whether the backend has a GPU a job can use.",
    )
    available_vram_gb: float | None = Field(
        default=None,
        ge=0,
        title="Available VRAM (GB)",
        description="GPU memory a job can use, in GB; empty without a GPU.",
    )
    images: list[str] | None = Field(
        default=None,
        title="Images",
        description=(
            "The container images the backend runs; not set means any image, "
            "a list limits jobs that pin an image to those listed."
        ),
    )
    tool_ids: list[str] | None = Field(
        default=None,
        title="Tools",
        description=(
            "The tools the backend offers; not set means any tool, a list "
            "limits jobs without a pinned image to those listed."
        ),
    )
    rates: RatesBlock | None = Field(
        default=None,
        title="Rates",
        description=(
            "The saved Dispatch Rates block that prices this backend; empty "
            "when the backend costs nothing."
        ),
    )
    work_pool: str | None = Field(
        default=None,
        title="Work pool",
        description=(
            "The Prefect work pool that reaches the backend; empty runs the "
            "work in the calling process."
        ),
    )
    deployment: str | None = Field(
        default=None,
        title="Deployment",
        description=(
            "The deployment (flow name/deployment name) that runs gated work "
            "on the work pool; empty submits to the pool without one."
        ),
    )
    job_variables: dict[str, Any] = Field(
        default_factory=dict,
        title="Job variables",
        description=(
            "Job variables for the work pool (image, cpu, memory, env and "
            "so on); never a secret."
        ),
    )
    base_url: str | None = Field(
        default=None,
        title="Endpoint URL",
        description="The https:// base URL of an sdk backend's API.",
    )
    secret: SecretRefBlock | None = Field(
        default=None,
        title="API key reference",
        description=(
            "The saved Dispatch Secret Reference that holds an sdk backend's key."
        ),
    )

    @field_validator("base_url")
    @classmethod
    def _https_endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            _require_https("base_url", value)

        return value

    @model_validator(mode="after")
    def _consistent(self) -> BackendBlock:
        if self.available_vram_gb is not None and not self.has_gpu:
            raise ValueError(
                f"available_vram_gb is {self.available_vram_gb:g} but has_gpu "
                "is false; set has_gpu or clear available_vram_gb"
            )

        if self.kind is BackendKind.SDK:
            missing = [
                name for name in ("base_url", "secret") if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(
                    f"kind 'sdk' needs {' and '.join(missing)}: the https:// "
                    "endpoint and the reference to its key"
                )

        return self

    def to_capabilities(self) -> BackendCapabilities:
        """What the backend offers, as the router sees it."""
        return BackendCapabilities(
            has_gpu=self.has_gpu,
            available_vram_gb=self.available_vram_gb,
            images=None if self.images is None else tuple(self.images),
            tool_ids=None if self.tool_ids is None else tuple(self.tool_ids),
        )

    def can_satisfy(self, req: ToolRequirements) -> bool:
        """Whether a job with these requirements can run here (``Routable``)."""
        return self.to_capabilities().can_satisfy(req)

    def cost_rates(self) -> CostRates | None:
        """The per-second rates, or None when the backend declares none."""
        if self.rates is None or not self.rates.has_compute_rates():
            return None

        return self.rates.to_cost_rates()

    def token_rates(self) -> TokenRates | None:
        """The per-token rates, or None when the backend declares none."""
        if self.rates is None or not self.rates.has_token_rates():
            return None

        return self.rates.to_token_rates()


_LEDGER_SCHEMES = ("sqlite", "postgresql")


class LedgerBlock(_DispatchBlock):
    """Where reservations and spend are recorded: a database URL.

    Empty means ``$DISPATCH_PREFECT_LEDGER_URL`` when set, else the embedded
    SQLite file under ``PREFECT_HOME``, enough for one orchestrating
    machine. A team with several points every machine at one PostgreSQL
    database. The URL is a secret (it may carry a password):
    the UI hides it and no message repeats it.

    Example:
        Open the ledger the gate records into:
        ```python
        from dispatch_prefect.blocks import LedgerBlock

        ledger_block = LedgerBlock.load("BLOCK_NAME")
        ledger = ledger_block.open_ledger()
        ```
    """

    model_config = ConfigDict(hide_input_in_errors=True)

    _block_type_name = "Dispatch Ledger"
    _logo_url = _LOGO_STORE  # type: ignore[assignment]

    url: SecretStr | None = Field(
        default=None,
        title="Database URL",
        description=(
            "A sqlite:/// or postgresql:// URL; empty uses "
            "DISPATCH_PREFECT_LEDGER_URL when set, else the embedded SQLite "
            "file under PREFECT_HOME."
        ),
    )

    @field_validator("url")
    @classmethod
    def _known_database(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None

        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme.split("+", 1)[0] not in _LEDGER_SCHEMES:
            # The scheme only: the rest of the URL may hold a password.
            raise ValueError(
                f"url has scheme {scheme!r}; use sqlite:///<file> or "
                "postgresql://<user>@<host>/<database>"
            )

        return value

    def open_ledger(self) -> Ledger:
        """Open the ledger this block points at."""
        from dispatch_prefect.ledger import Ledger

        url = None if self.url is None else self.url.get_secret_value()

        return Ledger.open(url)


BLOCK_CLASSES: tuple[type[Block], ...] = (
    BudgetBlock,
    RatesBlock,
    SecretRefBlock,
    BackendBlock,
    LedgerBlock,
)
"""Every Block class of the package, in the order their documents apply."""

B = TypeVar("B", bound=Block)


def load_block(cls: type[B], name: str) -> B:
    """Load a saved block, with a refusal that says how to create it.

    Raises:
        BlockNotFound: no document of that type and name exists.
        BlockInvalid: the document no longer validates.
    """
    try:
        block = cast(B, cls.load(name, _sync=True))  # type: ignore[call-arg]
    except (ValueError, RuntimeError) as exc:
        error = _load_error(cls, name, exc)
        if error is exc:
            raise

        raise error from exc

    return block


async def aload_block(cls: type[B], name: str) -> B:
    """Async twin of ``load_block``."""
    try:
        block: B = await cls.aload(name)
    except (ValueError, RuntimeError) as exc:
        error = _load_error(cls, name, exc)
        if error is exc:
            raise

        raise error from exc

    return block


def _load_error(cls: type[Block], name: str, exc: Exception) -> Exception:
    if isinstance(exc.__cause__, ObjectNotFound):
        return BlockNotFound(cls.get_block_type_name(), name)

    if isinstance(exc, RuntimeError):
        return BlockInvalid(
            f"{cls.get_block_type_name()} block {name!r} does not validate "
            f"against this version of dispatch_prefect; fix it in the Prefect "
            f"UI or re-apply it with `{APPLY_COMMAND}`"
        )

    return exc


# -- block documents as code ------------------------------------------------

TABLES: dict[str, type[Block]] = {
    "budget": BudgetBlock,
    "rates": RatesBlock,
    "secret": SecretRefBlock,
    "backend": BackendBlock,
    "ledger": LedgerBlock,
}
"""The table names of a block file (``[rates.cloud-run-l4]``) and their classes."""

# Referenced documents are written before the documents that point at them.
_APPLY_ORDER: tuple[type[Block], ...] = (
    RatesBlock,
    SecretRefBlock,
    BudgetBlock,
    LedgerBlock,
    BackendBlock,
)


class BlockDocumentsInvalid(ValueError):
    """One or more documents of a block folder do not validate."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            f"{len(problems)} problem(s) in the block documents; nothing was "
            "written:\n" + "\n".join(problems)
        )


class ApplyAction(enum.StrEnum):
    """What applying one document did to the server."""

    CREATED = "created"
    CHANGED = "changed"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class BlockDocumentSpec:
    """One validated block document read from a file."""

    path: Path
    name: str
    block: Block

    def label(self) -> str:
        """The block type and document name, for messages."""
        return f"{self.block.get_block_type_name()} {self.name!r}"


@dataclass(frozen=True)
class ApplyOutcome:
    """What happened to one document."""

    spec: BlockDocumentSpec
    action: ApplyAction


Lookup = Callable[[type[Block], str], "Block | None"]
"""Finds a saved block by class and name, or returns None."""


def find_saved_block(cls: type[B], name: str) -> B | None:
    """The saved block of that type and name, or None when there is none."""
    try:
        return load_block(cls, name)
    except BlockNotFound:
        return None


def read_block_documents(
    folder: Path, *, lookup: Lookup = find_saved_block
) -> list[BlockDocumentSpec]:
    """Read and validate every ``*.toml`` block document in ``folder``.

    A file holds tables named ``[<kind>.<document name>]`` where kind is one
    of ``TABLES``. Numbers are read as exact decimals. A field that refers to
    another block (``rates``, ``secret``, ``gcp_credentials``) holds that
    document's name: one in the folder, or one already saved. A secret field
    holds ``{ env = "VARIABLE" }``, read now, so no secret sits in a file.

    Raises:
        BlockDocumentsInvalid: every problem found, each naming the file,
            the document, the field and the value.
    """
    problems: list[str] = []
    raw = _read_tables(folder, problems)

    specs: dict[tuple[type[Block], str], BlockDocumentSpec] = {}
    invalid: set[tuple[type[Block], str]] = set()
    for cls in _APPLY_ORDER:
        for path, name, data in raw.get(cls, []):
            spec = _validate_document(
                cls, path, name, data, specs, invalid, lookup, problems
            )
            if spec is None:
                invalid.add((cls, name))
            else:
                specs[(cls, name)] = spec

    if problems:
        raise BlockDocumentsInvalid(problems)

    return list(specs.values())


def _read_tables(
    folder: Path, problems: list[str]
) -> dict[type[Block], list[tuple[Path, str, dict[str, Any]]]]:
    found: dict[type[Block], list[tuple[Path, str, dict[str, Any]]]] = {}
    if not folder.is_dir():
        problems.append(f"{folder}: not a folder of block documents")
        return found

    paths = sorted(folder.glob("*.toml"))
    if not paths:
        problems.append(f"{folder}: holds no *.toml block documents")

    seen: dict[tuple[str, str], Path] = {}
    for path in paths:
        try:
            with path.open("rb") as stream:
                document = tomllib.load(stream, parse_float=Decimal)
        except tomllib.TOMLDecodeError as exc:
            problems.append(f"{path}: not valid TOML: {exc}")
            continue

        for table, entries in document.items():
            cls = TABLES.get(table)
            if cls is None or not isinstance(entries, dict):
                problems.append(
                    f"{path}: [{table}] is not a block table; use one of "
                    + ", ".join(f"[{known}.<name>]" for known in TABLES)
                )
                continue

            for name, data in entries.items():
                where = f"{path}: {cls.get_block_type_name()} {name!r}"
                if not isinstance(data, dict):
                    problems.append(f"{where}: must be a table of fields")
                    continue

                if (table, name) in seen:
                    problems.append(f"{where}: also defined in {seen[(table, name)]}")
                    continue

                seen[(table, name)] = path
                found.setdefault(cls, []).append((path, name, data))

    return found


def _validate_document(
    cls: type[Block],
    path: Path,
    name: str,
    data: dict[str, Any],
    specs: dict[tuple[type[Block], str], BlockDocumentSpec],
    invalid: set[tuple[type[Block], str]],
    lookup: Lookup,
    problems: list[str],
) -> BlockDocumentSpec | None:
    where = f"{path}: {cls.get_block_type_name()} {name!r}"
    secret_fields = _secret_fields(cls)
    values: dict[str, Any] = {}
    before = len(problems)

    for field_name, value in data.items():
        if field_name not in cls.model_fields:
            problems.append(
                f"{where}: unknown field {field_name!r} = {value!r}; known "
                f"fields: {', '.join(cls.model_fields)}"
            )
        elif field_name in secret_fields:
            values[field_name] = _secret_from_env(where, field_name, value, problems)
        elif (target := _referenced_class(cls, field_name)) is not None:
            values[field_name] = _referenced_block(
                where, field_name, target, value, specs, invalid, lookup, problems
            )
        else:
            values[field_name] = value

    if len(problems) > before:
        return None

    try:
        block = cls(**values)
    except ValidationError as exc:
        problems.extend(_describe_errors(where, exc, secret_fields))
        return None

    block._block_document_name = name

    return BlockDocumentSpec(path=path, name=name, block=block)


def _secret_fields(cls: type[Block]) -> set[str]:
    names: list[str] = cls.model_json_schema().get("secret_fields", [])

    return {name for name in names if "." not in name}


def _referenced_class(cls: type[Block], field_name: str) -> type[Block] | None:
    annotation = cls.model_fields[field_name].annotation
    for candidate in (annotation, *get_args(annotation)):
        if Block.is_block_class(candidate):
            return candidate

    return None


def _secret_from_env(
    where: str, field_name: str, value: object, problems: list[str]
) -> str | None:
    variable = value.get("env") if isinstance(value, dict) else None
    if not isinstance(variable, str) or len(cast(dict[str, Any], value)) != 1:
        problems.append(
            f"{where}: {field_name} is a secret; write "
            f'{field_name} = {{ env = "VARIABLE" }} so its value stays out '
            "of the folder"
        )
        return None

    secret = os.environ.get(variable)
    if not secret:
        problems.append(
            f"{where}: {field_name} reads environment variable {variable}, "
            "which is unset or empty; set it before applying"
        )
        return None

    return secret


def _referenced_block(
    where: str,
    field_name: str,
    target: type[Block],
    value: object,
    specs: dict[tuple[type[Block], str], BlockDocumentSpec],
    invalid: set[tuple[type[Block], str]],
    lookup: Lookup,
    problems: list[str],
) -> Block | None:
    type_name = target.get_block_type_name()
    if not isinstance(value, str) or not value:
        problems.append(
            f"{where}: {field_name} = {value!r} must name a saved {type_name} block"
        )
        return None

    if (target, value) in specs:
        return specs[(target, value)].block

    if (target, value) in invalid:
        problems.append(
            f"{where}: {field_name} = {value!r} refers to a {type_name} "
            "document that is invalid (see its problem)"
        )
        return None

    saved = lookup(target, value)
    if saved is None:
        problems.append(
            f"{where}: {field_name} = {value!r}: no {type_name} named "
            f"{value!r} in the folder or on the server"
        )

    return saved


def _describe_errors(
    where: str, exc: ValidationError, secret_fields: set[str]
) -> list[str]:
    described = []
    for error in exc.errors(include_url=False):
        field_path = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if not field_path:
            described.append(f"{where}: {message}")
        elif field_path.split(".")[0] in secret_fields:
            described.append(f"{where}: {field_path} (value hidden): {message}")
        elif error["type"] == "missing":
            described.append(f"{where}: {field_path} is required")
        else:
            shown = _show_value(error.get("input"))
            described.append(f"{where}: {field_path} = {shown}: {message}")

    return described


def _show_value(value: object) -> str:
    if isinstance(value, Decimal):
        return _decimal_text(value)

    return repr(value)


def apply_block_documents(
    specs: list[BlockDocumentSpec], *, dry_run: bool = False
) -> list[ApplyOutcome]:
    """Create or update each document so the server matches the folder.

    A document whose saved data (and schema) already match is left alone,
    so applying twice changes nothing the second time. Referenced documents
    are written before the documents that point at them.
    """
    order = {cls: index for index, cls in enumerate(_APPLY_ORDER)}
    outcomes = []
    with get_client(sync_client=True) as client:
        for spec in sorted(specs, key=lambda spec: order[type(spec.block)]):
            action = _compare_with_saved(client, spec.block, spec.name)
            if action is not ApplyAction.UNCHANGED and not dry_run:
                spec.block.save(spec.name, overwrite=True, _sync=True)  # type: ignore[call-arg]
            outcomes.append(ApplyOutcome(spec=spec, action=action))

    return outcomes


def _compare_with_saved(
    client: SyncPrefectClient, wanted: Block, name: str
) -> ApplyAction:
    # An unchanged document lends its id to the wanted block, so documents
    # that refer to it are saved with a reference, not a copy.
    cls = type(wanted)
    try:
        document = client.read_block_document_by_name(
            name=name,
            block_type_slug=cls.get_block_type_slug(),
            include_secrets=True,
        )
    except ObjectNotFound:
        return ApplyAction.CREATED

    schema = document.block_schema
    if schema is None or schema.checksum != cls._calculate_schema_checksum():
        return ApplyAction.CHANGED

    try:
        saved = cls._from_block_document(document)
    except ValidationError:
        return ApplyAction.CHANGED

    if _comparable(saved) != _comparable(wanted):
        return ApplyAction.CHANGED

    wanted._block_document_id = document.id

    return ApplyAction.UNCHANGED


def _comparable(block: Block) -> dict[str, Any]:
    # Nested blocks compare by which saved document they point at; every
    # other field by its exact stored form, secrets included (in memory only).
    comparable: dict[str, Any] = {}
    for field_name in type(block).model_fields:
        value = getattr(block, field_name)
        if isinstance(value, Block):
            comparable[field_name] = (
                value.get_block_type_slug(),
                value._block_document_name,
            )
        elif isinstance(value, SecretStr):
            comparable[field_name] = value.get_secret_value()
        else:
            comparable[field_name] = block.model_dump(
                mode="json", include={field_name}
            ).get(field_name)

    return comparable
