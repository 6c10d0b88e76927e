"""Scoring rows that start with the same prompt (a preference pair, a GRPO group) reads the prompt once
(``inference.shared_prefix``): the same log-probabilities and gradients as scoring each row alone, less work, and
the plain forward wherever sharing would change the result."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import loratune
from conftest import build_tiny_llama
from loratune.data.tokenize import IGNORE_INDEX
from loratune.inference.logprobs import target_logprobs
from loratune.train.attention import patch_attention
from loratune.train.fused_ops import patch_for_training
from tiny_models import VOCAB, tiny_llama_family


def trained_model(build, dropout: float = 0.0):
    """A model as a training run holds it: a LoRA adapter with random B factors on every linear layer, the
    training patches, train mode."""
    model = build()
    loratune.add_adapter(
        model, loratune.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout)
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    patch_for_training(model)
    patch_attention(model)
    return model.train()


def grouped_batch(seed: int = 0, prompt_lengths=(5, 9), per_prompt: int = 3) -> dict[str, torch.Tensor]:
    """Prompts of different lengths, each followed by ``per_prompt`` completions of different lengths (scored),
    right-padded as loratune collates."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length in prompt_lengths:
        prompt = torch.randint(4, VOCAB, (length,), generator=generator).tolist()
        for _ in range(per_prompt):
            size = int(torch.randint(1, 8, (1,), generator=generator))
            rows.append((prompt, torch.randint(4, VOCAB, (size,), generator=generator).tolist()))
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), 2)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        input_ids[i, :n] = torch.tensor(prompt + completion)
        labels[i, len(prompt) : n] = torch.tensor(completion)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def tokens_read(model, run) -> int:
    """How many token positions the model's embedding reads while ``run()`` runs."""
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    try:
        run()
    finally:
        handle.remove()
    return sum(seen)


def scored(model, batch, weights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(Each target's log-probability; the trainable parameters' gradients of their weighted sum)."""
    model.zero_grad()
    logps, _ = target_logprobs(model, batch)
    (logps * weights).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def row_by_row(model, batch, weights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """What ``scored`` gives when every row is scored alone (nothing to share)."""
    model.zero_grad()
    logps = []
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        logps.append(target_logprobs(model, {k: v[i : i + 1, :n] for k, v in batch.items()})[0])
    logps = torch.cat(logps)
    (logps * weights).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


FAMILIES = {
    "llama": lambda: build_tiny_llama(VOCAB, seed=0),
    "qwen3": lambda: tiny_llama_family(Qwen3Config, Qwen3ForCausalLM),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_sharing_a_prompt_read_it_once_with_the_same_logprobs_and_gradients(family):
    model = trained_model(FAMILIES[family])
    batch = grouped_batch()
    targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    weights = torch.randn(targets, generator=torch.Generator().manual_seed(2))

    read = tokens_read(model, lambda: scored(model, batch, weights))
    shared, shared_grads = scored(model, batch, weights)
    alone, alone_grads = row_by_row(model, batch, weights)

    # two prompts (5 and 9 tokens, padded to 9) read once, then every row's completion: not six prompts
    assert read == 2 * 9 + 6 * int((batch["labels"] != IGNORE_INDEX).sum(dim=1).max())
    torch.testing.assert_close(shared, alone, rtol=1e-5, atol=1e-5)
    assert shared_grads.keys() == alone_grads.keys() and len(shared_grads) > 0
    for name, grad in alone_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()), msg=name)


def test_without_gradients_the_shared_prompt_gives_the_same_logprobs():
    model = trained_model(FAMILIES["llama"]).eval()
    batch = grouped_batch(seed=3, prompt_lengths=(4, 4, 6), per_prompt=2)
    with torch.no_grad():
        read = tokens_read(model, lambda: target_logprobs(model, batch))
        shared, rows = target_logprobs(model, batch)
        alone = [target_logprobs(model, {k: v[i : i + 1] for k, v in batch.items()})[0] for i in range(6)]
    assert read < batch["input_ids"].numel()
    torch.testing.assert_close(shared, torch.cat(alone), rtol=1e-5, atol=1e-5)
    assert rows.tolist() == sorted(rows.tolist())  # row-major order, as the plain forward gives


@pytest.mark.parametrize(
    "why",
    ["dropout", "checkpointing", "no prompt shared", "left padding"],
)
def test_the_whole_rows_are_read_where_sharing_would_change_the_result(why):
    model = trained_model(FAMILIES["llama"], dropout=0.1 if why == "dropout" else 0.0)
    batch = grouped_batch()
    if why == "checkpointing":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if why == "no prompt shared":
        batch = grouped_batch(prompt_lengths=(3, 4, 5, 6), per_prompt=1)
    if why == "left padding":
        width = batch["input_ids"].shape[1]
        lengths = batch["attention_mask"].sum(dim=1)
        for key, pad in (("input_ids", 2), ("labels", IGNORE_INDEX), ("attention_mask", 0)):
            batch[key] = torch.stack(
                [torch.cat([torch.full((width - n,), pad), row[:n]]) for row, n in zip(batch[key], lengths.tolist())]
            )
    if why == "dropout":
        torch.manual_seed(0)
    read = tokens_read(model, lambda: target_logprobs(model, batch)[0].sum().backward())
    assert read == batch["input_ids"].numel()
