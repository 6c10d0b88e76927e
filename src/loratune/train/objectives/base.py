"""What every objective gives the training recipe (``Objective``), and the data it hands over (``RunData``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from loratune.data import Example, TokenizedExample, split_eval
from loratune.data.classification import LabelSpace
from loratune.errors import ConfigError
from loratune.inference.evaluate import EvalResult
from loratune.inference.forgetting import retain_loss


@dataclass
class RunData:
    """Training and evaluation rows of a run (eval ``examples`` carry the references for exact match)."""

    train: list
    eval: list
    eval_examples: list[Example]
    stats: object
    retain: list[TokenizedExample] = ()  # data.retain: what the base knows (see inference.forgetting)
    labels: LabelSpace | None = None  # a classifier's outputs; its rows are TokenizedClassExample


# A micro-batch's (summed loss, count), or (summed loss, count, {metric name: its sum over the count}).
LossSum = tuple[torch.Tensor, int] | tuple[torch.Tensor, int, dict[str, float]]


def train_and_eval_rows(config, tokenizer, read, what: str) -> tuple[list, list, object]:
    """(training rows, held-out rows, the training file's stats) as ``read(path, tokenizer, max_length=…,
    truncation=…)`` gives them: held-out rows from ``data.eval`` or a seeded ``data.eval_split`` of the training
    rows, cut to ``data.eval_max_examples``. Raises ``ConfigError`` naming ``what`` when no training row is left."""
    d = config.data
    options = dict(max_length=d.max_length, truncation=d.truncation)
    train, stats = read(d.train, tokenizer, **options)
    evaluation = []
    if d.eval is not None:
        evaluation, _ = read(d.eval, tokenizer, **options)
    elif d.eval_split > 0:
        train, evaluation = split_eval(train, d.eval_split, config.train.seed)
    if d.eval_max_examples is not None:
        evaluation = evaluation[: d.eval_max_examples]
    if not train:
        raise ConfigError(f"data.train: no usable {what} in {d.train} after length limits")
    return train, evaluation, stats


def split_loss(result: LossSum) -> tuple[torch.Tensor, int, dict[str, float]]:
    """(summed loss, count, metric sums) of what ``Objective.loss_sum`` returned ({} when it has no metrics)."""
    loss, count, *metrics = result
    return loss, count, (metrics[0] if metrics else {})


class ObjectiveDefaults:
    """What an objective that trains on its data's rows as they come does for the recipe's batch and state hooks
    (``Objective.micro_batches`` and after); GRPO, which generates what it trains on, overrides them."""

    passes_per_batch = 1  # how many training micro-batches each micro-batch of data rows becomes

    def micro_batches(self, model: nn.Module, stream, n: int, step: int) -> list[dict]:
        """The step's ``n`` micro-batches: the stream's next ones."""
        return [stream.next() for _ in range(n)]

    def state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of the objective besides the trained weights (nothing)."""
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor], device) -> None:
        """Restore what ``state`` returned."""

    def log_samples(self, run_dir, step: int) -> None:
        """Write what the objective shows of the step besides its metrics (nothing), on log steps."""

    def retain_loss(self, model: nn.Module, retain: list, pad_id: int, batch_size: int) -> float:
        """The model's loss on the retain set now (see ``inference.forgetting``): the language-model loss."""
        return retain_loss(model, retain, pad_id, batch_size)


class Objective(Protocol):
    """What a run trains a model to do. The recipe calls these and never asks which objective it runs.

    - ``load`` the model and tokenizer (``load_hook``: what the loader hands each finished block to, for FSDP);
    - ``fit`` the config to the loaded model (a context length cap, a classifier's LoRA targets);
    - ``data``: the run's rows; ``collate`` them into a micro-batch;
    - ``loss_sum``: a micro-batch's summed loss and what it sums over (its ``count``, known before the forward),
      optionally followed by ``{metric: its sum over the same count}`` (DPO's rewards): the recipe adds those up
      over the step's micro-batches and processes, divides them by the step's count and logs them beside the loss
      under their names (``split_loss`` reads either form);
    - ``evaluate`` on the held-out rows (shared over ``processes``; rank 0 gets the result, the others None); a
      result with ``metrics`` is logged as ``eval_loss`` and ``eval_<name>`` for each of them;
    - ``describe`` the data for the log; ``evaluates_at_start``: evaluate before the first step (a new head's
      chance level, for comparison);
    - ``micro_batches``: the step's micro-batches, drawn from the run's stream of collated rows (GRPO generates its
      completions from them); ``passes_per_batch``: how many training micro-batches one of the stream's becomes
      (what the number of steps of ``train.epochs`` counts);
    - ``state`` / ``load_state``: tensors a checkpoint keeps besides the trained weights (GRPO's unused rollouts,
      a classifier's base representations of the retain set);
      ``log_samples``: called on rank 0 on each logged step (GRPO's ``completions.jsonl``);
    - ``retain_loss``: the model's loss on ``data.retain`` (see ``inference.forgetting``).

    ``ObjectiveDefaults`` gives the last five for objectives that train on their rows as they come.
    """

    evaluates_at_start: bool
    passes_per_batch: int

    def load(self, config, load_hook) -> tuple[nn.Module, object]: ...

    def fit(self, config, model: nn.Module, log) -> object: ...

    def data(self, config, tokenizer) -> RunData: ...

    def collate(self, rows: list, pad_id: int) -> dict[str, torch.Tensor]: ...

    def loss_sum(self, model: nn.Module, batch: dict) -> LossSum: ...

    def count(self, batch: dict) -> int: ...

    def evaluate(self, model: nn.Module, tokenizer, data: RunData, t, processes) -> EvalResult | None: ...

    def describe(self, data: RunData) -> list[str]: ...

    def micro_batches(self, model: nn.Module, stream, n: int, step: int) -> list[dict]: ...

    def state(self) -> dict[str, torch.Tensor]: ...

    def load_state(self, tensors: dict[str, torch.Tensor], device) -> None: ...

    def retain_loss(self, model: nn.Module, retain: list, pad_id: int, batch_size: int) -> float: ...

    def log_samples(self, run_dir, step: int) -> None: ...
