"""Adapter surgery on any PyTorch model: inject, activate, merge, unload, save and load (PEFT format)."""

from loratune.adapters.config import ALL_LINEAR, LoraConfig
from loratune.adapters.mixed_batch import mixed_batch
from loratune.adapters.modules_to_save import ModulesToSaveWrapper
from loratune.adapters.peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_slots,
    adapter_state,
    adapter_tensors,
    load_adapter_state,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from loratune.adapters.report import ParameterReport, parameter_report
from loratune.adapters.surgery import (
    BASE_ADAPTER,
    active_adapters,
    adapter_parameters,
    adapter_strength,
    adapters_of,
    add_adapter,
    delete_adapter,
    disabled_adapters,
    inject_adapter,
    lora_layers,
    merge_adapters,
    merged_adapters,
    set_active,
    set_strength,
    set_trainable,
    unload,
    unmerge_adapters,
)
from loratune.adapters.targets import find_targets

__all__ = [
    "ALL_LINEAR",
    "BASE_ADAPTER",
    "CONFIG_NAME",
    "LoraConfig",
    "ModulesToSaveWrapper",
    "ParameterReport",
    "WEIGHTS_NAME",
    "active_adapters",
    "adapter_parameters",
    "adapter_slots",
    "adapter_state",
    "adapter_strength",
    "adapter_tensors",
    "adapters_of",
    "add_adapter",
    "delete_adapter",
    "disabled_adapters",
    "find_targets",
    "inject_adapter",
    "load_adapter",
    "load_adapter_state",
    "lora_layers",
    "merge_adapters",
    "merged_adapters",
    "mixed_batch",
    "parameter_report",
    "read_adapter_config",
    "save_adapter",
    "set_active",
    "set_strength",
    "set_trainable",
    "unload",
    "unmerge_adapters",
]
