"""Helpers of the browser tests: a headless Chromium through selenium, ``pdserve serve``, light load.

Chromium comes from the system packages (``.ci/run`` installs ``chromium`` and
``chromium-driver`` where it can); where either is missing the tests are
skipped with a message that says so.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdserve.launch.local import free_port

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "dashboard"
READY_TIMEOUT_S = 180


def chrome() -> Any:
    """A headless Chromium driven by selenium (skips the test where there is none)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.skip(
            "no Chromium here: install the system packages chromium and chromium-driver (.ci/run does)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1500,2300",
        "--hide-scrollbars",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver_path))


def console_errors(driver: Any) -> list[str]:
    """The browser's console errors since the last call."""
    return [f"{e['level']}: {e['message']}" for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def screenshot(driver: Any, name: str) -> Path:
    """Save the page as a PNG test artifact (``tests/artifacts/dashboard``, git-ignored)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something true; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


class Served:
    """``pdserve serve`` as a user starts it (its supervisor replaces a worker that dies)."""

    def __init__(self, serve_args: list[str], api_key: str, worker_args: list[str], num_workers: int) -> None:
        self.api_key = api_key
        self.url = f"http://127.0.0.1:{free_port()}"
        self._log = tempfile.NamedTemporaryFile(prefix="pdserve-dash-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pdserve",
                "serve",
                "--model",
                "tiny",
                "--port",
                self.url.rsplit(":", 1)[1],
                "--threads-per-worker",
                "1",
                *serve_args,
                "--worker-args",
                *worker_args,
            ],
            env=dict(os.environ, PDSERVE_API_KEY=api_key),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

        def ready() -> bool:
            assert self.proc.poll() is None, f"pdserve serve exited: {self.log()}"
            return b"pdserve is ready" in Path(self._log.name).read_bytes()

        wait_for(ready, READY_TIMEOUT_S, "pdserve serve to be ready", 0.3)
        wait_for(lambda: len(self.workers()) == num_workers, READY_TIMEOUT_S, "every worker to register", 0.3)

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")[-3000:]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def workers(self) -> list[dict[str, Any]]:
        try:
            reply = httpx.get(f"{self.url}/pdserve/workers?stats=false", headers=self.headers, timeout=10)
        except httpx.HTTPError:
            return []
        return list(reply.json()["workers"]) if reply.status_code == 200 else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        os.unlink(self._log.name)


class Load:
    """A light, steady load: ``concurrency`` clients sending short completions until stopped."""

    def __init__(self, url: str, headers: dict[str, str], concurrency: int = 2) -> None:
        self.url, self.headers = url, headers
        self.num_ok = self.num_failed = 0
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(concurrency)
        ]
        for t in self._threads:
            t.start()

    def _run(self, i: int) -> None:
        with httpx.Client(timeout=120) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                body = {
                    "model": "tiny",
                    "prompt": f"load {i} {n} " * (1 + n % 5),
                    "max_tokens": 8 + n % 16,
                    "ignore_eos": True,
                    "stream": n % 2 == 0,
                }
                try:
                    reply = client.post(f"{self.url}/v1/completions", json=body, headers=self.headers)
                    ok = reply.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    self.num_ok += 1
                else:
                    self.num_failed += 1
                    time.sleep(0.2)
                time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=150)
