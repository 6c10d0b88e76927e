"""``loratune serve``: one base model, many adapters, behind OpenAI's API, batched across requests.

The engine that batches every request's decoding steps and the sequences it generates are
``loratune.inference``'s (``engine``, ``sequence``, ``kv``); here:

- ``adapters``: which adapters are known and which are in memory (LRU eviction, hot load/unload).
- ``service``: an OpenAI request checked, tokenized and run; ``protocol``: the request and answer shapes.
- ``app``: the HTTP layer (FastAPI); ``metrics``: Prometheus counters; ``server``: wiring and uvicorn.
"""

from loratune.serve.server import build, run, serving

__all__ = ["build", "run", "serving"]
