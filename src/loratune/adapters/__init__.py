"""Adapter surgery on any PyTorch model: inject, activate, merge, unload, save and load (PEFT format)."""

from loratune.adapters.config import ALL_LINEAR, LoraConfig
from loratune.adapters.int8 import INT8_WEIGHTS_NAME
from loratune.adapters.mix import MixResult, mix_adapter_dirs, mix_adapters
from loratune.adapters.mixed_batch import mixed_batch
from loratune.adapters.modules_to_save import ModulesToSaveWrapper
from loratune.adapters.peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_slots,
    adapter_state,
    adapter_tensors,
    attach_adapter,
    compress_adapter,
    load_adapter,
    load_adapter_state,
    read_adapter,
    read_adapter_config,
    save_adapter,
    write_adapter,
    write_adapter_dir,
)
from loratune.adapters.registry import (
    AdapterEntry,
    active_adapters,
    adapters_of,
    get_entry,
    lora_layers,
    merged_adapters,
    saved_modules,
)
from loratune.adapters.report import ParameterReport, expert_report, parameter_report
from loratune.adapters.surgery import (
    adapter_parameters,
    adapter_strength,
    add_adapter,
    delete_adapter,
    disabled_adapters,
    inject_adapter,
    merge_adapters,
    set_active,
    set_strength,
    set_trainable,
    unload,
    unmerge_adapters,
)
from loratune.adapters.targets import find_targets
from loratune.layers import BASE_ADAPTER

__all__ = [
    "ALL_LINEAR",
    "BASE_ADAPTER",
    "CONFIG_NAME",
    "INT8_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "AdapterEntry",
    "LoraConfig",
    "MixResult",
    "ModulesToSaveWrapper",
    "ParameterReport",
    "active_adapters",
    "adapter_parameters",
    "adapter_slots",
    "adapter_state",
    "adapter_strength",
    "adapter_tensors",
    "adapters_of",
    "add_adapter",
    "attach_adapter",
    "compress_adapter",
    "delete_adapter",
    "disabled_adapters",
    "expert_report",
    "find_targets",
    "get_entry",
    "inject_adapter",
    "load_adapter",
    "load_adapter_state",
    "lora_layers",
    "merge_adapters",
    "merged_adapters",
    "mix_adapter_dirs",
    "mix_adapters",
    "mixed_batch",
    "parameter_report",
    "read_adapter",
    "read_adapter_config",
    "save_adapter",
    "saved_modules",
    "set_active",
    "set_strength",
    "set_trainable",
    "unload",
    "unmerge_adapters",
    "write_adapter",
    "write_adapter_dir",
]
