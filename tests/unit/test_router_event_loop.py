"""Which event loop the router runs on."""

from __future__ import annotations

import builtins
from typing import Any

import pytest

from pdserve.router.server import _use_uvloop


def test_uvloop_where_installed_unless_asyncio_is_asked_for() -> None:
    pytest.importorskip("uvloop")
    assert _use_uvloop("auto") and _use_uvloop("uvloop")
    assert not _use_uvloop("asyncio")


def test_without_uvloop_auto_falls_back_and_an_explicit_choice_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_uvloop(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "uvloop":
            raise ImportError("no uvloop here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvloop)
    assert not _use_uvloop("auto")
    with pytest.raises(ImportError):
        _use_uvloop("uvloop")
