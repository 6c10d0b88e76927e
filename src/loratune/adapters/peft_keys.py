"""PEFT's tensor key names: the one place that builds and parses them.

    base_model.model.<module path>.lora_A.weight        r × in       (Linear, Conv1D)
    base_model.model.<module path>.lora_B.weight        out × r
    base_model.model.<module path>.lora_embedding_A     r × num_embeddings   (Embedding)
    base_model.model.<module path>.lora_embedding_B     embedding_dim × r
    base_model.model.<module path>.lora_magnitude_vector   out (embedding_dim)   (DoRA's magnitude)
    base_model.model.<module path>.<key>                a modules_to_save copy's own state-dict keys
    base_model.model.<module path>.base_layer.weight    PEFT's copy of an adapted embedding's base weight

A parameter adapted directly (``target_parameters``) has the factor keys of its module, nested as PEFT wraps
one parameter per layer: of the k adapted parameters of a module, in the module's parameter order, the last is
``<module path>.lora_A.weight``, the one before ``<module path>.base_layer.lora_A.weight``, and so on.

The adapter's own name never appears in the keys.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "base_model.model."
LINEAR_SUFFIXES = ("lora_A.weight", "lora_B.weight")
EMBEDDING_SUFFIXES = ("lora_embedding_A", "lora_embedding_B")
BASE_COPY_SUFFIX = ".base_layer.weight"
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"


@dataclass(frozen=True)
class FactorKey:
    """A parsed factor key: the module path, which factor (``"A"`` or ``"B"``) and whether it is an embedding's."""

    path: str
    factor: str
    embedding: bool

    def partner(self) -> str:
        """The key of the other factor of the same module."""
        return factor_key(self.path, "B" if self.factor == "A" else "A", self.embedding)


def factor_key(path: str, factor: str, embedding: bool = False) -> str:
    """The key of factor ``"A"`` or ``"B"`` of the module at ``path``."""
    suffixes = EMBEDDING_SUFFIXES if embedding else LINEAR_SUFFIXES
    return f"{PREFIX}{path}.{suffixes[0 if factor == 'A' else 1]}"


def parameter_module_path(owner_path: str, position: int, count: int) -> str:
    """The module path PEFT files the ``position``-th (from 0) of ``count`` adapted parameters of the module at
    ``owner_path`` under."""
    return owner_path + ".base_layer" * (count - 1 - position)


def factor_keys(path: str, embedding: bool = False) -> tuple[str, str]:
    """(A key, B key) of the module at ``path``."""
    return factor_key(path, "A", embedding), factor_key(path, "B", embedding)


def magnitude_key(path: str) -> str:
    """The key of a DoRA adapter's magnitude vector at ``path``."""
    return f"{PREFIX}{path}{MAGNITUDE_SUFFIX}"


def module_key(path: str, key: str) -> str:
    """The key of a modules_to_save copy's tensor ``key`` (its own state-dict key) at ``path``."""
    return f"{PREFIX}{path}.{key}"


def parse_factor_key(key: str) -> FactorKey | None:
    """The ``FactorKey`` of a LoRA factor key, or None for any other key."""
    if not key.startswith(PREFIX):
        return None
    for suffixes, embedding in ((LINEAR_SUFFIXES, False), (EMBEDDING_SUFFIXES, True)):
        for suffix, factor in zip(suffixes, "AB"):
            if key.endswith("." + suffix):
                return FactorKey(key[len(PREFIX) : -len(suffix) - 1], factor, embedding)
    return None


def is_factor_key(key: str) -> bool:
    """Whether ``key`` names a LoRA factor (A or B of a linear or embedding adapter)."""
    return parse_factor_key(key) is not None


def is_base_copy_key(key: str) -> bool:
    """Whether ``key`` is PEFT's copy of an adapted module's base weight (no adapter information)."""
    return key.endswith(BASE_COPY_SUFFIX)


def module_path(key: str) -> str:
    """The model path a key refers to (``PREFIX`` removed)."""
    return key[len(PREFIX) :] if key.startswith(PREFIX) else key
