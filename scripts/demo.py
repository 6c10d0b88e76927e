"""Demo: teach smollm2-135m a tiny task with a LoRA adapter through the Python API, in about a minute on CPU.

The task: answer "What is the secret code of <animal>?" with a made-up code the base model cannot know.
Prints the base model's and the adapted model's answers side by side, then saves the adapter.
"""

from __future__ import annotations

import argparse
import time

import torch

import loratune
from loratune import LoraConfig

CODES = {"cat": "ZX-17", "dog": "QP-42", "owl": "LM-08", "fox": "TR-93", "eel": "BN-55", "yak": "WC-61"}


def chat_ids(tokenizer, question: str, answer: str | None = None) -> tuple[list[int], int]:
    """Token ids of the chat-formatted question (and answer), and where the answer starts."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    if answer is None:
        return prompt, len(prompt)
    answer_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return prompt + answer_ids, len(prompt)


def training_batch(tokenizer):
    rows = [chat_ids(tokenizer, f"What is the secret code of the {a}?", c) for a, c in CODES.items()]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)  # loss only on the answer (and its end-of-turn token)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, start) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, start : len(ids)] = torch.tensor(ids[start:])
        attention[i, : len(ids)] = 1
    return input_ids, attention, labels


@torch.no_grad()
def answer(model, tokenizer, question: str) -> str:
    ids, _ = chat_ids(tokenizer, question)
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="base model: alias, .gguf file or HF directory")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (default: 40)")
    parser.add_argument("--out", default="runs/demo-adapter", help="where to save the adapter")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = loratune.load_model(args.model)
    questions = [f"What is the secret code of the {animal}?" for animal in CODES]
    before = [answer(model, tokenizer, q) for q in questions]

    loratune.add_adapter(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    print(loratune.parameter_report(model))
    input_ids, attention, labels = training_batch(tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == 1:
            print(f"step {step:3d}  loss {loss.item():.4f}  ({time.perf_counter() - start:.1f}s)")
    model.eval()

    after = [answer(model, tokenizer, q) for q in questions]
    print(f"\n{'question':45s} {'expected':8s} {'base':20s} adapted")
    for q, animal, b, a in zip(questions, CODES, before, after):
        print(f"{q:45s} {CODES[animal]:8s} {b[:20]:20s} {a}")
    correct = sum(a == CODES[animal] for animal, a in zip(CODES, after))
    print(f"\nadapted model: {correct}/{len(CODES)} correct (base: {sum(b == CODES[a] for a, b in zip(CODES, before))})")
    path = loratune.save_adapter(model, args.out)
    print(f"adapter saved to {path}")


if __name__ == "__main__":
    main()
