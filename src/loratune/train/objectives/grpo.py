"""Group Relative Policy Optimization (``train.objective: grpo``) with TRL's names, defaults and meanings
(``GRPOConfig``): an adapter learns from the rewards of completions it samples itself.

A generation: ``steps_per_generation`` micro-batches of ``train.batch_size`` prompts each; every prompt gets
``group_size`` completions, sampled by the serving engine (``inference.engine``, continuous batching, the no-grad
kernel path) on the very model being trained — the adapter live, nothing merged or copied; eval mode while it
generates, then back. The reward functions (``train.rewards``) score them; the group advantages follow; the
completions are shuffled and split into ``steps_per_generation`` micro-batches of ``batch_size × group_size``
completions (TRL's ``per_device_train_batch_size``), each trained on ``num_iterations`` times. Per-token
log-probabilities are recomputed with grad in the training forward, from the logits divided by the sampling
temperature (as TRL does). The old log-probabilities (the policy that sampled) are those of the step itself
(detached) when generation and optimizer steps line up, else computed once after generating (TRL's rule); the
reference's, when ``beta > 0``, are the base's: the adapter disabled.

Each sequence samples from its own generator seeded by (train.seed, generation, process, prompt, completion), and a
checkpoint keeps the generation's unused micro-batches, so a resumed run samples and trains exactly what the
uninterrupted one did.

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

import json
import math
import time
from pathlib import Path

import torch

from loratune.adapters import active_adapters, disabled_adapters
from loratune.data.batching import collate
from loratune.data.prompts import CONVERSATIONAL, PromptRow, collate_prompts, read_prompts
from loratune.data.tokenize import IGNORE_INDEX, TokenizedExample
from loratune.errors import ConfigError, LoratuneError
from loratune.inference.decode import stop_token_ids
from loratune.inference.engine import Engine
from loratune.inference.evaluate import EvalResult
from loratune.inference.logprobs import target_logprobs
from loratune.inference.sequence import Delta, Failed, Finished, SamplingParams, Sequence
from loratune.models.devices import model_device
from loratune.outputs import start_log, write_text_atomic
from loratune.train import distributed
from loratune.train.objectives.base import ObjectiveDefaults, RunData, train_and_eval_rows
from loratune.train.objectives.sft import CausalLM
from loratune.train.rewards import Reward, load_rewards, score, trainer_state

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_rewards: str = "group"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(each completion's advantage, whether its scale was zero) from ``rewards`` (one per completion, groups of
    ``group_size`` consecutive completions of one prompt), as TRL computes them: NaN rewards (no function scored the
    completion) are left out of the means and standard deviations (unbiased) and get advantage 0; the standard
    deviation plus 1e-4 divides. Raises ``ConfigError`` for an unknown ``scale_rewards``."""
    if scale_rewards not in SCALE_REWARDS:
        raise ConfigError(f"grpo.scale_rewards: unknown {scale_rewards!r}; use {', '.join(SCALE_REWARDS)}")
    groups = rewards.view(-1, group_size)
    advantages = (groups - groups.nanmean(dim=1, keepdim=True)).view(-1)
    if scale_rewards == "batch":
        std = _nanstd(rewards).expand_as(rewards)
    else:  # "none" measures the group's spread too, for frac_reward_zero_std
        std = _nanstd(groups, dim=1).repeat_interleave(group_size)
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), torch.isclose(std, torch.zeros_like(std))


def combined_rewards(per_function: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each completion's reward from its functions' (completions × functions, NaN where a function returned None):
    the weighted sum of those that scored it, NaN where none did (TRL's ``sum_then_normalize``)."""
    rewards = (per_function * weights).nansum(dim=1)
    rewards[per_function.isnan().all(dim=1)] = math.nan
    return rewards


def _nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The unbiased standard deviation of the non-NaN values (TRL's ``nanstd``)."""
    if dim is None:
        values, dim = values.reshape(-1), 0
    mean = values.nanmean(dim=dim, keepdim=True)
    count = (~values.isnan()).sum(dim=dim)
    variance = ((values - mean) ** 2).nanmean(dim=dim) * count / (count - 1)
    return variance.sqrt()


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


COMPLETIONS_FILE = "completions.jsonl"  # sampled completions with their rewards, written every log step


class RolloutError(LoratuneError):
    """The engine could not generate a rollout."""


def rollout_seed(seed: int, generation: int, rank: int, prompt: int, completion: int) -> int:
    """The seed of one sampled completion: a function of where it is, so a resumed run samples what the
    uninterrupted one sampled whatever ran before."""
    value = seed
    for part in (generation, rank, prompt, completion):
        value = (value * 1_000_003 + part + 1) % (2**63)
    return value


class GRPO(ObjectiveDefaults):
    """An adapter learning from the rewards of its own completions (``train.objective: grpo``; the ``grpo``
    section, ``GRPOSection``)."""

    evaluates_at_start = True  # the held-out reward before training: what the curve starts from

    def __init__(self, config):
        """From a run's config; ``ConfigError`` for a reward that cannot be loaded."""
        g, t = config.grpo, config.train
        self.g, self.seed, self.batch_size, self.grad_accum = g, t.seed, t.batch_size, t.grad_accum
        self.rewards: list[Reward] = load_rewards(g.rewards)
        self.weights = torch.tensor(g.reward_weights or [1.0] * len(self.rewards), dtype=torch.float32)
        self.steps_per_generation = g.steps_per_generation or t.grad_accum
        self.passes_per_batch = g.num_iterations  # each micro-batch of prompts trains num_iterations times
        cycle = self.steps_per_generation * g.num_iterations
        # TRL's rule: old log-probabilities are needed only when the sampling policy can differ from the trained one
        self.needs_old = t.grad_accum % cycle != 0
        self.max_steps = t.max_steps
        self.causal_lm = CausalLM()
        self.rows: list[PromptRow] = []
        self.buffer: list[dict[str, torch.Tensor]] = []  # the current generation's micro-batches still to train
        self.generations = 0
        self.samples: list[dict] = []  # the latest generation's completions, for completions.jsonl
        self.samples_logged = -1
        self.completions_started = False
        self.metric_names = [
            "reward",
            "reward_std",
            *(f"rewards/{r.name}/{stat}" for r in self.rewards for stat in ("mean", "std")),
            "frac_reward_zero_std",
            "completions/mean_length",
            "completions/clipped_ratio",
            "rollout/tokens_per_s",
        ]

    @classmethod
    def from_config(cls, config) -> GRPO:
        """The objective of a run whose ``train.objective`` is ``grpo``; ``ConfigError`` for data options prompts
        cannot take or a reward that cannot be loaded."""
        d = config.data
        refused = {"data.packing": d.packing, "data.train_on_prompt": d.train_on_prompt}
        refused[f"data.format: {d.format}"] = d.format != "auto"
        for option, given in refused.items():
            if given:
                raise ConfigError(
                    f"{option} does not apply to GRPO's prompts (train.objective: grpo trains on completions it "
                    "samples); remove it"
                )
        return cls(config)

    # --- model and data ---------------------------------------------------------------------------------------

    def load(self, config, load_hook):
        return self.causal_lm.load(config, load_hook)

    def fit(self, config, model, log):
        return self.causal_lm.fit(config, model, log)

    def data(self, config, tokenizer) -> RunData:
        """The training prompts and the held-out ones (``data.eval``, or a seeded ``data.eval_split``)."""
        train, evaluation, stats = train_and_eval_rows(config, tokenizer, read_prompts, "prompts")
        self.rows = [_reindexed(row, i) for i, row in enumerate(train)]
        self.tokenizer = tokenizer
        return RunData(self.rows, evaluation, [], stats)

    def collate(self, rows, pad_id: int):
        return collate_prompts(rows, pad_id)

    def count(self, batch) -> int:
        """The micro-batch's completions."""
        return batch["input_ids"].shape[0]

    # --- rollouts ---------------------------------------------------------------------------------------------

    def micro_batches(self, model, stream, n: int, step: int) -> list[dict]:
        """The step's ``n`` micro-batches of completions: from the current generation, generating the next one
        (from the next ``steps_per_generation`` micro-batches of prompts) when it is used up."""
        out = []
        while len(out) < n:
            if not self.buffer:
                self._generate(model, stream, step)
            out.append(self.buffer.pop(0))
        return out

    def _generate(self, model, stream, step: int) -> None:
        g, tokenizer = self.g, self.tokenizer
        started = time.perf_counter()
        prompts = [self.rows[i] for _ in range(self.steps_per_generation) for i in stream.next()["rows"].tolist()]
        sampled = self.sample(model, tokenizer, prompts, g.group_size, step, self.generations, stream.rank)
        generated_seconds = time.perf_counter() - started
        locations = [row.location for row in prompts for _ in range(g.group_size)]
        per_function = self.score(
            [row for row in prompts for _ in range(g.group_size)], sampled, locations, step
        )  # completions × functions
        rewards = combined_rewards(per_function, self.weights)
        advantages, zero_std = group_advantages(rewards, g.group_size, g.scale_rewards)

        examples = []
        for i, (ids, finished) in enumerate(sampled):
            row = prompts[i // g.group_size]
            trained = ids if (finished or not g.mask_truncated_completions) else []
            labels = [IGNORE_INDEX] * len(row.ids) + (trained or [IGNORE_INDEX] * len(ids))
            examples.append(TokenizedExample(row.ids + ids, labels, row.location))
        loss_tokens = sum(len(ids) for ids, finished in sampled if finished or not g.mask_truncated_completions)
        generation_tokens = distributed.total(stream.processes, loss_tokens)  # DAPO's normalizer spans processes
        lengths = torch.tensor([len(ids) for ids, _ in sampled], dtype=torch.float64)
        truncated = torch.tensor([not finished for _, finished in sampled], dtype=torch.float64)
        generation_metrics = {
            "reward": float(rewards.nanmean()),
            "reward_std": float(_nanstd(rewards)),
            "frac_reward_zero_std": float(zero_std.double().mean()),
            "completions/mean_length": float(lengths.mean()),
            "completions/clipped_ratio": float(truncated.mean()),
            "rollout/tokens_per_s": float(lengths.sum()) / max(generated_seconds, 1e-9),
        }
        for j, reward in enumerate(self.rewards):
            generation_metrics[f"rewards/{reward.name}/mean"] = float(per_function[:, j].nanmean())
            generation_metrics[f"rewards/{reward.name}/std"] = float(_nanstd(per_function[:, j]))
        metric_values = torch.tensor([generation_metrics[name] for name in self.metric_names], dtype=torch.float64)

        # TRL shuffles the generation's completions before splitting them into micro-batches
        shuffle = torch.Generator().manual_seed(rollout_seed(self.seed, self.generations, stream.rank, -1, -1))
        order = torch.randperm(len(examples), generator=shuffle)
        per_batch = len(examples) // self.steps_per_generation
        device = model_device(model)
        batches = []
        for start in range(0, len(examples), per_batch):
            chosen = order[start : start + per_batch]
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in chosen], tokenizer.pad_token_id).items()}
            batch["advantages"] = advantages[chosen].to(device)
            # DAPO divides by the generation's completion tokens, rescaled to one optimizer step (as TRL does)
            batch["dapo_scale"] = torch.tensor(
                per_batch * self.steps_per_generation * stream.world / max(1.0, generation_tokens), dtype=torch.float64
            )
            batch["generation_metrics"] = metric_values
            with torch.no_grad():
                if self.needs_old:
                    batch["old_logps"] = target_logprobs(model, batch, temperature=self._temperature)[0]
                if g.beta > 0:
                    with disabled_adapters(model):
                        batch["ref_logps"] = target_logprobs(model, batch, temperature=self._temperature)[0]
            batches.append(batch)
        self.buffer = batches * g.num_iterations
        self.samples = [
            {
                "generation": self.generations,
                "prompt": prompts[i // g.group_size].prompt,
                "completion": tokenizer.decode(sampled[i][0], skip_special_tokens=True),
                "rewards": {r.name: _json_number(per_function[i, j]) for j, r in enumerate(self.rewards)},
                "reward": _json_number(rewards[i]),
                "advantage": float(advantages[i]),
                "finished": sampled[i][1],
            }
            for i in range(len(sampled))
        ]
        self.generations += 1

    @property
    def _temperature(self) -> float:
        return self.g.temperature or 1.0  # greedy sampling: the plain log-probabilities

    def sample(
        self,
        model,
        tokenizer,
        prompts: list[PromptRow],
        per_prompt: int,
        step: int,
        generation: int,
        rank: int,
        *,
        greedy: bool = False,
    ) -> list[tuple[list[int], bool]]:
        """``per_prompt`` completions of each prompt from the serving engine on ``model`` as it is now (its active
        adapters live): each completion's token ids (with the stop token that ended it) and whether it ended by
        itself (False: cut at ``max_new_tokens``). In the order of ``prompts``, a prompt's completions together."""
        g = self.g
        adapters = dict.fromkeys(active_adapters(model), 1.0)
        stops = frozenset(stop_token_ids(model, tokenizer))
        results: list[dict] = [{"ids": [], "finished": None} for _ in range(len(prompts) * per_prompt)]
        seqs = []
        for j, row in enumerate(prompts):
            for k in range(per_prompt):
                result = results[j * per_prompt + k]
                params = SamplingParams(
                    max_tokens=g.max_new_tokens,
                    temperature=0.0 if greedy else g.temperature,
                    top_p=None if greedy or g.top_p >= 1.0 else g.top_p,
                    top_k=None if greedy or not g.top_k else g.top_k,
                    seed=rollout_seed(self.seed, generation, rank, j, k),
                    logprobs=0,  # each chosen token, the stop token included, comes back with its log-probability
                )
                seqs.append(Sequence(row.ids, adapters, params, tokenizer, stops, _collector(result, row.location)))
        width = max(len(row.ids) for row in prompts)
        engine = Engine(model, max_batch=len(seqs), prefill_tokens=max(512, width * len(seqs)))
        engine.run(seqs)
        failed = next((result["failed"] for result in results if "failed" in result), None)
        if failed is not None:
            raise RolloutError(failed)
        return [(result["ids"], result["finished"]) for result in results]

    def score(self, rows: list[PromptRow], sampled, locations: list[str], step: int) -> torch.Tensor:
        """Every reward function's score of every completion (completions × functions; NaN for None)."""
        conversational = rows[0].kind == CONVERSATIONAL
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in sampled]
        completions = [[{"role": "assistant", "content": text}] for text in texts] if conversational else texts
        prompts = [row.prompt for row in rows]
        keys = list(dict.fromkeys(key for row in rows for key in row.columns))
        columns = {key: [row.columns.get(key) for row in rows] for key in keys}
        columns["completion_ids"] = [ids for ids, _ in sampled]
        extra = {
            "trainer_state": trainer_state(step, self.max_steps),
            "log_extra": lambda *args, **kwargs: None,
            "log_metric": lambda *args, **kwargs: None,
        }
        scores = [score(reward, prompts, completions, columns, locations, extra) for reward in self.rewards]
        return torch.tensor(scores, dtype=torch.float32).T.reshape(len(rows), len(self.rewards))

    # --- the loss ---------------------------------------------------------------------------------------------

    def loss_sum(self, model, batch):
        """(the micro-batch's loss times its completions, its completions, the metrics summed over them): the step's
        loss — the sum over its micro-batches divided by its completions — is TRL's for the step."""
        g = self.g
        logps, rows = target_logprobs(model, batch, temperature=self._temperature)
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        advantages = batch["advantages"][rows]
        losses = grpo_token_losses(
            logps,
            old,
            advantages,
            epsilon=g.epsilon,
            epsilon_high=g.epsilon_high,
            beta=g.beta,
            ref_logps=batch.get("ref_logps"),
        )
        n = self.count(batch)
        if g.loss_type == "dapo":
            loss = losses.sum() * float(batch["dapo_scale"])
        else:
            loss = n * grpo_loss(losses, rows, n, g.loss_type, max_completion_length=g.max_new_tokens)
        sums = {name: n * float(v) for name, v in zip(self.metric_names, batch["generation_metrics"].tolist())}
        with torch.no_grad():
            ratio = torch.exp(logps.detach() - old)
            high = 1 + (g.epsilon if g.epsilon_high is None else g.epsilon_high)
            low_clipped = (ratio < 1 - g.epsilon) & (advantages < 0)
            high_clipped = (ratio > high) & (advantages > 0)
            tokens = max(1, ratio.numel())
            if g.beta > 0:  # TRL's logged KL: the per-token k3 times the ratio (use_bias_correction_kl)
                delta = batch["ref_logps"] - logps.detach()
                sums["kl"] = n * float(((torch.exp(delta) - delta - 1) * ratio).sum()) / tokens
            sums["clip_ratio/low_mean"] = n * float(low_clipped.sum()) / tokens
            sums["clip_ratio/high_mean"] = n * float(high_clipped.sum()) / tokens
            sums["clip_ratio/region_mean"] = n * float((low_clipped | high_clipped).sum()) / tokens
        return loss, n, sums

    # --- checkpoints and logs ---------------------------------------------------------------------------------

    def state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps: the generation count and the current generation's untrained micro-batches."""
        tensors = {"generations": torch.tensor([self.generations])}
        for i, batch in enumerate(self.buffer):
            for key, value in batch.items():
                tensors[f"buffer.{i}.{key}"] = value.detach()
        return tensors

    def load_state(self, tensors: dict[str, torch.Tensor], device) -> None:
        self.generations = int(tensors["generations"][0]) if "generations" in tensors else 0
        batches: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("buffer."):
                _, index, name = key.split(".", 2)
                batches.setdefault(int(index), {})[name] = value.to(device)
        self.buffer = [batches[i] for i in sorted(batches)]

    def log_samples(self, run_dir: Path, step: int) -> None:
        """Append the latest generation's completions and rewards to ``completions.jsonl`` (once per generation);
        a resumed run first drops what the interrupted one wrote from this step on."""
        path = Path(run_dir) / COMPLETIONS_FILE
        if not self.completions_started:
            self.completions_started = True
            if path.is_file():
                kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < step]
                write_text_atomic(path, "".join(line + "\n" for line in kept))
            start_log(path)  # recorded once, it only grows (--overwrite may replace it)
        if not self.samples or self.samples_logged == self.samples[0]["generation"]:
            return
        self.samples_logged = self.samples[0]["generation"]
        with path.open("a") as file:
            for sample in self.samples:
                file.write(json.dumps({"step": step, **sample}) + "\n")

    # --- evaluation -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model, tokenizer, data: RunData, t, processes) -> EvalResult | None:
        """The held-out prompts' rewards for one greedy completion each (``eval_reward``, and ``eval_rewards/<name>``
        per function). Each process evaluates every N-th prompt; rank 0 combines the sums."""
        rows = data.eval[processes.rank :: processes.world]
        sums, count, tokens = [0.0] * (len(self.rewards) + 1), 0, 0
        if rows:
            sampled = self.sample(model, tokenizer, rows, 1, 0, 0, processes.rank, greedy=True)
            per_function = self.score(rows, sampled, [row.location for row in rows], -1)
            rewards = combined_rewards(per_function, self.weights).nan_to_num(0.0)
            sums = [float(rewards.sum())] + [float(per_function[:, j].nansum()) for j in range(len(self.rewards))]
            count, tokens = len(rows), sum(len(ids) for ids, _ in sampled)
        parts = distributed.gathered(processes, (sums, count, tokens))
        if not processes.main:
            return None
        n = sum(part[1] for part in parts)
        if n == 0:
            return None
        totals = [sum(part[0][i] for part in parts) for i in range(len(self.rewards) + 1)]
        metrics = {"reward": totals[0] / n}
        metrics.update({f"rewards/{r.name}": totals[j + 1] / n for j, r in enumerate(self.rewards)})
        return EvalResult(loss=None, perplexity=None, n=n, n_tokens=sum(part[2] for part in parts), metrics=metrics)

    def describe(self, data: RunData) -> list[str]:
        st, g = data.stats, self.g
        rewards = ", ".join(
            f"{r.where}" + (f" ×{w:g}" if w != 1 else "") for r, w in zip(self.rewards, self.weights.tolist())
        )
        return [
            f"prompts: {st.rows_read} {st.kind} rows read from {st.path}; longer than max_length ({st.max_length}): "
            f"{st.too_long} ({st.dropped_too_long} dropped)",
            f"{len(data.train)} training prompts, {len(data.eval)} eval prompts",
            f"GRPO: {g.group_size} completions per prompt (≤ {g.max_new_tokens} tokens, temperature {g.temperature}), "
            f"loss {g.loss_type}, beta {g.beta}, a generation every {self.steps_per_generation} micro-batches × "
            f"{g.num_iterations} iterations; rewards: {rewards}",
        ]


def _reindexed(row: PromptRow, index: int) -> PromptRow:
    return PromptRow(row.location, row.prompt, row.ids, row.columns, index)


def _json_number(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _collector(result: dict, location: str):
    """A sequence's sink: its chosen token ids (from the per-token log-probabilities, which include the stop token)
    and how it ended."""

    def sink(event) -> None:
        if isinstance(event, Delta):
            result["ids"].extend(logprob.token_id for logprob in event.logprobs)
        elif isinstance(event, Finished):
            result["finished"] = event.reason == "stop"
        elif isinstance(event, Failed):  # raised once the engine returns (not from inside its step)
            result["failed"] = f"generating a completion of row {location} failed: {event.message}"

    return sink


__all__ = [
    "COMPLETIONS_FILE",
    "GRPO",
    "LOSS_TYPES",
    "SCALE_REWARDS",
    "combined_rewards",
    "group_advantages",
    "grpo_loss",
    "grpo_token_losses",
    "rollout_seed",
]
