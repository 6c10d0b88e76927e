"""The LoRA paper's fixed-budget design (its Table 5): for each target set, the rank whose trainable-parameter
count is closest to a budget. Counts come from the adapter itself, injected into the model built on the meta
device (no weights read), so every kind of module, DoRA's magnitudes and modules_to_save count as they will."""

from __future__ import annotations

from loratune.adapters import LoraConfig, add_adapter, parameter_report
from loratune.errors import ConfigError
from loratune.models.loader import resolve_model_dir
from loratune.models.structure import meta_model


def adapter_parameters(model_name: str, lora: LoraConfig, *, trust_remote_code: bool = False) -> int:
    """How many parameters ``lora`` trains on ``model_name`` (an alias, .gguf or HF directory)."""
    model = meta_model(resolve_model_dir(model_name), trust_remote_code)
    add_adapter(model, lora)
    return parameter_report(model).trainable


def rank_for_budget(
    model_name: str, lora: LoraConfig, budget: int, *, trust_remote_code: bool = False
) -> tuple[int, int]:
    """(r, its parameter count): the rank whose adapter is closest to ``budget`` parameters (the smaller on a
    tie). Raises ``ConfigError`` when even rank 1 is larger than the budget, or ranks are set per module."""
    if lora.rank_pattern:
        raise ConfigError("--budget chooses one rank per run; remove lora.rank_pattern")
    one = adapter_parameters(model_name, lora.model_copy(update={"r": 1}), trust_remote_code=trust_remote_code)
    two = adapter_parameters(model_name, lora.model_copy(update={"r": 2}), trust_remote_code=trust_remote_code)
    per_rank, fixed = two - one, 2 * one - two  # count = fixed + r · per_rank
    if one > budget:
        raise ConfigError(
            f"--budget {budget:,} is smaller than a rank-1 adapter on {lora.target_modules} ({one:,} parameters)"
        )
    low = max(1, (budget - fixed) // per_rank)
    r = min((low, low + 1), key=lambda k: (abs(fixed + k * per_rank - budget), k))
    return r, fixed + r * per_rank
