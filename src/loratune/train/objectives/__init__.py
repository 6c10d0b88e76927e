"""What a run trains a model to do, one module per objective (``base.Objective`` says what each gives the recipe):

- ``sft``: supervised fine-tuning of a causal language model on its data's target tokens (``task: causal_lm``);
- ``classification``: a sequence or token classifier with a new head (``task: seq_cls`` / ``token_cls``);
- ``dpo``: an adapter learning preference pairs against a reference (``train.objective: dpo``);
- ``grpo``: an adapter learning from the rewards of completions it samples itself (``train.objective: grpo``).

A new objective adds a module here and a line in ``objective_for``.
"""

from loratune.errors import ConfigError
from loratune.train.config import resolved_task
from loratune.train.objectives.base import Objective, RunData
from loratune.train.objectives.classification import Classification
from loratune.train.objectives.dpo import DPO
from loratune.train.objectives.grpo import GRPO
from loratune.train.objectives.sft import CausalLM


def objective_for(config) -> Objective:
    """The objective ``config`` trains: ``train.objective``, and for SFT its task (given, or read off the first
    training row)."""
    if config.train.objective == "dpo":
        return DPO.from_config(config)
    if config.train.objective == "grpo":
        return GRPO.from_config(config)
    if resolved_task(config) == "causal_lm":
        return CausalLM()
    if config.train.init_adapter is not None:
        raise ConfigError("train.init_adapter continues a language model's adapter; a classifier starts a new one")
    return Classification(config)


__all__ = ["DPO", "GRPO", "CausalLM", "Classification", "Objective", "RunData", "objective_for"]
