"""A headless Chromium for the browser tests (Debian's ``chromium`` and
``chromium-driver``). Without them the tests skip, unless
``ABSURD_REQUIRE_BROWSER=1`` (``.ci/run`` sets it), where they fail."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _missing(reason: str) -> None:
    if os.environ.get("ABSURD_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (ABSURD_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


@pytest.fixture
def browser() -> Iterator[object]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        _missing("chromium and chromedriver are not installed (apt install chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(driver_path)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def screenshots() -> Path:
    """Where the browser tests save a screenshot of each view: ``$ABSURD_ARTIFACTS``
    (default ``artifacts/``) / ``screenshots``."""
    folder = Path(os.environ.get("ABSURD_ARTIFACTS", ROOT / "artifacts")) / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
