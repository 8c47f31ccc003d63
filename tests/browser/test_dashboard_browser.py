"""The dashboard in a real browser: headless Chromium opens the dashboard served
by ``absurd-sqla dashboard``, goes overview -> tasks -> a failed task's page,
presses retry, and sees a live worker run the task again. A screenshot of each
view is saved (see ``conftest.screenshots``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from absurd_sqla import Absurd, TaskContext
from tests.support import DEADLINE, served_dashboard, wait_until, worker_thread


@pytest.fixture
def dashboard(database_url: str) -> Iterator[str]:
    """``absurd-sqla dashboard`` on a free loopback port; its base URL."""
    with served_dashboard(database_url) as served:
        yield served.url
    assert served.returncode == 0, served.output


def until(driver: Any, condition: Callable[[Any], Any], message: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, DEADLINE, poll_frequency=0.05).until(condition, message)


def test_overview_to_a_failed_task_then_retry_in_a_browser(
    app: Absurd, dashboard: str, browser: Any, screenshots: Path
) -> None:
    from selenium.webdriver.common.by import By

    @app.register_task("charge-card", max_attempts=1)
    def charge_card(params: Any, ctx: TaskContext) -> dict[str, Any]:
        ctx.step("reserve", lambda: {"amount": params["amount"]})
        if ctx.attempt == 1:
            raise RuntimeError("payment gateway timed out")
        return {"charged": params["amount"]}

    @app.register_task("ship-order")
    def ship_order(params: Any, ctx: TaskContext) -> Any:
        ctx.step("label", lambda: "LABEL-1")
        return ctx.await_event(f"packed:{params['order']}", timeout=3600)

    @app.register_task("send-receipt")
    def send_receipt(params: Any, ctx: TaskContext) -> str:
        return ctx.step("send", lambda: f"sent to {params['email']}")

    with worker_thread(app, concurrency=2, poll_interval=0.05):
        failed = app.spawn("charge-card", {"amount": 4200}, headers={"request_id": "r-17"})
        app.spawn("ship-order", {"order": 7})
        for n in range(3):
            app.spawn("send-receipt", {"email": f"user{n}@example.com"})
        wait_until(lambda: app.get_task(failed.task_id).state == "failed", "the charge fails first")
        app.emit_event("other-event", {"ok": True})

        browser.get(f"{dashboard}/")
        until(browser, lambda d: d.find_element(By.ID, "queue-default"), "the overview")
        assert "<svg" in browser.page_source  # the throughput chart
        browser.save_screenshot(str(screenshots / "1-overview.png"))

        browser.find_element(By.ID, "count-default-failed").click()
        until(browser, lambda d: d.find_element(By.ID, "tasks-table"), "the failed tasks")
        rows = browser.find_elements(By.CSS_SELECTOR, "#tasks-table tbody tr")
        assert [row.get_attribute("id") for row in rows] == [f"task-{failed.task_id}"]
        browser.save_screenshot(str(screenshots / "2-tasks-failed.png"))

        browser.find_element(By.CSS_SELECTOR, f"#task-{failed.task_id} a.task-link").click()
        until(browser, lambda d: d.find_element(By.ID, "task-state"), "the task's page")
        assert str(failed.task_id) in browser.current_url  # a link to paste
        assert browser.find_element(By.ID, "task-state").text == "failed"
        assert "payment gateway timed out" in browser.find_element(By.ID, "traceback").text
        browser.save_screenshot(str(screenshots / "3-task-failed.png"))

        browser.find_element(By.ID, "retry-button").click()
        until(browser, lambda d: d.find_element(By.ID, "flash"), "the retry's message")
        assert "error" not in (browser.find_element(By.ID, "flash").get_attribute("class") or "")

        def completed(driver: Any) -> bool:
            driver.refresh()
            return bool(driver.find_element(By.ID, "task-state").text == "completed")

        until(browser, completed, "the worker ran the task again")
        runs = browser.find_elements(By.CSS_SELECTOR, "#runs-table tbody tr")
        assert len(runs) == 2
        assert "charged" in browser.find_element(By.ID, "result").text
        browser.save_screenshot(str(screenshots / "4-task-retried.png"))

        for page, name in (("queues", "5-queues"), ("events", "6-events")):
            browser.find_element(By.ID, f"nav-{page}").click()
            until(browser, lambda d, p=page: d.find_element(By.ID, f"{p}-table"), page)
            browser.save_screenshot(str(screenshots / f"{name}.png"))
        assert "ship-order" in browser.page_source  # it waits on packed:7

    assert app.get_task(failed.task_id).state == "completed"
