"""`loratune serve` against the faults a public endpoint meets: hostile and malformed bodies, values OpenAI
refuses, clients that go away, a sequence whose output is not a number. A real HTTP server over a tiny Llama
with a long context (so an abandoned request would run for minutes), spoken to with the real `openai` client,
and with raw bytes and sockets where the client cannot express the fault.

Every test waits on what it can observe (the engine's published stats, the metrics), never on a timer; a
timeout only bounds how long a broken server can make a test wait before it fails."""

from __future__ import annotations

import json
import queue
import re
import socket
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx2
import pytest
import torch
from openai import APIStatusError, OpenAI

from loratune import LoraConfig, add_adapter, load_adapter, save_adapter, set_active
from loratune.cli import main
from loratune.data import encode_texts
from loratune.inference.engine import Engine
from loratune.inference.sequence import Failed, Finished, SamplingParams, Sequence
from loratune.models.loader import load_model
from loratune.serve import build, serving

pytestmark = pytest.mark.integration  # real HTTP servers

CONTEXT = 1_000_000  # long enough that a request nobody cancels runs for many minutes
LONG = 500_000  # max_tokens of such a request
WAIT = 120  # seconds a broken server may hold a test before it fails


@pytest.fixture(scope="module")
def model_dir(make_tiny_llama_dir):
    return make_tiny_llama_dir(max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    return _adapter_for(model_dir, tmp_path_factory.mktemp("adapters") / "a")


def _adapter_for(model_dir, path):
    """A random adapter "a" of the model at ``model_dir``, saved at ``path``."""
    model, _ = load_model(str(model_dir), dtype="fp32")
    torch.manual_seed(3)
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return save_adapter(model, path)


@contextmanager
def server(model_dir, adapter_dir, **options):
    """A service of the tiny model with adapter "a", served over HTTP; yields (base URL, service)."""
    model, tokenizer = load_model(str(model_dir), dtype="fp32")
    service = build(model, tokenizer, "tiny", [("a", str(adapter_dir), 1.0)], **options)
    try:
        with serving(service) as url:
            yield url, service
    finally:
        service.close()


@pytest.fixture(scope="module")
def served(model_dir, adapter_dir):
    with server(model_dir, adapter_dir) as running:
        yield running


@pytest.fixture(scope="module")
def client(served):
    return OpenAI(base_url=f"{served[0]}/v1", api_key="unused", max_retries=0, timeout=WAIT)


def _post(url: str, body: bytes, path: str = "/v1/completions") -> httpx2.Response:
    return httpx2.post(f"{url}{path}", content=body, headers={"content-type": "application/json"}, timeout=WAIT)


def _raw_request(url: str, body: dict, path: str = "/v1/completions") -> socket.socket:
    """A socket that has sent ``body`` as a POST to ``path`` and reads nothing: close it to go away."""
    where = urlsplit(url)
    data = json.dumps(body).encode()
    sock = socket.create_connection((where.hostname, where.port), timeout=WAIT)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def _cancelled(url: str, model: str) -> float:
    """loratune_cancelled_sequences_total for ``model`` (0 before any)."""
    text = httpx2.get(f"{url}/metrics").text
    found = re.search(rf'^loratune_cancelled_sequences_total{{model="{model}"}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _quiet(service) -> None:
    """Wait until nothing runs or waits in the engine, and assert it."""
    stats = service.engine.wait_for_stats(lambda s: s.running == 0 and s.waiting == 0, timeout=WAIT)
    assert (stats.running, stats.waiting) == (0, 0), stats


def _answers(client) -> None:
    """The server still answers a plain request."""
    answer = client.completions.create(model="a", prompt="hello", max_tokens=3, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length")


# --- values OpenAI refuses are refused (400), and the server keeps serving ---------------------------------


@pytest.mark.parametrize("temperature", [None, 0])
@pytest.mark.parametrize("strength", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_a_strength_that_is_not_a_finite_number_is_a_400(served, client, strength, temperature):
    url, service = served
    sampling = "" if temperature is None else f', "temperature": {temperature}'
    body = (
        f'{{"model": "tiny", "messages": [{{"role": "user", "content": "hi"}}], "adapters": {{"a": {strength}}},'
        f' "max_tokens": 4{sampling}}}'
    )
    response = _post(url, body.encode(), "/v1/chat/completions")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "adapters.a" and "finite" in error["message"]
    _quiet(service)
    _answers(client)


@pytest.mark.parametrize("seed", [2**64, 2**70, -(2**63) - 1])
def test_a_seed_outside_what_a_generator_takes_is_a_400(client, seed):
    with pytest.raises(APIStatusError) as refused:
        client.completions.create(model="a", prompt="x", max_tokens=2, temperature=1, seed=seed)
    assert refused.value.status_code == 400 and refused.value.response.json()["error"]["param"] == "seed"
    _answers(client)


@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63), 0])
def test_seeds_at_the_ends_of_the_range_sample_and_repeat(client, seed):
    def sample():
        answer = client.completions.create(model="a", prompt="x", max_tokens=6, temperature=1, seed=seed, n=2)
        return [c.text for c in answer.choices]

    first = sample()
    assert len(first) == 2 and sample() == first  # n = 2 from the last seed wraps around, reproducibly


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", True),
        ("max_tokens", 2.0),
        ("max_tokens", "2"),
        ("n", "2"),
        ("n", True),
        ("stream", "yes"),
        ("stream", 1),
        ("temperature", True),
        ("temperature", "0.5"),
        ("seed", 1.5),
        ("seed", "7"),
        ("top_k", False),
        ("logprobs", True),  # an int on completions
        ("prompt", [True, False]),
        ("stream_options", {"include_usage": "yes"}),
        ("model", 7),
    ],
)
def test_values_of_the_wrong_type_are_refused_not_coerced(served, client, field, value):
    body = {"model": "a", "prompt": "x", "max_tokens": 2, "temperature": 0, field: value}
    response = _post(served[0], json.dumps(body).encode())
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(field)
    _answers(client)


def test_a_chat_message_and_its_fields_are_checked_as_strictly(served):
    for message in ({"role": "user", "content": 7}, {"role": "user", "content": [{"type": "text", "text": 7}]}):
        body = {"model": "a", "messages": [message], "max_tokens": 2}
        response = _post(served[0], json.dumps(body).encode(), "/v1/chat/completions")
        assert response.status_code == 400 and response.json()["error"]["param"].startswith("messages.0.content")
    body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "logprobs": 1}  # a bool on chat
    response = _post(served[0], json.dumps(body).encode(), "/v1/chat/completions")
    assert response.status_code == 400 and response.json()["error"]["param"] == "logprobs"


# --- hostile bodies ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"model": "a", "prompt": "x", "user": ' + b"{" * 100_000])
def test_nesting_that_would_exhaust_the_parser_is_a_400(served, client, body):
    response = _post(served[0], body)
    assert response.status_code == 400 and "nests" in response.json()["error"]["message"]
    _answers(client)


def test_nesting_is_counted_by_brackets_outside_strings(served):
    def body(depth: int, prompt: str = "x") -> bytes:
        metadata = "[" * depth + "]" * depth  # an extra field: ignored once parsed
        return f'{{"model": "a", "prompt": {json.dumps(prompt)}, "max_tokens": 1, "metadata": {metadata}}}'.encode()

    assert _post(served[0], body(63)).status_code == 200  # with the body's own object: 64 levels
    assert _post(served[0], body(64)).status_code == 400
    assert _post(served[0], body(10, prompt='"[{' * 1000)).status_code == 200  # brackets in a string


@pytest.mark.parametrize(
    "body, param",
    [
        (rb'{"model": "a", "prompt": "x\ud800y", "max_tokens": 1}', "prompt"),
        (rb'{"model": "a", "messages": [{"role": "user", "content": "\udc00"}]}', "messages.0.content"),
        (rb'{"model": "\ud83d", "prompt": "x"}', "model"),
        (rb'{"model": "a", "prompt": "x", "adapters": {"\ud800": 1}}', "adapters"),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_its_field(served, client, body, param):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    response = _post(served[0], body, path)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "surrogate" in error["message"]
    _answers(client)


def test_unicode_of_every_kind_is_served(served, client):
    texts = ["😀 naïve 中文 עברית العربية", "zero\u200bwidth \u202eright-to-left", "nul \x00 in it", "\U0010ffff"]
    for text in texts:
        chat = client.chat.completions.create(
            model="a", messages=[{"role": "user", "content": text}], max_tokens=3, temperature=0
        )
        assert chat.choices[0].finish_reason in ("stop", "length")
    pair = _post(served[0], rb'{"model": "a", "prompt": "\ud83d\ude00", "max_tokens": 1}')  # escaped, paired
    assert pair.status_code == 200, pair.text
    not_utf8 = _post(served[0], b'{"model": "a", "prompt": "\xff\xfe", "max_tokens": 1}')
    assert not_utf8.status_code == 400 and "UTF-8" in not_utf8.json()["error"]["message"]


# --- clients that go away --------------------------------------------------------------------------------------


def test_a_client_that_disconnects_from_a_non_streaming_request_frees_its_slot(served):
    url, service = served
    _quiet(service)
    before = _cancelled(url, "a")
    body = {"model": "a", "prompt": "hello", "max_tokens": LONG, "temperature": 0, "ignore_eos": True}
    sock = _raw_request(url, body)
    try:
        steps = service.engine.stats.steps
        running = service.engine.wait_for_stats(lambda s: s.running == 1 and s.steps > steps + 2, timeout=WAIT)
        assert running.running == 1, "the request never started"
    finally:
        sock.close()
    _quiet(service)  # without the cancel: LONG tokens, many minutes
    assert _cancelled(url, "a") == before + 1


def test_clients_that_disconnect_while_queued_leave_the_queue(model_dir, adapter_dir):
    """One sequence at a time: a long request runs, a stream and a plain request wait behind it; both go away
    before their first token, so they leave the queue (not when the batch has room), then the long one goes."""
    with server(model_dir, adapter_dir, max_batch=1) as (url, service):
        long = _raw_request(url, {"model": "a", "prompt": "hello", "max_tokens": LONG, "ignore_eos": True})
        try:
            assert service.engine.wait_for_stats(lambda s: s.running == 1, timeout=WAIT).running == 1
            waiting = [
                _raw_request(url, {"model": "a", "prompt": "hi", "max_tokens": 4, "stream": stream})
                for stream in (True, False)
            ]
            assert service.engine.wait_for_stats(lambda s: s.waiting == 2, timeout=WAIT).waiting == 2
            for sock in waiting:
                sock.close()
            stats = service.engine.wait_for_stats(lambda s: s.waiting == 0, timeout=WAIT)
            assert (stats.waiting, stats.running) == (0, 1)
            assert _cancelled(url, "a") == 2
        finally:
            long.close()
        _quiet(service)
        assert _cancelled(url, "a") == 3


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served):
    url, service = served
    _quiet(service)
    before = _cancelled(url, "a")
    body = {"model": "a", "prompt": "hello", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    with httpx2.stream("POST", f"{url}/v1/completions", json=body, timeout=WAIT) as response:
        assert next(response.iter_lines()).startswith("data:")
    _quiet(service)
    assert _cancelled(url, "a") == before + 1


# --- a failing sequence fails alone ------------------------------------------------------------------------------


def test_a_sequence_whose_output_is_not_a_number_fails_alone(model_dir, adapter_dir):
    """Rows with a non-finite strength (greedy and sampled) prefilled together with plain rows, and one joining a
    decoding batch: each such row gets its own 500, the others answer exactly as alone and keep decoding, and
    the engine goes on."""
    model, tokenizer = load_model(str(model_dir), dtype="fp32")
    load_adapter(model, adapter_dir, name="a")
    set_active(model, [])
    ids = encode_texts(tokenizer, ["hello world"])[0]
    ends: queue.Queue = queue.Queue()

    def sequence(strength: float, temperature: float = 0.0, tokens: int = 12) -> Sequence:
        def sink(event):
            if isinstance(event, Finished | Failed):
                ends.put((seq, event))

        params = SamplingParams(tokens, temperature, seed=5 if temperature else None)
        seq = Sequence(ids, {"a": strength}, params, tokenizer, frozenset(), sink)
        return seq

    def ended(count: int) -> dict[Sequence, Finished | Failed]:
        return dict(ends.get(timeout=WAIT) for _ in range(count))

    def started(engine: Engine, seqs: list[Sequence]) -> Engine:
        for seq in seqs:
            engine.submit(seq)  # all queued before the engine looks: one prefill
        engine.start()
        return engine

    plain = [sequence(1.0), sequence(0.5)]
    alone = {}
    for strength in (1.0, 0.5):
        engine = started(Engine(model), [sequence(strength)])
        try:
            (seq, end), *_ = ended(1).items()
        finally:
            engine.stop()
        assert isinstance(end, Finished)
        alone[strength] = seq.tokens
    broken = [sequence(float("nan")), sequence(float("nan"), temperature=1.0), sequence(float("inf"))]
    engine = started(Engine(model, max_batch=8), [plain[0], *broken, plain[1]])
    try:
        together = ended(5)
        running = sequence(1.0, tokens=LONG)
        engine.submit(running)
        steps = engine.stats.steps
        # past the 12 tokens compared below before the broken row joins, so that they are all its own work
        assert engine.wait_for_stats(lambda s: s.running == 1 and s.steps > steps + 13, timeout=WAIT).running == 1
        late = sequence(float("nan"))
        engine.submit(late)
        (seq, failure), *_ = ended(1).items()
        assert seq is late and not running.done  # the running row went on
        made = len(running.tokens)
        steps = engine.stats.steps
        assert engine.wait_for_stats(lambda s: s.steps > steps + 2, timeout=WAIT).running == 1
        assert len(running.tokens) > made  # and still goes on
        running.cancel()
        after = sequence(0.5)
        engine.submit(after)
        (_, end), *_ = ended(1).items()
    finally:
        engine.stop()
    for failed in [*(together[seq] for seq in broken), failure]:
        assert isinstance(failed, Failed) and failed.status == 500 and "not a number" in failed.message
    assert all(isinstance(together[seq], Finished) for seq in plain)
    assert [seq.tokens for seq in plain] == [alone[1.0], alone[0.5]]
    assert running.tokens[:12] == alone[1.0] and len(running.tokens) > 12
    assert isinstance(end, Finished) and after.tokens == alone[0.5]


def test_a_text_too_long_for_the_context_is_refused_before_it_is_tokenized(make_tiny_llama_dir, tmp_path):
    """Megabytes of prompt would hold the one tokenizing thread for seconds, and every request behind it: a
    text with more characters than the context's tokens can cover is refused from its length alone."""
    model_dir = make_tiny_llama_dir(max_position_embeddings=64)
    _, tokenizer = load_model(str(model_dir), dtype="fp32")
    most = 64 * max(map(len, tokenizer.get_vocab())) * 2
    with server(model_dir, _adapter_for(model_dir, tmp_path / "a")) as (url, _):
        client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=WAIT)
        calls = {
            "prompt": lambda text: client.completions.create(model="a", prompt=["hi", text], max_tokens=1),
            "messages": lambda text: client.chat.completions.create(
                model="a", messages=[{"role": "user", "content": text}], max_tokens=1
            ),
        }
        for param, call in calls.items():
            with pytest.raises(APIStatusError) as refused:
                call("x" * (most + 1))
            error = refused.value.response.json()["error"]
            assert refused.value.status_code == 400 and error["param"] == param
            assert f"{most + 1:,} characters long" in error["message"]
            with pytest.raises(APIStatusError) as counted:  # at the bound: tokenized, then refused by its count
                call("x" * most)
            assert (
                counted.value.status_code == 400 and "tokens, which fills the model's context" in counted.value.message
            )
        _answers(client)


def test_a_body_over_the_limit_is_a_413_before_it_is_read(model_dir, adapter_dir):
    """Announced (Content-Length) or not (chunked), a body over ``--max-body-bytes`` gets OpenAI's error JSON with
    413, the server reads no more of it, and requests within the limit are served as before."""
    with server(model_dir, adapter_dir, max_body_bytes=4096) as (url, _):
        client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=WAIT)
        with pytest.raises(APIStatusError) as refused:
            client.completions.create(model="a", prompt="x" * 5000, max_tokens=1)
        error = refused.value.response.json()["error"]
        assert refused.value.status_code == 413 and error["code"] == "request_too_large"
        assert "4,096 bytes" in error["message"] and "--max-body-bytes" in error["message"]
        body = json.dumps({"model": "a", "prompt": "x" * 5000, "max_tokens": 1}).encode()
        chunked = httpx2.post(
            f"{url}/v1/completions",
            content=(body[i : i + 1000] for i in range(0, len(body), 1000)),  # no Content-Length: chunked
            headers={"content-type": "application/json"},
            timeout=WAIT,
        )
        assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
        assert "content-length" not in chunked.request.headers
        _answers(client)


def test_a_request_whose_output_overflows_gets_its_error_and_the_batch_goes_on(served, client):
    """A finite strength far too large (3.4e38, just under float32's largest) overflows the model's output to NaN: that
    request gets its own error, streaming or not, while a stream running beside it answers as if alone."""
    url, service = served
    _quiet(service)
    ignore_eos = {"ignore_eos": True}
    alone = client.completions.create(model="a", prompt="hello", max_tokens=40, temperature=0, extra_body=ignore_eos)
    beside = client.completions.create(
        model="a", prompt="hello", max_tokens=LONG, temperature=0, stream=True, extra_body=ignore_eos
    )
    pieces = [next(beside).choices[0].text]  # it runs (for minutes, unless cancelled) while the others fail
    for stream in (False, True):
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 4, "adapters": {"a": 3.4e38}, "stream": stream}
        response = _post(url, json.dumps(body).encode())
        if stream:  # the failure comes as the stream's first event: an error event
            assert response.status_code == 200 and '"error"' in response.text and "not a number" in response.text
        else:
            assert response.status_code == 500 and "not a number" in response.json()["error"]["message"]
    assert service.engine.stats.running == 1  # still running
    for chunk in beside:
        pieces.append(chunk.choices[0].text)
        if len("".join(pieces)) >= len(alone.choices[0].text):
            break
    beside.close()
    assert "".join(pieces).startswith(alone.choices[0].text)
    _quiet(service)
    _answers(client)


# --- --max-tokens-default ---------------------------------------------------------------------------------------


def test_max_tokens_default_caps_requests_that_give_none(model_dir, adapter_dir):
    with server(model_dir, adapter_dir, max_tokens_default=5, max_tokens_limit=9) as (url, _):
        client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=WAIT)
        default = client.completions.create(model="a", prompt="hi", temperature=0, extra_body={"ignore_eos": True})
        asked = client.completions.create(
            model="a", prompt="hi", temperature=0, max_tokens=9, extra_body={"ignore_eos": True}
        )
        with pytest.raises(APIStatusError) as refused:
            client.completions.create(model="a", prompt="hi", max_tokens=10)
    assert default.usage.completion_tokens == 5 and default.choices[0].finish_reason == "length"
    assert asked.usage.completion_tokens == 9
    assert refused.value.status_code == 400 and "--max-tokens-limit" in refused.value.message


def test_a_default_above_the_limit_is_refused_before_loading(capsys):
    status = main(["serve", "--model", "/no/such/model", "--max-tokens-default", "10", "--max-tokens-limit", "5"])
    err = capsys.readouterr().err
    assert status == 2 and "--max-tokens-default 10 is above --max-tokens-limit 5" in err
