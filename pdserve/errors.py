"""Typed exceptions raised at pdserve's boundaries.

Every error a user can cause is a subclass of :class:`PDServeError` with a
message that names the offending value and what would be accepted instead.
"""

from __future__ import annotations


class PDServeError(Exception):
    """Base class of every error pdserve raises on purpose."""


class ConfigError(PDServeError, ValueError):
    """A configuration value is out of range or inconsistent."""


class ModelLoadError(PDServeError):
    """A model could not be loaded: unknown preset, missing or corrupt files."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's architecture is not one pdserve implements."""


class InvalidRequestError(PDServeError, ValueError):
    """A request is invalid: bad sampling values, prompt too long, empty prompt."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
