"""The one-L4 Cloud Run v2 template, rendered by prefect-gcp, held to Google's schema.

prefect-gcp's own job configuration code renders the job body from the
shipped template against a real Prefect server; the body is then checked
against the Cloud Run Admin API v2 discovery document of
google-api-python-client. Only Google's servers are not run.
"""

from __future__ import annotations

import asyncio
import copy
import subprocess
import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from prefect import flow, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import FlowRun, WorkPool
from prefect_gcp.credentials import GcpCredentials
from prefect_gcp.workers.cloud_run_v2 import CloudRunWorkerJobV2Configuration

from dispatch_prefect.cloud_run import (
    CloudRunJobBodyError,
    CloudRunPoolError,
    check_job_body,
    cloud_run_pool_create_command,
    create_cloud_run_pool,
    job_body_problems,
    run_v2_discovery_document,
)
from dispatch_prefect.templates import (
    L4_MIN_CPU,
    L4_MIN_MEMORY_GIB,
    CloudRunResourceError,
    CloudRunTemplateError,
    check_cloud_run_l4_template,
    cloud_run_job_variables,
    cloud_run_l4_shape,
    cloud_run_l4_template,
)
from dispatch_prefect.testing import prefect_executable

PROJECT = "dispatch-test"


@flow
def cofold(sequence: str) -> int:
    return len(sequence)


def _task_template(template: dict[str, Any]) -> dict[str, Any]:
    task: dict[str, Any] = template["job_configuration"]["job_body"]["template"][
        "template"
    ]
    return task


def _service_account_info() -> dict[str, str]:
    """A service-account key made here, never sent anywhere."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()

    return {
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": uuid.uuid4().hex,
        "private_key": pem,
        "client_email": f"gate@{PROJECT}.iam.gserviceaccount.com",
        "client_id": "100000000000000000000",
        "token_uri": "https://oauth2.googleapis.com/token",
    }


def _memory_gib(memory: str) -> int:
    assert memory.endswith("Gi"), memory
    return int(memory.removesuffix("Gi"))


# The shipped template and the loader.


def test_shipped_template_asks_for_exactly_one_l4() -> None:
    template = cloud_run_l4_template()
    task = _task_template(template)
    limits = task["containers"][0]["resources"]["limits"]

    check_cloud_run_l4_template(template)
    assert len(task["containers"]) == 1
    assert limits["nvidia.com/gpu"] == "1"
    assert task["nodeSelector"] == {"accelerator": "nvidia-l4"}
    assert task["gpuZonalRedundancyDisabled"] is True
    assert task["maxRetries"] == 0
    assert "max_retries" not in template["variables"]["properties"]


def test_template_variables_are_described_and_default_to_the_l4_minimum() -> None:
    properties = cloud_run_l4_template()["variables"]["properties"]

    assert all(spec.get("description") for spec in properties.values())
    assert properties["cpu"]["default"] == str(L4_MIN_CPU)
    assert properties["memory"]["default"] == f"{L4_MIN_MEMORY_GIB}Gi"
    assert set(properties["cpu"]["enum"]) == {"4", "6", "8"}


def test_each_load_is_an_independent_copy() -> None:
    first = cloud_run_l4_template()
    _task_template(first)["maxRetries"] = 3

    assert _task_template(cloud_run_l4_template())["maxRetries"] == 0


def test_job_variables_carry_the_declared_max_runtime() -> None:
    job_variables = cloud_run_job_variables(
        timeout_s=3600, cpu=8, memory_gib=32, image="img:1", region="europe-west4"
    )

    assert job_variables == {
        "timeout": 3600,
        "cpu": "8",
        "memory": "32Gi",
        "image": "img:1",
        "region": "europe-west4",
    }


@pytest.mark.parametrize(
    ("cpu", "memory_gib", "timeout_s", "names"),
    [
        (2, 16, 600, "cpu=2"),
        (4, 8, 600, "memory_gib=8"),
        (4, 33, 600, "memory_gib=33"),
        (4, 24, 600, "needs at least 6 vCPUs"),
        (6, 25, 600, "needs at least 8 vCPUs"),
        (4, 16, 0, "timeout_s=0"),
        (4, 16, 604801, "timeout_s=604801"),
        (True, 16, 600, "cpu=True"),
        (4.0, 16, 600, "cpu=4.0"),
        (4, 16, 600.0, "timeout_s=600.0"),
    ],
)
def test_refuses_resources_an_l4_task_cannot_have(
    cpu: int, memory_gib: int, timeout_s: int, names: str
) -> None:
    with pytest.raises(CloudRunResourceError, match=names):
        cloud_run_job_variables(timeout_s=timeout_s, cpu=cpu, memory_gib=memory_gib)


@pytest.mark.parametrize(
    ("declared", "shape"),
    [
        ((0, 0), (4, 16)),
        ((2, 8), (4, 16)),
        ((5, 16), (6, 16)),
        ((4, 17), (6, 17)),
        ((4, 24.5), (8, 25)),
        ((8, 32), (8, 32)),
    ],
)
def test_shape_rounds_a_call_up_to_the_smallest_l4_task(
    declared: tuple[float, float], shape: tuple[int, int]
) -> None:
    """A call declaring less than the L4 minimum is billed for the minimum."""
    vcpus, memory_gib = declared

    found = cloud_run_l4_shape(min_vcpus=vcpus, min_memory_gib=memory_gib)

    assert found == shape
    cpu, rounded_gib = found
    cloud_run_job_variables(timeout_s=60, cpu=cpu, memory_gib=rounded_gib)


@pytest.mark.parametrize(("vcpus", "memory_gib"), [(9, 16), (4, 33)])
def test_shape_refuses_a_call_no_l4_task_holds(vcpus: int, memory_gib: int) -> None:
    with pytest.raises(CloudRunResourceError, match="largest is 8 vCPUs and 32 GiB"):
        cloud_run_l4_shape(min_vcpus=vcpus, min_memory_gib=memory_gib)


def _without_gpu(template: dict[str, Any]) -> None:
    del _task_template(template)["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"
    ]


def _with_retries(template: dict[str, Any]) -> None:
    _task_template(template)["maxRetries"] = 3


def _with_fixed_timeout(template: dict[str, Any]) -> None:
    template["job_configuration"]["timeout"] = 86400


def _with_other_accelerator(template: dict[str, Any]) -> None:
    _task_template(template)["nodeSelector"] = {"accelerator": "nvidia-t4"}


def _with_zonal_redundancy(template: dict[str, Any]) -> None:
    _task_template(template)["gpuZonalRedundancyDisabled"] = False


def _with_small_default_cpu(template: dict[str, Any]) -> None:
    template["variables"]["properties"]["cpu"]["default"] = "2"


@pytest.mark.parametrize(
    ("edit", "names"),
    [
        (_without_gpu, "nvidia.com/gpu"),
        (_with_retries, "maxRetries must be 0"),
        (_with_fixed_timeout, "timeout"),
        (_with_other_accelerator, "nodeSelector"),
        (_with_zonal_redundancy, "gpuZonalRedundancyDisabled"),
        (_with_small_default_cpu, "defaults"),
    ],
)
def test_refuses_a_template_edited_away_from_one_l4(edit: Any, names: str) -> None:
    template = cloud_run_l4_template()
    edit(template)

    with pytest.raises(CloudRunTemplateError, match=names):
        check_cloud_run_l4_template(template)


# The discovery-schema validator, on hand-written bodies.


def _good_body() -> dict[str, Any]:
    return {
        "client": "prefect",
        "launchStage": "BETA",
        "labels": {"team": "bio"},
        "template": {
            "taskCount": 1,
            "template": {
                "containers": [
                    {
                        "image": "img:1",
                        "command": ["prefect", "flow-run", "execute"],
                        "env": [{"name": "A", "value": "1"}],
                        "resources": {
                            "limits": {
                                "cpu": "4",
                                "memory": "16Gi",
                                "nvidia.com/gpu": "1",
                            }
                        },
                    }
                ],
                "maxRetries": 0,
                "timeout": "3600s",
                "nodeSelector": {"accelerator": "nvidia-l4"},
                "gpuZonalRedundancyDisabled": True,
                "serviceAccount": None,
            },
        },
    }


def test_validator_accepts_a_correct_body() -> None:
    assert job_body_problems(_good_body()) == []


def test_validator_catches_a_misspelled_field() -> None:
    body = _good_body()
    container = body["template"]["template"]["containers"][0]
    container["resorces"] = container.pop("resources")

    problems = job_body_problems(body)

    assert len(problems) == 1
    assert problems[0].startswith("template.template.containers[0].resorces:")
    assert "unknown field" in problems[0]
    with pytest.raises(CloudRunJobBodyError, match="resorces"):
        check_job_body(body)


@pytest.mark.parametrize(
    ("path", "value", "says"),
    [
        (("template", "template", "maxRetries"), "0", "expected an integer"),
        (("template", "template", "gpuZonalRedundancyDisabled"), "true", "boolean"),
        (("template", "template", "timeout"), 3600, "expected a string"),
        (("template", "template", "timeout"), "1h", "duration"),
        (("template", "template", "containers"), {"image": "x"}, "an array"),
        (("template", "template", "nodeSelector"), "nvidia-l4", "an object"),
        (("launchStage",), "BETTER", "not one of"),
        (("template", "taskCount"), 2**31, "int32"),
        (("uid",), "abc", "output-only"),
    ],
)
def test_validator_catches_a_wrong_type_or_value(
    path: tuple[str, ...], value: Any, says: str
) -> None:
    body = _good_body()
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value

    problems = job_body_problems(body)

    assert len(problems) == 1, problems
    assert problems[0].startswith(".".join(path) + ":")
    assert says in problems[0]


def _field_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every (container, key) path of a body, outside free-form maps."""
    paths: list[tuple[Any, ...]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if path and path[-1] in ("labels", "limits"):
                continue
            paths.append((*path, key))
            paths.extend(_field_paths(item, (*path, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            paths.extend(_field_paths(item, (*path, index)))

    return paths


def test_validator_catches_every_misspelled_field_of_a_body() -> None:
    body = _good_body()
    paths = _field_paths(body)

    assert len(paths) >= 15
    for path in paths:
        changed = copy.deepcopy(body)
        parent = changed
        for step in path[:-1]:
            parent = parent[step]
        parent[f"{path[-1]}_"] = parent.pop(path[-1])

        problems = job_body_problems(changed)

        assert len(problems) == 1, (path, problems)
        assert "unknown field" in problems[0], (path, problems)


def test_validator_checks_map_values_through_additional_properties() -> None:
    """A GPU limit written as a number is caught: limits map to strings."""
    body = _good_body()
    body["template"]["template"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"
    ] = 1

    assert job_body_problems(body) == [
        "template.template.containers[0].resources.limits.nvidia.com/gpu: "
        "expected a string, got an integer"
    ]


def test_discovery_document_knows_the_gpu_fields() -> None:
    schemas = run_v2_discovery_document()["schemas"]
    task = schemas["GoogleCloudRunV2TaskTemplate"]["properties"]

    assert task["gpuZonalRedundancyDisabled"]["type"] == "boolean"
    assert task["nodeSelector"]["$ref"] == "GoogleCloudRunV2NodeSelector"


# prefect-gcp renders the body from the pool a real Prefect server stores.


@pytest.fixture(scope="module")
def credentials_block(prefect_server: Any) -> str:
    name = f"gcp-{uuid.uuid4().hex[:8]}"
    GcpCredentials(service_account_info=_service_account_info()).save(name)

    return name


@pytest.fixture(scope="module")
def l4_pool(credentials_block: str) -> WorkPool:
    return create_cloud_run_pool(
        f"gpu-l4-{uuid.uuid4().hex[:8]}",
        region="us-central1",
        image="us-docker.pkg.dev/dispatch-test/jobs/cofold:1",
        credentials_block=credentials_block,
    )


def _render(pool: WorkPool, job_variables: dict[str, Any]) -> tuple[Any, FlowRun]:
    """Do what the Cloud Run worker does before it calls Google."""
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(cofold)
        deployment_id = client.create_deployment(
            flow_id=flow_id,
            name=f"cofold-{uuid.uuid4().hex[:6]}",
            work_pool_name=pool.name,
            entrypoint="tests/test_cloud_run.py:cofold",
        )
        created = client.create_flow_run_from_deployment(
            deployment_id, job_variables=job_variables
        )
        flow_run = client.read_flow_run(created.id)
        stored_pool = client.read_work_pool(pool.name)

    async def configure() -> CloudRunWorkerJobV2Configuration:
        configuration = await CloudRunWorkerJobV2Configuration.from_template_and_values(
            base_job_template=stored_pool.base_job_template,
            values=flow_run.job_variables or {},
        )
        configuration.prepare_for_flow_run(flow_run=flow_run, work_pool=stored_pool)
        return configuration

    return asyncio.run(configure()), flow_run


@pytest.mark.prefect_server
@pytest.mark.parametrize(
    ("timeout_s", "cpu", "memory_gib"),
    [(3600, 4, 16), (60, 6, 24), (86400, 8, 32)],
)
def test_rendered_body_asks_for_one_l4_for_the_declared_max_runtime(
    l4_pool: WorkPool, timeout_s: int, cpu: int, memory_gib: int
) -> None:
    job_variables = cloud_run_job_variables(
        timeout_s=timeout_s, cpu=cpu, memory_gib=memory_gib
    )

    configuration, flow_run = _render(l4_pool, job_variables)
    body = configuration.job_body
    task = body["template"]["template"]
    gpu_limits = [
        container["resources"]["limits"]["nvidia.com/gpu"]
        for container in task["containers"]
        if "nvidia.com/gpu" in container.get("resources", {}).get("limits", {})
    ]
    limits = task["containers"][0]["resources"]["limits"]

    check_job_body(body)
    assert gpu_limits == ["1"]
    assert task["nodeSelector"] == {"accelerator": "nvidia-l4"}
    assert task["gpuZonalRedundancyDisabled"] is True
    assert task["maxRetries"] == 0
    assert task["timeout"] == f"{timeout_s}s"
    assert int(limits["cpu"]) >= L4_MIN_CPU
    assert _memory_gib(limits["memory"]) >= L4_MIN_MEMORY_GIB
    assert (limits["cpu"], limits["memory"]) == (str(cpu), f"{memory_gib}Gi")
    assert task["containers"][0]["image"].endswith("cofold:1")
    assert configuration.project == PROJECT
    assert configuration.region == "us-central1"
    assert body["labels"]["prefect-io-flow-run-id"] == str(flow_run.id)


@pytest.mark.prefect_server
def test_pool_defaults_alone_render_a_valid_l4_body(l4_pool: WorkPool) -> None:
    configuration, _ = _render(l4_pool, {})
    task = configuration.job_body["template"]["template"]

    check_job_body(configuration.job_body)
    assert task["timeout"] == "600s"
    assert task["containers"][0]["resources"]["limits"] == {
        "cpu": "4",
        "memory": "16Gi",
        "nvidia.com/gpu": "1",
    }


# The template on a real Prefect server.


@pytest.mark.prefect_server
def test_server_stores_the_template_and_reads_it_back(
    l4_pool: WorkPool, credentials_block: str
) -> None:
    with get_client(sync_client=True) as client:
        stored = client.read_work_pool(l4_pool.name)
        document = client.read_block_document_by_name(
            credentials_block, "gcp-credentials", include_secrets=False
        )
    expected = cloud_run_l4_template()
    properties = expected["variables"]["properties"]
    properties["region"]["default"] = "us-central1"
    properties["image"]["default"] = "us-docker.pkg.dev/dispatch-test/jobs/cofold:1"
    properties["credentials"]["default"] = {
        "$ref": {"block_document_id": str(document.id)}
    }

    assert stored.type == "cloud-run-v2"
    assert stored.base_job_template == expected
    check_cloud_run_l4_template(stored.base_job_template)
    assert "private_key" not in str(stored.base_job_template)


@pytest.mark.prefect_server
def test_creating_the_pool_again_updates_it_in_place(l4_pool: WorkPool) -> None:
    again = create_cloud_run_pool(l4_pool.name, region="europe-west4")

    assert again.id == l4_pool.id
    properties = again.base_job_template["variables"]["properties"]
    assert properties["region"]["default"] == "europe-west4"


@pytest.mark.prefect_server
def test_refuses_to_turn_a_pool_of_another_type_into_cloud_run(
    prefect_server: Any,
) -> None:
    name = f"lan-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=name, type="process"))

    with pytest.raises(CloudRunPoolError, match="type 'process'"):
        create_cloud_run_pool(name)


@pytest.mark.prefect_server
def test_refuses_an_unknown_credentials_block(prefect_server: Any) -> None:
    with pytest.raises(CloudRunPoolError, match="no gcp-credentials block"):
        create_cloud_run_pool("gpu-never", credentials_block="missing")


@pytest.mark.prefect_server
def test_documented_prefect_command_creates_the_same_pool(
    prefect_server: Any,
) -> None:
    name = f"gpu-cli-{uuid.uuid4().hex[:8]}"
    command = cloud_run_pool_create_command(name)
    assert command[0] == "prefect"
    command[0] = prefect_executable()

    completed = subprocess.run(
        command,
        env=prefect_server.env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.returncode == 0, completed.stdout + completed.stderr
    with get_client(sync_client=True) as client:
        stored = client.read_work_pool(name)
    assert stored.type == "cloud-run-v2"
    assert stored.base_job_template == cloud_run_l4_template()


def test_template_copy_is_not_shared_with_the_pool_template() -> None:
    """Filling a pool's defaults never leaks into the shipped template."""
    from dispatch_prefect.cloud_run import cloud_run_pool_template

    before = copy.deepcopy(cloud_run_l4_template())
    cloud_run_pool_template(region="asia-southeast1", image="x")

    assert cloud_run_l4_template() == before
