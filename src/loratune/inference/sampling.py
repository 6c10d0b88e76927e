"""Choosing the next token: greedy (the argmax) or sampled from ``softmax(logits / temperature)``, restricted to the
``top_k`` most likely tokens and to the smallest set reaching ``top_p``; and the check that refuses options that
cannot mean anything."""

from __future__ import annotations

import math

import torch

from loratune.errors import ConfigError


def check_sampling(temperature: float | None, top_p: float | None, top_k: int | None) -> None:
    """Raise ``ConfigError`` for sampling options that cannot mean anything (see ``stream_greedy``)."""
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"temperature must be 0 (greedy) or a positive number, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"top_k must be an integer >= 1, got {top_k!r}")
    if not temperature and (top_p is not None or top_k is not None):
        raise ConfigError(
            "top_p and top_k shape sampling, but temperature 0 decodes greedily; give a temperature above 0"
        )


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token id of each row of ``logits`` (B × vocab): greedy decoding."""
    return logits.argmax(dim=-1)


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_p: float | None = None,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of ``logits`` (B × vocab), drawn from ``softmax(logits / temperature)`` restricted to
    the ``top_k`` most likely tokens and then to the smallest set of them whose probability reaches ``top_p``
    (the most likely token always stays). Raises ``ConfigError`` for options that cannot mean anything."""
    check_sampling(temperature, top_p, top_k)
    if not temperature:
        raise ConfigError("temperature 0 is greedy decoding, not sampling; give a temperature above 0")
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        probabilities = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p
        drop_sorted = (probabilities.cumsum(-1) - probabilities) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, sorted_idx, drop_sorted), float("-inf"))
    probs = logits.softmax(-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    # Inverse CDF: one uniform draw per row against the cumulative probabilities (float64, so rounding moves no
    # token's share measurably); torch.multinomial draws an exponential per vocabulary entry instead (about 20×
    # the time per row for a 50k vocabulary). A token of probability 0 is never drawn: its interval is empty.
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1]
    if not bool((total.isfinite() & (total > 0)).all()):
        raise ValueError("the logits are not numbers (NaN or infinite): no token can be sampled from them")
    draw = torch.rand((cdf.shape[0], 1), generator=generator, dtype=torch.float64, device=cdf.device) * total[:, None]
    tokens = torch.searchsorted(cdf, draw, right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)
    return tokens.to(logits.device)


def sampler(temperature: float, top_p: float | None, top_k: int | None, generator: torch.Generator | None):
    """A function from logits (B × vocab) to one sampled token id per row, with these options."""
    return lambda logits: sample_next(logits, temperature, top_p, top_k, generator)
