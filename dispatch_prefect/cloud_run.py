"""Cloud Run v2 work pools with one NVIDIA L4, and checks of their job bodies.

`create_cloud_run_pool` creates (or updates) a ``cloud-run-v2`` work pool from
the shipped one-L4 template. `check_job_body` holds a rendered job body (the
Job resource prefect-gcp sends to ``projects.locations.jobs.create``) against
the Cloud Run Admin API v2 discovery document that google-api-python-client
ships, so a misspelled field or a wrong type is caught before Google sees it.

```python
from dispatch_prefect.cloud_run import create_cloud_run_pool

create_cloud_run_pool("gpu-l4", region="us-central1", credentials_block="gcp")
```
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

from dispatch_prefect.templates import (
    check_cloud_run_l4_template,
    cloud_run_l4_template,
    cloud_run_l4_template_path,
)

if TYPE_CHECKING:
    from prefect.client.schemas.objects import WorkPool

__all__ = [
    "CLOUD_RUN_JOB_SCHEMA",
    "CLOUD_RUN_POOL_TYPE",
    "CloudRunJobBodyError",
    "CloudRunPoolError",
    "check_job_body",
    "cloud_run_pool_create_command",
    "cloud_run_pool_template",
    "create_cloud_run_pool",
    "job_body_problems",
    "run_v2_discovery_document",
]

CLOUD_RUN_POOL_TYPE: Final = "cloud-run-v2"
CLOUD_RUN_JOB_SCHEMA: Final = "GoogleCloudRunV2Job"
GCP_CREDENTIALS_BLOCK_TYPE: Final = "gcp-credentials"

_INT32_RANGE: Final = range(-(2**31), 2**31)
_DURATION = re.compile(r"^-?\d+(\.\d{1,9})?s$")
_INT64_TEXT = re.compile(r"^-?\d+$")


class CloudRunPoolError(RuntimeError):
    """The Cloud Run work pool cannot be created or updated as asked."""


class CloudRunJobBodyError(ValueError):
    """A Cloud Run job body does not match the Cloud Run Admin API v2."""


def cloud_run_pool_template(
    *,
    region: str | None = None,
    image: str | None = None,
    credentials_block_id: str | None = None,
) -> dict[str, Any]:
    """Return the one-L4 template with a pool's defaults filled in.

    Args:
        region: default Cloud Run region of the pool's jobs.
        image: default container image of the pool's jobs.
        credentials_block_id: id of a ``gcp-credentials`` block document the
            pool's jobs use by default (a reference, never the key itself).
    """
    template = cloud_run_l4_template()
    properties = template["variables"]["properties"]
    if region is not None:
        properties["region"]["default"] = region
    if image is not None:
        properties["image"]["default"] = image
    if credentials_block_id is not None:
        properties["credentials"]["default"] = {
            "$ref": {"block_document_id": credentials_block_id}
        }

    return template


def create_cloud_run_pool(
    name: str,
    *,
    region: str | None = None,
    image: str | None = None,
    credentials_block: str | None = None,
    description: str | None = None,
) -> WorkPool:
    """Create a ``cloud-run-v2`` work pool for one-L4 jobs, or update it.

    Running it again updates the pool's template and defaults in place, so a
    command that applies it is idempotent.

    Args:
        name: the work pool's name.
        region: default Cloud Run region of its jobs.
        image: default container image of its jobs.
        credentials_block: name of a saved ``GcpCredentials`` block the
            worker uses to call Cloud Run; the pool stores its id only.
        description: the pool's description in the Prefect UI.

    Returns:
        The pool as the Prefect server stores it.

    Raises:
        CloudRunPoolError: a pool of that name has another type, or the
            credentials block does not exist.
    """
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(work_pool_name=name)
        except ObjectNotFound:
            existing = None
        if existing is not None and existing.type != CLOUD_RUN_POOL_TYPE:
            raise CloudRunPoolError(
                f"work pool {name!r} exists with type {existing.type!r}, not "
                f"{CLOUD_RUN_POOL_TYPE!r}; pick another name or delete it "
                f"with `prefect work-pool delete {name}`"
            )

        credentials_block_id = None
        if credentials_block is not None:
            try:
                document = client.read_block_document_by_name(
                    credentials_block,
                    block_type_slug=GCP_CREDENTIALS_BLOCK_TYPE,
                    include_secrets=False,
                )
            except ObjectNotFound as exc:
                raise CloudRunPoolError(
                    f"no {GCP_CREDENTIALS_BLOCK_TYPE} block named "
                    f"{credentials_block!r}; save a prefect_gcp GcpCredentials "
                    "block under that name first"
                ) from exc
            credentials_block_id = str(document.id)

        template = cloud_run_pool_template(
            region=region,
            image=image,
            credentials_block_id=credentials_block_id,
        )
        check_cloud_run_l4_template(template)
        pool = client.create_work_pool(
            WorkPoolCreate(
                name=name,
                type=CLOUD_RUN_POOL_TYPE,
                base_job_template=template,
                description=description
                or "Cloud Run v2 jobs with one NVIDIA L4 (dispatch-prefect)",
            ),
            overwrite=True,
        )

    return pool


def cloud_run_pool_create_command(name: str) -> list[str]:
    """Return the ``prefect`` command that creates the pool from the template.

    The command does the same as `create_cloud_run_pool` without defaults;
    `--overwrite` makes it safe to run again.
    """
    return [
        "prefect",
        "work-pool",
        "create",
        name,
        "--type",
        CLOUD_RUN_POOL_TYPE,
        "--base-job-template",
        str(cloud_run_l4_template_path()),
        "--overwrite",
    ]


@cache
def _discovery_text() -> str:
    documents = resources.files("googleapiclient.discovery_cache") / "documents"

    return (documents / "run.v2.json").read_text(encoding="utf-8")


def run_v2_discovery_document() -> dict[str, Any]:
    """Return the Cloud Run Admin API v2 discovery document shipped offline.

    It is google-api-python-client's cached copy; its ``revision`` says which
    day of the API it describes.
    """
    document: dict[str, Any] = json.loads(_discovery_text())

    return document


def job_body_problems(
    body: Any,
    *,
    schema_id: str = CLOUD_RUN_JOB_SCHEMA,
    discovery: dict[str, Any] | None = None,
) -> list[str]:
    """List where a body breaks a discovery schema; empty when it fits.

    The walk follows ``$ref``, ``type``, ``format``, ``properties``,
    ``items``, ``additionalProperties`` and ``enum``. A field the schema does
    not name, a value of the wrong JSON type, a value outside an enum and an
    output-only (``readOnly``) field are problems. A JSON ``null`` means
    "unset" in Google's JSON mapping and is accepted anywhere.

    Args:
        body: the decoded JSON request body.
        schema_id: the schema the body is, by its id in the document.
        discovery: a discovery document; the shipped Cloud Run v2 one when
            None.
    """
    document = discovery if discovery is not None else run_v2_discovery_document()
    schemas: dict[str, Any] = document["schemas"]
    if schema_id not in schemas:
        raise KeyError(f"schema {schema_id!r} is not in the discovery document")

    problems: list[str] = []
    _walk(body, {"$ref": schema_id}, "", schemas, problems)

    return problems


def check_job_body(
    body: Any,
    *,
    schema_id: str = CLOUD_RUN_JOB_SCHEMA,
    discovery: dict[str, Any] | None = None,
) -> None:
    """Refuse a body that does not match the discovery schema.

    Raises:
        CloudRunJobBodyError: the message lists every problem by its path.
    """
    problems = job_body_problems(body, schema_id=schema_id, discovery=discovery)
    if problems:
        raise CloudRunJobBodyError(
            f"the job body does not match {schema_id} of the Cloud Run Admin "
            "API v2: " + "; ".join(problems)
        )


def _walk(
    value: Any,
    schema: dict[str, Any],
    path: str,
    schemas: dict[str, Any],
    problems: list[str],
) -> None:
    where = path or "<body>"
    if schema.get("readOnly") and value is not None:
        problems.append(f"{where}: output-only field, set by Cloud Run")
        return

    if "$ref" in schema:
        schema = schemas[schema["$ref"]]

    if value is None:
        return

    kind = schema.get("type")
    if kind == "object":
        _walk_object(value, schema, path, schemas, problems)
    elif kind == "array":
        if not isinstance(value, list):
            problems.append(f"{where}: expected an array, got {_kind(value)}")
            return
        for index, item in enumerate(value):
            _walk(item, schema.get("items", {}), f"{path}[{index}]", schemas, problems)
    elif kind is None:
        problems.append(f"{where}: the discovery schema gives no type to check")
    elif kind != "any":
        problem = _scalar_problem(value, kind, schema)
        if problem:
            problems.append(f"{where}: {problem}")


def _walk_object(
    value: Any,
    schema: dict[str, Any],
    path: str,
    schemas: dict[str, Any],
    problems: list[str],
) -> None:
    if not isinstance(value, dict):
        problems.append(f"{path or '<body>'}: expected an object, got {_kind(value)}")
        return

    properties: dict[str, Any] = schema.get("properties", {})
    extra = schema.get("additionalProperties")
    for key, item in value.items():
        child = f"{path}.{key}" if path else str(key)
        if key in properties:
            _walk(item, properties[key], child, schemas, problems)
        elif extra is not None:
            _walk(item, extra, child, schemas, problems)
        else:
            known = ", ".join(sorted(properties)) or "none"
            problems.append(f"{child}: unknown field (known: {known})")


def _scalar_problem(value: Any, kind: str, schema: dict[str, Any]) -> str | None:
    """Why a scalar does not fit its discovery type, or None when it does."""
    fmt = schema.get("format")
    if kind == "boolean":
        if isinstance(value, bool):
            return None
        return f"expected a boolean, got {_kind(value)}"

    if kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected an integer, got {_kind(value)}"
        if fmt == "int32" and value not in _INT32_RANGE:
            return f"{value} does not fit int32"
        return None

    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"expected a number, got {_kind(value)}"
        return None

    if kind == "string":
        return _string_problem(value, fmt, schema.get("enum"))

    return f"unsupported discovery type {kind!r}"


def _string_problem(value: Any, fmt: str | None, enum: list[str] | None) -> str | None:
    # Google's JSON mapping writes 64-bit integers as strings but reads numbers.
    if fmt in ("int64", "uint64") and type(value) is int:
        return None

    if not isinstance(value, str):
        return f"expected a string, got {_kind(value)}"
    if enum is not None and value not in enum:
        return f"{value!r} is not one of {', '.join(enum)}"
    if fmt == "google-duration" and not _DURATION.match(value):
        return f"{value!r} is not a duration like '3600s'"
    if fmt in ("int64", "uint64") and not _INT64_TEXT.match(value):
        return f"{value!r} is not an integer"

    return None


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    for python_type, name in names.items():
        if type(value) is python_type:
            return name
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"

    return type(value).__name__
