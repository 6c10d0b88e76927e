"""The ``loratune serve`` playground page, driven by a real headless Chromium against a real server.

The server runs as a subprocess on a tiny random Llama with one adapter (``alpha``) and an API key. Every
answer the page streams is compared with the same request made through the ``openai`` Python client.
Set ``LORATUNE_PLAYGROUND_SCREENSHOT=path.png`` to write a screenshot of the page (used for the docs).
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
]
API_KEY = "sekret"
ADAPTER = "alpha"
MIX = "__mix__"  # the #model option of the page's "mix adapters" mode
TIMEOUT_MS = 60_000  # generous: the two CPU cores are shared by the server and the browser
READY = re.compile(r"API at (http://\S+?)/v1")  # what `loratune serve` prints once it listens


def require(module: str):
    """Import ``module``; skip without it locally, fail in CI (which installs it)."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed")
        pytest.skip(f"{module} is not installed")


# ---- fixtures: adapter, server, browser ----


@pytest.fixture(scope="module")
def model_dir(make_tiny_llama_dir) -> Path:
    # larger random weights than the default 0.02, whose greedy answers are only newlines: with these the
    # answers vary, so comparing texts tells models, adapters and mixes apart
    return make_tiny_llama_dir(initializer_range=0.2)


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory) -> Path:
    """An adapter with random (non-zero) B, so it changes the model's outputs."""
    from transformers import AutoModelForCausalLM

    from loratune import LoraConfig, add_adapter, save_adapter

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return save_adapter(model.eval(), tmp_path_factory.mktemp("adapter") / ADAPTER)


@pytest.fixture(scope="module")
def server(model_dir, adapter_dir, tmp_path_factory):
    """``loratune serve`` in a subprocess on a port it binds itself (``--port 0``); yields its base URL once
    its ready line names the port. Its stderr is kept in a log file, shown when it fails."""
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    command = [
        sys.executable,
        "-m",
        "loratune",
        "serve",
        "--model",
        str(model_dir),
        "--adapter",
        f"{ADAPTER}={adapter_dir}",
        "--port",
        "0",
        "--api-key",
        API_KEY,
        # float32, whose greedy answers do not depend on how a prompt was read (whole, or after a kept start);
        # bf16's last bits do, and "auto" is bf16 on CPUs with bf16 products
        "--dtype",
        "fp32",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # leave the other core to the browser
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    found: queue.Queue = queue.Queue()

    def drain() -> None:  # to the log file, to its end, so the server never blocks on a full pipe
        with open(log_path, "w") as log:
            for line in process.stderr:
                log.write(line)
                log.flush()
                if match := READY.search(line):
                    found.put(match.group(1))
        found.put(None)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        try:
            url = found.get(timeout=60)
        except queue.Empty:
            pytest.fail(f"loratune serve was not ready within 60 s:\n{log_path.read_text()}")
        if url is None:
            pytest.fail(f"loratune serve exited with {process.wait()}:\n{log_path.read_text()}")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(timeout=15)


@pytest.fixture(scope="module")
def client(server):
    openai = require("openai")
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def base_id(client) -> str:
    models = client.models.list().data
    bases = [m.id for m in models if getattr(m, "parent", None) is None]
    assert len(bases) == 1, f"expected one base model (parent null) in /v1/models, got {models}"
    return bases[0]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing (CI installs Debian's chromium package)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    sync_api = require("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server, base_id):
    """A fresh page (empty localStorage) that has been given the API key; records the API requests it sends."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.api_requests = []
    page.on("request", lambda r: page.api_requests.append(r) if "/v1/" in r.url else None)
    errors = []
    page.on("pageerror", lambda error: errors.append(error))  # noqa: PLW0108 - playwright cannot wrap a builtin
    response = page.goto(server + "/")
    assert response.status == 200, "the page itself must load without an API key"
    enter_key(page)
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def enter_key(page):
    """The page asks for the key after /v1/models answers 401; give it and wait for the model list."""
    key_field = page.locator("#api-key")
    key_field.wait_for(state="visible")
    page.wait_for_selector("#error:not([hidden])")
    assert "401" in page.text_content("#error")
    assert page.locator("#model option").count() <= 1  # nothing listed without the key
    key_field.fill(API_KEY)
    page.click("#save-key")
    page.wait_for_function("document.querySelectorAll('#model option').length > 1")
    assert page.locator("#error").is_hidden()
    assert page.evaluate("localStorage.getItem('loratune.apiKey')") == API_KEY


# ---- helpers ----


def send(page, prompt: str, expect: str = "done") -> str:
    """Type ``prompt``, click Send, wait for the stream to end; return the text of #answer."""
    page.evaluate("document.body.dataset.state = 'idle'")
    page.fill("#prompt", prompt)
    page.click("#send")
    page.wait_for_function("['done', 'error'].includes(document.body.dataset.state)")
    state = page.evaluate("document.body.dataset.state")
    assert state == expect, f"state {state!r}, error area: {page.text_content('#error')!r}"
    return page.text_content("#answer") if expect == "done" else ""


def last_body(page, path: str) -> dict:
    request = [r for r in page.api_requests if r.url.endswith(path)][-1]
    assert request.method == "POST"
    assert request.all_headers().get("authorization") == f"Bearer {API_KEY}"
    return request.post_data_json


def check_usage(page, usage) -> None:
    shown = page.text_content("#usage")
    for part in (
        f"prompt {usage.prompt_tokens}",
        f"completion {usage.completion_tokens}",
        f"total {usage.total_tokens}",
        "tok/s",
    ):
        assert part in shown, f"{part!r} not in #usage {shown!r}"


def set_slider(page, adapter: str, value: float) -> None:
    page.eval_on_selector(
        f"#adapters input[data-adapter='{adapter}']",
        "(el, v) => { el.value = v; el.dispatchEvent(new Event('input', {bubbles: true})); }",
        value,
    )


# ---- tests ----


def test_chat_streams_the_same_answer_as_the_openai_client(page, client, base_id):
    options = page.eval_on_selector_all("#model option", "els => els.map(e => e.value)")
    assert base_id in options and ADAPTER in options
    page.select_option("#model", ADAPTER)
    assert page.input_value("#max-tokens") == "128" and page.input_value("#temperature") == "0"
    assert page.input_value("#system") == ""
    page.fill("#max-tokens", "24")  # the tiny model's context is 128 tokens, prompt included
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    answer = send(page, messages[0]["content"])
    expected = client.chat.completions.create(model=ADAPTER, messages=messages, max_tokens=24, temperature=0)
    assert answer and answer == expected.choices[0].message.content
    base_answer = client.chat.completions.create(model=base_id, messages=messages, max_tokens=24, temperature=0)
    assert answer != base_answer.choices[0].message.content, "the adapter must change the answer for this test"
    assert page.evaluate("window.__chunks") > 1, "the answer arrived in one piece: not streamed"
    body = last_body(page, "/v1/chat/completions")
    assert body["model"] == ADAPTER and body["stream"] is True and body["messages"] == messages
    assert body["max_tokens"] == 24 and body["temperature"] == 0 and "adapters" not in body
    check_usage(page, expected.usage)

    # a second turn sends the whole conversation
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And of Spain?"}]
    page.fill("#max-tokens", "10")
    first_usage = expected.usage
    answer = send(page, messages[-1]["content"])
    if os.environ.get("LORATUNE_PLAYGROUND_SCREENSHOT"):  # a two-turn chat, for the docs
        page.screenshot(path=os.environ["LORATUNE_PLAYGROUND_SCREENSHOT"])
    expected = client.chat.completions.create(model=ADAPTER, messages=messages, max_tokens=10, temperature=0)
    assert answer and answer == expected.choices[0].message.content
    assert expected.usage.prompt_tokens > first_usage.prompt_tokens + 5, "the server dropped turns of the chat"
    assert last_body(page, "/v1/chat/completions")["messages"] == messages
    assert page.locator("#transcript .msg.assistant").count() == 2
    check_usage(page, expected.usage)


def test_completion_mode_streams_the_continuation(page, client, base_id):
    page.select_option("#mode", "completion")
    page.fill("#max-tokens", "24")
    prompt = "The quick brown fox"
    answer = send(page, prompt)
    expected = client.completions.create(model=base_id, prompt=prompt, max_tokens=24, temperature=0)
    assert answer and answer == expected.choices[0].text
    assert page.evaluate("window.__chunks") > 1
    body = last_body(page, "/v1/completions")
    assert body["model"] == base_id and body["prompt"] == prompt and body["stream"] is True
    check_usage(page, expected.usage)


def test_an_error_is_shown_and_the_page_keeps_working(page, client, base_id):
    openai = require("openai")
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(
            model=base_id, messages=[{"role": "user", "content": "Hello"}], max_tokens=100000, temperature=0
        )
    page.fill("#max-tokens", "100000")
    send(page, "Hello", expect="error")
    shown = page.text_content("#error")
    assert page.locator("#error").is_visible()
    assert f"HTTP {refused.value.status_code}" in shown and refused.value.body["message"] in shown
    assert page.locator("#transcript .msg").count() == 0  # the failed turn is undone...
    assert page.input_value("#prompt") == "Hello"  # ...and its prompt given back

    page.fill("#max-tokens", "16")
    answer = send(page, "Hello")
    assert page.locator("#error").is_hidden()
    expected = client.chat.completions.create(
        model=base_id, messages=[{"role": "user", "content": "Hello"}], max_tokens=16, temperature=0
    )
    assert answer and answer == expected.choices[0].message.content


def test_mix_mode_sends_the_adapter_strengths(page, client, base_id):
    page.select_option("#model", MIX)
    assert page.locator("#adapters").is_visible()
    set_slider(page, ADAPTER, 0.5)
    page.fill("#max-tokens", "24")
    messages = [{"role": "user", "content": "Translate to French: hello world."}]
    answer = send(page, messages[0]["content"])
    body = last_body(page, "/v1/chat/completions")
    assert body["model"] == base_id and body["adapters"] == {ADAPTER: 0.5}
    expected = client.chat.completions.create(
        model=base_id, messages=messages, max_tokens=24, temperature=0, extra_body={"adapters": {ADAPTER: 0.5}}
    )
    assert answer and answer == expected.choices[0].message.content
    for model in (base_id, ADAPTER):  # the half-strength mix is neither the base nor the full adapter
        other = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
        assert answer != other.choices[0].message.content, f"the mix answered like {model}"
