"""Running a model without training it, shared by ``eval``, ``generate``, ``predict``, ``serve``, the training run's
evaluation and its rollouts:

- ``decode``: greedy generation in batches (left-padded, one KV cache), streaming for the terminal, stop tokens,
  exact match; ``sampling``: the next token, greedy or sampled (temperature, top-k, top-p).
- ``engine``: the continuous-batching engine (one thread owns the model; every row its own adapter or mix; at
  most ``max_adapters`` distinct adapters per step) over a KV cache per row (``kv``); ``sequence``: one generated
  sequence, tokens to text, stop strings.
- ``loss``: a causal LM's loss over its target tokens (chunked, never the whole logits); ``evaluate``: loss,
  perplexity and exact match over a data set; ``forgetting``: the loss on a retain set with and without adapters.
- ``classify``: a classifier's loss, logits, GLUE metrics (``scores``) and predictions.
"""

from loratune.inference.decode import exact_match, generate_greedy, inference, stop_token_ids, stream_greedy
from loratune.inference.evaluate import EvalResult, evaluate
from loratune.inference.sampling import check_sampling, sample_next

__all__ = [
    "EvalResult",
    "check_sampling",
    "evaluate",
    "exact_match",
    "generate_greedy",
    "inference",
    "sample_next",
    "stop_token_ids",
    "stream_greedy",
]
