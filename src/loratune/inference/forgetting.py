"""Forgetting: how much a fine-tune raises the loss on text standing for what the base model already knows.

``data.retain`` names that text (any data file; ``builtin``: answers smollm2-135m itself generated to 150
everyday instructions, shipped with loratune, see ``scripts/make_retain_data.py``). Its loss is measured on the
base before the first step, at every evaluation and at the end; ``forgetting = retain_loss − retain_loss_base``
(positive: the model got worse at it).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from loratune.data import TokenizedExample, build_dataset
from loratune.errors import ConfigError
from loratune.inference.evaluate import evaluate_loss

BUILTIN = "builtin"
BUILTIN_FILE = "smollm2-135m.jsonl"


def builtin_retain_path() -> Path:
    """The built-in retain set's file (inside the installed package)."""
    return Path(str(resources.files("loratune.data").joinpath("retain", BUILTIN_FILE)))


def retain_examples(source: str, tokenizer, max_length: int) -> list[TokenizedExample]:
    """The tokenized rows of the retain set ``source`` (a data file, or ``"builtin"``); the loss counts what a
    training run would (assistant turns of chats, completions, whole texts). Raises ``ConfigError`` when it
    has no usable row."""
    path = builtin_retain_path() if source == BUILTIN else Path(source)
    examples, _ = build_dataset(path, tokenizer, max_length=max_length)
    if not examples:
        raise ConfigError(f"data.retain: no usable rows in {path}")
    return examples


def retain_loss(model, examples: list[TokenizedExample], pad_id: int, batch_size: int) -> float:
    """The mean loss per target token of ``model`` on the retain examples."""
    loss, _ = evaluate_loss(model, examples, pad_id, batch_size=batch_size)
    return loss


def retention(model, tokenizer, source: str, max_length: int, batch_size: int) -> dict:
    """The retain set's loss with the model's active adapters (``retain_loss``) and without them
    (``retain_loss_base``), and ``forgetting`` = their difference; the last two are None without an adapter."""
    from loratune.adapters import active_adapters, disabled_adapters

    examples = retain_examples(source, tokenizer, max_length)
    adapted = retain_loss(model, examples, tokenizer.pad_token_id, batch_size)
    if not active_adapters(model):
        return {"retain_loss": adapted, "retain_loss_base": None, "forgetting": None}
    with disabled_adapters(model):
        base = retain_loss(model, examples, tokenizer.pad_token_id, batch_size)
    return {"retain_loss": adapted, "retain_loss_base": base, "forgetting": adapted - base}
