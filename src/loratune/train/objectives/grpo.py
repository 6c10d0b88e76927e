"""GRPO's loss (Group Relative Policy Optimization) with TRL's names and meanings (``GRPOConfig``): the first piece of
``train.objective: grpo``. The objective around it (rollouts from the serving engine on the trained weights, reward
functions with TRL's signature, the run's metrics) is not built yet; this module holds the math it will call.

For G completions o_1..o_G of one prompt with rewards r_i, each completion's advantage is r_i minus the group's mean,
divided by the group's standard deviation (``scale_rewards: group``), the whole batch's (``batch``) or nothing
(``none``). Each completion token t has the ratio w = π(o_t) / π_old(o_t) of its probability under the policy now to
its probability when it was sampled, and the loss

    ℓ_t = −min(w·A, clip(w, 1 − ε_low, 1 + ε_high)·A) + β·w·KL_t,    KL_t = exp(ref − logp) − (ref − logp) − 1

(the KL term to the reference, k3, only when β > 0; times w, TRL's default ``use_bias_correction_kl``, so its
gradient is unbiased for completions sampled from π_old), averaged as ``loss_type`` says:

    grpo      each completion's mean over its tokens, then the mean over completions
    dr_grpo   the sum over every token / (completions × max_completion_length)      (Dr. GRPO: no length bias)
    dapo      the sum over every token / the completion tokens of the whole global batch     (DAPO's token mean)
"""

from __future__ import annotations

import torch

from loratune.errors import ConfigError

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """Each completion's advantage from ``rewards`` (one per completion, groups of ``group_size`` consecutive
    completions of one prompt), as TRL computes it (its standard deviation unbiased, plus 1e-4 before dividing).
    Raises ``ConfigError`` for an unknown ``scale_rewards``."""
    if scale_rewards not in SCALE_REWARDS:
        raise ConfigError(f"grpo.scale_rewards: unknown {scale_rewards!r}; use {', '.join(SCALE_REWARDS)}")
    groups = rewards.view(-1, group_size)
    advantages = (groups - groups.mean(dim=1, keepdim=True)).view(-1)
    if scale_rewards == "group":
        std = groups.std(dim=1, keepdim=True).expand_as(groups).reshape(-1)
    elif scale_rewards == "batch":
        std = rewards.std().expand_as(rewards)
    else:
        return advantages
    return advantages / (std + 1e-4)


def grpo_token_losses(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    use_bias_correction_kl: bool = True,
) -> torch.Tensor:
    """ℓ_t of every completion token (see the module docstring): ``logps`` (with grad), ``old_logps`` and
    ``ref_logps`` (without), ``advantages`` already per token, all of the same shape. ``epsilon_high`` defaults to
    ``epsilon``; ``ref_logps`` is needed when ``beta > 0``; ``use_bias_correction_kl`` (TRL's name and default)
    weighs the KL term by the ratio."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + (epsilon if epsilon_high is None else epsilon_high))
    losses = -torch.min(ratio * advantages, clipped * advantages)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("grpo_token_losses: beta > 0 needs the reference's log-probabilities")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        losses = losses + beta * (kl * ratio if use_bias_correction_kl else kl)
    return losses


def grpo_loss(
    token_losses: torch.Tensor,
    rows: torch.Tensor,
    n_completions: int,
    loss_type: str,
    *,
    max_completion_length: int | None = None,
    batch_tokens: int | None = None,
) -> torch.Tensor:
    """The loss of a batch of ``n_completions`` completions from the per-token losses (``token_losses``, each in the
    completion ``rows`` says, as ``inference.logprobs.target_logprobs`` orders them), averaged as ``loss_type`` says.
    ``dr_grpo`` needs ``max_completion_length``; ``dapo`` takes ``batch_tokens`` (the completion tokens of the whole
    global batch; default: this batch's). Raises ``ConfigError`` for an unknown ``loss_type``."""
    if loss_type == "grpo":
        sums = torch.zeros(n_completions, dtype=token_losses.dtype, device=token_losses.device)
        sums = sums.index_add(0, rows, token_losses)
        tokens = torch.bincount(rows, minlength=n_completions).clamp(min=1)
        return (sums / tokens).mean()
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("grpo_loss: dr_grpo divides by max_completion_length; give it")
        return token_losses.sum() / (n_completions * max_completion_length)
    if loss_type == "dapo":
        return token_losses.sum() / max(1, token_losses.numel() if batch_tokens is None else batch_tokens)
    raise ConfigError(f"grpo.loss_type: unknown loss {loss_type!r}; use {', '.join(LOSS_TYPES)}")


__all__ = ["LOSS_TYPES", "SCALE_REWARDS", "group_advantages", "grpo_loss", "grpo_token_losses"]
