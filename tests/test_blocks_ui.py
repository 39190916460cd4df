"""A person fills the Dispatch block forms in the real Prefect UI."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal

import pytest
from test_blocks_server import saved_blocks_removed  # noqa: F401  (a fixture)

from dispatch_prefect.blocks import BackendBlock, BudgetBlock, RatesBlock, load_block
from dispatch_prefect.policy import BackendKind
from dispatch_prefect.testing import LocalPrefectServer

# The session server is shared: what these tests save is deleted after each.
pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("saved_blocks_removed")]

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def page(prefect_server: LocalPrefectServer) -> Iterator[object]:
    from playwright.sync_api import Route, sync_playwright

    def local_only(route: Route) -> None:
        # The UI calls an analytics host on load; nothing leaves the machine.
        if route.request.url.startswith(prefect_server.ui_url):
            route.continue_()
        else:
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1300, "height": 1800})
        page.route("**/*", local_only)
        try:
            yield page
        finally:
            browser.close()


def test_a_budget_typed_into_the_ui_form_loads_exactly(
    prefect_server: LocalPrefectServer, page: object
) -> None:
    from playwright.sync_api import Page

    assert isinstance(page, Page)
    name = f"ui-budget-{uuid.uuid4().hex[:8]}"
    BudgetBlock.register_type_and_schema(_sync=True)  # type: ignore[call-arg]

    page.goto(f"{prefect_server.ui_url}/v2/blocks/catalog/dispatch-budget/create")
    page.get_by_label("Name").fill(name)
    page.get_by_label("Run cap (USD) (Optional)").fill("12.50")
    page.get_by_label("Month cap (USD) (Optional)").fill("0.0001867")
    page.get_by_role("button", name="Save").click()
    page.wait_for_url("**/blocks/block/**")

    budget = load_block(BudgetBlock, name)
    assert str(budget.run_usd) == "12.50"
    assert budget.month_usd == Decimal("0.0001867")


def test_a_backend_made_in_the_ui_points_at_saved_rates(
    prefect_server: LocalPrefectServer, page: object
) -> None:
    from playwright.sync_api import Page

    assert isinstance(page, Page)
    suffix = uuid.uuid4().hex[:8]
    rates_name, backend_name = f"ui-l4-{suffix}", f"ui-cloud-{suffix}"
    # Playwright's sync API runs an event loop in this thread, where Prefect's
    # save() would hand back an unawaited coroutine: ask for the sync path.
    RatesBlock(
        gpu_usd_per_s="0.0001867", vcpu_usd_per_s="0.000018", gib_usd_per_s="0"
    ).save(rates_name, _sync=True)  # type: ignore[call-arg]
    BackendBlock.register_type_and_schema(_sync=True)  # type: ignore[call-arg]

    page.goto(f"{prefect_server.ui_url}/v2/blocks/catalog/dispatch-backend/create")
    page.get_by_label("Name").fill(backend_name)
    page.get_by_label("Select Kind").click()
    page.get_by_role("option", name="cloud_worker").click()
    page.get_by_text("RatesBlock", exact=True).click()
    page.get_by_text("Select a block...").click()
    page.get_by_role("option", name=rates_name).click()
    page.get_by_role("button", name="Save").click()
    page.wait_for_url("**/blocks/block/**")

    backend = load_block(BackendBlock, backend_name)
    assert backend.kind is BackendKind.CLOUD_WORKER
    cost_rates = backend.cost_rates()
    assert cost_rates is not None
    assert cost_rates.gpu_usd_per_s == Decimal("0.0001867")
