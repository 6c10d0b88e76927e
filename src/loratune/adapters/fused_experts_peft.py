"""Where PEFT reads an adapter's ``target_modules`` as something else on a mixture-of-experts model.

transformers 5 fused the experts' ``gate_proj``/``up_proj``/``down_proj`` (``w1``/``w3``/``w2`` in Mixtral) into
3-D parameters. To keep adapters written for transformers 4 loading, PEFT (up to at least 0.21) rewrites a
config before injecting it on the model types transformers converts: every ``target_modules`` entry named like a
pre-fusion expert projection (``gate_proj``, or any path ending in ``.gate_proj``) is taken out of
``target_modules`` and becomes a ``target_parameters`` entry for the fused experts, and naming both halves of
``gate_up_proj`` doubles its rank. It does so whatever the name meant: the shared experts and dense layers of
DeepSeek-V3, Qwen2-MoE or GLM-4-MoE have Linears of those names (huggingface/peft#3711), which PEFT then does not
adapt. loratune adapts what the config says; this module names the modules PEFT would misread, so that saving
can say so.
"""

from __future__ import annotations

from torch import nn

# per conversion family: the transformers-4 module names PEFT maps to fused expert parameters
_PRE_FUSION_NAMES = {
    "mixtral": ("gate", "w1", "w2", "w3"),
    "qwen2_moe": ("gate", "gate_proj", "up_proj", "down_proj"),
}


def _conversion_family(model: nn.Module) -> str | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "mixtral":
        return "mixtral"
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN
    except ImportError:  # a transformers without the v4 -> v5 conversion: nothing is rewritten
        return None
    return _MODEL_TO_CONVERSION_PATTERN.get(model_type)


def misread_by_peft(model: nn.Module, module_paths: list[str]) -> list[str]:
    """The paths among ``module_paths`` (adapted modules of ``model``) that PEFT takes for fused expert
    projections on this model type (see the module docstring); empty for every other model."""
    names = _PRE_FUSION_NAMES.get(_conversion_family(model) or "", ())
    return [path for path in module_paths if path.rpartition(".")[2] in names]


def misread_warning(model: nn.Module, misread: list[str]) -> str:
    """One line for a user saving an adapter whose modules ``misread`` PEFT reads as expert projections."""
    leaves = sorted({path.rpartition(".")[2] for path in misread})
    return (
        f"PEFT reads target_modules {leaves} on {model.config.model_type} models as the routed experts' fused "
        f"projections (huggingface/peft#3711), so in PEFT this adapter's {len(misread)} such modules (e.g. "
        f"{misread[0]}) are not adapted, or the adapter fails to load; loratune loads it whole. For an adapter "
        "PEFT loads as trained, leave them out (lora.exclude_modules)"
    )
