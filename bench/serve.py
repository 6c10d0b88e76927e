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
   with the same request sent alone: fp32 (bar: all identical) and bf16 (reported), each by default and with
   `--batch-invariant` (all identical).
4. Load stall: 4 greedy streams run (on a, b, c and the base) while `POST /v1/load_lora_adapter` loads a
   ~30 MB adapter (r=24, all-linear, fp32) and `/v1/unload_lora_adapter` frees it again, the adapter's files
   once in the page cache and once dropped from it (read from the disk); the time between consecutive chunks
   of each stream before, during and after each call. Bar: the longest gap that overlaps a load is at most
   2× the median gap of the quiet stretches.

    python bench/serve.py                   # all four, ~6 minutes on 2 cores
    python bench/serve.py --only throughput
"""

from __future__ import annotations

import argparse
import itertools
import os
import queue
import re
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
import torch
from openai import OpenAI

import loratune
from common import random_adapter
from loratune.adapters import lora_layers

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
READY = re.compile(r"API at (http://\S+?)/v1")  # the line `loratune serve` prints once it listens


@contextmanager
def server(
    model: str, adapters: dict[str, Path], dtype: str, root: Path, threads: int | None = None, extra: tuple = ()
):
    """``loratune serve`` (plus ``extra`` options) on a port it picks itself (``--port 0``); yields its URL once its
    ready line says it."""
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
        "0",
        "--adapter-root",
        str(root),
        *extra,
    ]
    for name, path in adapters.items():
        command += ["--adapter", f"{name}={path}"]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    found: queue.Queue = queue.Queue()
    lines: list[str] = []

    def drain() -> None:  # read all of stderr, so the server never blocks on a full pipe
        for line in process.stderr:
            lines.append(line)
            if match := READY.search(line):
                found.put(match.group(1))
        found.put(None)

    threading.Thread(target=drain, daemon=True).start()
    try:
        url = found.get(timeout=600)
        if url is None:
            raise RuntimeError(f"the server exited: {''.join(lines)}")
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
    for dtype, extra in itertools.product(("fp32", "bf16"), ((), ("--batch-invariant",))):
        with server(args.model, adapters, dtype, root, extra=extra) as url:
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
        print(
            f"{' '.join((dtype, *extra))}: {32 - differing}/32 identical to the request sent alone ({differing} differ)"
        )


def big_adapter(model_name: str, path: Path, rank: int = 24) -> Path:
    """An all-linear adapter of rank ``rank`` in float32 (r=24 on smollm2-135m: ~29 MB), B drawn small."""
    model, _ = loratune.load_model(model_name, dtype="fp32", device="cpu")
    torch.manual_seed(3)
    loratune.add_adapter(model, loratune.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].normal_(std=0.002)
    return loratune.save_adapter(model, path)


class Stream:
    """One greedy chat stream in a thread, stamping each chunk's arrival, until ``stop`` is set."""

    def __init__(self, client: OpenAI, model: str, prompt: str, stop: threading.Event, max_tokens: int):
        self.stamps: list[float] = []
        self.measured_from = float("inf")
        self.arrived = threading.Condition()
        self.error: Exception | None = None
        self._args = (client, model, prompt, stop, max_tokens)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        client, model, prompt, stop, max_tokens = self._args
        try:
            with client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
            ) as chunks:
                for chunk in chunks:
                    if chunk.choices and chunk.choices[0].delta.content:
                        with self.arrived:
                            self.stamps.append(time.perf_counter())
                            self.arrived.notify_all()
                    if stop.is_set():
                        break
        except Exception as error:  # noqa: BLE001 - reported
            self.error = error
        with self.arrived:
            self.stamps.append(float("nan"))  # the end, so that waiters wake up
            self.arrived.notify_all()

    def wait_for(self, count: int, timeout: float = 120) -> None:
        """Block until the stream has ``count`` chunks (or ended)."""
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.stamps) >= count, timeout)

    def gaps(self) -> list[tuple[float, float]]:
        """(start, end) of each gap between consecutive chunks from ``measured_from`` on."""
        stamps = [t for t in self.stamps if t == t and t >= self.measured_from]
        return list(itertools.pairwise(stamps))


def evict_from_page_cache(directory: Path) -> None:
    """Drop ``directory``'s files from the page cache, so that the next read goes to the disk."""
    for path in (p for p in directory.iterdir() if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages stay cached
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# what each cycle does, in order, between quiet stretches: (label, call, whether the files leave the page cache first)
STALL_CALLS = [
    ("load, file cached", "load", False),
    ("unload", "unload", False),
    ("load, file on disk", "load", True),
    ("unload", "unload", False),
]


def load_stall(args, adapters, root) -> None:
    big = big_adapter(args.model, root / "big")
    size = sum(f.stat().st_size for f in big.iterdir()) / 1e6
    windows: list[list[tuple[float, float]]] = [[] for _ in STALL_CALLS]  # (start, end) of each call, per cycle
    streams: list[Stream] = []
    with server(args.model, adapters, args.dtype, root) as url:
        client = client_for(url)
        base = client.models.list().data[0].id
        chat(client, base, PROMPTS[0], 4)  # warm up
        for _ in range(args.load_reps):
            stop = threading.Event()
            group = [
                Stream(client, model, f"Write a long story about {topic}.", stop, args.stall_tokens)
                for model, topic in zip([*ADAPTERS, base], ["a lighthouse", "a dragon", "the moon", "a baker"])
            ]
            streams += group
            for s in group:  # every stream decoding, past its prefill, and a quiet stretch before the first call
                s.wait_for(25)
            for s in group:
                s.measured_from = time.perf_counter()  # the start (first prefills, first routing) is not measured
            for spans, (_, kind, cold) in zip(windows, STALL_CALLS):
                if cold:
                    evict_from_page_cache(big)
                body = {"lora_name": "big", "lora_path": "big"} if kind == "load" else {"lora_name": "big"}
                started = time.perf_counter()
                response = httpx2.post(f"{url}/v1/{kind}_lora_adapter", json=body, timeout=120)
                spans.append((started, time.perf_counter()))
                assert response.status_code == 200, response.text
                targets = [len(s.stamps) + 20 for s in group]
                for s, target in zip(group, targets):  # a quiet stretch after it
                    s.wait_for(target)
            stop.set()
            for s in group:
                s.thread.join()
    errors = [s.error for s in streams if s.error is not None]

    def overlaps(gap, spans):
        return any(gap[0] < end and gap[1] > start for start, end in spans)

    every = [gap for s in streams for gap in s.gaps()]
    quiet = [b - a for a, b in every if not overlaps((a, b), [span for spans in windows for span in spans])]
    median = statistics.median(quiet)
    print(
        f"\n## load stall: 4 greedy streams while a {size:.0f} MB adapter (r=24, all-linear) is loaded and "
        f"unloaded, {args.load_reps} cycles, {args.dtype}"
    )
    print(
        f"gaps between chunks away from the calls ({len(quiet)}): median {median * 1000:.1f} ms, "
        f"p99 {percentile(quiet, 0.99) / median:.2f}x, longest {max(quiet) / median:.2f}x the median"
    )
    for (label, kind, _), spans in zip(STALL_CALLS, windows):
        worst = [max((b - a for a, b in every if overlaps((a, b), [span])), default=0.0) for span in spans]
        calls = statistics.median(end - start for start, end in spans)
        print(
            f"{label:<19} call median {calls * 1000:4.0f} ms; longest gap overlapping it, each cycle: "
            f"{', '.join(f'{w * 1000:.0f}' for w in worst)} ms = {', '.join(f'{w / median:.2f}' for w in worst)}x "
            "the median" + (" (bar 2x)" if kind == "load" else "")
        )
    print(f"streams failed: {len(errors)}" + (f" ({errors[0]!r})" if errors else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--invariance-tokens", type=int, default=32)
    parser.add_argument("--load-reps", type=int, default=5)
    parser.add_argument("--stall-tokens", type=int, default=1500, help="most tokens of each load_stall stream")
    parser.add_argument("--only", choices=("throughput", "hot_load", "invariance", "load_stall"), default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapters = {
            name: random_adapter(args.model, root / name, dtype=args.dtype, seed=i, std=0.02)
            for i, name in enumerate(ADAPTERS)
        }
        for part in (throughput, hot_load, invariance, load_stall):
            if args.only in (None, part.__name__):
                part(args, adapters, root)


if __name__ == "__main__":
    main()
