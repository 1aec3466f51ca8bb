"""The dashboard in a real browser (headless Chromium) against a real deployment under light load.

One deployment through ``pdserve serve`` (tiny: router, 1 prefill + 2 decode
workers, an API key, SLOs set) and one browser for the module. The page is opened with ``?key=``, as a
user would: the data requests then carry the key in the cookie the page set.
Screenshots go to ``tests/artifacts/dashboard/`` (git-ignored).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from browser import Load, Served, chrome, console_errors, screenshot, wait_for

pytestmark = pytest.mark.slow

KEY = "dash-test-key"
WORKER_ARGS = ["--model", "tiny", "--chunk-size", "32", "--block-size", "16", "--kv-cache-mib", "32"]


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    d = chrome()
    yield d
    d.quit()


@pytest.fixture(scope="module")
def deployment() -> Iterator[Served]:
    dep = Served(
        ["--prefill", "1", "--decode", "2", "--slo-ttft-ms", "400", "--slo-itl-ms", "80"],
        KEY,
        WORKER_ARGS,
        num_workers=3,
    )
    yield dep
    dep.stop()


@pytest.fixture(scope="module")
def load(deployment: Served) -> Iterator[Load]:
    running = Load(deployment.url, deployment.headers)
    yield running
    running.stop()


def snapshot(driver: Any) -> dict[str, Any]:
    """What the page shows now, read from its DOM."""
    return driver.execute_script(
        """
        const text = (id) => (document.getElementById(id) || {}).textContent;
        const workers = {};
        for (const g of document.querySelectorAll('g.worker')) {
          workers[g.dataset.worker] = {state: g.dataset.state, role: g.dataset.role,
            running: g.querySelector('.running').textContent, kv: g.querySelector('.kv').textContent};
        }
        return {updates: Number(document.body.dataset.updates), workers: workers,
          finished: text('stat-finished'), tokens: text('stat-tokens'), conn: text('conn'),
          lines: document.querySelectorAll('#charts polyline').length,
          slo: document.querySelectorAll('#charts line.slo').length,
          traces: document.querySelectorAll('#traces tr.trace').length,
          events: Array.from(document.querySelectorAll('#events tr.event-row')).map(r => r.dataset.kind)};
        """
    )


def test_page_shows_the_deployment_live(driver: Any, deployment: Served, load: Load) -> None:
    assert httpx.get(f"{deployment.url}/dashboard", timeout=10).status_code == 401  # no key, no page
    driver.get(f"{deployment.url}/dashboard?key={KEY}")
    first = wait_for(
        lambda: (s := snapshot(driver))["updates"] >= 2 and len(s["workers"]) == 3 and s,
        60,
        "the page to draw three workers",
    )
    assert "key=" not in driver.current_url  # taken out of the address bar
    assert set(first["workers"]) == {"prefill-0", "decode-0", "decode-1"}
    assert all(w["state"] == "ready" for w in first["workers"].values())
    assert first["workers"]["prefill-0"]["role"] == "prefill" and first["conn"] == "live"
    # Under load the numbers move: requests finish, tokens flow, charts and traces fill.
    later = wait_for(
        lambda: (
            (s := snapshot(driver))["finished"] != first["finished"]
            and s["lines"] > 0
            and s["traces"] > 0
            and s["updates"] >= first["updates"] + 3
            and s
        ),
        120,
        "the page's numbers to change",
    )
    assert later["tokens"] != first["tokens"]
    assert later["slo"] == 2  # the TTFT and ITL objectives are drawn
    assert "worker_registered" in later["events"]
    driver.find_element("css selector", "#traces tr.trace").click()
    wait_for(lambda: driver.find_elements("css selector", "#timeline svg rect"), 10, "the request's timeline")
    timeline = driver.find_element("id", "timeline").text
    assert "TTFT" in timeline and "first_token" in timeline
    time.sleep(2)  # a few more samples for the screenshot
    screenshot(driver, "1-live")
    assert console_errors(driver) == []
    assert load.num_ok > 0


def test_killed_worker_shows_as_lost_then_replaced(driver: Any, deployment: Served, load: Load) -> None:
    if "dashboard" not in driver.current_url:
        driver.get(f"{deployment.url}/dashboard?key={KEY}")
    wait_for(lambda: len(snapshot(driver)["workers"]) == 3, 60, "the page to show three workers")
    pid = next(w["pid"] for w in deployment.workers() if w["worker_id"] == "decode-1")
    killed_s = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    shown = wait_for(
        lambda: (s := snapshot(driver))["workers"].get("decode-1", {}).get("state") == "lost" and s,
        60,
        "the page to show decode-1 as lost",
        interval_s=0.05,
    )
    print(f"worker killed → page shows it lost: {time.monotonic() - killed_s:.2f} s")
    others = [shown["workers"][w]["state"] for w in ("decode-0", "prefill-0")]
    assert others == ["ready", "ready"]
    assert "worker_lost" in shown["events"]
    screenshot(driver, "2-worker-lost")
    # The supervisor of `pdserve serve` starts a new decode-1: the page shows it ready again.
    replaced = wait_for(
        lambda: (s := snapshot(driver))["workers"]["decode-1"]["state"] == "ready" and s,
        180,
        "the page to show decode-1 replaced",
    )
    assert "worker_replaced" in replaced["events"]
    new_pid = next(w["pid"] for w in deployment.workers() if w["worker_id"] == "decode-1")
    assert new_pid != pid
    # Requests keep finishing.
    before = replaced["finished"]
    wait_for(lambda: snapshot(driver)["finished"] != before, 120, "requests to finish after the replacement")
    screenshot(driver, "3-worker-replaced")
    assert console_errors(driver) == []
