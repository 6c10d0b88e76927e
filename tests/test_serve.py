"""`loratune serve`: a real HTTP server (uvicorn on loopback) over a tiny Llama with three adapters, spoken to
with the real `openai` client (and raw HTTP for what the client cannot send).

Servers bind port 0 themselves and say which port they got (no free-port-then-bind race), and tests wait on
what they can observe (a ready line, a streamed chunk, the engine's published stats), never on a timer."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx2
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import APIStatusError, OpenAI

from loratune import LoraConfig, add_adapter, compress_adapter, load_adapter, save_adapter, set_active
from loratune.cli import main
from loratune.data import chat_prompt_ids, encode_texts
from loratune.inference.decode import stream_greedy
from loratune.inference.engine import Engine
from loratune.inference.sequence import Finished, SamplingParams, Sequence
from loratune.models.loader import load_model
from loratune.serve import build, reading, serving

pytestmark = pytest.mark.integration  # real HTTP servers (and one subprocess)

ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=8, lora_alpha=32, target_modules="all-linear"),
    "c": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], use_dora=True),
}
PROMPTS = ["The capital of France", "1 + 1 =", "hello world", "Translate to French: hello"]


def _make_adapter(model_dir: Path, out: Path, seed: int, **config) -> Path:
    model, _ = load_model(str(model_dir), dtype="fp32")
    torch.manual_seed(seed)
    add_adapter(model, LoraConfig(init_lora_weights=False, **config))
    save_adapter(model, out)
    return out


@contextmanager
def own_server(model, tokenizer, adapters=(), **options):
    """A service of its own for one test, served over HTTP; yields its base URL."""
    service = build(model, tokenizer, "tiny", list(adapters), **options)
    try:
        with serving(service) as url:
            yield url
    finally:
        service.close()


@pytest.fixture(scope="module")
def served(make_tiny_llama_dir, tmp_path_factory):
    """(model dir, {name: adapter dir}, adapter root, service) — the service runs until the module ends."""
    model_dir = make_tiny_llama_dir()
    root = tmp_path_factory.mktemp("adapters")
    dirs = {
        name: _make_adapter(model_dir, root / name, 10 + i, **cfg) for i, (name, cfg) in enumerate(ADAPTERS.items())
    }
    _make_adapter(model_dir, root / "spare", 20, **ADAPTERS["a"])
    _make_adapter(model_dir, root / "spare2", 21, **ADAPTERS["b"])
    model, tokenizer = load_model(str(model_dir), dtype="fp32")
    service = build(
        model,
        tokenizer,
        "tiny",
        [(n, str(d), 1.0) for n, d in dirs.items()],
        adapter_root=root,
        max_tokens_limit=64,
        max_loaded=4,
    )
    yield model_dir, dirs, root, service
    service.close()


@pytest.fixture(scope="module")
def url(served):
    with serving(served[3]) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _complete(client, model, prompt, max_tokens=12, stream=False, **extra):
    if not stream:
        answer = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **extra)
        return answer.choices[0].text
    chunks = client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, **extra
    )
    return "".join(c.choices[0].text for c in chunks if c.choices)


def _first_chunk_then_rest(client, model, prompt, max_tokens, started: threading.Event) -> tuple[str, str]:
    """A streamed completion that sets ``started`` once its first chunk has arrived; its whole text and its
    finish reason."""
    pieces, reason = [], None
    for chunk in client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
    ):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            reason = chunk.choices[0].finish_reason or reason
        started.set()
    return "".join(pieces), reason


def _metric(text: str, name: str) -> float:
    """The value of the sample ``name`` (with its labels, if any) in Prometheus' text format."""
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in the metrics"
    return float(found.group(1))


def _chat(client, model, text, max_tokens=12, stream=False, **extra):
    messages = [{"role": "user", "content": text}]
    if not stream:
        answer = client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0, **extra
        )
        return answer.choices[0].message.content
    chunks = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True, **extra
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_models_lists_the_base_and_every_adapter(client, served):
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {"tiny", "a", "b", "c"}
    assert listed["a"].parent == "tiny" and listed["a"].root == str(served[1]["a"])
    assert listed["tiny"].parent is None


def test_greedy_answers_are_what_generate_prints(client, served, capsys):
    model_dir, dirs = served[0], served[1]
    for name in ("a", "c"):
        assert (
            main(
                [
                    "generate",
                    "--model",
                    str(model_dir),
                    "--adapter",
                    str(dirs[name]),
                    "--prompt",
                    PROMPTS[0],
                    "--max-new-tokens",
                    "12",
                    "--dtype",
                    "fp32",
                ]
            )
            == 0
        )
        chat_expected = capsys.readouterr().out.removesuffix("\n")
        assert (
            main(
                [
                    "generate",
                    "--model",
                    str(model_dir),
                    "--adapter",
                    str(dirs[name]),
                    "--prompt",
                    PROMPTS[1],
                    "--raw",
                    "--max-new-tokens",
                    "12",
                    "--dtype",
                    "fp32",
                ]
            )
            == 0
        )
        raw_expected = capsys.readouterr().out.removesuffix("\n")
        assert _chat(client, name, PROMPTS[0]) == chat_expected
        assert _complete(client, name, PROMPTS[1]) == raw_expected
    assert (
        main(
            [
                "generate",
                "--model",
                str(model_dir),
                "--prompt",
                PROMPTS[2],
                "--raw",
                "--max-new-tokens",
                "12",
                "--dtype",
                "fp32",
            ]
        )
        == 0
    )
    assert _complete(client, "tiny", PROMPTS[2]) == capsys.readouterr().out.removesuffix("\n")


def test_streamed_text_joins_to_the_unstreamed_text(client):
    for model in ("tiny", "a", "b", "c"):
        for prompt in PROMPTS[:2]:
            assert _complete(client, model, prompt, 20, stream=True) == _complete(client, model, prompt, 20)
            assert _chat(client, model, prompt, 20, stream=True) == _chat(client, model, prompt, 20)


def test_32_concurrent_requests_over_3_adapters_and_the_base_equal_each_sent_alone(client):
    jobs = [
        (model, PROMPTS[i % len(PROMPTS)], bool(i % 2), "chat" if i % 3 == 0 else "completion")
        for i, model in enumerate(["tiny", "a", "b", "c"] * 8)
    ]

    def run(job):
        model, prompt, stream, kind = job
        return (_chat if kind == "chat" else _complete)(client, model, prompt, 24, stream=stream)

    alone = [run(job) for job in jobs]
    assert len({alone[i] for i in range(4)}) == 4, "the adapters must answer differently for this test to mean anything"
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(run, jobs))
    assert together == alone


def test_a_batch_invariant_bf16_server_answers_each_request_with_the_bits_it_gets_alone(served):
    """``--batch-invariant``: in bf16 too, concurrent requests over the adapters (DoRA's among them), a weighted
    mix and the base get the very tokens and logprobs each gets sent alone."""
    model_dir, dirs = served[0], served[1]
    model, tokenizer = load_model(str(model_dir), dtype="bf16")
    adapters = [(name, str(path), 1.0) for name, path in dirs.items()]
    with own_server(model, tokenizer, adapters, max_tokens_limit=64, batch_invariant=True) as base:
        client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)

        def run(job):
            model_id, prompt, mix = job
            answer = client.completions.create(
                model=model_id, prompt=prompt, max_tokens=16, temperature=0, logprobs=1, extra_body=mix
            ).choices[0]
            return answer.text, answer.logprobs.token_logprobs

        models = [("tiny", {}), ("a", {}), ("b", {}), ("c", {}), ("tiny", {"adapters": {"a": 0.5, "b": -0.3}})]
        jobs = [(model_id, PROMPTS[i % len(PROMPTS)], mix) for i, (model_id, mix) in enumerate(models * 4)]
        alone = [run(job) for job in jobs]
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(run, jobs))
    assert len({alone[i][0] for i in range(len(models))}) == len(models)  # the adapters and the mix act
    assert together == alone


def test_a_per_request_mix_equals_the_adapters_active_together(client, served):
    model_dir, dirs = served[0], served[1]
    model, tokenizer = load_model(str(model_dir), dtype="fp32")
    load_adapter(model, dirs["a"], name="a")
    load_adapter(model, dirs["b"], name="b")
    set_active(model, ["a", "b"], [0.5, -0.3])
    ids = encode_texts(tokenizer, [PROMPTS[0]])[0]
    expected = stream_greedy(model, tokenizer, ids, 16, lambda _: None)
    assert _complete(client, "tiny", PROMPTS[0], 16, extra_body={"adapters": {"a": 0.5, "b": -0.3}}) == expected
    assert (
        _complete(client, "tiny", PROMPTS[0], 16, stream=True, extra_body={"adapters": {"a": 0.5, "b": -0.3}})
        == expected
    )
    # a strength of one adapter alone, beside plain requests in the same batch
    set_active(model, ["b"], [0.5])
    alone = stream_greedy(model, tokenizer, ids, 16, lambda _: None)
    with ThreadPoolExecutor(4) as pool:
        mixed = pool.submit(_complete, client, "tiny", PROMPTS[0], 16, extra_body={"adapters": {"b": 0.5}})
        others = [pool.submit(_complete, client, m, PROMPTS[0], 16) for m in ("a", "b", "tiny")]
        assert mixed.result() == alone
        assert all(o.result() for o in others)


def test_usage_logprobs_stop_and_n(client):
    answer = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=2)
    choice = answer.choices[0]
    assert answer.usage.completion_tokens == 8 and answer.usage.prompt_tokens > 0
    assert len(choice.logprobs.token_logprobs) == 8 and all(len(t) == 2 for t in choice.logprobs.top_logprobs)
    assert "".join(choice.logprobs.tokens) == choice.text
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    full = choice.text
    stop = full[3:5]
    cut = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="a", prompt=PROMPTS[0], max_tokens=8, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text
    chat = client.chat.completions.create(
        model="b",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        n=2,
    )
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message.content == chat.choices[
        1
    ].message.content
    assert len(chat.choices[0].logprobs.content) == 5 and len(chat.choices[0].logprobs.content[0].top_logprobs) == 3
    chunks = list(
        client.chat.completions.create(
            model="b",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.completion_tokens == 5 and not chunks[-1].choices


def test_ignore_eos_runs_to_max_tokens(make_tiny_llama_dir, tmp_path):
    # an adapter whose output head makes <|im_end|> win at once, so that answers end unless told otherwise
    model_dir = make_tiny_llama_dir(tie_word_embeddings=False)
    model, tokenizer = load_model(str(model_dir), dtype="fp32")
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.lm_head.copies["default"].weight[tokenizer.eos_token_id].mul_(1000)
    save_adapter(model, tmp_path / "eos")
    model, tokenizer = load_model(str(model_dir), dtype="fp32")
    with own_server(model, tokenizer, [("eos", str(tmp_path / "eos"), 1.0)]) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        ended = client.completions.create(model="eos", prompt=PROMPTS[0], max_tokens=20, temperature=0)
        ran = client.completions.create(
            model="eos", prompt=PROMPTS[0], max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
        )
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens < 20
    assert ran.choices[0].finish_reason == "length" and ran.usage.completion_tokens == 20


def test_sampling_with_a_seed_repeats_and_differs_from_greedy(client):
    def sample(seed):
        return (
            client.completions.create(
                model="b",
                prompt=PROMPTS[1],
                max_tokens=16,
                temperature=1.0,
                top_p=0.9,
                seed=seed,
                extra_body={"top_k": 50},
            )
            .choices[0]
            .text
        )

    assert sample(1) == sample(1)
    assert len({sample(s) for s in range(4)}) > 1


def test_max_tokens_defaults_to_the_context_left_and_limits_are_refused(client, url):
    with pytest.raises(APIStatusError) as refused:
        client.completions.create(model="a", prompt="x", max_tokens=65)  # above --max-tokens-limit 64
    assert refused.value.status_code == 400 and "64" in refused.value.message
    with pytest.raises(APIStatusError) as too_long:
        client.completions.create(model="a", prompt=list(range(5, 133)), max_tokens=1)  # 128 tokens fill the context
    assert too_long.value.status_code == 400 and "context" in too_long.value.message
    answer = client.completions.create(model="a", prompt=list(range(5, 100)), temperature=0)  # 95 + 33 = 128
    assert answer.usage.completion_tokens <= 33


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (json.dumps({"prompt": "x"}).encode(), 400, "model"),
        (json.dumps({"model": "a"}).encode(), 400, "prompt"),
        (json.dumps({"model": "a", "prompt": "x", "temperature": -1}).encode(), 400, "temperature"),
        (json.dumps({"model": "a", "prompt": "x", "max_tokens": "many"}).encode(), 400, "max_tokens"),
        (json.dumps({"model": "a", "prompt": "x", "presence_penalty": 1}).encode(), 400, "presence_penalty"),
        (json.dumps({"model": "a", "prompt": [10**9]}).encode(), 400, "vocabulary"),
        (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "available: tiny, a, b, c"),
        (json.dumps({"model": "tiny", "prompt": "x", "adapters": {"zz": 1}}).encode(), 404, "zz"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(url, client, body, status, words):
    response = httpx2.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error["message"] and error["type"]
    assert _complete(client, "a", PROMPTS[0], 4)


def test_the_api_key_guards_every_endpoint_but_health_and_the_page(served):
    with serving(served[3], api_key="sekret") as url:
        assert httpx2.get(f"{url}/health").status_code == 200
        assert "<html" in httpx2.get(f"{url}/").text.lower()
        for path in ("/v1/models", "/metrics"):
            response = httpx2.get(f"{url}{path}", headers={"Authorization": "Bearer wrong"})
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(APIStatusError) as refused:
            OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        assert refused.value.status_code == 401
        assert len(OpenAI(base_url=f"{url}/v1", api_key="sekret").models.list().data) == 4


def test_hot_load_and_unload_while_other_requests_run(url, client):
    errors: list[Exception] = []
    stop = threading.Event()

    def keep_asking():
        while not stop.is_set():
            try:
                _complete(client, "b", PROMPTS[0], 8, stream=True)
            except Exception as error:  # noqa: BLE001 - collected and asserted on
                errors.append(error)

    workers = [threading.Thread(target=keep_asking) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        response = httpx2.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "spare", "lora_path": "spare"})
        assert response.status_code == 200, response.text
        assert _complete(client, "spare", PROMPTS[0], 8)  # usable as soon as the call returned
        assert "spare" in {m.id for m in client.models.list().data}
        # an unload waits for the requests running on it, which finish whole
        started = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(_first_chunk_then_rest, client, "spare", PROMPTS[1], 40, started)
            assert started.wait(timeout=60)
            assert httpx2.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "spare"}).status_code == 200
            text, reason = running.result()
            assert text and reason in ("stop", "length")  # ran to its end
        assert "spare" not in {m.id for m in client.models.list().data}
        with pytest.raises(APIStatusError) as gone:
            _complete(client, "spare", PROMPTS[0], 4)
        assert gone.value.status_code == 404
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert not errors


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"lora_name": "x", "lora_path": "does-not-exist"}, 400, "does-not-exist"),
        ({"lora_name": "x", "lora_path": "../outside"}, 400, ".."),
        ({"lora_name": "x", "lora_path": "/etc"}, 400, "outside the adapter root"),
        ({"lora_name": "x", "lora_path": "link-out"}, 400, "outside the adapter root"),
        ({"lora_name": "x", "lora_path": "other-base"}, 400, "trained on"),
        ({"lora_name": "x", "lora_path": "misfit"}, 400, "has shape (4, 48)"),
        ({"lora_name": "a", "lora_path": "spare"}, 400, "already loaded"),
        ({"lora_name": "x"}, 400, "lora_path"),
    ],
)
def test_bad_loads_are_refused_and_load_nothing(
    url, client, served, tmp_path_factory, make_tiny_llama_dir, body, status, words
):
    root = served[2]
    if not (root / "link-out").exists():
        outside = tmp_path_factory.mktemp("outside")
        _make_adapter(served[0], outside / "adapter", 30, **ADAPTERS["a"])
        (root / "link-out").symlink_to(outside / "adapter")
        other = make_tiny_llama_dir(hidden_size=48, intermediate_size=96)
        _make_adapter(other, root / "other-base", 31, **ADAPTERS["a"])
        misfit = _make_adapter(other, root / "misfit", 32, **ADAPTERS["a"])  # records our base, has other shapes
        config = json.loads((misfit / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(served[0])
        (misfit / "adapter_config.json").write_text(json.dumps(config))
    before = {m.id for m in client.models.list().data}
    response = httpx2.post(f"{url}/v1/load_lora_adapter", json=body)
    assert response.status_code == status and words in response.json()["error"]["message"]
    assert {m.id for m in client.models.list().data} == before
    assert _complete(client, "a", PROMPTS[0], 4)


def test_evicted_adapters_come_back_when_asked_for(url, client, served):
    # max_loaded 4 with three pinned: loading two more evicts the older of them, which a request reads back
    expected = None
    for name in ("spare", "spare2"):
        assert (
            httpx2.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name}).status_code == 200
        )
        if name == "spare":
            expected = _complete(client, "spare", PROMPTS[2], 12)
    metrics = httpx2.get(f"{url}/metrics").text
    assert "loratune_adapters_in_memory 4.0" in metrics and "loratune_adapters_known 5.0" in metrics
    assert _complete(client, "spare", PROMPTS[2], 12) == expected  # read back, evicting spare2
    assert _complete(client, "spare2", PROMPTS[2], 12)
    for name in ("spare", "spare2"):
        assert httpx2.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200


def test_a_client_that_disconnects_mid_stream_frees_its_slot(url, served):
    service = served[3]
    body = {"model": "b", "prompt": PROMPTS[0], "max_tokens": 64, "temperature": 0, "stream": True}
    with httpx2.stream("POST", f"{url}/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data:")
    assert service.engine.wait_for_stats(lambda stats: stats.running == 0, timeout=30).running == 0
    metrics = httpx2.get(f"{url}/metrics").text
    assert "loratune_running_sequences 0.0" in metrics and "loratune_batch_size_count" in metrics
    assert 'loratune_cancelled_sequences_total{model="b"} 1.0' in metrics


def test_a_full_queue_answers_429_with_retry_after(served):
    with own_server(*load_model(str(served[0]), dtype="fp32"), max_waiting=0) as url:
        response = httpx2.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert "busy" in response.json()["error"]["message"]


def test_a_request_over_the_time_limit_fails_with_504(served):
    with own_server(*load_model(str(served[0]), dtype="fp32"), request_timeout=0.0) as url:
        response = httpx2.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 8})
    assert response.status_code == 504 and "time limit" in response.json()["error"]["message"]


def test_an_adapter_with_its_own_chat_template_formats_its_requests(served, tmp_path):
    model_dir = served[0]
    own = _make_adapter(model_dir, tmp_path / "own", 40, **ADAPTERS["a"])
    _, tokenizer = load_model(str(model_dir), dtype="fp32")
    tokenizer.chat_template = "SYSTEM: be brief\n" + tokenizer.chat_template
    tokenizer.save_pretrained(own)
    model, base_tokenizer = load_model(str(model_dir), dtype="fp32")
    with own_server(model, base_tokenizer, [("own", str(own), 1.0), ("a", str(served[1]["a"]), 1.0)]) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        usage_own = client.chat.completions.create(model="own", messages=messages, max_tokens=1).usage
        usage_base = client.chat.completions.create(model="a", messages=messages, max_tokens=1).usage
    assert usage_own.prompt_tokens == len(chat_prompt_ids(tokenizer, "hi"))
    assert usage_base.prompt_tokens == len(chat_prompt_ids(base_tokenizer, "hi")) < usage_own.prompt_tokens


def _peft_pissa_adapter(model_dir: Path, out: Path) -> Path:
    import peft
    from transformers import AutoModelForCausalLM

    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"], init_lora_weights="pissa"),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.3)
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("base", ["fp32", "nf4"])
def test_any_adapter_loratune_loads_is_servable(make_tiny_llama_dir, tmp_path, base):
    """rsLoRA with patterns and modules_to_save, an int8-compressed copy, a PiSSA start saved with its residual,
    over a float or a 4-bit base: each answers as the same adapter loaded with load_adapter does, batched beside
    the others, and in a mix."""
    model_dir = make_tiny_llama_dir(tie_word_embeddings=False)
    kinds = {
        "saved": _make_adapter(
            model_dir, tmp_path / "saved", 1, r=4, target_modules=["q_proj", "k_proj"], modules_to_save=["lm_head"]
        ),
        "patterned": _make_adapter(
            model_dir,
            tmp_path / "patterned",
            2,
            r=8,
            lora_alpha=8,
            use_rslora=True,
            target_modules="all-linear",
            rank_pattern={"v_proj": 2},
            alpha_pattern={"o_proj": 4},
        ),
    }
    kinds["int8"] = compress_adapter(kinds["patterned"], tmp_path / "int8")
    kinds["pissa"] = _peft_pissa_adapter(model_dir, tmp_path / "pissa")  # its residual start, as PEFT saves it
    quantize = None if base == "fp32" else "nf4"
    if quantize:
        del kinds["pissa"]  # a PiSSA start needs the base's full-precision weights to split

    def loaded(*names):
        model, tokenizer = load_model(str(model_dir), dtype="fp32", quantize=quantize)
        for name in names:
            load_adapter(model, kinds[name], name=name)
        return model, tokenizer

    model, tokenizer = loaded()
    ids = encode_texts(tokenizer, [PROMPTS[0]])[0]
    with own_server(model, tokenizer, [(n, str(d), 1.0) for n, d in kinds.items()]) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with ThreadPoolExecutor(4) as pool:
            answers = dict(zip(kinds, pool.map(lambda n: _complete(client, n, PROMPTS[0], 16), kinds)))
            mix = pool.submit(
                _complete, client, "tiny", PROMPTS[0], 16, extra_body={"adapters": {"patterned": 0.5, "int8": 0.5}}
            ).result()
    for name in kinds:
        alone, _ = loaded(name)
        assert answers[name] == stream_greedy(alone, tokenizer, ids, 16, lambda _: None), name
    both, _ = loaded("patterned", "int8")
    set_active(both, ["patterned", "int8"], [0.5, 0.5])
    assert mix == stream_greedy(both, tokenizer, ids, 16, lambda _: None)


READY = re.compile(r"API at (http://\S+?)/v1")  # what `loratune serve` prints once it listens


@contextmanager
def serve_process(*arguments: str):
    """``loratune serve ARGUMENTS --port 0`` in a subprocess (one thread for torch); yields (process, URL, the
    stderr lines so far) once its ready line names the port it bound. Stderr is read to its end meanwhile."""
    server = subprocess.Popen(
        [sys.executable, "-m", "loratune", "serve", *arguments, "--port", "0"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    found: queue.Queue = queue.Queue()

    def drain() -> None:
        for line in server.stderr:
            lines.append(line)
            if match := READY.search(line):
                found.put(match.group(1))
        found.put(None)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        url = found.get(timeout=120)
        assert url is not None, f"loratune serve exited before it was ready:\n{''.join(lines)}"
        yield server, url, lines
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
        reader.join(timeout=30)


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGHUP"])
def test_a_stop_signal_drains_running_requests_then_exits_cleanly(make_tiny_llama_dir, tmp_path, signum):
    import signal

    # big enough that a long answer is still streaming when the signal comes
    model_dir = make_tiny_llama_dir(hidden_size=512, intermediate_size=1024, num_hidden_layers=6)
    adapter = _make_adapter(model_dir, tmp_path / "b", 1, **ADAPTERS["b"])
    with serve_process("--model", str(model_dir), "--adapter", f"b={adapter}") as (server, url, lines):
        assert httpx2.get(f"{url}/health").status_code == 200
        body = {"model": "b", "prompt": PROMPTS[0], "max_tokens": 120, "temperature": 0, "stream": True}
        with httpx2.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            stream = response.iter_lines()
            assert next(stream).startswith("data:")
            server.send_signal(getattr(signal, signum))
            signalled = time.monotonic()
            while True:  # draining: new requests are refused (503, or the port is closed) once the signal lands
                try:
                    probe = httpx2.post(f"{url}/v1/completions", json={**body, "stream": False, "max_tokens": 1})
                except httpx2.TransportError:
                    break
                if probe.status_code == 503:
                    break
                assert probe.status_code == 200 and time.monotonic() - signalled < 30
            rest = [line for line in stream if line]
            streamed_after_signal = time.monotonic() - signalled
        assert rest[-1] == "data: [DONE]"
        finish = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in rest[:-1]]
        assert finish[-1] == "length"
        print(f"streamed for {streamed_after_signal:.2f} s after {signum}")
        assert server.wait(timeout=60) == 0  # a completed drain is a clean end
    assert "Traceback" not in "".join(lines)


def test_max_loras_caps_the_distinct_adapters_of_every_batch(served):
    """Five adapters and the base under --max-loras 2: every answer equals the one sent alone, and no decoding
    step ran more than 2 distinct adapters (the batch-adapters histogram, as /metrics reports it)."""
    model_dir, dirs, root = served[0], served[1], served[2]
    adapters = [(n, str(d), 1.0) for n, d in dirs.items()]
    adapters += [(n, str(root / n), 1.0) for n in ("spare", "spare2")]
    model, tokenizer = load_model(str(model_dir), dtype="fp32")
    with own_server(model, tokenizer, adapters, max_loras=2, max_batch=8) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        jobs = [(m, PROMPTS[i % len(PROMPTS)]) for i, m in enumerate(["tiny", "a", "b", "c", "spare", "spare2"] * 4)]
        alone = [_complete(client, m, p, 16) for m, p in jobs]
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(lambda job: _complete(client, job[0], job[1], 16, stream=True), jobs))
        with pytest.raises(APIStatusError) as refused:
            _complete(client, "tiny", PROMPTS[0], 4, extra_body={"adapters": {"a": 0.5, "b": 0.5, "c": 0.5}})
        metrics = httpx2.get(f"{url}/metrics").text
    assert together == alone
    assert refused.value.status_code == 400 and "--max-loras" in refused.value.message
    assert _metric(metrics, "loratune_max_loras") == 2
    steps = _metric(metrics, "loratune_batch_adapters_count")
    assert steps > 0 and _metric(metrics, 'loratune_batch_adapters_bucket{le="2.0"}') == steps
    assert _metric(metrics, 'loratune_batch_adapters_bucket{le="1.0"}') < steps, "no step mixed two adapters"


def run_queued(engine: Engine, seqs: list[Sequence], finished: queue.Queue) -> None:
    """Queue every sequence before the engine starts (so it sees them in this order, in one prefill), then wait
    until each has finished (``finished`` gets their ``Finished`` events)."""
    for seq in seqs:
        engine.submit(seq)
    engine.start()
    try:
        for _ in seqs:
            assert isinstance(finished.get(timeout=60), Finished)
    finally:
        engine.stop()


def test_a_sequence_held_back_by_the_adapter_cap_is_not_starved(served):
    """max_adapters 1, max_batch 2: a long sequence on "a" runs; one on "b" waits; later ones on "a" may start
    ahead of it, but at most max_batch of them — then "b" goes before the rest."""
    model_dir, dirs = served[0], served[1]
    model, tokenizer = load_model(str(model_dir), dtype="fp32")
    for name in ("a", "b"):
        load_adapter(model, dirs[name], name=name)
    set_active(model, [])
    ids = encode_texts(tokenizer, [PROMPTS[0]])[0]
    finished = queue.Queue()

    def sequence(name: str, tokens: int) -> Sequence:
        sink = lambda event: finished.put(event) if isinstance(event, Finished) else None  # noqa: E731
        return Sequence(ids, {name: 1.0}, SamplingParams(tokens), tokenizer, frozenset(), sink)

    order = [("a", 30), ("b", 3)] + [("a", 3)] * 5  # a0 (long), b, then a1..a5
    seqs = [sequence(name, tokens) for name, tokens in order]
    engine = Engine(model, max_batch=2, max_adapters=1)
    run_queued(engine, seqs, finished)
    started = {i: seq.first_token_at for i, seq in enumerate(seqs)}
    b = started[1]
    overtook = [i for i in range(2, len(seqs)) if started[i] < b]
    assert overtook == [2, 3], f"sequences started ahead of the held one: {overtook}"  # max_batch = 2 of them
    assert engine.stats.most_adapters == 1


def test_sequences_with_one_prompt_and_the_same_adapters_read_the_prompt_once(served):
    """GRPO's group of completions, a request's n choices: sequences with the same prompt and adapters are
    prefilled as one row and copied out; each still samples its own continuation, and a greedy one gets what it
    gets alone."""
    model_dir, dirs = served[0], served[1]
    model, tokenizer = load_model(str(model_dir), dtype="fp32")
    load_adapter(model, dirs["a"], name="a")
    set_active(model, [])
    ids, other = encode_texts(tokenizer, PROMPTS[:2])
    prefilled = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: (
            prefilled.append(kwargs["input_ids"].shape[0]) if kwargs["input_ids"].shape[1] > 1 else None
        ),
        with_kwargs=True,
    )

    def run(specs) -> list[list[int]]:
        finished = queue.Queue()
        sink = lambda event: finished.put(event) if isinstance(event, Finished) else None  # noqa: E731
        seqs = [
            Sequence(prompt, adapters, SamplingParams(8, temperature, seed=seed), tokenizer, frozenset(), sink)
            for prompt, adapters, temperature, seed in specs
        ]
        run_queued(Engine(model, max_batch=8), seqs, finished)
        return [seq.tokens for seq in seqs]

    a = {"a": 1.0}
    group = [
        (ids, a, 0.0, None),
        *((ids, a, 1.0, seed) for seed in range(4)),
        (ids, {}, 0.0, None),
        (other, a, 0.0, None),
    ]
    together = run(group)
    assert prefilled == [3]  # one row per distinct (prompt, adapters), not seven
    assert len({tuple(tokens) for tokens in together[1:5]}) > 1  # the sampled ones each sampled their own
    for i in (0, 5, 6):
        prefilled.clear()
        assert run([group[i]]) == [together[i]] and prefilled == [1]


def test_a_prompt_that_starts_as_an_earlier_one_reads_only_the_rest_and_answers_the_same(served):
    """The engine keeps recent prompts' keys and values: a prompt read alone that starts as one read before with
    the same adapters reads only what follows (a repeat: its last token), never across adapters or an engine
    call (which may change them), and every answer is the one an engine without the cache gives."""
    model_dir, dirs = served[0], served[1]
    model, tokenizer = load_model(str(model_dir), dtype="fp32")
    load_adapter(model, dirs["a"], name="a")
    set_active(model, [])
    first = encode_texts(tokenizer, ["Translate to French: hello, and then say goodbye"])[0]
    longer = first + encode_texts(tokenizer, [" twice please"])[0]
    read = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: read.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    a = {"a": 1.0}
    plan = [(first, a), (longer, a), (longer, {}), (first, a), ("call", None), (first, a)]

    def answers(prefix_cache_mb: float) -> tuple[list[list[int]], list[int]]:
        engine, tokens, prefills, finished = Engine(model, prefix_cache_mb=prefix_cache_mb), [], [], queue.Queue()
        sink = lambda event: finished.put(event) if isinstance(event, Finished) else None  # noqa: E731
        engine.start()
        try:
            for prompt, adapters in plan:
                if prompt == "call":
                    engine.call(lambda: None).result(timeout=60)
                    continue
                read[:] = []
                seq = Sequence(prompt, adapters, SamplingParams(6), tokenizer, frozenset(), sink)
                engine.submit(seq)
                assert isinstance(finished.get(timeout=60), Finished)
                tokens.append(seq.tokens)
                prefills.append(read[0])  # the prompt tokens the prefill read
        finally:
            engine.stop()
        return tokens, prefills

    cached, read_cached = answers(64)
    plain, read_plain = answers(0)
    assert cached == plain
    assert read_plain == [len(first), len(longer), len(longer), len(first), len(first)]
    # the longer prompt after the first on "a": only its new tokens; on the base: all; a repeat: its last token;
    # after an engine call: all again
    assert read_cached == [len(first), len(longer) - len(first), len(longer), 1, len(first)]


def test_kept_prompts_are_found_by_adapters_and_longest_start_and_fit_their_budget():
    from transformers.cache_utils import DynamicCache

    from loratune.inference.prefix_cache import MIN_SHARED, PromptPrefixes

    def cache_of(tokens: int, layers: int = 2) -> DynamicCache:
        cache = DynamicCache()
        for index in range(layers):
            cache.update(torch.full((1, 2, tokens, 4), float(index)), torch.full((1, 2, tokens, 4), -1.0), index)
        return cache

    size = 2 * 2 * (2 * 10 * 4) * 4  # bytes of a 10-token prompt: two layers of keys and values
    kept = PromptPrefixes(budget_bytes=2 * size)
    one, two = list(range(10)), list(range(50, 60))
    kept.keep(("a", 1.0), one, cache_of(10))
    kept.keep(("a", 1.0), two, cache_of(10))
    shared, cache = kept.start_of(("a", 1.0), [*range(8), 99, 98], config=None)
    assert shared == 8 and cache.layers[1].keys.shape == (1, 2, 8, 4) and cache.layers[1].keys.eq(1).all()
    assert kept.start_of(("a", 1.0), one, config=None)[0] == 9  # a repeat leaves its last token to read
    assert kept.start_of(("b", 1.0), one, config=None) is None  # other adapters: nothing
    assert kept.start_of(("a", 1.0), [*range(MIN_SHARED - 1), 99], config=None) is None  # too little shared
    kept.keep((), list(range(100, 110)), cache_of(10))  # over the budget: the least recently used goes
    assert kept.start_of(("a", 1.0), two, config=None) is None and kept.start_of(("a", 1.0), one, config=None)
    kept.keep((), list(range(40)), cache_of(40))  # larger than the whole budget: its first 20 tokens kept
    shared, cache = kept.start_of((), [*range(40), 7], config=None)
    assert shared == 20 and cache.layers[0].keys.shape == (1, 2, 20, 4)
    assert kept.start_of(("a", 1.0), one, config=None) is None  # (which took all the room)
    kept.clear()
    assert kept.start_of(("a", 1.0), one, config=None) is None


def test_adapter_files_and_prompts_are_read_off_the_engine_thread_and_the_event_loop(url, client, monkeypatch):
    """Reading an adapter (config, tokenizer, tensors) runs on the pool's reader thread and tokenizing on the
    service's preparing thread, so neither holds up the engine's steps or the streams' delivery."""
    from loratune.serve.service import Service

    threads: dict[str, set[str]] = {"reading": set(), "preparing": set()}

    def recorded(kind, function):
        def run(*args, **kwargs):
            threads[kind].add(threading.current_thread().name.split("_")[0])  # an executor's name_N
            return function(*args, **kwargs)

        return run

    monkeypatch.setattr(reading, "read", recorded("reading", reading.read))
    monkeypatch.setattr(reading, "inspect", recorded("reading", reading.inspect))
    monkeypatch.setattr(Service, "prepare", recorded("preparing", Service.prepare))
    load = {"lora_name": "spare", "lora_path": "spare"}
    assert httpx2.post(f"{url}/v1/load_lora_adapter", json=load).status_code == 200
    try:
        assert _chat(client, "spare", PROMPTS[0], 4)
    finally:
        assert httpx2.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "spare"}).status_code == 200
    assert threads == {"reading": {"loratune-adapter-reader"}, "preparing": {"loratune-prepare"}}


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(min_size=1, max_size=40), extra=st.lists(st.integers(0, 255), max_size=6), stop_after=st.integers(0, 3)
)
def test_text_grown_token_by_token_is_the_text_of_all_the_tokens(tiny_tokenizer, text, extra, stop_after):
    # any text (CJK, emoji, combining marks) plus random ids, which can split or break UTF-8 characters
    stop = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tiny_tokenizer.encode(text, add_special_tokens=False) + [t for t in extra if t != stop]
    events = []
    limit = len(ids) + (1 if stop_after else 0)
    seq = Sequence([1], {}, SamplingParams(limit), tiny_tokenizer, frozenset({stop}), events.append)
    for token in ids + ([stop] if stop_after else []):
        seq.accept(token)
        assert tiny_tokenizer.decode(seq.tokens, skip_special_tokens=True).startswith(seq.text)
    assert isinstance(events[-1], Finished)
    streamed = "".join(e.text for e in events if not isinstance(e, Finished))
    assert streamed == tiny_tokenizer.decode(ids, skip_special_tokens=True)
