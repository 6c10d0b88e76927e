"""``LoraConfig``: what to adapt and how, with PEFT's field names and meanings.

The config is immutable: derive a changed copy with ``config.model_copy(update={...})``.
``to_peft_dict`` / ``from_peft_dict`` translate to and from ``adapter_config.json``.
"""

from __future__ import annotations

from typing import Any

from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from loratune.errors import AdapterLoadError, ConfigError
from loratune.layers import INIT_CHOICES, is_residual_start, is_valid_init
from loratune.validation import check_known_keys, one_line_errors

ALL_LINEAR = "all-linear"

# Keys PEFT writes whose non-default values change the math; an adapter using one of them is refused
# rather than silently misread.
_UNSUPPORTED_PEFT_FEATURES = {
    "lora_bias": False,
    "layer_replication": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
}


# PEFT starts that rewrite W0 in ways loratune cannot rebuild on load ("pissa" and "olora" it can: they are
# deterministic; "pissa_niter_N" is random).
_BASE_REWRITING_STARTS = ("pissa_niter_", "corda", "loftq", "lora_ga")


class LoraConfig(BaseModel):
    """Which modules get LoRA adapters and with which rank, scaling, dropout and initialisation.

    Fields and meanings follow PEFT's ``LoraConfig``:

    - ``target_modules``: a list (exact module path or dotted suffix, e.g. ``"q_proj"``), a string (regex
      that must match the whole module path), or ``"all-linear"`` (every Linear/Conv1D except the output head).
    - ``target_parameters``: parameters adapted directly, each named by its full name or a dotted suffix
      (``"mlp.experts.gate_up_proj"``): the 3-D expert stacks of mixture-of-experts models (one low-rank
      update per expert), or a 2-D weight used outside a Linear. Unset, ``"all-linear"`` adapts every fused
      expert stack as well (and the saved config lists them); ``[]`` adapts none.
    - ``exclude_modules``: same forms; matching modules are skipped.
    - ``layers_to_transform`` / ``layers_pattern``: only adapt blocks with these indices (list targets only).
    - ``rank_pattern`` / ``alpha_pattern``: per-module r / alpha; a key is a regex matched against the end
      of the module path at a dot boundary.
    - ``init_lora_weights``: True (A Kaiming-uniform, B zero: starts as the base model), ``"gaussian"``
      (A ~ N(0, 1/r)), ``"pissa"`` (principal singular directions of W0), ``"pissa_niter_N"`` (the same from a
      randomized SVD with N iterations), ``"olora"`` (QR of W0), or False (random B; tests only).
    - ``modules_to_save``: modules trained in full (a private copy per adapter) and saved with the adapter.
    - ``use_dora``: DoRA, weight-decomposed LoRA (a trainable magnitude per output row; see ``layers.dora``).

    Raises ``ConfigError`` on an unknown field (naming the closest valid one) or an invalid value.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    r: int = Field(8, gt=0)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = ALL_LINEAR
    target_parameters: list[str] | None = None
    exclude_modules: str | list[str] | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    modules_to_save: list[str] | None = None
    use_dora: bool = False
    bias: str = "none"
    fan_in_fan_out: bool = False  # accepted for PEFT compatibility; Conv1D layers are detected by type
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    # how modules_to_save names modules: by a plain string suffix in adapters PEFT before 0.22 wrote (read from
    # their peft_version); not a setting, never written out
    _plain_suffix: bool = PrivateAttr(False)

    @property
    def modules_to_save_plain_suffix(self) -> bool:
        """Whether ``modules_to_save`` matches a plain string suffix (an adapter PEFT before 0.22 wrote)."""
        return self._plain_suffix

    def __init__(self, **data: Any):
        check_known_keys(data, type(self).model_fields, "LoraConfig.")
        with one_line_errors("LoraConfig."):
            super().__init__(**data)

    @field_validator("init_lora_weights", mode="before")
    @classmethod
    def _known_init(cls, value):
        if not is_valid_init(value):
            raise ValueError(f"must be one of {', '.join(map(repr, INIT_CHOICES))} (N: a positive integer)")
        return value

    @field_validator("target_parameters")
    @classmethod
    def _parameter_names(cls, value):
        if value is not None and any(not name.strip() for name in value):
            raise ValueError("entries must be parameter names such as 'mlp.experts.gate_up_proj'")
        return value

    @model_validator(mode="after")
    def _something_targeted(self):
        if not self.target_modules and not self.target_parameters:
            raise ValueError(
                "target_modules must name at least one module (or be 'all-linear'), unless target_parameters names "
                "parameters"
            )
        return self

    @model_validator(mode="after")
    def _experts_without_dropout(self):
        if self.target_parameters and self.lora_dropout:
            raise ValueError(
                "lora_dropout must be 0 with target_parameters (dropout cannot apply to a parameter's update, and "
                "PEFT refuses such an adapter); set lora_dropout: 0"
            )
        return self

    @field_validator("bias")
    @classmethod
    def _bias_none(cls, value):
        if value != "none":
            raise ValueError("only 'none' is supported: LoRA here trains no bias terms")
        return value

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _positive_patterns(cls, value):
        for key, number in value.items():
            if number <= 0:
                raise ValueError(f"value for {key!r} must be positive")
        return value

    @model_validator(mode="after")
    def _dora_start(self):
        if self.use_dora and is_residual_start(self.init_lora_weights):
            raise ValueError(
                f"use_dora cannot start from init_lora_weights={self.init_lora_weights!r}; use the default init"
            )
        return self

    @model_validator(mode="after")
    def _layers_need_list_targets(self):
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ValueError("layers_to_transform needs target_modules as a list of names, not a regex string")
        return self

    # --- adapter_config.json ----------------------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content PEFT reads (``peft_type`` LORA, PEFT's key names)."""
        data = self.model_dump()
        data["peft_type"] = "LORA"
        data["target_modules"] = _json_list(self.target_modules) or None  # PEFT's "parameters only"
        data["exclude_modules"] = _json_list(self.exclude_modules)
        data["inference_mode"] = True
        return data

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> LoraConfig:
        """Read a PEFT ``adapter_config.json`` dict; unknown keys are ignored, non-LoRA adapters refused.

        Raises ``AdapterLoadError`` for another PEFT method or a LoRA variant loratune does not implement.
        """
        peft_type = data.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise AdapterLoadError(f"{source}: peft_type is {peft_type!r}; loratune loads LoRA adapters only")
        for key, default in _UNSUPPORTED_PEFT_FEATURES.items():
            if data.get(key, default) not in (default, [], {}):
                raise AdapterLoadError(f"{source}: uses {key}={data[key]!r}, a LoRA variant loratune does not support")
        known = {k: v for k, v in data.items() if k in cls.model_fields}
        if known.get("target_modules") is None and known.get("target_parameters"):
            known["target_modules"] = []  # PEFT: parameters only
        init = known.get("init_lora_weights", True)
        if isinstance(init, str) and init.startswith(_BASE_REWRITING_STARTS):
            raise AdapterLoadError(
                f"{source}: init_lora_weights={init!r} means the adapter expects a base weight rewritten by that "
                "start; save it converted with PEFT (path_initial_model_for_weight_conversion) and load that"
            )
        if not is_valid_init(init):
            known["init_lora_weights"] = True  # other starts (eva, orthogonal, ...) leave W0 alone
        for key in ("rank_pattern", "alpha_pattern"):
            if known.get(key) is None:
                known[key] = {}
        try:
            config = cls(**known)
        except ConfigError as exc:
            raise AdapterLoadError(f"{source}: {exc}") from None
        config._plain_suffix = _written_before(data.get("peft_version"), "0.22")
        return config


def _written_before(version: object, release: str) -> bool:
    """Whether a recorded PEFT version (``"0.21.2"``, ``"0.17.1.dev0"``; None when not recorded, or unreadable:
    taken as current) is older than ``release``."""
    try:
        return version is not None and Version(str(version)) < Version(release)
    except InvalidVersion:
        return False


def _json_list(value):
    # PEFT stores target sets as lists; keep regex strings as they are.
    return sorted(value) if isinstance(value, (list, set, tuple)) else value
