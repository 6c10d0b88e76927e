"""``loratune serve``: one base model, many adapters, behind OpenAI's API, batched across requests.

- ``engine``: the thread that owns the model and runs every request's decoding steps in one batch
  (continuous batching over a left-padded KV cache, ``kv``; chunked prefill).
- ``sequence``: one generated sequence — tokens to text, stop strings, finish reasons.
- ``adapters``: which adapters are known and which are in memory (LRU eviction, hot load/unload).
- ``service``: an OpenAI request checked, tokenized and run; ``protocol``: the request and answer shapes.
- ``app``: the HTTP layer (FastAPI); ``metrics``: Prometheus counters; ``server``: wiring and uvicorn.
"""

from loratune.serve.server import build, run, serving

__all__ = ["build", "run", "serving"]
