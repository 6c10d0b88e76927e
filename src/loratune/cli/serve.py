"""``loratune serve``: parse its options, load the base and the adapters, serve."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import socket
import sys
from pathlib import Path

from loratune.cli.options import (
    adapter_spec,
    add_model_options,
    base_model_for,
    non_negative_float,
    non_negative_seconds,
    port,
    positive_int,
    positive_seconds,
)
from loratune.cli.writes import NOTHING, Writes
from loratune.errors import ConfigError

NAME = "serve"

SERVE_HELP = """\
Serve a base model and any number of adapters behind OpenAI's API (/v1/models, /v1/completions,
/v1/chat/completions, streaming included), batching all requests together: each row of a decoding step
runs with its own adapter, or a per-request mix (the extra body field "adapters": {"NAME": strength}).
The "model" field picks an adapter by NAME, or the base by its id (the --model name).
Also: POST /v1/load_lora_adapter and /v1/unload_lora_adapter (with --adapter-root), GET /health,
GET /metrics (Prometheus) and a playground page at /. Binds 127.0.0.1 unless --host says otherwise; the
address is taken before the model loads, so a busy port is said at once. SIGTERM, SIGHUP and Ctrl-C drain:
no new requests, running ones finish (up to --drain-timeout), then the server exits with status 0."""


def named_adapter(value: str) -> tuple[str, str, float]:
    """``NAME=DIR[:SCALE]`` or ``DIR[:SCALE]`` (named after the directory)."""
    name, sep, rest = value.partition("=")
    if not sep or "/" in name or not name:
        name, rest = "", value
    path, scale = adapter_spec(rest)
    return name or Path(path).resolve().name, path, scale


def add_parser(verb) -> None:
    p = verb(NAME, "serve the base and adapters over an OpenAI-compatible HTTP API, batched", SERVE_HELP)
    add_model_options(p, adapters=False)
    p.add_argument(
        "--adapter",
        "-a",
        action="append",
        default=[],
        type=named_adapter,
        metavar="NAME=DIR[:SCALE]",
        help="an adapter to serve as NAME (default: the directory's name) at a strength (default 1); "
        "repeatable; these stay in memory",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument(
        "--port",
        type=listen_port,
        default=8000,
        help="port, 1 to 65535, or 0 for any free one (the ready line says which) (default: 8000)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        type=api_key,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every endpoint except /health and the playground page",
    )
    p.add_argument(
        "--adapter-root",
        default=None,
        metavar="DIR",
        help="allow POST /v1/load_lora_adapter for adapter directories inside DIR (off without it)",
    )
    p.add_argument(
        "--max-loaded",
        type=positive_int,
        default=16,
        metavar="N",
        help="adapters held in memory at once; beyond, the least recently used idle one is freed and "
        "read back when asked for (default: 16; --adapter ones always stay)",
    )
    p.add_argument(
        "--max-loras",
        type=positive_int,
        default=8,
        metavar="N",
        help="distinct adapters in one decoding step, a mix counting each of its adapters; a request that "
        "would exceed it waits while others run (default: 8: each adapter in a step adds to every step's cost)",
    )
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=32,
        metavar="B",
        help="sequences decoded together in one step (default: 32)",
    )
    p.add_argument(
        "--max-tokens-limit",
        type=positive_int,
        default=None,
        metavar="T",
        help="refuse requests for more than T new tokens (default: only the model's context limits)",
    )
    p.add_argument(
        "--max-tokens-default",
        type=positive_int,
        default=None,
        metavar="T",
        help="new tokens for a request that gives no max_tokens, at most T (default: the rest of the model's "
        "context, as OpenAI's API, vLLM and llama.cpp do; set it on a public endpoint so that a client that "
        "forgets max_tokens does not run to the end of the context); at most --max-tokens-limit",
    )
    p.add_argument(
        "--prefill-tokens",
        type=positive_int,
        default=512,
        metavar="N",
        help="prompt tokens read between two decoding steps, so new requests never stall running ones "
        "for long (default: 512)",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=non_negative_float,
        default=64,
        metavar="MB",
        help="memory for the keys and values of recent prompts, so that a prompt that starts as an earlier "
        "one did with the same adapters (a chat template's system prompt, a conversation's earlier turns) "
        "reads only the rest (default: 64; 0: off)",
    )
    p.add_argument(
        "--batch-invariant",
        action="store_true",
        help="compute every request alone, so that its answer is the same bits whatever else the server is "
        "running (in bf16 too; greedy answers are then reproducible); reading long prompts takes longer",
    )
    p.add_argument(
        "--max-waiting",
        type=positive_int,
        default=256,
        metavar="N",
        help="requests queued before new ones get 429 with Retry-After (default: 256)",
    )
    p.add_argument(
        "--request-timeout",
        type=positive_seconds,
        default=600.0,
        metavar="S",
        help="fail a request still running after S seconds, more than 0 (default: 600)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=8 * 2**20,
        metavar="N",
        help="refuse a request body over N bytes with 413, before reading it (default: 8388608, 8 MiB)",
    )
    p.add_argument(
        "--drain-timeout",
        type=non_negative_seconds,
        default=30.0,
        metavar="S",
        help="on SIGTERM, SIGHUP or Ctrl-C, wait up to S seconds for running requests; 0: stop at once (default: 30)",
    )


def listen_port(text: str) -> int:
    """A port to listen on: 1 to 65535, or 0 for one the system picks."""
    value = text.strip()
    if value.isdigit() and int(value) == 0:
        return 0
    try:
        return port(text)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{error} (or 0 for any free port)") from None


def api_key(text: str) -> str:
    """An API key: any text but an empty one (which every client would match)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty; give a secret, or leave --api-key out for no key")
    return text


def check_token_limits(default: int | None, limit: int | None) -> None:
    """Refuse a default answer length above the longest the server allows: every request that gives no
    max_tokens would be refused for a number it did not ask for."""
    if default is not None and limit is not None and default > limit:
        raise ConfigError(
            f"--max-tokens-default {default} is above --max-tokens-limit {limit}; a default must be allowed"
        )


def writes(args) -> Writes:
    return NOTHING  # adapters loaded at run time are read, never written (see serve.adapters)


def run(args) -> int:
    from loratune.models.loader import load_model, resolve_model_dir
    from loratune.models.quantized import stored_in_4bit
    from loratune.serve import build
    from loratune.serve import run as serve

    names = [name for name, _, _ in args.adapter]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ConfigError(f"two adapters are named {duplicated[0]!r}; name them apart with NAME=DIR")
    if args.adapter_root is not None and not Path(args.adapter_root).is_dir():
        raise ConfigError(f"--adapter-root {args.adapter_root} is not a directory")
    check_token_limits(args.max_tokens_default, args.max_tokens_limit)
    name = base_model_for(args, adapters=[path for _, path, _ in args.adapter])
    listener = bind(args.host, args.port)  # before the model loads: a busy port is said at once
    try:
        quantize = args.quantize or stored_in_4bit(resolve_model_dir(name))
        model, tokenizer = load_model(
            name, quantize=quantize, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code
        )
        service = build(
            model,
            tokenizer,
            name,
            args.adapter,
            max_batch=args.max_batch,
            prefill_tokens=args.prefill_tokens,
            max_waiting=args.max_waiting,
            max_loaded=args.max_loaded,
            max_loras=args.max_loras,
            adapter_root=args.adapter_root,
            max_tokens_limit=args.max_tokens_limit,
            max_tokens_default=args.max_tokens_default,
            max_body_bytes=args.max_body_bytes,
            request_timeout=args.request_timeout,
            prefix_cache_mb=args.prefix_cache_mb,
            batch_invariant=args.batch_invariant,
        )
    except BaseException:
        listener.close()
        raise
    if not _is_loopback(args.host) and args.api_key is None:
        print(
            f"loratune serve: warning: listening on {args.host} without --api-key: anyone who reaches this "
            "port can use the model",
            file=sys.stderr,
        )
    where = f"http://{args.host}:{listener.getsockname()[1]}"  # the port the system gave, for --port 0

    def ready() -> None:
        adapters = ", ".join(a.name for a in service.pool.listed()) or "none"
        print(
            f"loratune serve: {name} with adapters: {adapters}; API at {where}/v1, playground at {where}/ "
            "(Ctrl-C stops)",
            file=sys.stderr,
            flush=True,
        )

    serve(service, api_key=args.api_key, drain_timeout=args.drain_timeout, on_ready=ready, sock=listener)
    return 0


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port``. Raises ``ConfigError`` for an address that does not resolve
    or cannot be bound (in use, not this machine's, a privileged port)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as error:
        raise ConfigError(f"--host {host}: not an address of this machine ({error.args[-1]})") from None
    family, kind, proto, _, address = infos[0]
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(address)
        listener.listen(2048)
    except OSError as error:
        listener.close()
        reason = error.strerror or str(error)
        hint = {
            errno.EADDRINUSE: "another server listens there; choose another --port",
            errno.EADDRNOTAVAIL: "it is not an address of this machine; give one of its addresses (or 0.0.0.0)",
            errno.EACCES: "ports below 1024 need privileges; choose a port above 1023",
        }.get(error.errno, "")
        raise ConfigError(f"cannot listen on {host}:{port}: {reason}" + (f"; {hint}" if hint else "")) from None
    listener.setblocking(False)
    return listener


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
