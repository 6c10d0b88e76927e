"""The training config: one YAML file, validated, with ``--set KEY=VALUE`` overrides.

Sections ``model``, ``lora`` (every ``LoraConfig`` field), ``data``, ``train``, ``intrinsic``, ``dpo`` and
``grpo``, plus ``output_dir``.
An unknown key is an error naming the closest valid key; an invalid value names its dotted path.
Relative data paths are looked up from the working directory first, then from the config file's directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loratune.adapters import LoraConfig
from loratune.errors import ConfigError
from loratune.models.quantized import DEFAULT_UNQUANTIZED
from loratune.validation import check_known_keys, validate_model

DATA_FORMATS = ("auto", "text", "prompt_completion", "alpaca", "messages", "sharegpt")
TASKS = ("causal_lm", "seq_cls", "token_cls")
# what a run is trained to do (train.objective): sft learns its data's target tokens, dpo preference pairs, grpo
# from rewards of its own sampled completions
OBJECTIVES = ("sft", "dpo", "grpo")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
# GRPO's losses and reward scalings, by TRL's names (GRPOConfig.loss_type, scale_rewards)
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
GRPO_SCALE_REWARDS = ("group", "batch", "none")
# the evaluation metric a GRPO run can keep its best adapter by: the held-out prompts' mean reward
GRPO_BEST_METRICS = ("eval_reward",)
# DPO's losses, by TRL's names (DPOConfig.loss_type)
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
# the evaluation metrics a DPO run can keep its best adapter by (eval_loss too)
DPO_BEST_METRICS = ("eval_rewards/accuracies", "eval_rewards/margins")
BEST_METRICS = (
    "eval_loss",
    "eval_exact_match",
    "eval_accuracy",
    "eval_macro_f1",
    "eval_mcc",
    "eval_pearson",
    "eval_spearman",
    *DPO_BEST_METRICS,
    *GRPO_BEST_METRICS,
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    name: str = "smollm2-135m"
    quantize: Literal["nf4", "fp4"] | None = None
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    # 4-bit options (used when quantize is set): see loratune.models.quantized
    double_quant: bool = True  # quantize the per-block scales too (~0.37 bits/parameter less)
    compute_dtype: str = "auto"  # dtype of the dequantized weights and matmuls; auto: bf16 where supported
    unquantized_modules: list[str] = list(DEFAULT_UNQUANTIZED)  # keywords and/or Linear module names


class DataSection(_Section):
    train: str
    eval: str | None = None
    eval_split: float = Field(0.0, ge=0.0, lt=1.0)
    format: Literal[DATA_FORMATS] = "auto"
    max_length: int = Field(512, gt=0)
    truncation: Literal["truncate", "drop"] = "truncate"
    train_on_prompt: bool = False
    packing: bool = False
    eval_max_examples: int | None = Field(None, gt=0)  # cap on eval rows (exact match generates text)
    retain: str | None = None  # a data file (or "builtin") whose loss measures forgetting (train.forgetting)


class TrainSection(_Section):
    # sft: the data's target tokens; dpo: preference pairs (DPOSection); grpo: rewards of its samples (GRPOSection)
    objective: Literal[OBJECTIVES] = "sft"
    # full: every weight (or full_modules); bitfit: the biases (and full_modules); intrinsic: see below
    method: Literal["lora", "full", "bitfit", "intrinsic"] = "lora"
    init_adapter: str | None = None  # a PEFT adapter directory whose adapter this run trains further (method lora)
    full_modules: list[str] | None = None  # with method full: module names or dotted suffixes that train
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2.0e-4, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    # adamw: torch's; adamw_8bit: bitsandbytes' AdamW with 8-bit states; paged_adamw_8bit: also paged (CUDA only)
    optimizer: Literal[OPTIMIZERS] = "adamw"
    loraplus_lr_ratio: float | None = Field(None, gt=0)  # LoRA+: B's lr = ratio × lr (see train/optimizer.py)
    loraplus_lr_embedding: float = Field(1e-6, gt=0)  # LoRA+: the lr of adapted embeddings' factors (PEFT's default)
    max_grad_norm: float | None = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    # mixture-of-experts layers keep only their input for backward and run again there (see train.recipe)
    recompute_experts: bool = True
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"  # with several processes; auto: ddp (see train.distributed)
    seed: int = 0
    save_every: int = Field(200, gt=0)
    keep_checkpoints: int = Field(3, gt=0)
    eval_every: int | None = Field(None, gt=0)
    best_metric: Literal[BEST_METRICS] | None = None
    log_every: int = Field(10, gt=0)
    eval_batch_size: int = Field(32, gt=0)
    eval_max_new_tokens: int = Field(32, gt=0)
    exact_match: bool = True  # generate and score exact match when the eval data has references
    tensorboard: bool = False

    @field_validator("best_metric")
    @classmethod
    def _best_needs_eval(cls, value, info):
        if value is not None and info.data.get("eval_every") is None:
            raise ValueError("best_metric needs train.eval_every (how often to evaluate)")
        return value


class IntrinsicSection(_Section):
    """``train.method: intrinsic``: ``dim`` trained numbers projected into the ``targets`` (``all``: every
    parameter; ``all-linear`` or chosen Linear layers: their weights), SAID's λ among them (train.intrinsic)."""

    dim: int | None = Field(None, gt=0)
    said: bool = True  # SAID: one trained scalar per target tensor, counted inside dim
    targets: str | list[str] = "all"
    seed: int | None = None  # of the projection; default: train.seed


class DPOSection(_Section):
    """``train.objective: dpo``: Direct Preference Optimization, with TRL's names and meanings (``DPOConfig``).

    ``beta``: how far the policy may move from the reference (larger: closer); for ``ipo`` the regularisation τ.
    ``loss_type``: ``sigmoid`` (DPO), ``ipo`` (IPO, on length-averaged log-ratios as TRL computes it) or ``hinge``
    (SLiC). ``reference``: ``base`` (the base model: the trained adapter disabled, no second copy of the weights) or
    an adapter directory (e.g. the SFT adapter the run starts from, ``train.init_adapter``), loaded frozen."""

    beta: float = Field(0.1, gt=0)
    loss_type: Literal[DPO_LOSS_TYPES] = "sigmoid"
    reference: str = "base"


class GRPOSection(_Section):
    """``train.objective: grpo``: Group Relative Policy Optimization, with TRL's names, defaults and meanings
    (``GRPOConfig``; ``group_size`` is its ``num_generations``, ``max_new_tokens`` its ``max_completion_length``).

    Each prompt gets ``group_size`` completions sampled at ``temperature`` / ``top_p`` / ``top_k`` (0: off) from the
    model being trained; ``rewards`` score them — ``"path/to/file.py:function"`` with TRL's signature
    ``f(prompts, completions, **columns) -> list[float | None]`` or a built-in (``exact_match`` against an ``answer``
    column, ``regex:PATTERN``, ``json_valid``) — summed with ``reward_weights`` (default 1 each). ``beta``: the weight
    of the KL to the base (the adapter disabled; 0: none). ``epsilon`` / ``epsilon_high`` (default ``epsilon``): the
    clip range of the probability ratio. ``loss_type``: ``grpo``, ``dr_grpo`` or ``dapo``; ``scale_rewards``:
    ``group``, ``batch`` or ``none``. One generation serves ``steps_per_generation`` micro-batches (default:
    ``train.grad_accum``, one optimizer step), each ``num_iterations`` times. ``mask_truncated_completions``:
    completions cut by ``max_new_tokens`` are left out of the loss."""

    group_size: int = Field(8, ge=2)
    max_new_tokens: int = Field(512, gt=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    beta: float = Field(0.0, ge=0)
    epsilon: float = Field(0.2, gt=0)
    epsilon_high: float | None = Field(None, gt=0)
    loss_type: Literal[GRPO_LOSS_TYPES] = "dapo"
    scale_rewards: Literal[GRPO_SCALE_REWARDS] = "group"
    steps_per_generation: int | None = Field(None, gt=0)
    num_iterations: int = Field(1, gt=0)
    mask_truncated_completions: bool = False
    rewards: list[str] = ["exact_match"]
    reward_weights: list[float] | None = None

    @model_validator(mode="after")
    def _weights_fit(self):
        if not self.rewards:
            raise ValueError("grpo.rewards: give at least one reward function")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(
                f"grpo.reward_weights has {len(self.reward_weights)} weights for {len(self.rewards)} rewards; "
                "give one per reward"
            )
        return self


class TrainConfig(_Section):
    """The whole run: what to load, how to adapt it, what data, how to train, and where to write. ``task``:
    ``causal_lm`` (a language model learns to continue text), ``seq_cls`` (a classification head learns a label
    per row) or ``token_cls`` (a tag per word); by default ``seq_cls`` when the training rows have a ``label``,
    ``token_cls`` when they have ``tokens`` and ``tags``, else ``causal_lm``."""

    task: Literal[TASKS] | None = None

    model: ModelSection = ModelSection()
    lora: LoraConfig = LoraConfig()
    data: DataSection
    train: TrainSection = TrainSection()
    intrinsic: IntrinsicSection = IntrinsicSection()
    dpo: DPOSection = DPOSection()
    grpo: GRPOSection = GRPOSection()
    output_dir: str
    meta: dict[str, Any] | None = None  # written by loratune into a run's config.yaml; ignored on input

    @model_validator(mode="after")
    def _method_fits(self):
        method = self.train.method
        if method != "lora" and self.model.quantize is not None:
            raise ValueError(
                f"train.method: {method} changes the base weights, which a {self.model.quantize} base "
                "stores in 4 bits and cannot update; set model.quantize: null, or train LoRA over it"
            )
        if method != "lora" and self.train.loraplus_lr_ratio is not None:
            raise ValueError(
                f"train.loraplus_lr_ratio sets the lr of LoRA's B factors; with train.method: {method} "
                "there are none, so remove it"
            )
        if method == "intrinsic" and self.intrinsic.dim is None:
            raise ValueError("train.method: intrinsic needs intrinsic.dim (how many parameters train), e.g. 1000")
        if self.train.distributed == "fsdp" and method == "intrinsic":
            raise ValueError(
                "train.distributed: fsdp shards the base's weights, and train.method: intrinsic adds a "
                "projection into all of them to each forward; use train.distributed: ddp"
            )
        if method not in ("full", "bitfit") and self.train.full_modules is not None:
            raise ValueError("train.full_modules applies to train.method: full or bitfit; remove it or set the method")
        if self.train.distributed == "fsdp" and method == "bitfit":
            raise ValueError(
                "train.distributed: fsdp shards the trained weights whole; BitFit trains only their biases, "
                "so use train.distributed: ddp"
            )
        if self.train.init_adapter is not None:
            if method != "lora":
                raise ValueError(
                    f"train.init_adapter continues training an adapter; train.method: {method} trains no adapter"
                )
            if self.lora != LoraConfig():
                raise ValueError(
                    "train.init_adapter trains that adapter on with its own LoRA settings (its adapter_config.json); "
                    "remove the lora section"
                )
        return self

    @model_validator(mode="after")
    def _objective_fits(self):
        objective, best = self.train.objective, self.train.best_metric
        if objective != "dpo" and self.dpo != DPOSection():
            raise ValueError(f"the dpo section applies to train.objective: dpo (this run's is {objective})")
        if objective != "dpo" and best in DPO_BEST_METRICS:
            raise ValueError(f"train.best_metric: {best} is a DPO metric; this run's train.objective is {objective}")
        if objective != "grpo" and self.grpo != GRPOSection():
            raise ValueError(f"the grpo section applies to train.objective: grpo (this run's is {objective})")
        if objective != "grpo" and best in GRPO_BEST_METRICS:
            raise ValueError(f"train.best_metric: {best} is a GRPO metric; this run's train.objective is {objective}")
        if objective in ("dpo", "grpo"):
            if self.train.method != "lora":
                raise ValueError(
                    f"train.objective: {objective} trains an adapter against the model without it; "
                    f"train.method: {self.train.method} has no adapter to turn off, so use train.method: lora"
                )
            if self.task not in (None, "causal_lm"):
                raise ValueError(
                    f"train.objective: {objective} trains a language model; task: {self.task} is a classifier"
                )
        if objective == "grpo":
            if self.train.distributed == "fsdp":
                raise ValueError(
                    "train.objective: grpo generates on each process alone, and train.distributed: fsdp runs every "
                    "forward on all of them together; use train.distributed: ddp"
                )
            if best not in (None, *GRPO_BEST_METRICS):
                raise ValueError(f"train.best_metric: {best} is not measured by a GRPO run; use eval_reward")
        if objective == "dpo" and best not in (None, "eval_loss", *DPO_BEST_METRICS):
            raise ValueError(
                f"train.best_metric: {best} is not measured by a DPO run; use eval_loss or "
                + " or ".join(DPO_BEST_METRICS)
            )
        return self

    def to_yaml_dict(self) -> dict[str, Any]:
        """Plain data for ``config.yaml`` (every default spelled out)."""
        return self.model_dump(mode="json", exclude_none=False)


_SECTIONS = {
    "model": ModelSection,
    "lora": LoraConfig,
    "data": DataSection,
    "train": TrainSection,
    "intrinsic": IntrinsicSection,
    "dpo": DPOSection,
    "grpo": GRPOSection,
}
_TOP_KEYS = [*_SECTIONS, "task", "output_dir", "meta"]


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-3"`` → (["train", "lr"], 0.001): the value is parsed as a YAML scalar."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """A copy of ``data`` with each ``KEY=VALUE`` (dotted key) set; unknown keys are caught by validation."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: Path) -> dict:
    """The mapping in YAML file ``path``; ``ConfigError`` with file and line for a syntax error."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give the YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the config as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = str(getattr(exc, "problem", None) or exc).strip().splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML ({problem})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with sections model, lora, data, train")
    return data


def validate_config(data: dict, *, default_output_dir: str) -> TrainConfig:
    """Build a ``TrainConfig`` from plain data; one-line ``ConfigError`` naming the dotted key on failure."""
    check_known_keys(data, _TOP_KEYS, "")
    for section, cls in _SECTIONS.items():
        value = data.get(section)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {value!r}")
        check_known_keys(value, cls.model_fields, f"{section}.")
    if "data" not in data or "train" not in (data.get("data") or {}):
        raise ConfigError("data.train is required: the training data file (JSONL, JSON, CSV or Parquet)")
    data = {"output_dir": default_output_dir, **data}
    if isinstance(data.get("lora"), dict):
        try:
            data["lora"] = LoraConfig(**data["lora"])
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("LoraConfig.", "lora.", 1)) from None
    return validate_model(TrainConfig, data)


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read, override and validate the YAML config at ``path``; resolve relative data paths.

    ``output_dir`` defaults to ``runs/<config file stem>``.
    """
    path = Path(path)
    data = apply_overrides(read_yaml(path), overrides or [])
    config = validate_config(data, default_output_dir=f"runs/{path.stem}")
    return resolve_data_paths(config, path.parent)


def resolved_task(config: TrainConfig) -> str:
    """``config.task``, or the task its training data asks for: ``seq_cls`` when the first row has a
    ``label`` column, ``token_cls`` when it has ``tokens`` and ``tags`` (or ``ner_tags``), else ``causal_lm``."""
    if config.task is not None:
        return config.task
    from loratune.data.readers import read_rows

    first = next(iter(read_rows(config.data.train)))[1]
    if "tokens" in first and ("tags" in first or "ner_tags" in first):
        return "token_cls"
    return "seq_cls" if "label" in first else "causal_lm"


def resolve_data_paths(config: TrainConfig, config_dir: Path) -> TrainConfig:
    """Make data paths absolute: relative to the working directory if the file is there, else to
    ``config_dir``. ``ConfigError`` when a named data file exists in neither place."""
    config = _resolve_adapter_paths(config, config_dir)
    updates = {}
    for key in ("train", "eval", "retain"):
        value = getattr(config.data, key)
        if value is None or (key == "retain" and value == "builtin"):
            continue
        candidates = [Path(value)] if Path(value).is_absolute() else [Path(value), config_dir / value]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            directory = next((c for c in candidates if c.is_dir()), None)
            if directory is not None:
                raise ConfigError(
                    f"data.{key}: {directory} is a directory; give one data file in it "
                    "(.jsonl, .json, .csv, .tsv or .parquet)"
                )
            raise ConfigError(f"data.{key}: file {value!r} not found (looked in {', '.join(map(str, candidates))})")
        updates[key] = str(found.resolve())
    return config.model_copy(update={"data": config.data.model_copy(update=updates)})


def _resolve_adapter_paths(config: TrainConfig, config_dir: Path) -> TrainConfig:
    """Make ``train.init_adapter`` and an adapter ``dpo.reference`` absolute, found as data paths are (the working
    directory first, then ``config_dir``); ``ConfigError`` when the directory exists in neither place."""

    def found(key: str, value: str) -> str:
        candidates = [Path(value)] if Path(value).is_absolute() else [Path(value), config_dir / value]
        directory = next((c for c in candidates if c.is_dir()), None)
        if directory is None:
            raise ConfigError(
                f"{key}: adapter directory {value!r} not found (looked in {', '.join(map(str, candidates))})"
            )
        return str(directory.resolve())

    if config.train.init_adapter is not None:
        train = config.train.model_copy(update={"init_adapter": found("train.init_adapter", config.train.init_adapter)})
        config = config.model_copy(update={"train": train})
    rewards = [_resolved_reward(spec, config_dir) for spec in config.grpo.rewards]
    if rewards != config.grpo.rewards:
        config = config.model_copy(update={"grpo": config.grpo.model_copy(update={"rewards": rewards})})
    if config.dpo.reference != "base":
        dpo = config.dpo.model_copy(update={"reference": found("dpo.reference", config.dpo.reference)})
        config = config.model_copy(update={"dpo": dpo})
    return config


def _resolved_reward(spec: str, config_dir: Path) -> str:
    """A ``grpo.rewards`` entry with its file made absolute when found beside the config (not in the working
    directory); built-ins and files not found as they are stay (the reward loader names what is missing)."""
    file, sep, name = spec.rpartition(":")
    if not sep or not file.endswith(".py") or Path(file).is_absolute() or Path(file).is_file():
        return spec
    beside = config_dir / file
    return f"{beside.resolve()}:{name}" if beside.is_file() else spec
