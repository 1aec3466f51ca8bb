"""How a deployment stops: ``stop_all``'s order and kill fallback, the launcher's signals, the quick exit."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator

import pytest

from pdserve.launch.base import Placement, stop_all
from pdserve.launch.stop_signals import StopSignals


class StubbornProcess:
    """A fake process that ends on SIGTERM only if ``obeys``; it writes what happens to ``events``."""

    def __init__(self, name: str, events: list[str], obeys: bool) -> None:
        self.name = name
        self.events = events
        self.obeys = obeys
        self.code: int | None = None

    def poll(self) -> int | None:
        return self.code

    def terminate(self) -> None:
        self.events.append(f"term {self.name}")
        if self.obeys:
            self.code = 0

    def kill(self) -> None:
        self.events.append(f"kill {self.name}")
        self.code = -9

    def wait(self, timeout_s: float) -> int | None:
        self.events.append(f"wait {self.name}")
        return self.code

    def placement(self) -> Placement:
        return Placement(host="here")


def test_stop_all_signals_workers_first_and_kills_every_late_process_before_waiting_for_any() -> None:
    """Two hung workers: both are killed at the deadline, then waited for (not kill, wait, kill, wait)."""
    events: list[str] = []
    router = StubbornProcess("router", events, obeys=True)
    hung = [StubbornProcess(f"prefill-{i}", events, obeys=False) for i in range(2)]
    decode = StubbornProcess("decode-0", events, obeys=True)
    stop_all([router, *hung, decode], grace_s=0.0, kill_wait_s=0.0)
    terms = [e for e in events if e.startswith("term")]
    assert terms == ["term decode-0", "term prefill-1", "term prefill-0", "term router"]
    after = events[len(terms):]
    kills = [i for i, e in enumerate(after) if e.startswith("kill")]
    assert [after[i] for i in kills] == ["kill prefill-0", "kill prefill-1"]
    assert after[kills[0] + 1] == "kill prefill-1"  # the second kill is not held up by a wait
    assert after[kills[-1] + 1:] == ["wait prefill-0", "wait prefill-1"]
    assert router.code == 0 and decode.code == 0 and all(p.code == -9 for p in hung)


def test_stop_all_kills_nothing_that_stopped_in_time() -> None:
    events: list[str] = []
    procs = [StubbornProcess(name, events, obeys=True) for name in ("router", "decode-0")]
    stop_all(procs, grace_s=0.0)
    assert not any(e.startswith("kill") for e in events)


def test_the_launcher_and_the_router_do_not_load_torch() -> None:
    """Loading torch costs a second to start and most of the stop time, for nothing, in the launcher
    (the router process loads it when it starts serving, for S5's reason in ``run_router``)."""
    code = textwrap.dedent("""
        import sys
        from pdserve.cli import _build_parser
        import pdserve.launch.serve, pdserve.launch.local_backend, pdserve.router.server
        _build_parser()
        print("torch" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=120)
    assert out.stdout.strip() == "False"


def test_exit_now_flushes_logs_and_output_and_skips_the_teardown() -> None:
    code = textwrap.dedent("""
        import atexit, logging, sys
        from pdserve.quick_exit import exit_now
        logging.basicConfig(stream=sys.stderr, format="%(message)s")
        atexit.register(print, "teardown ran")
        print("buffered", end="")
        logging.warning("logged")
        exit_now(3)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3
    assert out.stdout == "buffered"  # flushed from the pipe's buffer; the atexit print never ran
    assert "logged" in out.stderr


class QuickExit(Exception):
    pass


@pytest.mark.parametrize(("argv", "command", "quick"), [
    (None, "serve", True), (None, "worker", True), (None, "bench", False), (["serve"], "serve", False),
])
def test_main_ends_only_a_service_process_quickly(
    monkeypatch: pytest.MonkeyPatch, argv: list[str] | None, command: str, quick: bool
) -> None:
    """The service commands' own process skips the teardown; an in-process caller of main() gets a return."""
    from pdserve import cli

    def fake_parser() -> tuple[argparse.ArgumentParser, dict[str, cli.Command]]:
        parser = argparse.ArgumentParser()
        parser.add_argument("--log-level", default="WARNING")
        sub = parser.add_subparsers(dest="command", required=True)
        for name in ("serve", "worker", "bench"):
            sub.add_parser(name)
        return parser, dict.fromkeys(("serve", "worker", "bench"), lambda _args: 7)

    def fake_exit(code: int) -> None:
        raise QuickExit(code)

    monkeypatch.setattr(cli, "_build_parser", fake_parser)
    monkeypatch.setattr(cli, "exit_now", fake_exit)
    monkeypatch.setattr(sys, "argv", ["pdserve", command])
    if quick:
        with pytest.raises(QuickExit, match="7"):
            cli.main(argv)
    else:
        assert cli.main(argv) == 7


@pytest.fixture
def restore_signal_handlers() -> Iterator[None]:
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@pytest.mark.usefixtures("restore_signal_handlers")
def test_a_second_signal_during_the_stop_closes_again_and_later_ones_are_ignored() -> None:
    """Ctrl-C asks for a drain; again, it re-signals everything (they stop at once); a third does nothing."""
    stop = threading.Event()
    signals = StopSignals(stop)
    signals.install()
    signal.raise_signal(signal.SIGINT)
    assert stop.is_set()
    signal.raise_signal(signal.SIGTERM)  # before the close began: nothing to hurry yet
    calls: list[int] = []

    def close() -> None:
        calls.append(len(calls))
        signal.raise_signal(signal.SIGINT)  # the user presses Ctrl-C while the workers drain

    signals.close(close)
    assert calls == [0, 1]


@pytest.mark.usefixtures("restore_signal_handlers")
def test_a_close_without_a_second_signal_runs_once() -> None:
    stop = threading.Event()
    signals = StopSignals(stop)
    signals.install()
    calls: list[int] = []
    signals.close(lambda: calls.append(1))
    assert calls == [1] and not stop.is_set()


def test_local_children_get_a_process_group_of_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Else a terminal's Ctrl-C reaches them besides the launcher's SIGTERM: two signals, no drain."""
    from pdserve.launch import local_backend

    seen: dict[str, object] = {}

    def fake_popen(cmd: list[str], **kwargs: object) -> object:
        seen.update(kwargs)
        return object()

    monkeypatch.setattr(local_backend.subprocess, "Popen", fake_popen)
    backend = local_backend.LocalBackend()
    try:
        backend._spawn("decode-0", ["worker", "--role", "decode"], {})
    finally:
        backend._rundir.cleanup()
    assert seen["process_group"] == 0 and seen["preexec_fn"] is local_backend.die_with_parent


@pytest.mark.parametrize(("options", "grace_s"), [([], 10.0), (["--stop-timeout", "45"], 45.0)])
def test_stop_timeout_is_the_local_backends_grace(
    monkeypatch: pytest.MonkeyPatch, options: list[str], grace_s: float
) -> None:
    from pdserve.cli import _build_parser
    from pdserve.launch import local_backend
    from pdserve.launch.serve import make_backend

    graces: list[float] = []
    monkeypatch.setattr(local_backend, "stop_all", lambda _handles, grace: graces.append(grace))
    parser, _ = _build_parser()
    backend = make_backend(parser.parse_args(["serve", *options]))
    backend.close()
    assert graces == [grace_s]
    with pytest.raises(ValueError, match="stop-timeout"):
        make_backend(parser.parse_args(["serve", "--stop-timeout", "-1"]))
