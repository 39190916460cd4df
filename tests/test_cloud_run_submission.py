"""How a gated call reaches a Cloud Run L4 pool (see docs/submission.md).

`run_deployment` creates the child run with per-call job variables that the
server checks against the pool's schema; the infrastructure-bound
`@cloud_run` path needs pool bundle storage the gate cannot assume.
"""

from __future__ import annotations

import uuid
import warnings
from typing import Any
from uuid import UUID

import pytest
from prefect import flow, get_client
from prefect.client.schemas.objects import WorkPool
from prefect.exceptions import PrefectHTTPStatusError
from prefect_gcp.decorators import cloud_run

from dispatch_prefect.cloud_run import create_cloud_run_pool
from dispatch_prefect.templates import cloud_run_job_variables

pytestmark = pytest.mark.prefect_server


@flow
def fold(sequence: str) -> int:
    return len(sequence)


@pytest.fixture(scope="module")
def l4_pool(prefect_server: Any) -> WorkPool:
    return create_cloud_run_pool(f"gpu-sub-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def deployment_id(l4_pool: WorkPool) -> UUID:
    with get_client(sync_client=True) as client:
        return client.create_deployment(
            flow_id=client.create_flow(fold),
            name="fold-l4",
            work_pool_name=l4_pool.name,
            entrypoint="tests/test_cloud_run_submission.py:fold",
        )


def test_per_call_job_variables_land_on_the_child_run(deployment_id: UUID) -> None:
    job_variables = cloud_run_job_variables(timeout_s=5400, cpu=8, memory_gib=32)

    with get_client(sync_client=True) as client:
        created = client.create_flow_run_from_deployment(
            deployment_id, job_variables=job_variables
        )
        stored = client.read_flow_run(created.id)

    assert stored.job_variables == job_variables


@pytest.mark.parametrize(
    "job_variables",
    [{"cpu": "2"}, {"memory": "8Gi"}, {"memory": "16G"}, {"timeout": 0}],
)
def test_server_refuses_job_variables_outside_the_l4_schema(
    deployment_id: UUID, job_variables: dict[str, Any]
) -> None:
    """The pool's schema is enforced by the Prefect server itself (HTTP 422)."""
    (field,) = job_variables
    with (
        get_client(sync_client=True) as client,
        pytest.raises(
            PrefectHTTPStatusError,
            match=f"422.*Validation failed for field '{field}'",
        ),
    ):
        client.create_flow_run_from_deployment(
            deployment_id, job_variables=job_variables
        )


def test_a_replayed_submission_with_its_key_finds_the_same_run(
    deployment_id: UUID,
) -> None:
    key = f"root-run/task-run/attempt-{uuid.uuid4().hex[:6]}"

    with get_client(sync_client=True) as client:
        first = client.create_flow_run_from_deployment(
            deployment_id, idempotency_key=key
        )
        replay = client.create_flow_run_from_deployment(
            deployment_id, idempotency_key=key
        )

    assert replay.id == first.id


def test_cloud_run_decorator_needs_bundle_storage_on_the_pool(
    l4_pool: WorkPool,
) -> None:
    """The bound-flow path refuses a pool without GCS bundle storage."""
    bound = cloud_run(work_pool=l4_pool.name, timeout=3600)(fold)

    with (
        warnings.catch_warnings(),
        pytest.raises(RuntimeError, match="Storage is not configured"),
    ):
        warnings.simplefilter("ignore", FutureWarning)
        bound("MKV")
