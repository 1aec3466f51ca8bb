"""A live dashboard of the deployment, served by the router itself (``GET /dashboard``).

Parts:

- :mod:`~pdserve.router.dashboard.sampler`: a ring buffer of periodic samples
  (rates, latency percentiles, the TTFT breakdown, errors) and the recent traces;
- :mod:`~pdserve.router.dashboard.fleet`: the workers with their state, and the
  events of their lives (registered, draining, lost, replaced; migrations...);
- :mod:`~pdserve.router.dashboard.routes`: the page (hand-written HTML, CSS and
  SVG drawing in JavaScript, shipped as package data: no build step, no
  network access from the browser) and its data endpoint
  ``GET /pdserve/dashboard/data``, which the page polls once a second.

Behind the API key when one is set: a browser cannot send a header when it
opens a page, so these two paths (and no other) also accept the key as a
``?key=`` query parameter or the ``pdserve_key`` cookie the page sets.
"""

from pdserve.router.dashboard.routes import BROWSER_PATHS, Dashboard, SLOConfig, mount_dashboard

__all__ = ["BROWSER_PATHS", "Dashboard", "SLOConfig", "mount_dashboard"]
