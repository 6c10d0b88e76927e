"""What several verbs share: the terminal, loading the model a verb runs (``--model`` with its ``--adapter``s, a
classifier when they carry labels), and fitting ``--max-length`` to the model's context."""

from __future__ import annotations

import warnings
from pathlib import Path

from loratune.cli.options import base_model_for
from loratune.errors import ConfigError

DEFAULT_EVAL_MAX_LENGTH = 512


def console():
    """A rich console for a verb's output (no highlighting of numbers and paths)."""
    from rich.console import Console

    return Console(highlight=False)


def load_for_verb(args):
    """(model, tokenizer, labels): the model ``--model`` names (see ``base_model_for``) with ``args.adapter`` loaded
    at their strengths — a classifier, with its label space as ``labels``, when the adapters (or the model
    directory) carry ``labels.json``; else a causal LM (in 4 bits when asked, or stored so) and None."""
    from loratune.adapters import load_adapter
    from loratune.models.loader import load_classifier, load_model

    name = base_model_for(args)
    labels = classifier_labels(args, name)
    if labels is not None:
        model, tokenizer = load_classifier(name, labels, args.dtype, args.device, args.trust_remote_code)
    else:
        model, tokenizer = load_model(
            name,
            quantize=getattr(args, "quantize", None) or "auto",
            dtype=args.dtype,
            device=args.device,
            trust_remote_code=args.trust_remote_code,
        )
    for path, scale in args.adapter:
        load_adapter(model, path, scale=scale)
    return model, tokenizer, labels


def classifier_labels(args, model_name: str):
    """The label space of the classifier the command runs: from the adapters' ``labels.json`` (they must
    agree), or from the model directory's (a full fine-tune's ``model/``); None for a language model."""
    from loratune.data.classification import read_labels

    found = {str(path): read_labels(path) for path, _ in args.adapter}
    spaces = {space for space in found.values() if space is not None}
    if len(spaces) > 1:
        raise ConfigError("the adapters are classifiers with different labels; give adapters of one task")
    if spaces and None in found.values():
        plain = next(path for path, space in found.items() if space is None)
        raise ConfigError(
            f"adapter {plain} has no labels.json but the others are classifiers; give adapters of one task"
        )
    if spaces:
        return spaces.pop()
    return read_labels(model_name) if Path(model_name).is_dir() else None


def base_context(name: str) -> int | None:
    """The context length of model ``name``, from its config alone."""
    from loratune.models import context_length
    from loratune.models.base_config import base_model_config

    return context_length(base_model_config(name))


def fit_max_length(max_length: int, limit: int | None, what: str) -> int:
    """``max_length`` capped at the model's context ``limit``, with a warning when it is longer."""
    if limit is None or max_length <= limit:
        return max_length
    warnings.warn(
        f"{what} {max_length} is longer than the model's context ({limit} positions); using {limit}", stacklevel=2
    )
    return limit


def eval_max_length(model, requested: int | None) -> int:
    """The row length ``eval`` and ``predict`` use: ``--max-length`` capped at the context, else 512 or the context
    when shorter."""
    from loratune.models import context_length

    limit = context_length(model.config)
    if requested is None:
        return min(DEFAULT_EVAL_MAX_LENGTH, limit or DEFAULT_EVAL_MAX_LENGTH)
    return fit_max_length(requested, limit, "--max-length")


def classifier_rows(space, tokenizer, args, max_length: int, *, labelled: bool):
    """(rows as read, tokenized rows) of ``--data`` for a classifier with label space ``space``."""
    from loratune.data.classification import (
        check_layout,
        read_classification,
        read_token_classification,
        tokenize_classification,
        tokenize_tokens,
    )

    if getattr(args, "retain", None) is not None:
        raise ConfigError("--retain measures forgetting of a language model; it does not apply to a classifier")
    if space.token:
        examples = read_token_classification(args.data, require_labels=labelled)
    else:
        examples = read_classification(args.data, require_labels=labelled)
        check_layout(space, examples, str(args.data))
    if args.max_examples is not None:
        examples = examples[: args.max_examples]
    tokenize = tokenize_tokens if space.token else tokenize_classification
    return examples, tokenize(examples, tokenizer, space if labelled else None, max_length)
