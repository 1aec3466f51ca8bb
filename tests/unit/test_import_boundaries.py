"""The router and the tokenizer package stay free of torch and of the model/engine packages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_FORBIDDEN = ("torch", "pdserve.model", "pdserve.engine", "transformers")


def _loaded_after(code: str) -> list[str]:
    probe = (
        f"{code}\n"
        "import json, sys\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or "
        f"any(m == f or m.startswith(f + '.') for f in {list(_FORBIDDEN)!r}))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "code",
    [
        "import pdserve.router.server, pdserve.router.app, pdserve.router.generation",
        "from pdserve.router.server import build_router_app, RouterConfig\n"
        "build_router_app(RouterConfig(model='tiny'))",
        "from pdserve.tokenizer import load_tokenizer, Detokenizer\nload_tokenizer('tiny').encode('hi')",
        "import pdserve.bench.cli",
    ],
)
def test_router_and_tokenizer_import_neither_torch_nor_model(code: str) -> None:
    assert _loaded_after(code) == []


def test_probe_sees_an_import_of_the_model_package() -> None:
    # the check above can fail: importing the model runner does load torch and pdserve.model
    loaded = _loaded_after("import pdserve.engine.model_runner")
    assert "torch" in loaded and "pdserve.model" in loaded
