"""Fixtures that start real deployments (router + worker processes) on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pdserve.launch.local import LaunchConfig, LocalLauncher

# Small settings so the tests exercise chunking and block boundaries with the tiny model.
WORKER_ARGS = ["--model", "tiny", "--chunk-size", "32", "--block-size", "16", "--kv-cache-mib", "64"]


def launch(
    mode: str,
    transport: str | None = None,
    router_args: tuple[str, ...] = (),
    worker_args: tuple[str, ...] = (),
    **counts: int,
) -> LocalLauncher:
    """Start a deployment of the tiny model and wait until every worker is registered.

    Disaggregated deployments pin ``--disagg-policy always`` unless the test
    names one: the tests written for the P → D path must see every prompt take
    it (conditional disaggregation would prefill short prompts on D).
    """
    all_worker_args = [*WORKER_ARGS, *worker_args]
    if mode == "disaggregated" and "--disagg-policy" not in router_args:
        router_args = ("--disagg-policy", "always", *router_args)
    if transport:
        all_worker_args += ["--kv-transport", transport]
    config = LaunchConfig(
        mode=mode,
        port=0,
        router_args=["--model", "tiny", *router_args],
        worker_args=all_worker_args,
        threads_per_worker=1,
        ready_timeout_s=180,
        log_level=os.environ.get("PDSERVE_TEST_LOG", "WARNING"),
        **counts,
    )
    launcher = LocalLauncher(config)
    try:
        launcher.start()
    except BaseException:
        launcher.stop()
        raise
    return launcher


@pytest.fixture(scope="session")
def disagg_shm() -> Iterator[LocalLauncher]:
    launcher = launch("disaggregated", "shm", ("--trace-responses",), num_prefill=2, num_decode=2)
    yield launcher
    launcher.stop()


@pytest.fixture(scope="session")
def disagg_tcp() -> Iterator[LocalLauncher]:
    launcher = launch("disaggregated", "tcp", num_prefill=2, num_decode=2)
    yield launcher
    launcher.stop()


@pytest.fixture(scope="session")
def aggregated() -> Iterator[LocalLauncher]:
    launcher = launch("aggregated", router_args=("--trace-responses",), num_mixed=1)
    yield launcher
    launcher.stop()
