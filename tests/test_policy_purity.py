"""The policy core stays pure: standard library only, importable on its own."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

import dispatch_prefect
import dispatch_prefect.policy as policy

POLICY_DIR = Path(policy.__file__).parent
MODULES = sorted(POLICY_DIR.glob("*.py"))

# The public names of dispatch-kit 0.3.0, plus the token-pricing additions.
SEED_NAMES = {
    "AdmissionDecision",
    "Approval",
    "ApprovalOutcome",
    "BackendCapabilities",
    "BackendKind",
    "BudgetCap",
    "BudgetState",
    "BudgetWindow",
    "CostEstimate",
    "CostRates",
    "DispatchError",
    "EnvLookup",
    "ExternalEndpoint",
    "HostCapabilities",
    "JobState",
    "JobStore",
    "Lease",
    "NoEligibleBackendError",
    "NodeIdentity",
    "RetriableError",
    "Routable",
    "SecretMissingError",
    "SecretRef",
    "ToolRequirements",
    "Transport",
    "WorkerExecutor",
    "admits",
    "can_transition",
    "ensure_transition",
    "estimate_cost",
    "is_lease_stale",
    "log_egress",
    "select_backend",
    "should_give_up",
    "vram_fits",
}
ADDED_NAMES = {"TokenRates", "estimate_token_cost", "token_cost"}


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, absolute, with its line number."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append((node.lineno, "dispatch_prefect.policy"))
            else:
                found.append((node.lineno, node.module or ""))

    return found


def _allowed(module: str) -> bool:
    top = module.split(".")[0]

    return top in sys.stdlib_module_names or (
        module == "dispatch_prefect.policy"
        or module.startswith("dispatch_prefect.policy.")
    )


def test_the_policy_package_has_modules_to_check() -> None:
    names = {path.stem for path in MODULES}

    assert {"budget", "routing", "egress", "approval", "dispatch"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda path: path.name)
def test_module_imports_only_the_standard_library(path: Path) -> None:
    outside = [
        f"{path.name}:{line} imports {module}"
        for line, module in _imported_modules(path)
        if not _allowed(module)
    ]

    assert outside == []


@pytest.mark.parametrize("path", MODULES, ids=lambda path: path.name)
def test_module_does_not_import_dynamically(path: Path) -> None:
    """``__import__`` or ``importlib`` would slip past the import check."""
    tree = ast.parse(path.read_text(), filename=str(path))
    called = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }

    assert "__import__" not in called
    assert all(m != "importlib" for _, m in _imported_modules(path))


def test_import_check_would_catch_a_third_party_import() -> None:
    assert not _allowed("pydantic")
    assert not _allowed("prefect.blocks.core")
    assert not _allowed("dispatch_prefect.ledger")
    assert _allowed("decimal")
    assert _allowed("dispatch_prefect.policy.money")


def test_importing_the_policy_loads_no_prefect_pydantic_or_sqlalchemy() -> None:
    script = (
        "import json, sys\n"
        "import dispatch_prefect.policy\n"
        "heavy = ('prefect', 'pydantic', 'sqlalchemy')\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in heavy]\n"
        "print(json.dumps(['dispatch_prefect.policy' in sys.modules, loaded]))\n"
    )

    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )

    assert json.loads(completed.stdout) == [True, []]


def test_every_seed_name_is_exported_by_the_policy() -> None:
    assert set(policy.__all__) >= SEED_NAMES | ADDED_NAMES
    assert policy.__all__ == sorted(policy.__all__)


@pytest.mark.parametrize("name", sorted(SEED_NAMES | ADDED_NAMES))
def test_seed_name_is_the_same_object_at_the_top_level(name: str) -> None:
    """``from dispatch_prefect import X`` is a drop-in for dispatch-kit's X."""
    assert getattr(dispatch_prefect, name) is getattr(policy, name)
    assert name in dispatch_prefect.__all__


def test_every_policy_dataclass_is_frozen() -> None:
    classes = [
        value
        for name in policy.__all__
        if dataclasses.is_dataclass(value := getattr(policy, name))
        and inspect.isclass(value)
    ]

    assert len(classes) >= 10
    assert [c.__name__ for c in classes if not c.__dataclass_params__.frozen] == []
