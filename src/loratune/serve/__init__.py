"""``loratune serve``: one base model, many adapters, behind OpenAI's API, batched across requests.

The engine that batches every request's decoding steps and the sequences it generates are
``loratune.inference``'s (``engine``, ``sequence``, ``kv``); here:

- ``adapters``: which adapters are known and which are in memory (LRU eviction, hot load/unload), with the
  disk work on a reader thread (``reading``) and the model changed by the engine thread between steps.
- ``service``: an OpenAI request checked and tokenized (on its own thread) and run; ``protocol``: the
  request and answer shapes.
- ``app``: the HTTP layer (FastAPI); ``metrics``: Prometheus counters; ``server``: wiring and uvicorn.

Threads: the event loop (HTTP, streaming) waits on the others and never does their work; the preparing
thread tokenizes; the adapter reader reads files; the engine thread owns the model.
"""

from loratune.serve.server import build, run, serving

__all__ = ["build", "run", "serving"]
