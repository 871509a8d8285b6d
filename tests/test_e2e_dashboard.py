"""The dashboard in a real browser: Debian's chromium, driven by chromedriver
through Selenium, against the real ``twistd l5dproxy`` (issue 15 part 1).

The page must load with no console error, show the service, and its request
counter must rise while traffic flows through the proxy; the tap view must
show requests as they end. The test writes the screenshot README shows
(docs/dashboard.png).
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.trial.unittest import TestCase

from tests.support import HttpServer, ProxyProcess, require_tool, wait_for
from tests.test_command import get

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCREENSHOT = os.path.join(REPO, "docs", "dashboard.png")

#: Chromium as root in a container, quiet: no sandbox, GPU, QUIC, first-run
#: or background traffic (nothing leaves loopback).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1000")


def _selenium():
    try:
        import selenium  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            raise AssertionError("selenium is required under CI (pip install -e .[test])") \
                from None
        from unittest import SkipTest

        raise SkipTest("selenium is not installed") from None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    return webdriver, Service


class DashboardBrowserTests(TestCase):
    def start_browser(self):
        chromium = require_tool("chromium")
        chromedriver = require_tool("chromedriver")
        webdriver, Service = _selenium()
        profile = tempfile.mkdtemp(prefix="l5dproxy-chromium-")
        self.addCleanup(shutil.rmtree, profile, True)
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
        self.addCleanup(driver.quit)
        driver.set_page_load_timeout(30)
        return driver

    def test_dashboard_live(self):
        from selenium.webdriver.common.by import By

        app = HttpServer(self)
        proxy = ProxyProcess(self, listeners=[{"name": "inbound", "service": "app"}],
                             services={"app": {"endpoints": [app.address]}})
        port = proxy.port("inbound")
        for _ in range(3):
            self.assertEqual(get(port, "/warm-up"), 200)
        driver = self.start_browser()
        driver.get(f"http://127.0.0.1:{proxy.admin_port}/dashboard")

        def text(selector: str) -> str | None:
            # Read in one script: the page replaces its rows every second, so
            # an element found first may be gone when its text is asked for.
            return driver.execute_script(
                "const e = document.querySelector(arguments[0]);"
                " return e ? e.innerText : null;", selector)

        def counter() -> int | None:
            value = text('tr[data-service="app"] td.requests-total')
            return int(value) if value and value.isdigit() else None

        first = wait_for(counter, 20, "the dashboard to show service app")
        self.assertGreaterEqual(first, 3)
        self.assertEqual(text("#endpoints tbody td:nth-child(2)"), app.address)
        # Traffic flows: the counter rises without a reload.
        for i in range(20):
            self.assertEqual(get(port, f"/api/items/{i % 4}"), 200)
        wait_for(lambda: (counter() or 0) >= first + 20, 20, "the request counter to rise")
        self.assertIn("http1", text('tr[data-listener="inbound"]'))
        # The tap view: start it, requests show up as they end.
        driver.find_element(By.ID, "tap-toggle").click()
        wait_for(lambda: text("#tap-status") == "tapping", 20, "the tap to connect")

        def tapped() -> bool:
            for i in range(3):
                get(port, f"/api/orders/{i}")
            return "/api/orders/" in (text("#tap tbody") or "")

        wait_for(tapped, 20, "tapped requests in the tap view", interval=0.2)
        # 20 requests above and at least 3 tapped.
        wait_for(lambda: (counter() or 0) >= first + 23, 20, "the counter after the tap")
        os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
        self.assertTrue(driver.save_screenshot(SCREENSHOT))
        with open(SCREENSHOT, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        errors = [entry for entry in driver.get_log("browser")
                  if entry["level"] in ("SEVERE", "ERROR")]
        self.assertEqual(errors, [])
