"""Supervised fine-tuning of a causal language model: the loss is the sum of the target tokens' cross-entropy (the
completions or assistant turns, as the data's loss masks say), evaluation the held-out loss, perplexity and greedy
exact match."""

from __future__ import annotations

import math

from torch import nn

from loratune.data import build_dataset, collate, read_examples, split_eval
from loratune.errors import ConfigError
from loratune.inference.evaluate import EvalResult, evaluate
from loratune.inference.forgetting import retain_examples
from loratune.inference.loss import causal_lm_loss_sum
from loratune.models import context_length, load_model
from loratune.train import distributed
from loratune.train.objectives.base import ObjectiveDefaults, RunData


class CausalLM(ObjectiveDefaults):
    """A causal LM learning its data's target tokens (``task: causal_lm``, the default)."""

    evaluates_at_start = False

    def load(self, config, load_hook):
        m = config.model
        return load_model(
            m.name,
            quantize=m.quantize,
            dtype=m.dtype,
            device=m.device,
            trust_remote_code=m.trust_remote_code,
            double_quant=m.double_quant,
            compute_dtype=m.compute_dtype,
            unquantized_modules=m.unquantized_modules,
            on_block=load_hook,
        )

    def fit(self, config, model: nn.Module, log):
        """``config`` with ``data.max_length`` capped at the model's context length, saying so when it was longer."""
        limit = context_length(getattr(model, "config", None))
        if limit is None or config.data.max_length <= limit:
            return config
        log(
            f"data.max_length {config.data.max_length} is longer than the model's context ({limit} positions); "
            f"using {limit}"
        )
        return config.model_copy(update={"data": config.data.model_copy(update={"max_length": limit})})

    def data(self, config, tokenizer) -> RunData:
        return prepare_data(config, tokenizer)

    def collate(self, rows, pad_id: int):
        return collate(rows, pad_id)

    def loss_sum(self, model, batch):
        return causal_lm_loss_sum(model, batch)

    def count(self, batch) -> int:
        """The micro-batch's target tokens (a label shifted by one predicts the next token)."""
        return int((batch["labels"][:, 1:] != -100).sum())

    def evaluate(self, model, tokenizer, data: RunData, t, processes) -> EvalResult | None:
        """Each process evaluates every N-th row; rank 0 combines the sums (the others get None)."""
        rank, world = processes.rank, processes.world
        result = evaluate(
            model,
            tokenizer,
            data.eval[rank::world],
            data.eval_examples[rank::world],
            batch_size=t.eval_batch_size,
            max_new_tokens=t.eval_max_new_tokens,
            with_exact_match=t.exact_match,
        )
        if not processes.active:
            return result
        matches = None if result.exact_match is None else result.exact_match * len(result.references)
        loss_sum = result.loss * result.n_tokens if result.n_tokens else 0.0  # (a share with no rows has a NaN mean)
        parts = distributed.gathered(processes, (loss_sum, result.n_tokens, result.n, matches, len(result.references)))
        if not processes.main:
            return None
        loss_sum, n_tokens, n, match_sum, references = (sum(p[i] or 0 for p in parts) for i in range(5))
        loss = loss_sum / n_tokens if n_tokens else float("nan")
        exact = match_sum / references if references and any(p[3] is not None for p in parts) else None
        return EvalResult(
            loss=loss,
            perplexity=math.exp(loss) if loss < 50 else float("inf"),
            n=n,
            n_tokens=n_tokens,
            exact_match=exact,
        )

    def describe(self, data: RunData) -> list[str]:
        st = data.stats
        return [
            f"data: {st.rows_read} rows read from {st.path}; longer than max_length ({st.max_length}): {st.too_long} "
            f"({st.truncated} truncated, {st.dropped_too_long} dropped); dropped with no target token: "
            f"{st.dropped_no_target}",
            f"{len(data.train)} training examples ({st.trained_tokens:,} target tokens), {len(data.eval)} eval",
        ]


def prepare_data(config, tokenizer) -> RunData:
    """Read, tokenize and split the run's data as ``config.data`` says."""
    d = config.data
    options = dict(format=d.format, max_length=d.max_length, truncation=d.truncation, train_on_prompt=d.train_on_prompt)
    train, stats = build_dataset(d.train, tokenizer, **options)
    eval_tokenized, eval_examples = [], []
    if d.eval is not None:
        eval_tokenized, _ = build_dataset(d.eval, tokenizer, **options)
        eval_examples, _ = read_examples(d.eval, d.format)
    elif d.eval_split > 0:
        train, eval_tokenized = split_eval(train, d.eval_split, config.train.seed)
        by_location = {ex.location: ex for ex in read_examples(d.train, d.format)[0]}
        eval_examples = [by_location[t.location] for t in eval_tokenized]
    if d.eval_max_examples is not None:
        eval_tokenized, eval_examples = eval_tokenized[: d.eval_max_examples], eval_examples[: d.eval_max_examples]
    if not train:
        raise ConfigError(f"data.train: no usable training rows in {d.train} after length limits")
    retain = retain_examples(d.retain, tokenizer, d.max_length) if d.retain is not None else []
    return RunData(train, eval_tokenized, eval_examples, stats, retain)
