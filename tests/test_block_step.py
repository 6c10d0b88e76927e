"""Decoding's block step (``inference.block_step``): each block of a Llama-family model as kernel calls over a KV cache
that grows in place, judged by the model's own forward over a copy of the same cache; and where it gives way."""

import copy
import queue
import weakref

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import loratune
from conftest import build_tiny_llama
from loratune.adapters.mixed_batch import mixed_batch
from loratune.inference import kv
from loratune.inference.block_step import BlockStep, decode_logits
from loratune.inference.decode import generate_greedy, inference
from loratune.inference.engine import Engine
from loratune.inference.sequence import Finished, SamplingParams, Sequence
from loratune.kernels.loader import compiled as _cpu
from loratune.layers import execution
from tiny_models import tiny_llama_family


def _tiny(config_class, model_class, dtype=torch.float32, **extra):
    return tiny_llama_family(config_class, model_class, **extra).to(dtype)


FAMILIES = {
    "llama": lambda **k: _tiny(LlamaConfig, LlamaForCausalLM, **k),
    "llama-biased": lambda **k: _tiny(LlamaConfig, LlamaForCausalLM, attention_bias=True, mlp_bias=True, **k),
    "mistral": lambda **k: _tiny(MistralConfig, MistralForCausalLM, sliding_window=None, **k),
    "qwen2": lambda **k: _tiny(Qwen2Config, Qwen2ForCausalLM, **k),  # q, k, v biases
    "qwen3": lambda **k: _tiny(Qwen3Config, Qwen3ForCausalLM, **k),  # per-head q/k norms before RoPE
}


def _two_acting_adapters(model) -> None:
    """Adapters "a" and "b" on every Linear, their B drawn so that each changes the output."""
    for name in ("a", "b"):
        loratune.add_adapter(model, loratune.LoraConfig(r=4, target_modules="all-linear"), name)
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if "lora_B" in key:
                parameter.normal_(std=0.2)


def _left_padded():
    """Three rows of different lengths, left-padded (the engine's layout)."""
    ids = torch.tensor([[0, 0, 0, 5, 6], [0, 7, 8, 9, 10], [11, 12, 13, 14, 15]])
    mask = (torch.arange(5)[None] >= torch.tensor([[3], [1], [0]])).long()
    return ids, mask


def _steps_side_by_side(model, steps: int = 6, surgery=None, ran: list | None = None):
    """Prefill, then ``steps`` greedy decoding steps twice over copies of one cache: by the block step and by the
    model's forward. Returns both lists of logits and both caches; ``surgery(cache, mask)`` (-> mask, rows kept)
    runs on both after the third step; ``ran`` collects the backends of the block step's layer calls."""
    ids, mask = _left_padded()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    stepper = BlockStep.build(model)
    assert stepper is not None
    with inference(model):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        ours, theirs = out.cache, copy.deepcopy(out.cache)
        last, position = out.logits[:, -1].argmax(-1, keepdim=True), positions[:, -1:]
        got, expected = [], []
        for step in range(steps):
            if step == 3 and surgery is not None:
                surgery(theirs, mask)
                mask, keep = surgery(ours, mask)
                last, position = last[keep], position[keep]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
            position = position + 1
            with execution.trace() as backends:
                logits = stepper.step(last, mask, position, ours)
            assert logits is not None
            if ran is not None:
                ran.extend(backends)
            reference = model(input_ids=last, attention_mask=mask, position_ids=position, cache=theirs, use_cache=True)
            got.append(logits)
            expected.append(reference.logits[:, -1])
            last = reference.logits[:, -1].argmax(-1, keepdim=True)
    return got, expected, ours, theirs


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.usefixtures("kernel_isa")
def test_each_family_decodes_as_its_own_forward(family):
    got, expected, ours, theirs = _steps_side_by_side(FAMILIES[family]())
    torch.testing.assert_close(torch.stack(got), torch.stack(expected), rtol=1e-5, atol=1e-5)
    for a, b in zip(ours.layers, theirs.layers):  # the cache holds what the forward's holds
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a.values, b.values, rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("kernel_isa")
def test_bf16_decodes_within_bf16_rounding():
    got, expected, _, _ = _steps_side_by_side(FAMILIES["llama"](dtype=torch.bfloat16), steps=4)
    torch.testing.assert_close(torch.stack(got).float(), torch.stack(expected).float(), rtol=0.05, atol=0.05)


@pytest.mark.usefixtures("kernel_isa")
def test_a_mixed_batch_runs_each_lora_layer_as_one_kernel_call():
    model = FAMILIES["llama"]()
    _two_acting_adapters(model)
    model.eval()
    ran = []
    with mixed_batch(model, ["a", "b", "__base__"]):
        got, expected, _, _ = _steps_side_by_side(model, ran=ran)
    torch.testing.assert_close(torch.stack(got), torch.stack(expected), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0][0], got[0][2], atol=1e-3)  # the adapters act, on their own rows
    assert ran == ["kernel"] * (6 * 2 * 7)  # 6 steps: each of the 7 LoRA layers of both blocks in one call
    ran.clear()
    with mixed_batch(model, ["__base__"] * 3):  # no adapter acts: the LoRA layers' base weights alone
        got, expected, _, _ = _steps_side_by_side(model, ran=ran)
    torch.testing.assert_close(torch.stack(got), torch.stack(expected), rtol=1e-5, atol=1e-5)
    assert ran == ["base"] * (6 * 2 * 7)


def _keep_two(cache, mask):
    """The engine's row surgery: the middle row leaves, the columns no row uses go, two pad columns come."""
    keep = torch.tensor([0, 2])
    kv.keep_rows(cache, keep)
    mask = mask[keep]
    kv.drop_left(cache, 1)
    kv.pad_left(cache, 2)
    return torch.cat([mask.new_zeros(2, 2), mask[:, 1:]], dim=-1), keep


@pytest.mark.usefixtures("kernel_isa")
def test_the_cache_grows_in_place_and_survives_the_engines_row_surgery():
    model = FAMILIES["qwen3"]()
    got, expected, _, _ = _steps_side_by_side(model, steps=7, surgery=_keep_two)
    torch.testing.assert_close(torch.stack(got[3:]), torch.stack(expected[3:]), rtol=1e-5, atol=1e-5)
    # a step writes one column into the room the cache has: the keys stay where they were
    ids, mask = _left_padded()
    stepper = BlockStep.build(model)
    with inference(model):
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).cache
        mask = torch.cat([mask, mask.new_ones(3, 1)], dim=-1)
        stepper.step(ids[:, -1:], mask, torch.full((3, 1), 5), cache)
        where = cache.layers[0].keys.data_ptr()
        mask = torch.cat([mask, mask.new_ones(3, 1)], dim=-1)
        stepper.step(ids[:, -1:], mask, torch.full((3, 1), 6), cache)
        assert cache.layers[0].keys.data_ptr() == where and cache.get_seq_length() == 7


@pytest.mark.usefixtures("kernel_isa")
def test_the_cache_takes_no_more_room_than_the_tokens_left_and_cuts_free_it():
    """Told how many columns may still come (``room``), a step grows the cache's buffers by that much, not by a
    growth step; a cut by the engine's row surgery frees each layer's buffers as it replaces them."""
    model = FAMILIES["qwen3"]()
    config = model.config
    kv_heads, head_dim = config.num_key_value_heads, config.head_dim
    ids, mask = _left_padded()
    stepper = BlockStep.build(model)

    def columns_held(cache) -> set[int]:
        return {
            layer.keys.untyped_storage().nbytes() // (3 * kv_heads * head_dim * layer.keys.element_size())
            for layer in cache.layers
        }

    with inference(model):
        for room, held in ((2, {8}), (None, {6 + 128})):
            cache = model(input_ids=ids, attention_mask=mask, use_cache=True).cache
            grown = mask
            for step in range(3 if room else 1):
                grown = torch.cat([grown, grown.new_ones(3, 1)], dim=-1)
                stepper.step(ids[:, -1:], grown, torch.full((3, 1), 5 + step), cache, room=room and room - step)
            assert columns_held(cache) == held and cache.get_seq_length() == grown.shape[1]
        buffers = [weakref.ref(kv.held(layer)[0]) for layer in cache.layers]
        kv.keep_rows(cache, torch.tensor([0, 2]))
        assert [ref() for ref in buffers] == [None] * len(buffers)


@pytest.mark.usefixtures("kernel_isa")
def test_greedy_generation_is_the_same_with_and_without_it(monkeypatch, tiny_tokenizer):
    model = build_tiny_llama(len(tiny_tokenizer), seed=3, max_position_embeddings=256)
    prompts = [tiny_tokenizer.encode(text) for text in ("hello there", "a longer prompt than the other one", "x")]
    with_it = generate_greedy(model, tiny_tokenizer, prompts, max_new_tokens=12, stop_ids=set())
    monkeypatch.setenv("LORATUNE_BLOCK_STEP", "0")
    without = generate_greedy(model, tiny_tokenizer, prompts, max_new_tokens=12, stop_ids=set())
    assert with_it == without and all(with_it)


def test_where_it_gives_way_the_forward_runs():
    assert BlockStep.build(_tiny(GPT2Config, GPT2LMHeadModel)) is None  # another architecture
    assert BlockStep.build(_tiny(MistralConfig, MistralForCausalLM, sliding_window=4)) is None  # a window
    model = FAMILIES["llama"]()
    ids, mask = _left_padded()
    seen = []
    with inference(model):
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).cache
        reference = copy.deepcopy(cache)
        mask = torch.cat([mask, mask.new_ones(3, 1)], dim=-1)
        positions = torch.full((3, 1), 5)
        stepper = BlockStep.build(model)
        hook = model.model.layers[1].mlp.register_forward_hook(lambda *args: seen.append("mlp"))
        assert stepper.step(ids[:, -1:], mask, positions, cache) is None  # it would skip the hook
        logits, _ = decode_logits(model, ids[:, -1:], mask, positions, cache)  # so the forward runs it
        hook.remove()
        expected = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=positions, cache=reference)
        torch.testing.assert_close(logits, expected.logits[:, -1], rtol=1e-5, atol=1e-5)
        assert seen == ["mlp"]
        with torch.enable_grad():
            assert stepper.step(ids[:, -1:], mask, positions, cache) is None  # autograd: the forward's business
    with torch.no_grad():  # outside decoding (no few-row kernel), as everywhere else: PyTorch's own products
        assert stepper.step(ids[:, -1:], mask, positions, cache) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [8, 12, 64])  # 12: a tail past the eight-float vectors
@pytest.mark.usefixtures("kernel_isa")
def test_decoding_attention_is_softmax_attention_over_the_unmasked_columns(dtype, dim):
    torch.manual_seed(dim)
    rows, q_heads, kv_heads, cols, capacity = 3, 6, 2, 9, 13
    q = torch.randn(rows, q_heads, dim).to(dtype)
    keys, values = torch.randn(rows, kv_heads, capacity, dim).to(dtype), torch.randn(rows, kv_heads, capacity, dim)
    values = values.to(dtype)
    k_new, v_new = torch.randn(rows, kv_heads, dim).to(dtype), torch.randn(rows, kv_heads, dim).to(dtype)
    mask = (torch.rand(rows, cols) > 0.4).long()
    mask[:, -1] = 1
    out = torch.empty_like(q)
    scale = dim**-0.5
    _cpu.decode_attention(
        *(t.data_ptr() for t in (out, q, keys, values, k_new, v_new, mask)),
        rows * q_heads,
        q_heads,
        kv_heads,
        dim,
        cols,
        capacity,
        scale,
        int(dtype == torch.bfloat16),
        2,
    )
    assert torch.equal(keys[:, :, cols - 1], k_new) and torch.equal(values[:, :, cols - 1], v_new)  # appended
    k, v = keys[:, :, :cols].double(), values[:, :, :cols].double()
    k, v = k.repeat_interleave(q_heads // kv_heads, 1), v.repeat_interleave(q_heads // kv_heads, 1)
    scores = torch.einsum("rhd,rhcd->rhc", q.double(), k) * scale
    scores = scores.masked_fill(mask[:, None, :] == 0, float("-inf"))
    expected = torch.einsum("rhc,rhcd->rhd", scores.softmax(-1), v)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.usefixtures("kernel_isa")
def test_a_changed_adapter_or_weight_between_steps_is_what_the_next_step_computes():
    """A training run samples its rollouts, trains, samples again: the program bound for one step must not outlive
    the weights it was bound to (an optimizer step updates the factors in place; a weight may be replaced)."""
    model = FAMILIES["llama"]()
    loratune.add_adapter(model, loratune.LoraConfig(r=4, target_modules="all-linear"))
    model.eval()
    ids, mask = _left_padded()
    stepper = BlockStep.build(model)
    with inference(model):
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).cache
        for change in range(3):
            if change == 1:  # the factors change in place (their versions move)
                for key, parameter in model.named_parameters():
                    if "lora_B" in key:
                        parameter.add_(0.3)
            elif change == 2:  # a base weight is replaced
                base = model.model.layers[0].mlp.down_proj.base_layer
                base.weight = torch.nn.Parameter(torch.randn_like(base.weight) * 0.1, requires_grad=False)
            reference = copy.deepcopy(cache)
            mask = torch.cat([mask, mask.new_ones(3, 1)], dim=-1)
            positions = mask.sum(-1, keepdim=True) - 1
            got = stepper.step(ids[:, -1:], mask, positions, cache)
            expected = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=positions, cache=reference)
            torch.testing.assert_close(got, expected.logits[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("kernel_isa")
def test_a_vouched_step_skips_the_checks_only_right_after_its_own_step_on_that_cache():
    """``unchanged=True`` is the caller's word that nothing touched the model or the cache since the step's own
    previous step on that cache: taken then (the checks are skipped), and nowhere else."""
    model = FAMILIES["llama"]()
    ids, mask = _left_padded()
    stepper = BlockStep.build(model)
    mlp = model.model.layers[1].mlp
    with inference(model):
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).cache
        other = copy.deepcopy(cache)

        def step(cache, columns):
            full = torch.cat([mask, mask.new_ones(3, columns - mask.shape[1])], dim=-1)
            return stepper.step(ids[:, -1:], full, full.sum(-1, keepdim=True) - 1, cache, unchanged=True)

        hook = mlp.register_forward_hook(lambda *args: None)
        assert step(cache, 6) is None  # no step of its own before: checked, and the hook seen
        hook.remove()
        reference = copy.deepcopy(cache)
        got = step(cache, 6)
        full = torch.cat([mask, mask.new_ones(3, 1)], dim=-1)
        expected = model(input_ids=ids[:, -1:], attention_mask=full, position_ids=full.sum(-1, keepdim=True) - 1,
                         cache=reference)  # fmt: skip
        torch.testing.assert_close(got, expected.logits[:, -1], rtol=1e-5, atol=1e-5)
        hook = mlp.register_forward_hook(lambda *args: None)
        assert step(cache, 7) is not None  # right after its own step: the caller's word is taken
        assert step(cache, 9) is None  # a column skipped: checked
        hook.remove()
        assert step(cache, 8) is not None
        hook = mlp.register_forward_hook(lambda *args: None)
        assert step(other, 6) is None  # another cache: checked
        hook.remove()


@pytest.mark.usefixtures("kernel_isa")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("kernel_isa")
def test_a_batch_invariant_engines_answers_and_logprobs_are_the_same_bits_alone_and_in_any_batch(dtype, tiny_tokenizer):
    """PyTorch's products and attention round a row by what else its batch holds (other prompts, padding); an
    engine made batch-invariant runs every product, low-rank update and prompt attention through kernels that
    compute each row alone, so a request's answer does not depend on who else is served."""
    model = build_tiny_llama(len(tiny_tokenizer), seed=5, max_position_embeddings=256).to(dtype)
    _two_acting_adapters(model)
    texts = ["hello there", "a longer prompt than the other ones, with a clause", "x", "the same words again"]
    jobs = [(tiny_tokenizer.encode(text), adapters) for text in texts for adapters in ({"a": 1.0}, {"b": 1.0}, {})]

    def answers(batch):
        got = [[] for _ in batch]
        seqs = [
            Sequence(prompt, adapters, SamplingParams(8, logprobs=1), tiny_tokenizer, frozenset(), got[i].append)
            for i, (prompt, adapters) in enumerate(batch)
        ]
        Engine(model, batch_invariant=True).run(seqs)
        return [[(p.token_id, p.logprob) for event in events for p in getattr(event, "logprobs", ())] for events in got]

    together = answers(jobs)
    assert sum(len(prompt) for prompt, _ in jobs) > 64  # the batch's prompts: more rows than decoding's few
    assert all(len(answer) == 8 for answer in together)
    assert together == [answers([job])[0] for job in jobs]

    # a prompt that starts as one read before reads only the rest, from the kept keys and values: the same bits
    # (a hook counts what each forward reads; with it, every decoding step runs the model's forward, both times)
    first, adapters = jobs[1]
    longer = first + tiny_tokenizer.encode(" and then a few more words")
    read, events = [], queue.Queue()
    hook = model.register_forward_pre_hook(lambda m, a, k: read.append(k["input_ids"].shape[1]), with_kwargs=True)
    engine = Engine(model, batch_invariant=True)
    engine.start()
    try:
        for prompt in (first, longer):
            got = []
            sink = lambda event, got=got: (got.append(event), isinstance(event, Finished) and events.put(1))  # noqa: E731
            engine.submit(Sequence(prompt, adapters, SamplingParams(8, logprobs=1), tiny_tokenizer, frozenset(), sink))
            events.get(timeout=60)
        engine.stop()
        assert read[0] == len(first) and len(longer) - len(first) in read  # the longer prompt read only its rest
        whole = answers([(longer, adapters)])[0]  # read whole by an engine of its own
    finally:
        engine.stop()
        hook.remove()
    assert [(p.token_id, p.logprob) for event in got for p in getattr(event, "logprobs", ())] == whole


def test_an_engine_call_between_decoding_steps_is_seen_by_the_next_step(tiny_tokenizer):
    """The engine vouches for the steps of an unchanged batch; an engine call (which may attach adapters or
    change the model) ends that, so a hook it adds runs from the next step on."""
    model = build_tiny_llama(len(tiny_tokenizer), seed=3, max_position_embeddings=256)
    engine = Engine(model)
    fired, seqs = [], []

    def sink(event) -> None:
        if len(seqs[0].tokens) == 3 and not fired:
            fired.append("call")
            hook = model.model.layers[0].mlp.register_forward_hook(lambda *args: fired.append("mlp"))
            engine.call(lambda: hook)  # (registered here, in the engine's thread; the call marks the change)

    prompt = tiny_tokenizer.encode("hello there")
    seqs.append(Sequence(prompt, {}, SamplingParams(10), tiny_tokenizer, frozenset(), sink))
    engine.run(seqs)
    assert len(seqs[0].tokens) == 10
    assert fired.count("mlp") == 7  # each step after the third token ran the module's forward, hook and all
