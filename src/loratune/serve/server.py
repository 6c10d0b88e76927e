"""Put the pieces together and run them: engine thread, adapters, service, HTTP app under uvicorn.

``build`` makes a ``Service`` for a loaded model (tests and the command line both use it); ``run`` serves it
until SIGINT, SIGTERM or SIGHUP, then drains: no new requests, running ones finish (up to ``drain_timeout``),
and it returns.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading

from loratune.inference.engine import Engine
from loratune.serve.adapters import DEFAULT_MAX_LOADED, AdapterPool
from loratune.serve.metrics import ServeMetrics
from loratune.serve.service import DEFAULT_MAX_BODY_BYTES, Service

log = logging.getLogger("loratune.serve")

# A decoding step stacks the factors of every distinct adapter in the batch and (beyond the few-row CPU kernel)
# multiplies every row by all of them, masked, so its cost grows with their total rank: 8 bounds that at a few
# times one adapter's while a 32-row batch still serves many tenants at once. (vLLM's default is 1: it
# preallocates GPU slots per adapter, which loratune does not.)
DEFAULT_MAX_LORAS = 8


def build(
    model,
    tokenizer,
    base_id: str,
    adapters: list[tuple[str, str, float]] = (),
    *,
    max_batch: int = 32,
    prefill_tokens: int = 512,
    max_waiting: int = 256,
    max_loaded: int = DEFAULT_MAX_LOADED,
    max_loras: int | None = DEFAULT_MAX_LORAS,
    adapter_root=None,
    max_tokens_limit: int | None = None,
    max_tokens_default: int | None = None,
    request_timeout: float = 600.0,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    prefix_cache_mb: float = 64,
    batch_invariant: bool = False,
) -> Service:
    """A started service for ``model`` with ``adapters`` given as (name, directory, strength), pinned.

    ``max_loras``: most distinct adapters in one decoding batch (None: no limit); requests beyond it wait
    for room (see ``inference.engine``'s admission rule). The other options are ``loratune serve``'s."""
    metrics = ServeMetrics()
    engine = Engine(
        model,
        max_batch=max_batch,
        prefill_tokens=prefill_tokens,
        max_waiting=max_waiting,
        max_adapters=max_loras,
        on_step=metrics.on_step,
        prefix_cache_mb=prefix_cache_mb,
        batch_invariant=batch_invariant,
    )
    pool = AdapterPool(model, engine, max_loaded=max(max_loaded, len(adapters)), adapter_root=adapter_root)
    for name, path, strength in adapters:
        pool.add_at_start(name, path, strength)
    metrics.watch(engine, pool)
    service = Service(
        model,
        tokenizer,
        base_id,
        engine,
        pool,
        metrics,
        max_tokens_limit=max_tokens_limit,
        max_tokens_default=max_tokens_default,
        request_timeout=request_timeout,
        max_body_bytes=max_body_bytes,
    )
    engine.start()
    return service


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def run(
    service: Service,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    drain_timeout: float = 30.0,
    on_ready=None,
    sock: socket.socket | None = None,
) -> None:
    """Serve over HTTP (on ``sock`` when given: a socket already bound, else on ``host``:``port``) until SIGINT,
    SIGTERM or SIGHUP, then drain, stop the engine and return."""
    import uvicorn

    from loratune.serve.app import create_app

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            service.draining = True  # new requests get 503 while running ones finish
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's own re-raises the signal once drained, which would kill the process: a drain is the end
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if on_ready is not None and self.started:
                on_ready()

    config = uvicorn.Config(
        create_app(service, api_key),
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=drain_timeout,
        access_log=False,
    )
    try:
        DrainingServer(config).run(sockets=[sock] if sock is not None else None)
    finally:
        service.close()
        if sock is not None:
            sock.close()


@contextlib.contextmanager
def serving(service: Service, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None):
    """Serve ``service`` over HTTP from a background thread (a notebook, a test) for the ``with`` block;
    yields the base URL (port 0: a free port). The engine keeps running afterwards: ``service.close()``."""
    import uvicorn

    from loratune.serve.app import create_app

    started = threading.Event()

    class StartedServer(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                started.set()

    config = uvicorn.Config(create_app(service, api_key), host=host, port=port, log_level="warning", access_log=False)
    server = StartedServer(config)
    thread = threading.Thread(target=server.run, name="loratune-http", daemon=True)
    thread.start()
    while not started.wait(timeout=0.1):
        if not thread.is_alive():
            raise RuntimeError(f"the HTTP server did not start on {host}:{port}")
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
