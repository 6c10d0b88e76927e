"""Greedy generation for evaluation (batched, left-padded), exact match, and streaming for the terminal.

One decoding loop with a KV cache serves both: ``generate_greedy`` runs it on batches of prompts sorted by
length (less padding), ``stream_greedy`` on one prompt, handing each new piece of text to a callback.
Prompts are token ids, already formatted (chat template or raw) by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch

from loratune.adapters.mixed_batch import mixed_batch
from loratune.errors import ConfigError
from loratune.inference.block_step import decode_logits
from loratune.inference.lean import decoding_kernels
from loratune.inference.sampling import argmax, check_sampling, sampler
from loratune.models.devices import model_device

END_OF_TURN = "<|im_end|>"  # ChatML's end-of-turn token (SmolLM2, Qwen, ...)


def stop_token_ids(model, tokenizer) -> set[int]:
    """Token ids that end a completion: the tokenizer's EOS, ``<|im_end|>`` when the vocabulary has it, and
    every id in ``model.generation_config.eos_token_id`` (an int or a list)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    if configured is not None:
        ids.update(int(i) for i in ([configured] if isinstance(configured, int) else configured))
    return ids


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction (0..1) of predictions equal to their reference after stripping surrounding whitespace.

    Returns 0.0 for empty inputs. Raises ValueError when the two lists differ in length.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return 0.0
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(predictions)


def generate_greedy(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 32,
    stop_ids: set[int] | None = None,
    adapter_names: Sequence[str] | None = None,
) -> list[str]:
    """Greedy completions of many prompts (lists of token ids), in the order given.

    ``adapter_names`` (one per prompt; ``"__base__"`` for none) runs each prompt with its own adapter, in
    mixed batches (see ``loratune.adapters.mixed_batch``); by default the active adapters act on every prompt.

    Prompts are sorted by length and run in batches of ``batch_size`` with left padding and an attention
    mask; each row stops at its first stop token (default: ``stop_token_ids(model, tokenizer)``) or after
    ``max_new_tokens``. The result for each prompt is the same as generating it alone. Returns the decoded
    completions with special tokens skipped (the stop token is not part of them).
    Raises ``ConfigError`` for an empty prompt, ``max_new_tokens < 0``, ``batch_size < 1``, and
    ``adapter_names`` of the wrong length or naming an unknown adapter.
    """
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise ConfigError(f"{len(adapter_names)} adapter names for {len(prompts)} prompts; give one per prompt")
    if max_new_tokens < 0 or batch_size < 1:
        raise ConfigError(f"need max_new_tokens >= 0 and batch_size >= 1, got {max_new_tokens} and {batch_size}")
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    stops = stop_token_ids(model, tokenizer) if stop_ids is None else set(stop_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops, default=0)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[str] = [""] * len(prompts)
    with inference(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            input_ids, attention_mask = _left_pad([prompts[i] for i in rows], pad_id, model_device(model))
            routing = mixed_batch(model, [adapter_names[i] for i in rows]) if adapter_names else nullcontext()
            with routing:
                generated = _greedy_rows(model, input_ids, attention_mask, max_new_tokens, stops)
            for i, ids in zip(rows, generated):
                results[i] = tokenizer.decode(ids, skip_special_tokens=True)
    return results


def _greedy_rows(model, input_ids, attention_mask, max_new_tokens: int, stops: set[int]) -> list[list[int]]:
    """The new token ids of each row, up to its first stop token (excluded) or the length limit."""
    generated: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for next_ids in _decode(model, input_ids, attention_mask, max_new_tokens, argmax):
        for j, token in enumerate(next_ids.tolist()):
            if done[j]:
                continue
            if token in stops:
                done[j] = True
            else:
                generated[j].append(token)
        if bool(done.all()):
            break
    return generated


def stream_greedy(
    model,
    tokenizer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    on_text: Callable[[str], None],
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    stop_ids: set[int] | None = None,
    generator: torch.Generator | None = None,
) -> str:
    """Generate from one prompt, calling ``on_text`` with each new piece of decoded text as it appears.

    Greedy when ``temperature`` is None or 0; a positive ``temperature`` samples from the softmax at that
    temperature, restricted to the ``top_k`` most likely tokens and/or the smallest set with probability
    ``top_p`` (``generator`` makes sampling reproducible). Stops at a stop token (not emitted) or after
    ``max_new_tokens``. Text is emitted only once it decodes cleanly, so a character split across tokens is
    never printed half-way. Returns the whole completion (special tokens skipped).
    Raises ``ConfigError`` for an empty prompt, a negative ``max_new_tokens`` and any sampling option that
    cannot mean anything: a negative or non-finite temperature, top_p outside (0, 1], top_k below 1, or
    top_p/top_k with greedy decoding.
    """
    check_sampling(temperature, top_p, top_k)
    if len(prompt_ids) == 0:
        raise ConfigError("the prompt needs at least one token")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be 0 or more, got {max_new_tokens}")
    stops = stop_token_ids(model, tokenizer) if stop_ids is None else set(stop_ids)
    pick = argmax if not temperature else sampler(temperature, top_p, top_k, generator)
    input_ids = torch.tensor([list(prompt_ids)], device=model_device(model))
    attention_mask = torch.ones_like(input_ids)
    generated: list[int] = []
    emitted = ""
    with inference(model):
        for next_ids in _decode(model, input_ids, attention_mask, max_new_tokens, pick):
            token = int(next_ids[0])
            if token in stops:
                break
            generated.append(token)
            text = tokenizer.decode(generated, skip_special_tokens=True)
            # An incomplete UTF-8 sequence decodes to U+FFFD; wait for the token that completes it.
            if len(text) > len(emitted) and not text.endswith("\ufffd") and text.startswith(emitted):
                on_text(text[len(emitted) :])
                emitted = text
    text = tokenizer.decode(generated, skip_special_tokens=True)
    if text != emitted and text.startswith(emitted):
        on_text(text[len(emitted) :])
    return text


# --- the decoding loop ------------------------------------------------------------------------------------


def _decode(
    model,
    input_ids: torch.Tensor,  # (B, L) left-padded
    attention_mask: torch.Tensor,  # (B, L) 1 = real token
    max_new_tokens: int,
    pick: Callable[[torch.Tensor], torch.Tensor],  # (B, vocab) logits -> (B,) token ids
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, step by step, reusing the KV cache; the caller decides when to stop."""
    if max_new_tokens == 0:
        return
    # Positions count real tokens only, so a left-padded row sees the same positions as when run alone.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,  # only the last position's logits: (B, 1, vocab) instead of (B, L, vocab)
    )
    cache, logits = out.cache, out.logits[:, -1, :]
    position = position_ids[:, -1:]
    for step in range(max_new_tokens):
        next_ids = pick(logits.float())
        yield next_ids.cpu()
        if step + 1 == max_new_tokens:
            return
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=-1)
        position = position + 1
        room = max_new_tokens - step - 2  # the columns the steps after this one append
        logits, cache = decode_logits(model, next_ids[:, None], attention_mask, position, cache, room=room)


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            input_ids[i, width - len(row) :] = torch.as_tensor(list(row), dtype=torch.long)
            attention_mask[i, width - len(row) :] = 1
    return input_ids.to(device), attention_mask.to(device)


@contextmanager
def inference(model):
    """Eval mode (no dropout), no autograd, a contiguous input to the output head and decoding's kernels
    (``inference.lean``) for the duration; restores the model's training flag and removes the hook and the
    kernels afterwards."""
    was_training = model.training
    model.eval()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # With logits_to_keep=1 the head gets hidden[:, -1:, :], a strided view. For a frozen weight, torch's
    # matmul then takes a batched path that copies the whole (B, hidden, vocab) weight: seconds per prefill
    # on a CPU. A contiguous input is folded into one plain matrix product instead.
    hook = head.register_forward_pre_hook(_contiguous_input) if isinstance(head, torch.nn.Module) else None
    try:
        # not inference_mode: tensors a forward caches on the model stay usable in training
        with torch.no_grad(), decoding_kernels(model):
            yield
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)


def _contiguous_input(module, args):
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None
