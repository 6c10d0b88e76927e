"""`loratune serve` under load, measured with the real `openai` client over loopback.

The server runs as its own process (`loratune serve`, every CPU thread); the clients are threads of this one
(they mostly wait on sockets). On smollm2-135m with three r=8 all-linear adapters:

1. Throughput: the same requests (chat prompts, greedy, `--max-tokens` each) sent one at a time, then by 16
   concurrent clients; generated tokens/s of each and the ratio (bar ≥ 4×, target 6×). The concurrent run
   twice: rows spread over the three adapters and the base ("mixed"), and all on one adapter ("same"); the
   ratio mixed / same (bar ≥ 0.85). Time to first token and per-token latency (p50 / p95) from the streams.
2. Hot load under load: while clients keep requests running, `POST /v1/load_lora_adapter`; how long the call
   takes, how long until a request on the new adapter answers, and whether any request failed during load
   and unload.
3. Batch invariance: 32 concurrent requests (streaming and not, 3 adapters + base, greedy), each compared
   with the same request sent alone: fp32 (bar: all identical) and bf16 (reported).

    python bench/serve.py                   # all three, ~5 minutes on 2 cores
    python bench/serve.py --only throughput
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx2
from openai import OpenAI

from common import random_adapter

PROMPTS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Explain photosynthesis briefly.",
    "Write a haiku about the sea.",
    "How do I reverse a list in Python?",
    "Name the planets of the solar system.",
    "What is 17 times 23?",
    "Summarize the plot of Hamlet in two sentences.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish.",
    "What does a compiler do?",
    "Suggest a name for a coffee shop.",
    "List four primary colors of light.",
    "How many legs does a spider have?",
    "What is machine learning?",
    "Describe a cat to someone who has never seen one.",
]
ADAPTERS = ["a", "b", "c"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def server(model: str, adapters: dict[str, Path], dtype: str, root: Path, threads: int | None = None):
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "loratune",
        "serve",
        "--model",
        model,
        "--dtype",
        dtype,
        "--port",
        str(port),
        "--adapter-root",
        str(root),
    ]
    for name, path in adapters.items():
        command += ["--adapter", f"{name}={path}"]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            if process.poll() is not None:
                raise RuntimeError(f"the server exited: {process.stderr.read()}")
            try:
                if httpx2.get(f"{url}/health").status_code == 200:
                    break
            except httpx2.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=120)


def client_for(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)


def chat(client: OpenAI, model: str, prompt: str, max_tokens: int, stream: bool = True, **extra) -> dict:
    """One greedy chat request; its text, token count, time to first token and gaps between chunks."""
    started = time.perf_counter()
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        answer = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
        return {
            "text": answer.choices[0].message.content,
            "tokens": answer.usage.completion_tokens,
            "seconds": time.perf_counter() - started,
        }
    pieces, stamps, tokens = [], [], 0
    for chunk in client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        **extra,
    ):
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            stamps.append(time.perf_counter())
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {
        "text": "".join(pieces),
        "tokens": tokens,
        "seconds": time.perf_counter() - started,
        "ttft": stamps[0] - started if stamps else None,
        "gaps": gaps,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_requests(client: OpenAI, jobs: list[tuple[str, str]], max_tokens: int, clients: int) -> dict:
    """``jobs`` by ``clients`` concurrent clients, every answer ``max_tokens`` long (vLLM's ``ignore_eos``), so
    that runs with different adapters do the same work."""
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(
            pool.map(lambda job: chat(client, job[0], job[1], max_tokens, extra_body={"ignore_eos": True}), jobs)
        )
    seconds = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "ttft": [r["ttft"] for r in results if r["ttft"] is not None],
        "gaps": [g for r in results for g in r["gaps"]],
        "texts": [r["text"] for r in results],
    }


def describe(name: str, run: dict) -> str:
    return (
        f"{name:<28} {run['tokens']:>6} tokens in {run['seconds']:6.1f} s = {run['tokens_per_s']:7.1f} tok/s;"
        f" TTFT p50 {percentile(run['ttft'], 0.5) * 1000:6.0f} ms p95 {percentile(run['ttft'], 0.95) * 1000:6.0f} ms;"
        f" per token p50 {percentile(run['gaps'], 0.5) * 1000:5.1f} ms"
        f" p95 {percentile(run['gaps'], 0.95) * 1000:5.1f} ms"
    )


def throughput(args, adapters, root) -> None:
    n = args.requests
    mixed_jobs = [([*ADAPTERS, "base"][i % 4], PROMPTS[i % len(PROMPTS)]) for i in range(n)]
    same_jobs = [("a", PROMPTS[i % len(PROMPTS)]) for i in range(n)]
    with server(args.model, adapters, args.dtype, root) as url:
        client = client_for(url)
        base = client.models.list().data[0].id
        mixed_jobs = [(base if m == "base" else m, p) for m, p in mixed_jobs]
        run_requests(client, mixed_jobs[:4], 4, 4)  # warm up
        alone = run_requests(client, mixed_jobs, args.max_tokens, 1)
        mixed = run_requests(client, mixed_jobs, args.max_tokens, args.clients)
        same = run_requests(client, same_jobs, args.max_tokens, args.clients)
    print(f"\n## throughput: {n} chat requests, greedy, max_tokens {args.max_tokens}, {args.dtype}")
    print(describe("one at a time (mixed)", alone))
    print(describe(f"{args.clients} clients, mixed", mixed))
    print(describe(f"{args.clients} clients, same adapter", same))
    print(f"concurrent / one at a time: {mixed['tokens_per_s'] / alone['tokens_per_s']:.2f}x (bar 4x, target 6x)")
    print(f"mixed / same adapter:       {mixed['tokens_per_s'] / same['tokens_per_s']:.2f}x (bar 0.85)")
    identical = sum(a == b for a, b in zip(alone["texts"], mixed["texts"]))
    print(f"concurrent answers equal to the ones sent alone: {identical}/{n}")


def hot_load(args, adapters, root) -> None:
    random_adapter(args.model, root / "hot", dtype=args.dtype, seed=7)
    failures: list[str] = []
    stop = threading.Event()
    with server(args.model, adapters, args.dtype, root) as url:
        client = client_for(url)

        def keep_asking(i):
            while not stop.is_set():
                try:
                    chat(client, ADAPTERS[i % 3], PROMPTS[i % len(PROMPTS)], 24)
                except Exception as error:  # noqa: BLE001 - counted
                    failures.append(repr(error))

        workers = [threading.Thread(target=keep_asking, args=(i,)) for i in range(8)]
        for w in workers:
            w.start()
        time.sleep(3)
        loads, availability, first_answers, unloads = [], [], [], []
        for _ in range(args.load_reps):
            started = time.perf_counter()
            response = httpx2.post(
                f"{url}/v1/load_lora_adapter", json={"lora_name": "hot", "lora_path": "hot"}, timeout=120
            )
            returned = time.perf_counter()
            assert response.status_code == 200, response.text
            listed = "hot" in {m.id for m in client.models.list().data}
            availability.append(time.perf_counter() - returned if listed else float("inf"))
            answer = client.chat.completions.create(
                model="hot", messages=[{"role": "user", "content": "hi"}], max_tokens=1, temperature=0
            )
            assert answer.choices[0].message.content is not None
            first_answers.append(time.perf_counter() - returned)
            loads.append(returned - started)
            started = time.perf_counter()
            assert (
                httpx2.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "hot"}, timeout=120).status_code == 200
            )
            unloads.append(time.perf_counter() - started)
        stop.set()
        for w in workers:
            w.join()
    ms = lambda values: f"median {statistics.median(values) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms"  # noqa: E731
    print(f"\n## hot load under load (8 clients streaming, {args.load_reps} load/unload cycles, {args.dtype})")
    print(f"load call:                            {ms(loads)}")
    print(f"listed in /v1/models after the call:  {ms(availability)}")
    print(f"a 1-token answer from it after the call (behind the running batch): {ms(first_answers)}")
    print(f"unload call:                          {ms(unloads)}")
    print(f"requests failed during load/unload:   {len(failures)}" + (f" ({failures[0]})" if failures else ""))


def invariance(args, adapters, root) -> None:
    print("\n## batch invariance: 32 concurrent requests (half streaming) vs each alone, greedy")
    for dtype in ("fp32", "bf16"):
        with server(args.model, adapters, dtype, root) as url:
            client = client_for(url)
            base = client.models.list().data[0].id
            jobs = [([*ADAPTERS, base][i % 4], PROMPTS[i % len(PROMPTS)], bool(i % 2)) for i in range(32)]
            alone = [chat(client, m, p, args.invariance_tokens, s)["text"] for m, p, s in jobs]
            with ThreadPoolExecutor(32) as pool:
                together = list(
                    pool.map(
                        lambda job, c=client: chat(c, job[0], job[1], args.invariance_tokens, job[2])["text"], jobs
                    )
                )
        differing = sum(a != b for a, b in zip(alone, together))
        print(f"{dtype}: {32 - differing}/32 identical to the request sent alone ({differing} differ)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--invariance-tokens", type=int, default=32)
    parser.add_argument("--load-reps", type=int, default=5)
    parser.add_argument("--only", choices=("throughput", "hot_load", "invariance"), default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapters = {
            name: random_adapter(args.model, root / name, dtype=args.dtype, seed=i, std=0.02)
            for i, name in enumerate(ADAPTERS)
        }
        for part in (throughput, hot_load, invariance):
            if args.only in (None, part.__name__):
                part(args, adapters, root)


if __name__ == "__main__":
    main()
