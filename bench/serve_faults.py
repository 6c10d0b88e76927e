"""`loratune serve` against the faults a public endpoint meets, each bounded in time, against a real server.

The server runs as its own process (`loratune serve`, smollm2-135m by default, one random r=8 all-linear
adapter "a"); the faults come from the real `openai` client, from httpx and from raw sockets:

1. Hostile and malformed bodies: not JSON, not an object, nested 100,000 deep, NaN and infinite numbers
   (an adapter strength among them), seeds a generator cannot take, values of the wrong type, out-of-range
   sizes, an unknown model or adapter, invalid UTF-8, lone surrogates, a prompt over the context, a 16 MB
   body, a path escape on `load_lora_adapter`. Each must get its expected status with OpenAI's error JSON,
   and the server must answer normally afterwards.
2. Disconnects: a raw-socket non-streaming request (`max_tokens` 4,000) closed after 2 s, a stream closed
   after its first chunk, and a body cut short (Content-Length larger than what is sent). Each must be
   cancelled: running sequences back to 0 and `loratune_cancelled_sequences_total` up, within seconds.
3. A slow reader: a stream read 1 byte per second (a small receive buffer) while other clients are served;
   their latency must stay near what it is without the slow reader.
4. Unicode: emoji, CJK, right-to-left, zero-width, NUL, U+10FFFF through the client (200, and a greedy
   stream joins to exactly the non-streamed text); lone surrogates (400) and an escaped pair (200).
5. 1,000 sequential requests (completions and chat, streaming and not, adapter and base): every one 200,
   and the server's RSS after them within 5% of its RSS after the first 100 (the warm-up).
6. SIGTERM with 8 streams running: every stream finishes whole, a new request is refused, and the process
   exits 0.

    python bench/serve_faults.py                       # ~10 minutes on one core
    python bench/serve_faults.py --requests 200 --only bodies,disconnects
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
from openai import APIStatusError, OpenAI

from common import random_adapter

READY = re.compile(r"API at (http://\S+?)/v1")  # the line `loratune serve` prints once it listens
SECTIONS = ["bodies", "disconnects", "slow_reader", "unicode", "sequential", "sigterm"]
WAIT = 120.0  # the longest any one check may wait before it counts as failed


class Server:
    """``loratune serve`` as a child process on a port it picks (``--port 0``)."""

    def __init__(self, model: str, adapter: Path, dtype: str):
        command = [sys.executable, "-m", "loratune", "serve", "--model", model, "--dtype", dtype, "--port", "0"]
        command += ["--adapter", f"a={adapter}", "--drain-timeout", "60"]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        found: queue.Queue = queue.Queue()

        def drain() -> None:  # read all of stderr, so the server never blocks on a full pipe
            for line in self.process.stderr:
                self.lines.append(line)
                if match := READY.search(line):
                    found.put(match.group(1))
            found.put(None)

        threading.Thread(target=drain, daemon=True).start()
        self.url = found.get(timeout=600)
        if self.url is None:
            raise RuntimeError(f"the server exited: {''.join(self.lines)}")
        self.client = OpenAI(base_url=f"{self.url}/v1", api_key="bench", max_retries=0, timeout=WAIT)
        self.base = next(m.id for m in self.client.models.list().data if m.id != "a")

    def rss_mb(self) -> float:
        text = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx2.get(f"{self.url}/metrics", timeout=WAIT).text
        found = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def wait_running(self, count: int, timeout: float = 10.0) -> float:
        """The running sequences once they are ``count`` (the engine publishes them after each step, so they lag
        a first token by a step), or what they are after ``timeout``."""
        started = time.perf_counter()
        while (
            running := self.metric("loratune_running_sequences")
        ) != count and time.perf_counter() - started < timeout:
            time.sleep(0.05)
        return running

    def wait_idle(self, timeout: float = WAIT) -> float:
        """Seconds until no sequence runs or waits (inf if that never happens within ``timeout``)."""
        started = time.perf_counter()
        while time.perf_counter() - started < timeout:
            if self.metric("loratune_running_sequences") == 0 and self.metric("loratune_queue_depth") == 0:
                return time.perf_counter() - started
            time.sleep(0.05)
        return float("inf")

    def answers(self) -> bool:
        """The server still answers a plain request."""
        reply = self.client.completions.create(model="a", prompt="Hello", max_tokens=2, temperature=0)
        return reply.choices[0].finish_reason in ("stop", "length")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=120)


def post(url: str, body: bytes, path: str) -> httpx2.Response:
    return httpx2.post(f"{url}{path}", content=body, headers={"content-type": "application/json"}, timeout=WAIT)


def raw_request(url: str, body: bytes, path: str, *, length: int | None = None, rcvbuf: int | None = None):
    """A socket that has sent a POST of ``body`` to ``path`` (announcing ``length`` bytes, if given)."""
    where = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connecting: the window the server may fill is set then
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(WAIT)
    sock.connect((where.hostname, where.port))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def chat_body(content: str = "Hi", **fields) -> dict:
    return {"model": "a", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **fields}


def text_body(**fields) -> dict:
    return {"model": "a", "prompt": "Hello", "max_tokens": 4, **fields}


def dumps(body: dict) -> bytes:
    return json.dumps(body).encode()


# --- 1. hostile and malformed bodies --------------------------------------------------------------------------


def hostile_bodies() -> list[tuple[str, bytes, str, set[int]]]:
    """(what, body, path, statuses that are right)."""
    chat, text, load = "/v1/chat/completions", "/v1/completions", "/v1/load_lora_adapter"
    cases = [
        ("empty body", b"", text, {400}),
        ("not JSON", b"hello", text, {400}),
        ("cut short", b'{"model": "a", "prompt": ', text, {400}),
        ("an array", b"[]", text, {400}),
        ("a string", b'"x"', text, {400}),
        ("null", b"null", text, {400}),
        ("100,000 [", b"[" * 100_000, text, {400}),
        ("100,000 {", b"{" * 100_000, text, {400}),
        ('100,000 {"a":', b'{"a":' * 100_000, text, {400}),
        ("nesting in an extra field", dumps(text_body())[:-1] + b', "user": ' + b"[" * 100_000 + b"}", text, {400}),
        ("invalid UTF-8", b'{"model": "a", "prompt": "\xff\xfe", "max_tokens": 1}', text, {400}),
        ("a lone surrogate", rb'{"model": "a", "prompt": "x\ud800", "max_tokens": 1}', text, {400}),
        (
            "a lone low surrogate in chat",
            rb'{"model": "a", "messages": [{"role": "user", "content": "\udc00"}]}',
            chat,
            {400},
        ),
        ("unknown model", dumps(text_body(model="nope")), text, {404}),
        ("model 7", dumps(text_body(model=7)), text, {400}),
        ("model empty", dumps(text_body(model="")), text, {400}),
        ("unknown adapter in a mix", dumps(text_body(adapters={"nope": 1.0})), text, {400, 404}),
        ("adapter name a path", dumps(text_body(adapters={"../../etc/passwd": 1.0})), text, {400, 404}),
        ("messages empty", dumps({"model": "a", "messages": []}), chat, {400}),
        ("role hacker", dumps({"model": "a", "messages": [{"role": "hacker", "content": "x"}]}), chat, {400}),
        ("content 7", dumps({"model": "a", "messages": [{"role": "user", "content": 7}]}), chat, {400}),
        ("prompt []", dumps(text_body(prompt=[])), text, {400}),
        ("prompt [true]", dumps(text_body(prompt=[True])), text, {400}),
        ("token id past the vocabulary", dumps(text_body(prompt=[10**9])), text, {400}),
        ("negative token id", dumps(text_body(prompt=[-1])), text, {400}),
        ("prompt over the context", dumps(text_body(prompt="hello " * 20_000)), text, {400}),
        ("a 16 MB prompt", dumps(text_body(prompt="x" * 16_000_000)), text, {400, 413}),
        ("stop x100", dumps(text_body(stop=["x"] * 100)), text, {400}),
        ("logit_bias", dumps(text_body(logit_bias={"1": 5})), text, {400}),
        ("echo", dumps(text_body(echo=True)), text, {400}),
    ]
    for value in ("NaN", "Infinity", "-Infinity", "1e999"):
        body = f'{{"model": "a", "messages": [{{"role": "user", "content": "Hi"}}], "adapters": {{"a": {value}}}}}'
        cases.append((f"strength {value} (default temperature)", body.encode(), chat, {400}))
        cases.append(
            (f"temperature {value}", f'{{"model": "a", "prompt": "x", "temperature": {value}}}'.encode(), text, {400})
        )
        cases.append((f"top_p {value}", f'{{"model": "a", "prompt": "x", "top_p": {value}}}'.encode(), text, {400}))
    for seed in (2**64, 10**30, -(2**63) - 1):
        cases.append((f"seed {seed}", dumps(text_body(seed=seed, temperature=1)), text, {400}))
    wrong = [
        ("max_tokens", True), ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 10**9), ("max_tokens", 2.5),
        ("max_tokens", "4"), ("n", "2"), ("n", True), ("n", 0), ("n", 1000), ("stream", "yes"), ("stream", 1),
        ("temperature", True), ("temperature", "0"), ("temperature", -1), ("temperature", 3), ("top_k", False),
        ("logprobs", 1000), ("logprobs", True), ("stream_options", {"include_usage": "yes"}),
        ("adapters", {}), ("adapters", {"a": "1"}), ("adapters", {"a": True}), ("adapters", [1]),
    ]  # fmt: skip
    cases += [(f"{field} {value!r}", dumps(text_body(**{field: value})), text, {400}) for field, value in wrong]
    cases += [
        ("load: path outside any root", dumps({"lora_name": "x", "lora_path": "/etc"}), load, {400, 403, 404}),
        ("load: lora_name 7", dumps({"lora_name": 7, "lora_path": "/etc"}), load, {400}),
        ("unload: unknown", dumps({"lora_name": "nope"}), "/v1/unload_lora_adapter", {400, 404}),
    ]
    return cases


def bodies(server: Server) -> bool:
    wrong = []
    cases = hostile_bodies()
    slowest = (0.0, "")
    for what, body, path, statuses in cases:
        started = time.perf_counter()
        response = post(server.url, body, path)
        seconds = time.perf_counter() - started
        slowest = max(slowest, (seconds, what))
        try:
            error = response.json()["error"]
            shaped = {"message", "type", "param", "code"} <= error.keys() and bool(error["message"])
        except (ValueError, KeyError, TypeError):
            shaped = False
        if response.status_code not in statuses or not shaped:
            wrong.append(f"{what}: {response.status_code} {response.text[:200]}")
    alive = server.wait_idle() < WAIT and server.answers()
    print(f"  {len(cases) - len(wrong)}/{len(cases)} bodies got the expected status with OpenAI's error JSON")
    print(f"  slowest: {slowest[1]} in {slowest[0]:.2f} s; the server answers afterwards: {alive}")
    for line in wrong:
        print(f"  WRONG {line}")
    return not wrong and alive


# --- 2. disconnects ----------------------------------------------------------------------------------------------


def disconnects(server: Server) -> bool:
    ok = True
    long = {"max_tokens": 4000, "ignore_eos": True, "temperature": 0}
    kinds = [
        ("non-streaming, closed after 2 s", dumps(text_body(**long)), None, 2.0),
        ("streaming, closed after its first chunk", dumps(text_body(stream=True, **long)), None, None),
        ("body cut short (Content-Length 1,000, 40 sent)", dumps(text_body())[:40], 1000, 1.0),
    ]
    for what, body, length, hold in kinds:
        server.wait_idle()
        before = server.metric("loratune_cancelled_sequences_total", '{model="a"}')
        sock = raw_request(server.url, body, "/v1/completions", length=length)
        if hold is None:
            first = sock.recv(4096)  # the head and (soon) the first chunk
            while b"data:" not in first:
                first += sock.recv(4096)
        else:
            time.sleep(hold)
        running = server.wait_running(0 if length is not None else 1, timeout=2.0)
        sock.close()
        freed = server.wait_idle()
        cancelled = server.metric("loratune_cancelled_sequences_total", '{model="a"}') - before
        expected = 0 if length is not None else 1  # a body cut short never became a sequence
        # (the cancelled counter counts sequences unfinished when their client left: +1 proves it still ran)
        right = freed < 10 and cancelled == expected
        ok &= right
        print(
            f"  {what}: running {running:.0f} when closed, idle {freed:.2f} s after, cancelled +{cancelled:.0f}"
            f" [{'ok' if right else 'WRONG'}]"
        )
    return ok and server.answers()


# --- 3. a slow reader ------------------------------------------------------------------------------------------------


def probe_seconds(server: Server, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        server.client.completions.create(model="a", prompt="Hello", max_tokens=4, temperature=0)
        times.append(time.perf_counter() - started)
    return times


def slow_reader(server: Server, seconds: int) -> bool:
    alone = probe_seconds(server, 10)
    body = dumps(chat_body("Tell me a long story.", max_tokens=512, ignore_eos=True, temperature=0, stream=True))
    sock = raw_request(server.url, body, "/v1/chat/completions", rcvbuf=1024)
    got = bytearray()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set() and len(got) < seconds:
            got.extend(sock.recv(1))  # one byte a second: far slower than the tokens come
            time.sleep(1.0)

    reader = threading.Thread(target=read)
    reader.start()
    beside = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        beside += probe_seconds(server, 1)
    stop.set()
    reader.join()
    sock.close()
    idle = server.wait_idle()
    ratio = statistics.median(beside) / statistics.median(alone)
    right = got.startswith(b"HTTP/1.1 200") and ratio < 3 and idle < 10
    print(
        f"  read {len(got)} bytes at 1 byte/s ({bytes(got[:15])!r}...); requests beside it: {len(beside)},"
        f" median {statistics.median(beside) * 1000:.0f} ms against {statistics.median(alone) * 1000:.0f} ms"
        f" alone ({ratio:.2f}x); idle {idle:.2f} s after closing [{'ok' if right else 'WRONG'}]"
    )
    return right


# --- 4. unicode ------------------------------------------------------------------------------------------------------


def unicode(server: Server) -> bool:
    texts = [
        "Répondez en français : où est la bibliothèque ?",
        "用中文回答：今天天气怎么样？",
        "עברית العربية مرحبا",
        "emoji 😀🎉👩‍👩‍👧‍👦 and flags 🇫🇷",
        "zero\u200bwidth\u200d joiners and \u202eright-to-left override",
        "a NUL \x00 inside",
        "the last code point \U0010ffff and a private one \ue000",
        "combining e\u0301\u0301\u0301 and Zalgo t̸̢͙͈h̵̡͎e̶",
    ]
    ok = True
    for text in texts:
        messages = [{"role": "user", "content": text}]
        whole = server.client.chat.completions.create(model="a", messages=messages, max_tokens=24, temperature=0)
        pieces = [
            c.choices[0].delta.content or ""
            for c in server.client.chat.completions.create(
                model="a", messages=messages, max_tokens=24, temperature=0, stream=True
            )
            if c.choices
        ]
        same = "".join(pieces) == whole.choices[0].message.content
        ok &= same
        if not same:
            print(
                f"  WRONG {text!r}: the stream joins to {''.join(pieces)!r}, not {whole.choices[0].message.content!r}"
            )
    raw = [
        (rb'{"model": "a", "prompt": "\ud83d\ude00", "max_tokens": 2}', 200),  # an escaped pair: one emoji
        (rb'{"model": "a", "prompt": "\ud83d", "max_tokens": 2}', 400),
        (rb'{"model": "a", "prompt": "\ude00\ud83d", "max_tokens": 2}', 400),  # a pair the wrong way round
    ]
    statuses = [post(server.url, body, "/v1/completions").status_code for body, _ in raw]
    ok &= statuses == [want for _, want in raw]
    print(
        f"  {len(texts)} texts: greedy streams equal the whole answers: {ok}; surrogates (pair, lone, reversed):"
        f" {statuses}"
    )
    return ok


# --- 5. 1,000 sequential requests ------------------------------------------------------------------------------------


def sequential(server: Server, count: int) -> bool:
    warm_up = 100

    def one(i: int) -> None:
        model = "a" if i % 2 else server.base
        stream = i % 4 >= 2
        if i % 8 < 4:
            answer = server.client.completions.create(
                model=model, prompt=f"Count to {i}:", max_tokens=4, temperature=0, stream=stream
            )
        else:
            messages = [{"role": "user", "content": f"What is {i} + {i}?"}]
            answer = server.client.chat.completions.create(
                model=model, messages=messages, max_tokens=4, temperature=0, stream=stream
            )
        if stream:
            for _ in answer:
                pass

    samples = []
    failed = 0
    started = time.perf_counter()
    for i in range(count):
        try:
            one(i)
        except APIStatusError:
            failed += 1
        if i + 1 == warm_up or (i + 1) % 100 == 0:
            samples.append((i + 1, server.rss_mb()))
    seconds = time.perf_counter() - started
    start = dict(samples)[warm_up]
    end = samples[-1][1]
    growth = (end - start) / start
    right = failed == 0 and abs(growth) <= 0.05
    print(f"  {count} requests in {seconds:.0f} s ({count / seconds:.1f}/s), {failed} failed")
    print("  RSS MB after " + ", ".join(f"{n}: {mb:.0f}" for n, mb in samples))
    print(
        f"  RSS after the warm-up ({warm_up}) {start:.1f} MB, at the end {end:.1f} MB: {growth:+.2%}"
        f" [{'ok' if right else 'WRONG'}]"
    )
    return right


# --- 6. SIGTERM with 8 streams running -------------------------------------------------------------------------------


def sigterm(server: Server, tokens: int = 64) -> bool:
    began: queue.Queue = queue.Queue()  # one item per stream: once it has its first chunk, or has failed
    results: list = [None] * 8

    def stream(i: int) -> None:
        text, usage, reason, first = [], None, None, True
        try:
            for chunk in server.client.chat.completions.create(
                model="a" if i % 2 else server.base,
                messages=[{"role": "user", "content": f"Story {i}"}],
                max_tokens=tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            ):
                if first:
                    first = False
                    began.put(i)
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
                if chunk.choices:
                    text.append(chunk.choices[0].delta.content or "")
                    reason = chunk.choices[0].finish_reason or reason
            results[i] = (usage, reason)
        except Exception as error:  # noqa: BLE001 - reported
            results[i] = error
            if first:
                began.put(i)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for _ in threads:
        began.get(timeout=WAIT)
    running = server.wait_running(8)
    signalled = time.perf_counter()
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    try:  # a new request while draining: refused (503), or the connection refused once the listener is closed
        refused = str(post(server.url, dumps(text_body()), "/v1/completions").status_code)
    except httpx2.HTTPError as error:
        refused = type(error).__name__
    for thread in threads:
        thread.join(timeout=WAIT)
    code = server.process.wait(timeout=WAIT)
    drained = time.perf_counter() - signalled
    whole = sum(r == (tokens, "length") for r in results)
    right = whole == 8 and code == 0 and refused in ("503", "ConnectError")
    print(
        f"  {running:.0f} sequences running at SIGTERM; {whole}/8 streams finished whole ({tokens} tokens,"
        f" 'length'); a new request during the drain: {refused}; exit status {code} after {drained:.1f} s"
        f" [{'ok' if right else 'WRONG'}]"
    )
    if whole != 8:
        print(f"  streams: {results}")
    return right


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--requests", type=int, default=1000, help="sequential requests (RSS check)")
    parser.add_argument("--slow-seconds", type=int, default=20, help="how long the slow reader reads")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated, of {SECTIONS}")
    args = parser.parse_args()
    only = args.only.split(",")
    if unknown := set(only) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    print(f"loratune serve faults: {args.model} {args.dtype}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        adapter = random_adapter(args.model, Path(tmp) / "a", dtype=args.dtype)
        server = Server(args.model, adapter, args.dtype)
        try:
            print(f"server up at {server.url}, RSS {server.rss_mb():.0f} MB")
            for name in SECTIONS:
                if name not in only:
                    continue
                print(f"{name}:")
                started = time.perf_counter()
                if name == "bodies":
                    results[name] = bodies(server)
                elif name == "disconnects":
                    results[name] = disconnects(server)
                elif name == "slow_reader":
                    results[name] = slow_reader(server, args.slow_seconds)
                elif name == "unicode":
                    results[name] = unicode(server)
                elif name == "sequential":
                    results[name] = sequential(server, args.requests)
                else:
                    results[name] = sigterm(server)
                print(f"  ({time.perf_counter() - started:.0f} s)")
        finally:
            server.close()
    print("summary: " + ", ".join(f"{name} {'ok' if ok else 'FAILED'}" for name, ok in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
