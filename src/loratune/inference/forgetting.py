"""Forgetting: how much a fine-tune raises the loss on text standing for what the base model already knows.

``data.retain`` names that text (any data file; ``builtin``: answers smollm2-135m itself generated to 150
everyday instructions, shipped with loratune, see ``scripts/make_retain_data.py``). Its loss is measured on the
base before the first step, at every evaluation and at the end; ``forgetting = retain_loss − retain_loss_base``
(positive: the model got worse at it).

A classifier has no language-model loss: for it the retain set is text (``text`` / ``text_pair`` rows, labels
ignored; ``builtin``: the same answers' text), and ``retain_loss`` is how far its encoder's representations of
that text moved from the base's, ``1 − mean cosine similarity`` of the mean-pooled last hidden states
(``representation_drift``): 0 before training, so ``forgetting`` equals it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

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


def retain_texts(source: str) -> list:
    """The retain set ``source`` (a data file of ``text`` rows, or ``"builtin"``) as ``ClassExample`` texts for a
    classifier. Raises ``ConfigError`` / ``DataError`` for a file without usable text."""
    from loratune.data.classification import ClassExample, read_classification
    from loratune.data.readers import read_rows

    if source != BUILTIN:
        return read_classification(source, require_labels=False)
    return [
        ClassExample(" ".join(m["content"] for m in row["messages"]), None, None, location)
        for location, row in read_rows(builtin_retain_path())
    ]


@torch.no_grad()
def encoder_representations(model, rows: list, pad_id: int, batch_size: int) -> torch.Tensor:
    """Each row's mean-pooled last hidden state (float32, rows × hidden) from the classifier ``model``."""
    from loratune.data.classification import collate_classification
    from loratune.models.devices import model_device

    was_training = model.training
    model.eval()
    device = model_device(model)
    out = []
    try:
        for start in range(0, len(rows), batch_size):
            batch = collate_classification(rows[start : start + batch_size], pad_id)
            batch.pop("labels", None)
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden = model(**batch, output_hidden_states=True).hidden_states[-1].float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * mask).sum(1) / mask.sum(1)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def representation_drift(representations: torch.Tensor, base: torch.Tensor) -> float:
    """``1 − mean cosine similarity`` between rows of ``representations`` and ``base`` (0: unchanged)."""
    return float(1 - torch.nn.functional.cosine_similarity(representations, base, dim=1).mean())


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
