"""What a run trains a model to do, one module per objective (``base.Objective`` says what each gives the recipe):

- ``sft``: supervised fine-tuning of a causal language model on its data's target tokens (``task: causal_lm``);
- ``classification``: a sequence or token classifier with a new head (``task: seq_cls`` / ``token_cls``).

A new objective (preference or reinforcement learning) adds a module here and a line in ``objective_for``.
"""

from loratune.train.config import resolved_task
from loratune.train.objectives.base import Objective, RunData
from loratune.train.objectives.classification import Classification
from loratune.train.objectives.sft import CausalLM


def objective_for(config) -> Objective:
    """The objective ``config`` trains (its task, given or read off the first training row)."""
    return CausalLM() if resolved_task(config) == "causal_lm" else Classification(config)


__all__ = ["CausalLM", "Classification", "Objective", "RunData", "objective_for"]
