"""Direct Preference Optimization (``train.objective: dpo``): an adapter learns to prefer each pair's chosen
completion over its rejected one, relative to a reference model, with TRL's losses, names and metrics.

For a pair with completions y_c (chosen) and y_r (rejected) after prompt x, log π(y|x) is the summed log-probability
of the completion's tokens under the policy (the model with the trained adapter) and log π_ref(y|x) the same under
the reference: the base model with the adapter disabled (``dpo.reference: base``; no second copy of the weights) or
another adapter loaded frozen beside it (``dpo.reference: DIR``). With the log-ratios ρ = log π − log π_ref and
Δ = ρ_c − ρ_r:

    sigmoid   −log σ(β·Δ)                                   (DPO; a fresh adapter starts at ln 2)
    hinge     max(0, 1 − β·Δ)                               (SLiC)
    ipo       (ρ_c / |y_c| − ρ_r / |y_r| − 1/(2β))²         (IPO on per-token log-ratios, as TRL computes it)

The implicit rewards are β·ρ_c and β·ρ_r; the metrics are TRL's (``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``: the share of pairs whose chosen reward is the larger, ``rewards/margins``, ``logps/chosen``,
``logps/rejected``), means over the step's pairs, logged beside the loss and, over the held-out pairs, as
``eval_<name>``. A micro-batch is TRL's concatenated layout: its chosen sequences then its rejected ones, one
forward of the policy for both (and one, without gradients, of the reference, run first so its activations are
gone before the policy's are kept). The reference runs in eval mode (no dropout).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from loratune.adapters import active_adapters, disabled_adapters, load_adapter, set_active
from loratune.data.preference import build_preferences, check_preference_options, collate_preferences
from loratune.errors import ConfigError
from loratune.inference.evaluate import EvalResult
from loratune.inference.forgetting import retain_examples
from loratune.inference.logprobs import sequence_logprobs, target_counts
from loratune.models.devices import model_device
from loratune.train import distributed
from loratune.train.config import DPO_LOSS_TYPES
from loratune.train.objectives.base import ObjectiveDefaults, RunData, train_and_eval_rows
from loratune.train.objectives.sft import CausalLM

REFERENCE_ADAPTER = "reference"  # the name of a reference adapter loaded beside the trained one
# TRL's metric names, in TRL's order
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def dpo_loss(
    policy: torch.Tensor, reference: torch.Tensor, completion_tokens: torch.Tensor, beta: float, loss_type: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(each pair's loss, chosen rewards, rejected rewards) from the summed completion log-probabilities of 2P
    sequences (the P chosen, then the P rejected) under the policy and the reference; ``completion_tokens``: each
    sequence's completion length (IPO's per-token log-ratios). The rewards are detached. See the module docstring."""
    chosen, rejected = policy.chunk(2)
    reference_chosen, reference_rejected = reference.chunk(2)
    chosen_ratio, rejected_ratio = chosen - reference_chosen, rejected - reference_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        chosen_tokens, rejected_tokens = completion_tokens.to(policy.dtype).clamp(min=1.0).chunk(2)
        losses = (chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens - 1 / (2 * beta)) ** 2
    else:
        raise ConfigError(f"dpo.loss_type: unknown loss {loss_type!r}; use {', '.join(DPO_LOSS_TYPES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def metric_sums(policy: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    """TRL's DPO metrics (``METRICS``) as sums over the pairs (their means once divided by the number of pairs)."""
    chosen, rejected = policy.detach().chunk(2)
    return {
        "rewards/chosen": float(chosen_rewards.sum()),
        "rewards/rejected": float(rejected_rewards.sum()),
        "rewards/accuracies": float((chosen_rewards > rejected_rewards).sum()),
        "rewards/margins": float((chosen_rewards - rejected_rewards).sum()),
        "logps/chosen": float(chosen.sum()),
        "logps/rejected": float(rejected.sum()),
    }


class DPO(ObjectiveDefaults):
    """An adapter learning preference pairs (``train.objective: dpo``, configured by the ``dpo`` section)."""

    evaluates_at_start = False  # a fresh adapter is the reference: every metric is 0 (or ln 2) there

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", reference: str = "base"):
        """``beta``, ``loss_type`` and ``reference`` as the ``dpo`` section says (``DPOSection``); raises
        ``ConfigError`` for an unknown loss."""
        if loss_type not in DPO_LOSS_TYPES:
            raise ConfigError(f"dpo.loss_type: unknown loss {loss_type!r}; use {', '.join(DPO_LOSS_TYPES)}")
        self.beta, self.loss_type, self.reference = beta, loss_type, reference
        self.causal_lm = CausalLM()  # loading a causal LM and fitting the config to it are SFT's

    @classmethod
    def from_config(cls, config) -> DPO:
        """The objective of a run whose ``train.objective`` is ``dpo``; ``ConfigError`` for data options that
        preference pairs cannot take."""
        check_preference_options(config.data)
        d = config.dpo
        return cls(d.beta, d.loss_type, d.reference)

    def load(self, config, load_hook):
        """The causal LM, with the reference adapter (``dpo.reference: DIR``) loaded frozen beside where the trained
        one will be (the recipe then makes the trained adapter the only active one)."""
        model, tokenizer = self.causal_lm.load(config, load_hook)
        if self.reference != "base":
            # as_plain: an adapter saved from a PiSSA/OLoRA start acts on the unmodified base, so the base stays the
            # policy's base too
            load_adapter(model, self.reference, REFERENCE_ADAPTER, as_plain=True)
        return model, tokenizer

    def fit(self, config, model: nn.Module, log):
        return self.causal_lm.fit(config, model, log)

    def data(self, config, tokenizer) -> RunData:
        """The training pairs and the held-out ones (``data.eval``, or a seeded ``data.eval_split``), and the
        retain set; raises ``ConfigError`` when no training pair is left after the length limits."""
        d = config.data
        train, evaluation, stats = train_and_eval_rows(config, tokenizer, build_preferences, "preference pairs")
        retain = retain_examples(d.retain, tokenizer, d.max_length) if d.retain is not None else []
        return RunData(train, evaluation, [], stats, retain)

    def collate(self, rows, pad_id: int):
        return collate_preferences(rows, pad_id)

    def count(self, batch) -> int:
        """The micro-batch's pairs (half its rows)."""
        return batch["input_ids"].shape[0] // 2

    def loss_sum(self, model, batch):
        """(summed loss over the pairs, pairs, TRL's metrics summed over them)."""
        losses, sums = self._scored(model, batch)
        return losses.sum(), self.count(batch), sums

    def reference_logprobs(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Each sequence's summed completion log-probability under the reference (no gradient)."""
        with torch.no_grad(), self._as_reference(model):
            return sequence_logprobs(model, batch)

    @contextlib.contextmanager
    def _as_reference(self, model: nn.Module):
        """The model as the reference inside the block: in eval mode, with the base alone or the reference adapter
        alone acting; as it was afterwards."""
        was_training = model.training
        model.eval()
        try:
            if self.reference == "base":
                with disabled_adapters(model):
                    yield
            else:
                active = active_adapters(model)
                set_active(model, REFERENCE_ADAPTER)
                try:
                    yield
                finally:
                    set_active(model, active)
        finally:
            model.train(was_training)

    @torch.no_grad()
    def evaluate(self, model, tokenizer, data: RunData, t, processes) -> EvalResult | None:
        """The loss and TRL's metrics over the held-out pairs, the model in eval mode. Each process evaluates every
        N-th pair; rank 0 combines the sums (the others get None)."""
        pairs = data.eval[processes.rank :: processes.world]
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]))  # similar lengths share a batch
        per_batch = max(1, t.eval_batch_size // 2)  # pairs: each is two sequences
        device = model_device(model)
        was_training = model.training
        model.eval()
        loss_sum, tokens, sums = 0.0, 0, dict.fromkeys(METRICS, 0.0)
        try:
            for start in range(0, len(order), per_batch):
                chosen = [pairs[i] for i in order[start : start + per_batch]]
                batch = {k: v.to(device) for k, v in self.collate(chosen, tokenizer.pad_token_id).items()}
                losses, batch_sums = self._scored(model, batch)
                loss_sum += float(losses.sum())
                tokens += int(target_counts(batch).sum())
                for name, value in batch_sums.items():
                    sums[name] += value
        finally:
            model.train(was_training)
        parts = distributed.gathered(processes, (loss_sum, tokens, len(pairs), sums))
        if not processes.main:
            return None
        n = sum(part[2] for part in parts)
        if n == 0:
            return None
        return EvalResult(
            loss=sum(part[0] for part in parts) / n,
            perplexity=None,
            n=n,
            n_tokens=sum(part[1] for part in parts),
            metrics={name: sum(part[3][name] for part in parts) / n for name in METRICS},
        )

    def _scored(self, model, batch) -> tuple[torch.Tensor, dict]:
        """(each pair's loss, the metrics' sums) of a micro-batch: the reference's forward first (no gradient), then
        the policy's."""
        reference = self.reference_logprobs(model, batch)
        policy = sequence_logprobs(model, batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy, reference, target_counts(batch), self.beta, self.loss_type
        )
        return losses, metric_sums(policy, chosen_rewards, rejected_rewards)

    def describe(self, data: RunData) -> list[str]:
        st = data.stats
        reference = (
            "the base model (the adapter disabled)" if self.reference == "base" else f"the adapter in {self.reference}"
        )
        return [
            f"preference data: {st.rows_read} {st.kind} pairs read from {st.path}; longer than max_length "
            f"({st.max_length}): {st.too_long} ({st.truncated} truncated, {st.dropped_too_long} dropped); dropped "
            f"with no completion token left: {st.dropped_no_completion}",
            f"{len(data.train)} training pairs ({st.chosen_tokens:,} chosen and {st.rejected_tokens:,} rejected "
            f"completion tokens read), {len(data.eval)} eval pairs",
            f"DPO: loss {self.loss_type}, beta {self.beta}; reference: {reference}",
        ]


__all__ = ["DPO", "METRICS", "REFERENCE_ADAPTER", "dpo_loss", "metric_sums"]
