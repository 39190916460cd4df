"""Work-pool base job templates shipped with dispatch-prefect.

`cloud-run-v2-l4.json` is prefect-gcp's default Cloud Run v2 template plus
what one NVIDIA L4 needs: the GPU limit, the ``nvidia-l4`` accelerator
selector, GPU zonal redundancy off and zero task retries in the job body, and
CPU, memory and timeout variables held to the L4's limits.

```python
from dispatch_prefect.templates import (
    cloud_run_job_variables,
    cloud_run_l4_template,
)

template = cloud_run_l4_template()
job_variables = cloud_run_job_variables(timeout_s=3600, cpu=8, memory_gib=32)
```
"""

from __future__ import annotations

import copy
import json
import math
import re
from functools import cache
from pathlib import Path
from typing import Any, Final

__all__ = [
    "CLOUD_RUN_L4_TEMPLATE_FILE",
    "CLOUD_RUN_MAX_MEMORY_GIB",
    "CLOUD_RUN_MAX_TIMEOUT_S",
    "L4_ACCELERATOR",
    "L4_CPU_CHOICES",
    "L4_MIN_CPU",
    "L4_MIN_MEMORY_GIB",
    "CloudRunResourceError",
    "CloudRunTemplateError",
    "check_cloud_run_l4_resources",
    "check_cloud_run_l4_template",
    "cloud_run_job_variables",
    "cloud_run_l4_shape",
    "cloud_run_l4_template",
    "cloud_run_l4_template_path",
    "cloud_run_min_cpu_for_memory",
]

CLOUD_RUN_L4_TEMPLATE_FILE: Final = "cloud-run-v2-l4.json"

# Google, "Configure GPUs for Cloud Run jobs" (cloud.google.com/run/docs/
# configuring/jobs/gpu): an L4 needs at least 4 CPU and 16 GiB of memory.
L4_ACCELERATOR: Final = "nvidia-l4"
L4_MIN_CPU: Final = 4
L4_MIN_MEMORY_GIB: Final = 16
# Cloud Run offers 1, 2, 4, 6 or 8 vCPUs; of those, the L4 allows 4 and up.
L4_CPU_CHOICES: Final = (4, 6, 8)
# Google, "Configure memory limits": at most 32 GiB; more than 16 GiB needs
# 6 vCPUs and more than 24 GiB needs 8.
CLOUD_RUN_MAX_MEMORY_GIB: Final = 32
_MIN_CPU_ABOVE_GIB: Final = ((24, 8), (16, 6))
# prefect-gcp's bound on the job variable (7 days).
CLOUD_RUN_MAX_TIMEOUT_S: Final = 604800

_MEMORY_GIB = re.compile(r"^(?P<gib>\d+)Gi$")


class CloudRunTemplateError(ValueError):
    """A base job template is not the one-L4 shape the gate relies on."""


class CloudRunResourceError(ValueError):
    """CPU, memory or timeout of a Cloud Run L4 job are outside its limits."""


def cloud_run_l4_template_path() -> Path:
    """Return the path of the shipped template, for `--base-job-template`."""
    return Path(__file__).with_name(CLOUD_RUN_L4_TEMPLATE_FILE)


@cache
def _template() -> dict[str, Any]:
    text = cloud_run_l4_template_path().read_text(encoding="utf-8")
    template: dict[str, Any] = json.loads(text)

    return template


def cloud_run_l4_template() -> dict[str, Any]:
    """Return the Cloud Run v2 one-L4 base job template as a fresh dict.

    Each call returns a new deep copy, so callers may change it freely.
    """
    return copy.deepcopy(_template())


def cloud_run_min_cpu_for_memory(memory_gib: int) -> int:
    """Return the fewest vCPUs a Cloud Run L4 task with this memory needs."""
    for above_gib, min_cpu in _MIN_CPU_ABOVE_GIB:
        if memory_gib > above_gib:
            return min_cpu

    return L4_MIN_CPU


def cloud_run_l4_shape(
    *, min_vcpus: float = 0, min_memory_gib: float = 0
) -> tuple[int, int]:
    """Return the smallest L4 task, as (cpu, memory_gib), that holds a call.

    A call that declares less than the L4 minimum still gets (and is billed
    for) 4 vCPUs and 16 GiB, so the gate should price the shape returned
    here, not the declared numbers.

    Raises:
        CloudRunResourceError: no Cloud Run L4 task is that large.
    """
    memory_gib = max(L4_MIN_MEMORY_GIB, math.ceil(min_memory_gib))
    for cpu in L4_CPU_CHOICES:
        fits = cpu >= min_vcpus and cpu >= cloud_run_min_cpu_for_memory(memory_gib)
        if fits and memory_gib <= CLOUD_RUN_MAX_MEMORY_GIB:
            return cpu, memory_gib

    raise CloudRunResourceError(
        f"no Cloud Run L4 task has {min_vcpus} vCPUs and {min_memory_gib} GiB; "
        f"the largest is {L4_CPU_CHOICES[-1]} vCPUs and "
        f"{CLOUD_RUN_MAX_MEMORY_GIB} GiB: lower the call's vcpus or memory_gib "
        "or route it to another backend"
    )


def check_cloud_run_l4_resources(*, cpu: int, memory_gib: int, timeout_s: int) -> None:
    """Refuse CPU, memory or a timeout one Cloud Run L4 task cannot have.

    Raises:
        CloudRunResourceError: the message names the value and the limit.
    """
    if type(cpu) is not int or cpu not in L4_CPU_CHOICES:
        raise CloudRunResourceError(
            f"cpu={cpu!r} is not a Cloud Run L4 size; use one of "
            f"{', '.join(map(str, L4_CPU_CHOICES))} (an L4 needs at least "
            f"{L4_MIN_CPU} vCPUs)"
        )

    if (
        type(memory_gib) is not int
        or not L4_MIN_MEMORY_GIB <= memory_gib <= CLOUD_RUN_MAX_MEMORY_GIB
    ):
        raise CloudRunResourceError(
            f"memory_gib={memory_gib!r} is outside what a Cloud Run L4 task "
            f"takes; use a whole number from {L4_MIN_MEMORY_GIB} to "
            f"{CLOUD_RUN_MAX_MEMORY_GIB}"
        )

    min_cpu = cloud_run_min_cpu_for_memory(memory_gib)
    if cpu < min_cpu:
        raise CloudRunResourceError(
            f"memory_gib={memory_gib} needs at least {min_cpu} vCPUs on "
            f"Cloud Run, not cpu={cpu}; raise cpu or lower memory_gib"
        )

    if type(timeout_s) is not int or not 0 < timeout_s <= CLOUD_RUN_MAX_TIMEOUT_S:
        raise CloudRunResourceError(
            f"timeout_s={timeout_s!r} is not a Cloud Run job timeout; use "
            f"whole seconds from 1 to {CLOUD_RUN_MAX_TIMEOUT_S}"
        )


def cloud_run_job_variables(
    *,
    timeout_s: int,
    cpu: int = L4_MIN_CPU,
    memory_gib: int = L4_MIN_MEMORY_GIB,
    image: str | None = None,
    region: str | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Return the job variables of one gated call on a Cloud Run L4 pool.

    The gate passes them as `run_deployment(..., job_variables=...)`; Prefect
    overlays them on the pool's template and its server checks them against
    the template's variable schema.

    Args:
        timeout_s: the call's declared max runtime; it becomes the task
            timeout, so the job is stopped when the reserved bound runs out.
        cpu: vCPUs, one of `L4_CPU_CHOICES`.
        memory_gib: memory in GiB, `L4_MIN_MEMORY_GIB` to
            `CLOUD_RUN_MAX_MEMORY_GIB`, within what `cpu` allows.
        image: the container image; the pool's default when None.
        region: the Cloud Run region; the pool's default when None.
        env: extra environment variables of the job (no secrets: use the
            template's `env_from_secrets` for those).

    Raises:
        CloudRunResourceError: a value is outside the L4's limits.
    """
    check_cloud_run_l4_resources(cpu=cpu, memory_gib=memory_gib, timeout_s=timeout_s)

    job_variables: dict[str, Any] = {
        "timeout": timeout_s,
        "cpu": str(cpu),
        "memory": f"{memory_gib}Gi",
    }
    if image is not None:
        job_variables["image"] = image
    if region is not None:
        job_variables["region"] = region
    if env:
        job_variables["env"] = dict(env)

    return job_variables


def check_cloud_run_l4_template(base_job_template: dict[str, Any]) -> None:
    """Refuse a base job template that no longer asks for exactly one L4.

    The gate reads a pool's template back from the server and calls this
    before it submits, so a template edited in the UI (retries turned on, GPU
    removed, a fixed timeout) fails closed instead of breaking the bound.

    Raises:
        CloudRunTemplateError: the message names the broken part.
    """
    try:
        job_config = base_job_template["job_configuration"]
        task = job_config["job_body"]["template"]["template"]
        containers = task["containers"]
        properties = base_job_template["variables"]["properties"]
    except (KeyError, TypeError) as exc:
        raise CloudRunTemplateError(
            f"not a Cloud Run v2 base job template: {exc!r} is missing; "
            "recreate the pool from dispatch_prefect.templates"
        ) from exc

    problems: list[str] = []
    if not isinstance(containers, list) or len(containers) != 1:
        problems.append("the task must have exactly one container")
    else:
        limits = containers[0].get("resources", {}).get("limits", {})
        if limits.get("nvidia.com/gpu") != "1":
            problems.append("the container's nvidia.com/gpu limit must be '1'")
        if limits.get("cpu") != "{{ cpu }}":
            problems.append("the cpu limit must come from the cpu variable")
        if limits.get("memory") != "{{ memory }}":
            problems.append("the memory limit must come from the memory variable")
    if task.get("nodeSelector") != {"accelerator": L4_ACCELERATOR}:
        problems.append(f"nodeSelector must be {{'accelerator': '{L4_ACCELERATOR}'}}")
    if task.get("gpuZonalRedundancyDisabled") is not True:
        problems.append("gpuZonalRedundancyDisabled must be true")
    if task.get("maxRetries") != 0:
        problems.append(
            "maxRetries must be 0: Cloud Run gives every retry the full "
            "timeout, which would multiply the bound"
        )
    if job_config.get("timeout") != "{{ timeout }}":
        problems.append("job_configuration.timeout must be '{{ timeout }}'")
    for name in ("cpu", "memory", "timeout"):
        if name not in properties:
            problems.append(f"the variables schema lacks {name!r}")
    _check_defaults(properties, problems)

    if problems:
        raise CloudRunTemplateError(
            "the Cloud Run template does not ask for exactly one L4: "
            + "; ".join(problems)
            + "; recreate the pool with `dispatch-prefect pools "
            "create-cloud-run`"
        )


def _check_defaults(properties: dict[str, Any], problems: list[str]) -> None:
    """The pool's defaults apply when a caller omits a variable."""
    cpu_default = properties.get("cpu", {}).get("default")
    memory_default = properties.get("memory", {}).get("default")
    timeout_default = properties.get("timeout", {}).get("default")
    memory_match = _MEMORY_GIB.match(str(memory_default))
    try:
        check_cloud_run_l4_resources(
            cpu=int(cpu_default),
            memory_gib=int(memory_match["gib"]) if memory_match else -1,
            timeout_s=timeout_default,
        )
    except (CloudRunResourceError, TypeError, ValueError) as exc:
        problems.append(
            f"the defaults cpu={cpu_default!r}, memory={memory_default!r}, "
            f"timeout={timeout_default!r} are not a valid L4 job ({exc})"
        )
