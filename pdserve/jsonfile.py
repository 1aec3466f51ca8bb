"""Reading the small JSON files of a checkpoint folder (config, tokenizer config...)."""

from __future__ import annotations

import json
import os
from typing import Any

from pdserve.errors import ModelLoadError


def read_json_object(path: str, *, required: bool = False) -> dict[str, Any]:
    """The JSON object in ``path``; ``{}`` when the file is absent and not ``required``.

    Raises:
        ModelLoadError: the file is required and absent, unreadable, not JSON, or not an object.
    """
    if not os.path.isfile(path):
        if required:
            raise ModelLoadError(f"{path} not found: a checkpoint folder needs a config.json")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data
