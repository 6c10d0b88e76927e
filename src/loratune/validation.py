"""Config validation shared by every config model: unknown keys name the closest valid key, and pydantic's
multi-line errors become one ``ConfigError`` line that names the offending field."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ValidationError

from loratune.errors import ConfigError

# Names other tools use for our keys; checked before spelling similarity, which would suggest e.g.
# rank_pattern for "rank".
SYNONYMS = {
    "rank": "r",
    "lora_r": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "learning_rate": "lr",
    "gradient_accumulation_steps": "grad_accum",
    "gradient_accumulation": "grad_accum",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "lr_scheduler_type": "scheduler",
    "max_seq_length": "max_length",
    "model_name_or_path": "name",
    "torch_dtype": "dtype",
}


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The valid name closest to ``word`` (a known synonym first, then spelling), or None."""
    choices = list(choices)
    if SYNONYMS.get(word) in choices:
        return SYNONYMS[word]
    found = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return found[0] if found else None


def check_known_keys(data: Mapping, valid: Iterable[str], where: str) -> None:
    """Raise ``ConfigError`` for the first key of ``data`` that is not in ``valid``, suggesting the closest."""
    valid = list(valid)
    for key in data:
        if key not in valid:
            hint = closest(str(key), valid)
            suggestion = f"; did you mean '{where}{hint}'?" if hint else f"; valid keys: {', '.join(sorted(valid))}"
            raise ConfigError(f"unknown key {quoted(f'{where}{key}')}{suggestion}")


def quoted(text: str) -> str:
    """``text`` in single quotes for a message, escaped (as Python would) when it holds line breaks or other
    characters that do not print, so the message stays one readable line."""
    return f"'{text}'" if text.isprintable() else repr(text)


def validate_model(cls: type[BaseModel], data: Mapping, where: str = "") -> BaseModel:
    """Build ``cls`` from ``data``; unknown keys and invalid values raise a one-line ``ConfigError``.

    ``where`` prefixes field names in messages (e.g. ``"lora."``).
    """
    check_known_keys(data, cls.model_fields, where)
    with one_line_errors(where):
        return cls.model_validate(dict(data))


@contextlib.contextmanager
def one_line_errors(where: str = ""):
    """Inside the block, pydantic's multi-line ``ValidationError`` becomes a one-line ``ConfigError``."""
    try:
        yield
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, where)) from None


def describe_validation_error(exc: ValidationError, where: str = "") -> str:
    """One line for the first problem pydantic found: the field, what is wrong, and the value given."""
    err = exc.errors()[0]
    loc = ".".join(str(part) for part in err["loc"] if not str(part).startswith("function-"))
    field = f"{where}{loc}" if loc else where.rstrip(".") or "config"
    msg = err["msg"].removeprefix("Value error, ")
    given = err.get("input")
    shown = "" if isinstance(given, Mapping) else f" (got {given!r})"
    return f"{field}: {msg}{shown}"
