"""GRPO's loss (``train.objectives.grpo``) judged by TRL's own ``GRPOTrainer``: for fixed prompts, completions,
rewards and old (and reference) log-probabilities, the loss and the adapter's gradients equal TRL's for each loss
type, on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_llama
from loratune.adapters import adapter_slots, load_adapter
from loratune.data.tokenize import IGNORE_INDEX
from loratune.inference.logprobs import target_logprobs
from loratune.train.objectives.grpo import group_advantages, grpo_loss, grpo_token_losses

GROUP, PROMPTS, PROMPT_LEN, COMPLETION_LEN = 4, 2, 5, 7
# TRL 1.x's GRPOConfig sets transformers' deprecated gradient_checkpointing itself; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")


def fixed_batch(vocab: int) -> dict[str, torch.Tensor]:
    """Prompts left-padded and completions right-padded as TRL lays them out, with rewards, and old and reference
    log-probabilities that differ from the policy's enough that some ratios leave the clip range."""
    generator = torch.Generator().manual_seed(0)
    rows = GROUP * PROMPTS
    prompt_ids = torch.randint(4, vocab, (rows, PROMPT_LEN), generator=generator)
    prompt_mask = torch.ones(rows, PROMPT_LEN, dtype=torch.long)
    prompt_mask[::3, :2] = 0  # some prompts shorter (left padding)
    completion_ids = torch.randint(4, vocab, (rows, COMPLETION_LEN), generator=generator)
    lengths = torch.tensor([7, 3, 5, 1, 6, 7, 2, 4])
    completion_mask = (torch.arange(COMPLETION_LEN)[None, :] < lengths[:, None]).long()
    return {
        "prompt_ids": prompt_ids.masked_fill(prompt_mask == 0, 2),
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids.masked_fill(completion_mask == 0, 2),
        "completion_mask": completion_mask,
        "rewards": torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0, 2.0, -1.0, 0.0]),
        "old_noise": torch.randn(rows, COMPLETION_LEN, generator=generator) * 0.3,
        "ref_noise": torch.randn(rows, COMPLETION_LEN, generator=generator) * 0.5,
    }


def trl_grpo(tmp_path, tokenizer, loss_type: str, beta: float, corrected: bool = True):
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to="none",
        use_cpu=True,
        loss_type=loss_type,
        beta=beta,
        epsilon=0.2,
        epsilon_high=0.28,
        num_generations=GROUP,
        per_device_train_batch_size=GROUP * PROMPTS,
        max_completion_length=COMPLETION_LEN,
        use_bias_correction_kl=corrected,
        bf16=False,  # TRL's default autocasts to bf16; the judge runs in float32
    )
    trainer = GRPOTrainer(
        model=build_tiny_llama(len(tokenizer), seed=0),
        reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "Q"}] * 8),
        processing_class=tokenizer,
        peft_config=PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B.default." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    trainer.current_gradient_accumulation_steps = 1  # what TRL's training loop sets before a step
    return trainer


@pytest.mark.parametrize(
    ("loss_type", "beta", "corrected"),
    [("grpo", 0.0, True), ("grpo", 0.04, True), ("grpo", 0.04, False), ("dr_grpo", 0.0, True), ("dapo", 0.04, True)],
)
def test_grpo_loss_and_gradients_equal_trl(tmp_path, tiny_tokenizer, loss_type, beta, corrected):
    fixed = fixed_batch(len(tiny_tokenizer))
    trainer = trl_grpo(tmp_path, tiny_tokenizer, loss_type, beta, corrected)
    trainer.model.save_pretrained(tmp_path / "adapter")
    model = build_tiny_llama(len(tiny_tokenizer), seed=0)
    load_adapter(model, tmp_path / "adapter", "default", trainable=True)
    model.train()

    input_ids = torch.cat([fixed["prompt_ids"], fixed["completion_ids"]], dim=1)
    attention_mask = torch.cat([fixed["prompt_mask"], fixed["completion_mask"]], dim=1)
    scored = torch.cat([torch.zeros_like(fixed["prompt_mask"]), fixed["completion_mask"]], dim=1)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": input_ids.masked_fill(scored == 0, IGNORE_INDEX),
    }
    with torch.no_grad():
        now, _ = target_logprobs(model, batch)
    mask = fixed["completion_mask"].bool()
    dense_now = torch.zeros(mask.shape).masked_scatter(mask, now)
    old = dense_now + fixed["old_noise"]  # fixed old and reference log-probabilities, near the policy's
    ref = dense_now + fixed["ref_noise"]
    advantages, _ = group_advantages(fixed["rewards"], GROUP)

    logps, rows = target_logprobs(model, batch)
    losses = grpo_token_losses(
        logps,
        old[mask],
        advantages[rows],
        epsilon=0.2,
        epsilon_high=0.28,
        beta=beta,
        ref_logps=ref[mask],
        use_bias_correction_kl=corrected,
    )
    loss = grpo_loss(losses, rows, len(advantages), loss_type, max_completion_length=COMPLETION_LEN)
    loss.backward()

    inputs = {
        "prompt_ids": fixed["prompt_ids"],
        "prompt_mask": fixed["prompt_mask"],
        "completion_ids": fixed["completion_ids"],
        "completion_mask": fixed["completion_mask"],
        "advantages": advantages,
        "old_per_token_logps": old,
        "num_items_in_batch": fixed["completion_mask"].sum(),
    }
    if beta:
        inputs["ref_per_token_logps"] = ref
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()
    theirs = {
        name.replace(".default.", "."): param.grad
        for name, param in trainer.model.named_parameters()
        if ".default." in name and param.requires_grad
    }
    ratio = torch.exp(logps.detach() - old[mask])
    assert ((ratio < 0.8) | (ratio > 1.28)).any()  # the clip acts somewhere
    assert float(loss.detach()) == pytest.approx(float(trl_loss.detach()), rel=1e-5, abs=1e-7)
    ours = {key: tensor.grad for key, tensor in adapter_slots(model, "default")}
    assert ours.keys() == theirs.keys() and len(ours) == 28
    for key, grad in theirs.items():
        torch.testing.assert_close(ours[key], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()), msg=key)


def test_advantages_are_centred_per_group_and_scaled_as_asked():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 3.0, 3.0, 3.0, 3.0])
    group, zero_std = group_advantages(rewards, 4)
    assert torch.allclose(group[:4], (rewards[:4] - 0.5) / (rewards[:4].std() + 1e-4))
    assert torch.equal(group[4:], torch.zeros(4))  # a group whose rewards are all equal teaches nothing
    assert zero_std.tolist() == [False] * 4 + [True] * 4
    none, _ = group_advantages(rewards, 4, "none")
    assert torch.equal(none, torch.tensor([0.5, -0.5, 0.5, -0.5, 0, 0, 0, 0]))
    assert torch.allclose(group_advantages(rewards, 4, "batch")[0], none / (rewards.std() + 1e-4))
