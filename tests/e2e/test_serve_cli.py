"""``pdserve serve`` as a user runs it: ready within a bounded time, answers, leaves no process behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pdserve.launch.local import free_port

pytestmark = pytest.mark.slow

READY_TIMEOUT_S = 120


def children_of(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_serve(port: int, own_group: bool = False) -> tuple[subprocess.Popen[str], str]:
    """``pdserve serve --model tiny`` as a user starts it (``own_group``: in a process group of its own,
    as a shell's foreground job); returns once it printed that it is ready, with that line."""
    exe = shutil.which("pdserve", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "pdserve"]
    start = time.monotonic()
    proc = subprocess.Popen(
        [*cmd, "serve", "--model", "tiny", "--port", str(port), "--threads-per-worker", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=own_group,
    )
    try:
        assert proc.stdout is not None
        line = ""
        while "pdserve is ready" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "pdserve serve exited during start-up"
            assert time.monotonic() - start < READY_TIMEOUT_S, "not ready in time"
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, line


def assert_no_orphans(children: set[int]) -> None:
    """Every one of ``children`` is gone within 10 s."""
    deadline = time.monotonic() + 10
    while any(alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [c for c in children if alive(c)], "orphan processes left behind"


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_serve_answers_and_stops_cleanly(stop_signal: signal.Signals) -> None:
    port = free_port()
    proc, line = start_serve(port)
    try:
        assert f"http://127.0.0.1:{port}/v1" in line
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 0},
            timeout=60,
        )
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8
        children = children_of(proc.pid)
        assert len(children) >= 3  # router, prefill worker, decode worker
        cmdlines = [Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ") for c in children]
        for role in (b"router", b"--role prefill", b"--role decode"):
            assert any(role in c for c in cmdlines), f"no process shows {role!r} in ps"
        proc.send_signal(stop_signal)
        assert proc.wait(timeout=30) in (0, -stop_signal, 128 + stop_signal)
        assert_no_orphans(children)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_router_on_port_zero_reports_the_ports_it_bound(tmp_path: Path) -> None:
    ready = tmp_path / "router.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdserve", "router", "--model", "tiny", "--port", "0", "--control-port", "0",
         "--ready-file", str(ready)],
    )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        ports = json.loads(ready.read_text())
        assert ports["http_port"] > 0 and ports["control_endpoint"].startswith("tcp://127.0.0.1:")
        assert int(ports["control_endpoint"].rsplit(":", 1)[1]) > 0
        assert httpx.get(f"http://127.0.0.1:{ports['http_port']}/live", timeout=10).status_code == 200
        assert not (tmp_path / "router.json.tmp").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_ctrl_c_lets_a_running_stream_finish_and_a_second_one_stops_at_once() -> None:
    """Ctrl-C in a terminal signals the whole foreground process group: the launcher and every
    child. The stream in flight must still finish (the deployment drains), and the deployment must
    then exit with nothing left; a second Ctrl-C stops the rest at once (the stream is cut)."""
    port = free_port()

    def stream(ctrl_c: int) -> tuple[int, str | None]:
        """Stream 1,000 tokens; after the fifth chunk, ``ctrl_c`` SIGINTs to the process group. Returns
        the chunks received and how it ended (a finish reason, "error" for an error event, None: cut)."""
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 1000, "temperature": 0,
                "ignore_eos": True, "stream": True}
        chunks, finish = 0, None
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            try:
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "choices" not in event:  # an error event: the stream ends with it
                        assert event["error"]["type"] == "server_error", event
                        return chunks, "error"
                    choice = event["choices"][0]
                    chunks += 1
                    finish = choice.get("finish_reason") or finish
                    if chunks == 5:
                        for _ in range(ctrl_c):
                            os.killpg(proc.pid, signal.SIGINT)
                            time.sleep(0.3)
            except httpx.HTTPError:
                pass  # cut: what a second Ctrl-C does
        return chunks, finish

    for presses in (1, 2):
        proc, _ = start_serve(port, own_group=True)
        children = children_of(proc.pid)
        try:
            chunks, finish = stream(presses)
            assert chunks >= 5
            if presses == 1:
                assert finish == "length", (chunks, finish)  # drained: all 1,000 tokens
            else:  # stopped at once: the stream ends early, cut or with an error event
                assert finish in (None, "error"), (chunks, finish)
            assert proc.wait(timeout=30) in (0, 130, -signal.SIGINT)
            assert_no_orphans(children)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
