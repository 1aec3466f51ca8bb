"""Runs the planner beside the router: a thread of the ``pdserve serve`` process.

Why a thread there: that process already holds what the planner needs (the
router's URL, the cluster secret, the API key, the budget it started the
workers with) and outlives router restarts; the planner only talks HTTP to the
router, like ``pdserve scale`` and ``pdserve status`` do, so it could run
anywhere. Every ``interval_s``:

1. read the signals (:func:`pdserve.planner.signals.read`);
2. :func:`~pdserve.planner.planner.decide`;
3. when the target changed, ``POST /pdserve/scale`` with every pool at once
   (the supervisor flips roles first, starts workers, drains before removal);
4. report the decision to the router (``POST /pdserve/planner``): history,
   ``/metrics``, trace log, ``pdserve status``, and the early-shedding limit.

A failing interval (router restarting, a bad answer) is logged and skipped.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable

import httpx

from pdserve.planner import signals
from pdserve.planner.decision import Decision
from pdserve.planner.planner import PlannerConfig, PlannerState, decide

logger = logging.getLogger(__name__)


def shed_limit(d: Decision, attainment_target: float = 0.9) -> int | None:
    """Generations in flight above which the router refuses early (None: not over capacity).

    Only when the prediction says over capacity *and* the window measured the
    SLO attainment below ``attainment_target`` with the shape in place for the
    whole window (``steady_window``): S3 measured the planner refusing requests
    (429) at loads a static shape of the same budget served within the SLOs
    on a pessimistic prediction alone; and a window that straddles a reshape
    measured the transition (workers draining, starting, flipping), not what
    the shape in place can serve.

    The chosen shape's sustainable arrival rate (the observed one scaled down
    to ``max_utilization``) times a request's predicted latency (Little's law),
    with 50% slack so a burst the deployment can absorb is not refused.
    """
    p = d.chosen
    if not d.over_capacity or p is None:
        return None
    measured = d.inputs.get("attainment")
    if measured is None or measured >= attainment_target or not d.inputs.get("steady_window"):
        return None
    lam = float(d.inputs.get("arrival_rate") or 0.0)
    outputs = float(d.inputs.get("output_mean") or 0.0)
    if lam <= 0 or not math.isfinite(p.utilization) or p.utilization <= 0:
        return max(2 * d.target.workers, 4)
    sustainable = lam * min(1.0, 0.9 / p.utilization)
    ttft = p.ttft_p90_s if math.isfinite(p.ttft_p90_s) else 1.0
    itl = p.itl_s if math.isfinite(p.itl_s) else 0.1
    return max(2 * d.target.workers, 4, math.ceil(1.5 * sustainable * (ttft + itl * outputs)))


class PlannerRunner:
    """The planner's loop (see the module docstring)."""

    def __init__(
        self,
        url: Callable[[], str],
        config: PlannerConfig,
        *,
        interval_s: float,
        window_s: float,
        secret: str,
        api_key: str = "",
    ) -> None:
        self.url = url
        self.config = config
        self.interval_s = interval_s
        self.window_s = window_s
        self.state = PlannerState()
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._secret_headers = {**self._headers, "X-PDServe-Cluster-Secret": secret}
        self._client = httpx.Client(timeout=10.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: Decision | None = None

    def start(self) -> PlannerRunner:
        """Start the loop in a daemon thread."""
        self._thread = threading.Thread(target=self._loop, name="pdserve-planner", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 15)
        self._client.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.step()
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                logger.warning("planner: interval skipped: %s", exc)

    def step(self) -> Decision:
        """One interval: read, decide, act, report."""
        url = self.url()
        sig = signals.read(url, self._headers, self.window_s, self._client)
        d = decide(sig, self.state, self.config)
        if d.changes:
            reply = self._client.post(f"{url}/pdserve/scale", json=d.target.targets(), headers=self._headers)
            if reply.status_code != 200:
                logger.warning(
                    "planner: scale to %s refused (%d): %s", d.target, reply.status_code, reply.text
                )
                self.state.pending = None
            else:
                logger.info("planner: %s %s -> %s: %s", d.action, d.current, d.target, d.reason)
        body = {"decision": d.as_dict(), "shed_above_inflight": shed_limit(d, self.config.attainment_target)}
        self._client.post(f"{url}/pdserve/planner", json=body, headers=self._secret_headers)
        self.last = d
        return d
