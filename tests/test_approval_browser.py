"""A person approves a paused gated task in the real Prefect UI (Chromium)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright
from ui.approval_flows import run_gated_flow, unique_tool_id, wait_for_pending

from dispatch_prefect.approval import pending_approvals
from dispatch_prefect.policy import ApprovalOutcome
from dispatch_prefect.testing import LocalPrefectServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The machine is shared and the UI is heavy: generous, but finite.
UI_TIMEOUT_MS = 60_000

pytestmark = pytest.mark.browser


@pytest.fixture
def page(request: pytest.FixtureRequest) -> Iterator[Page]:
    """A Chromium page that reaches the test server's UI and nothing else."""
    if not CHROMIUM.exists():
        message = (
            f"{CHROMIUM} is missing; install Debian's Chromium with "
            "`apt-get update && apt-get install -y chromium`"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)

    server: LocalPrefectServer = request.getfixturevalue("prefect_server")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(UI_TIMEOUT_MS)
        expect.set_options(timeout=UI_TIMEOUT_MS)
        # UI v2 calls an analytics host on load; offline it only fails slowly.
        page.route(
            lambda url: not url.startswith(server.ui_url),
            lambda route: route.abort(),
        )
        try:
            yield page
        finally:
            browser.close()


def test_a_person_approves_in_the_prefect_ui_and_sees_the_record(
    page: Page, prefect_server: LocalPrefectServer, tmp_path: Path
) -> None:
    tool_id = unique_tool_id()
    running = run_gated_flow(tool_id, timeout_s=900)
    pending = wait_for_pending(tool_id)
    run_url = f"{prefect_server.ui_url}/v2/runs/flow-run/{pending.flow_run_id}"

    page.goto(run_url)
    page.get_by_role("button", name="Open menu").click()
    page.get_by_role("menuitem", name="Resume").click()
    form = page.get_by_role("dialog")
    expect(form).to_contain_text(f"Approve $1.2345 for {tool_id} on cloud-l4?")
    expect(form).to_contain_text("$56.6655")

    form.get_by_label("Approver").fill("   ")
    form.get_by_label("Reason").fill("checked the grant in the browser")
    form.get_by_role("button", name="Resume").click()
    # A blank approver: the server refuses the form and the run keeps waiting.
    refusal = page.get_by_text(re.compile(r"Validation failed.*'approver'"))
    expect(refusal.first).to_be_visible()
    assert pending.flow_run_id in {p.flow_run_id for p in pending_approvals()}

    form.get_by_label("Approver").fill("Ann in the UI")
    form.get_by_role("switch").click()
    expect(form.get_by_role("switch")).to_be_checked()
    page.screenshot(path=tmp_path / "approval-form.png", full_page=True)
    form.get_by_role("button", name="Resume").click()
    expect(form).to_be_hidden()
    approval = running.result(timeout_s=120)

    assert approval.outcome is ApprovalOutcome.APPROVED
    assert approval.author == "Ann in the UI"
    assert approval.reason == "checked the grant in the browser"

    page.goto(f"{run_url}?tab=Artifacts")
    expect(page.get_by_text("Approved by Ann in the UI").first).to_be_visible()
    page.get_by_text(f"approval-{tool_id}").first.click()
    record = page.get_by_role("table").filter(has_text="Who")
    expect(record).to_contain_text("Ann in the UI")
    expect(record).to_contain_text("checked the grant in the browser")
    expect(record).to_contain_text(approval.decided_at)
    expect(record).to_contain_text("$1.2345")
    page.screenshot(path=tmp_path / "approval-record.png", full_page=True)
