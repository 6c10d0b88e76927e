"""``load_model``: turn a model name (alias, ``.gguf`` file or local Hugging Face directory) into a
ready-to-use ``(model, tokenizer)`` pair."""

from __future__ import annotations

from pathlib import Path

import torch

from loratune.errors import ConfigError, LoratuneError, ModelNotFoundError
from loratune.memory import release_freed_memory
from loratune.models.aliases import alias_gguf_path, alias_names, get_alias
from loratune.models.aligned import align_weights
from loratune.models.devices import resolve_device, resolve_dtype
from loratune.models.gguf_cache import cached_hf_dir, gguf_cache_dir
from loratune.models.quantized import DEFAULT_UNQUANTIZED, stored_in_4bit
from loratune.models.streamed import load_streamed
from loratune.quant import QuantSpec, checkpoint_files

QUANTIZE_CHOICES = (None, "nf4", "fp4")


def hf_name_for(name: str | Path) -> str:
    """Return the name adapters record as ``base_model_name_or_path`` for a model loaded as ``name``.

    For an alias this is its Hugging Face id (``smollm2-135m`` -> ``HuggingFaceTB/SmolLM2-135M-Instruct``);
    for anything else it is ``name`` exactly as given.
    """
    alias = get_alias(str(name))
    return alias.hf_id if alias is not None else str(name)


def load_model(
    name: str | Path,
    quantize: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    *,
    double_quant: bool = True,
    compute_dtype: str | torch.dtype | None = None,
    unquantized_modules=DEFAULT_UNQUANTIZED,
    on_block=None,
):
    """Load a causal language model and its tokenizer; return ``(model, tokenizer)``.

    ``name`` is an alias (see ``loratune.models.aliases``), a ``.gguf`` file (converted once into the cache,
    see ``gguf_cache``) or a local Hugging Face model directory containing ``config.json``. Nothing is
    downloaded. ``dtype`` and ``device`` accept "auto"/None (see ``resolve_dtype``, ``resolve_device``).

    The model is returned in eval mode on ``device``, with ``config._name_or_path`` and ``name_or_path``
    set to ``hf_name_for(name)``. The tokenizer always has a pad token (its EOS token when it had none).

    ``quantize`` "nf4"/"fp4" stores the Linear layers in 4 bits (blocks of 64; ``double_quant`` quantizes the
    block scales too) except ``unquantized_modules`` (see ``models.quantized``); ``"auto"``: in 4 bits when the
    model directory stores them so, at their format. They compute in
    ``compute_dtype`` ("auto"/None: bf16 where supported, else fp32). The safetensors weights are then read
    tensor by tensor, never holding the full-precision model. A ``.gguf`` base is first converted once into
    the cache through transformers, which holds that whole model in memory (fine for small models).

    ``on_block`` (FSDP2 sharding): the safetensors weights are streamed the same way, in any dtype, and each
    transformer block is given to ``on_block`` as soon as it is complete (see ``models.streamed``); a checkpoint
    without safetensors files is loaded whole instead.

    Raises ``ModelNotFoundError`` when ``name`` cannot be found or read, ``ConfigError`` for an invalid
    ``quantize``/``dtype``/``device`` or a weight that cannot be quantized, and ``LoratuneError`` when a
    checkpoint does not match its config in 4-bit loading.
    """
    from transformers import AutoModelForCausalLM  # slow import; only needed here

    if quantize != "auto":
        check_quantize(quantize)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    model_dir = resolve_model_dir(name)

    try:
        stored = stored_in_4bit(model_dir)
        if quantize == "auto":  # as the model is stored: 4 bits when it was saved in them
            quantize = stored
        if quantize is None and stored:
            raise ConfigError(f"{name} is stored in 4 bits ({stored}); load it with quantize={stored!r}")
        if quantize is None and on_block is not None and _has_safetensors(model_dir):
            model = load_streamed(
                model_dir, None, torch_dtype, device, trust_remote_code=trust_remote_code, on_block=on_block
            )
        elif quantize is None:
            model = AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype=torch_dtype, trust_remote_code=trust_remote_code, local_files_only=True
            )
        else:
            spec = QuantSpec(quantize.strip().lower(), double_quant, resolve_dtype(compute_dtype, device))
            model = load_streamed(
                model_dir, spec, torch_dtype, device, unquantized_modules, trust_remote_code, on_block
            )
        tokenizer = _tokenizer_from(model_dir, trust_remote_code)
    except LoratuneError:
        raise  # already says what is wrong (e.g. a weight that cannot be quantized)
    except (OSError, ValueError, KeyError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelNotFoundError(f"cannot load model {name!r} from {model_dir}: {message}") from error

    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    # What adapters record as base_model_name_or_path: the hub id for an alias, not our cache path.
    recorded_name = hf_name_for(name)
    model.config._name_or_path = recorded_name
    model.name_or_path = recorded_name  # PEFT reads this one
    tokenizer.name_or_path = recorded_name

    model.to(device)
    if quantize is None and torch.device(device).type == "cpu":  # (weights used in place from the mapped file)
        align_weights(model)
    model.eval()
    release_freed_memory()  # what loading freed (conversions, the checkpoint's reading), or the heap keeps it
    return model, tokenizer


def load_classifier(
    name: str | Path,
    labels,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
):
    """Load model ``name`` with a classification head for ``labels`` (a ``data.classification.LabelSpace``: its
    outputs, names, problem type, and whether it labels sequences or tokens); return ``(model, tokenizer)``.

    transformers' ``AutoModelForSequenceClassification`` (``AutoModelForTokenClassification``) builds the head: kept
    from the checkpoint when it has
    one of that size, else new (drawn from torch's generator: seed first for a reproducible start). Nothing is
    downloaded. Raises ``ConfigError`` when transformers has no classification head for this kind of model,
    ``ModelNotFoundError`` when it cannot be read. ``model.new_head_modules`` names the head's modules the
    checkpoint did not have.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    model_dir = resolve_model_dir(name)
    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code, local_files_only=True)
        auto = AutoModelForTokenClassification if labels.token else AutoModelForSequenceClassification
        what = "token" if labels.token else "sequence"
        if type(config) not in auto._model_mapping:
            raise ConfigError(
                f"transformers has no {what}-classification head for {name} (a {config.model_type} "
                "model); use an encoder (BERT, RoBERTa, DeBERTa, …) or a model type that has one"
            )
        tokenizer = _tokenizer_from(model_dir, trust_remote_code)
        extra = {} if labels.token else {"problem_type": labels.problem_type}
        model, info = auto.from_pretrained(
            str(model_dir),
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            local_files_only=True,
            num_labels=labels.num_labels,
            id2label=labels.id2label,
            output_loading_info=True,
            label2id={v: k for k, v in labels.id2label.items()},
            pad_token_id=tokenizer.pad_token_id,
            **extra,
        )
    except LoratuneError:
        raise
    except (OSError, ValueError, KeyError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelNotFoundError(f"cannot load model {name!r} from {model_dir}: {message}") from error
    recorded_name = hf_name_for(name)
    model.config._name_or_path = recorded_name
    model.name_or_path = recorded_name
    tokenizer.name_or_path = recorded_name
    # the head's modules the checkpoint did not have (new, so a run trains them in full)
    prefix = model.base_model_prefix + "."
    model.new_head_modules = sorted({key.split(".")[0] for key in info["missing_keys"] if not key.startswith(prefix)})
    model.to(device)
    if torch.device(device).type == "cpu":  # (weights used in place from the mapped file)
        align_weights(model)
    model.eval()
    return model, tokenizer


def load_tokenizer(name: str | Path, trust_remote_code: bool = False):
    """The tokenizer of model ``name`` (alias, ``.gguf`` or directory) without loading any weights; it always
    has a pad token (its EOS token when it had none) and records ``hf_name_for(name)`` as its name.

    Raises ``ModelNotFoundError`` when ``name`` cannot be found or its tokenizer cannot be read.
    """
    model_dir = resolve_model_dir(name)
    try:
        tokenizer = _tokenizer_from(model_dir, trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelNotFoundError(f"cannot load the tokenizer of {name!r} from {model_dir}: {message}") from error
    tokenizer.name_or_path = hf_name_for(name)
    return tokenizer


def _tokenizer_from(model_dir: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(model_dir), trust_remote_code=trust_remote_code, local_files_only=True
    )
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Batching needs a pad token; EOS is the usual choice and the one SmolLM2 itself ships with.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _has_safetensors(model_dir: Path) -> bool:
    try:
        return bool(checkpoint_files(model_dir))
    except ModelNotFoundError:
        return False


def context_length(config) -> int | None:
    """How many positions a model attends over (``max_position_embeddings``, GPT-2's ``n_positions``), from
    its config object or ``config.json`` dict; None when the config does not say."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_quantize(quantize: str | None) -> None:
    """Check a ``quantize`` value (None, "nf4" or "fp4", any case); return None when it is valid.

    Raises ``ConfigError`` listing the valid values for anything else.
    """
    if quantize is None or (isinstance(quantize, str) and quantize.strip().lower() in QUANTIZE_CHOICES):
        return
    valid = ", ".join("null" if choice is None else repr(choice) for choice in QUANTIZE_CHOICES)
    raise ConfigError(f"unknown quantize value {quantize!r}; use one of: {valid}")


def model_sources(name: str | Path) -> list[Path]:
    """The local files and directories a model name reads, without converting anything (for an output guard to
    keep clear of): the directory itself; a ``.gguf`` file and its cache directory; an alias's shipped file and its
    cache directory. Empty for a name that does not exist (loading it then says why)."""
    alias = get_alias(str(name))
    try:
        source = alias_gguf_path(alias) if alias is not None else Path(name).expanduser()
    except ModelNotFoundError:
        return []
    if not source.exists():
        return []
    if source.is_file():
        try:
            return [source, gguf_cache_dir(source)]
        except ModelNotFoundError:
            return [source]
    return [source]


def resolve_model_dir(name: str | Path) -> Path:
    """Return the local Hugging Face model directory that ``name`` stands for.

    An alias or ``.gguf`` file resolves to its cache directory (converting on first use); a directory with
    ``config.json`` resolves to itself.

    Raises ``ModelNotFoundError`` saying what was tried, listing the aliases, when nothing matches.
    """
    alias = get_alias(str(name))
    if alias is not None:
        return cached_hf_dir(alias_gguf_path(alias))

    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {name}; check the path")
        return cached_hf_dir(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"directory {name} has no config.json, so it is not a Hugging Face model directory; "
                "pass the directory that holds config.json and the weights"
            )
        return path
    aliases = ", ".join(alias_names())
    hint = ""
    if not path.exists() and str(name).count("/") == 1 and not str(name).startswith(("/", ".", "~")):
        # Looks like a hub id: say plainly that we do not download.
        hint = f"; loratune does not download models, so download {name} to a local directory first and pass that"
    raise ModelNotFoundError(
        f"model {str(name)!r} not found: it is not an alias ({aliases}), a .gguf file or a local "
        f"Hugging Face model directory with config.json{hint}"
    )
