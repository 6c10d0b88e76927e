"""Batched greedy generation, exact match and streaming (loratune.inference.decode) on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_llama
from loratune.errors import ConfigError
from loratune.inference.decode import exact_match, generate_greedy, stop_token_ids, stream_greedy

IM_END = 2  # "<|im_end|>" in the tiny tokenizer: its EOS and pad token


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    """A 2-block random Llama in float32. A larger init spread than usual makes its logits peaked, so greedy
    choices are not near-ties that float rounding could flip."""
    return build_tiny_llama(
        len(tiny_tokenizer),
        tie_word_embeddings=False,
        hidden_size=64,
        intermediate_size=128,
        max_position_embeddings=256,
        initializer_range=0.2,
        bos_token_id=1,
    )


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    """Prompts of different lengths (so batches need padding), as token ids."""
    texts = [
        "The capital of France is",
        "1 + 1 =",
        "What is the capital of France? The quick brown fox jumps over the lazy dog.",
        "hello",
        "Translate to French: hello world.",
        "2 + 2 = 4, 3 * 3 =",
        "The quick brown fox",
    ]
    return [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def no_stop_generation(model, prompt: list[int], n: int) -> list[int]:
    """Reference: Hugging Face's own greedy decoding of one prompt, exactly n new tokens, no stop token."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def test_batched_generation_equals_one_prompt_at_a_time(model, tiny_tokenizer, prompts):
    batched = generate_greedy(model, tiny_tokenizer, prompts, max_new_tokens=12, batch_size=3)
    one_by_one = [generate_greedy(model, tiny_tokenizer, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == one_by_one
    assert any(batched)  # the comparison is not between empty strings


def test_batched_generation_equals_hugging_face_greedy_decoding(model, tiny_tokenizer, prompts):
    ours = generate_greedy(model, tiny_tokenizer, prompts, max_new_tokens=10, batch_size=4, stop_ids=set())
    reference = [tiny_tokenizer.decode(no_stop_generation(model, p, 10), skip_special_tokens=True) for p in prompts]
    assert ours == reference


def test_results_come_back_in_the_order_of_the_prompts(model, tiny_tokenizer, prompts):
    forward = generate_greedy(model, tiny_tokenizer, prompts, max_new_tokens=8, batch_size=2)
    backward = generate_greedy(model, tiny_tokenizer, prompts[::-1], max_new_tokens=8, batch_size=2)
    assert backward == forward[::-1]


def test_each_row_stops_at_its_own_stop_token_while_others_continue(model, tiny_tokenizer, prompts):
    tokens = [no_stop_generation(model, p, 8) for p in prompts]
    stop = tokens[0][3]  # a token the first prompt generates fourth
    result = generate_greedy(model, tiny_tokenizer, prompts, max_new_tokens=8, batch_size=len(prompts), stop_ids={stop})
    for ids, text in zip(tokens, result):
        kept = ids[: ids.index(stop)] if stop in ids else ids
        assert text == tiny_tokenizer.decode(kept, skip_special_tokens=True)
    assert len(result[0]) < len(tiny_tokenizer.decode(tokens[0], skip_special_tokens=True))


def test_generation_stops_after_max_new_tokens(model, tiny_tokenizer, prompts):
    for n in (1, 5):
        result = generate_greedy(model, tiny_tokenizer, prompts[:2], max_new_tokens=n, stop_ids=set())
        expected = [
            tiny_tokenizer.decode(no_stop_generation(model, p, n), skip_special_tokens=True) for p in prompts[:2]
        ]
        assert result == expected


def test_zero_new_tokens_gives_empty_completions(model, tiny_tokenizer, prompts):
    assert generate_greedy(model, tiny_tokenizer, prompts[:2], max_new_tokens=0) == ["", ""]


def test_completions_skip_special_tokens(model, tiny_tokenizer, prompts):
    special = tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    with torch.no_grad():  # make <|im_start|> (not a stop token) the greedy choice at every step
        bias = torch.zeros(len(tiny_tokenizer))
        bias[special] = 1e4
        model.lm_head.bias = torch.nn.Parameter(bias)
    try:
        text = generate_greedy(model, tiny_tokenizer, [prompts[0]], max_new_tokens=4)[0]
    finally:
        model.lm_head.bias = None
    assert text == ""


def test_default_stop_tokens_are_eos_end_of_turn_and_generation_config_eos(model, tiny_tokenizer):
    model.generation_config.eos_token_id = [IM_END, 0]
    try:
        assert stop_token_ids(model, tiny_tokenizer) == {IM_END, 0}
    finally:
        model.generation_config.eos_token_id = IM_END
    assert stop_token_ids(model, tiny_tokenizer) == {IM_END}


def test_generation_stops_at_the_end_of_turn_token_by_default(model, tiny_tokenizer, prompts):
    tokens = no_stop_generation(model, prompts[1], 6)
    with torch.no_grad():  # make <|im_end|> the greedy choice right after the prompt
        bias = torch.zeros(len(tiny_tokenizer))
        bias[IM_END] = 1e4
        model.lm_head.bias = torch.nn.Parameter(bias)
    try:
        assert generate_greedy(model, tiny_tokenizer, [prompts[1]], max_new_tokens=6) == [""]
    finally:
        model.lm_head.bias = None
    assert tokens


def test_generation_restores_training_mode(model, tiny_tokenizer, prompts):
    model.train()
    try:
        generate_greedy(model, tiny_tokenizer, prompts[:1], max_new_tokens=2)
        assert model.training
    finally:
        model.eval()


def test_empty_prompt_is_an_error(model, tiny_tokenizer):
    with pytest.raises(ValueError, match="at least one token"):
        generate_greedy(model, tiny_tokenizer, [[5, 6], []], max_new_tokens=2)


def test_exact_match_strips_surrounding_whitespace():
    assert exact_match([" 2021-03-05\n", "2021-03-06"], ["2021-03-05", " 2021-03-05 "]) == 0.5


def test_exact_match_is_case_and_inner_whitespace_sensitive():
    assert exact_match(["Paris", "New  York"], ["paris", "New York"]) == 0.0


def test_exact_match_of_nothing_is_zero():
    assert exact_match([], []) == 0.0


def test_exact_match_rejects_lists_of_different_lengths():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"])


def test_streamed_pieces_add_up_to_the_greedy_completion(model, tiny_tokenizer, prompts):
    pieces: list[str] = []
    text = stream_greedy(model, tiny_tokenizer, prompts[2], 12, pieces.append)
    assert "".join(pieces) == text
    assert text == generate_greedy(model, tiny_tokenizer, [prompts[2]], max_new_tokens=12)[0]
    assert len(pieces) > 1


def test_streaming_never_emits_half_a_character(model, tiny_tokenizer):
    # "é" is two bytes, so two byte-level tokens in the tiny vocabulary: the first alone decodes to U+FFFD.
    e_acute = tiny_tokenizer("é", add_special_tokens=False)["input_ids"]
    assert len(e_acute) == 2
    script = iter(e_acute * 3)
    original_forward = model.forward

    def forward_following_the_script(*args, **kwargs):  # the scripted token wins every step
        out = original_forward(*args, **kwargs)
        out.logits[:, -1, next(script)] = 1e5
        return out

    pieces: list[str] = []
    model.forward = forward_following_the_script
    try:
        text = stream_greedy(model, tiny_tokenizer, [5, 6, 7], 6, pieces.append, stop_ids=set())
    finally:
        del model.forward  # back to the class's forward
    assert text == "ééé"
    assert pieces == ["é", "é", "é"]


def test_sampling_with_a_seeded_generator_is_reproducible(model, tiny_tokenizer, prompts):
    def sample(seed: int) -> str:
        generator = torch.Generator().manual_seed(seed)
        return stream_greedy(
            model, tiny_tokenizer, prompts[0], 10, lambda _: None, temperature=1.5, top_p=0.95, generator=generator
        )

    assert sample(1) == sample(1)


def test_sampling_from_the_single_most_likely_token_is_greedy(model, tiny_tokenizer, prompts):
    sampled = stream_greedy(model, tiny_tokenizer, prompts[3], 10, lambda _: None, temperature=0.7, top_k=1)
    greedy = stream_greedy(model, tiny_tokenizer, prompts[3], 10, lambda _: None)
    assert sampled == greedy


@pytest.mark.parametrize(
    "options, named",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=1.0, top_p=0.0), "top_p"),
        (dict(temperature=1.0, top_p=1.5), "top_p"),
        (dict(temperature=1.0, top_k=0), "top_k"),
        (dict(top_p=0.9), "temperature 0"),
        (dict(temperature=0.0, top_k=5), "temperature 0"),
    ],
)
def test_sampling_options_that_cannot_mean_anything_are_refused(model, tiny_tokenizer, prompts, options, named):
    with pytest.raises(ConfigError, match=named):
        stream_greedy(model, tiny_tokenizer, prompts[0], 4, print, **options)


def test_a_negative_token_budget_is_refused_not_read_as_nothing(model, tiny_tokenizer, prompts):
    with pytest.raises(ConfigError, match="max_new_tokens"):
        stream_greedy(model, tiny_tokenizer, prompts[0], -1, print)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate_greedy(model, tiny_tokenizer, prompts, max_new_tokens=-1)


def test_generation_with_a_frozen_model_gives_the_same_result_and_leaves_no_hooks(model, tiny_tokenizer, prompts):
    expected = generate_greedy(model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=4)
    model.requires_grad_(False)  # frozen weights take a different matmul path in torch
    try:
        assert generate_greedy(model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=4) == expected
    finally:
        model.requires_grad_(True)
    assert not model.get_output_embeddings()._forward_pre_hooks


def test_different_seeds_give_different_samples(model, tiny_tokenizer, prompts):
    samples = {
        stream_greedy(
            model,
            tiny_tokenizer,
            prompts[0],
            8,
            lambda _: None,
            temperature=1.5,
            generator=torch.Generator().manual_seed(seed),
            stop_ids=set(),
        )
        for seed in range(6)
    }
    assert len(samples) >= 4


def expected_distribution(logits: torch.Tensor, temperature: float, top_p, top_k) -> torch.Tensor:
    """The target distribution written out independently: softmax(logits/T) over the top-k tokens, then the
    smallest prefix (by probability) whose mass reaches top_p, renormalised."""
    probs = torch.softmax(logits.double() / temperature, -1)
    order = torch.argsort(probs, descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    kept_mass = 0.0
    support = order[:top_k] if top_k else order
    renormalised = probs[support] / probs[support].sum()
    for token, p in zip(support.tolist(), renormalised.tolist()):
        if top_p is not None and kept_mass >= top_p:
            break
        keep[token] = True
        kept_mass += p
    out = torch.where(keep, probs, torch.zeros_like(probs))
    return out / out.sum()


@pytest.mark.parametrize(
    "temperature, top_p, top_k", [(1.0, None, None), (0.7, None, 8), (1.3, 0.6, None), (1.0, 0.9, 12)]
)
def test_sampled_token_frequencies_follow_the_tempered_and_truncated_softmax(model, prompts, temperature, top_p, top_k):
    from loratune.inference.sampling import sample_next

    with torch.no_grad():
        logits = model(torch.tensor([prompts[1]])).logits[0, -1].float()
    logits = (logits - logits.mean()) / logits.std() * 2.5  # spread out: truncation changes it visibly
    expected = expected_distribution(logits, temperature, top_p, top_k)
    n = 40_000
    draws = sample_next(logits.expand(n, -1), temperature, top_p, top_k, torch.Generator().manual_seed(0))
    observed = torch.bincount(draws, minlength=logits.numel()).double() / n
    assert observed[expected == 0].sum() == 0  # nothing outside the truncated support, ever
    assert 0.5 * (observed - expected).abs().sum() < 0.02  # total variation distance
    assert (expected > 0).sum() > 1  # a real distribution, not a single certain token


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_logits_that_are_not_numbers_cannot_be_sampled(bad):
    from loratune.inference.sampling import sample_next

    logits = torch.zeros(2, 10)
    logits[1, 3] = bad
    with pytest.raises(ValueError, match="not numbers"):
        sample_next(logits, 1.0, None, None, torch.Generator().manual_seed(0))
    assert sample_next(logits[:1], 1.0, None, None, torch.Generator().manual_seed(0)).shape == (1,)


def test_streamed_sampling_draws_each_token_with_sample_next(model, tiny_tokenizer, prompts):
    from loratune.inference.sampling import sample_next

    with torch.no_grad():
        logits = model(torch.tensor([prompts[1]])).logits[0, -1].float()
    for seed in range(40):
        streamed = stream_greedy(
            model,
            tiny_tokenizer,
            prompts[1],
            1,
            lambda _: None,
            temperature=2.0,
            top_k=5,
            stop_ids=set(),
            generator=torch.Generator().manual_seed(seed),
        )
        token = sample_next(logits[None], 2.0, None, 5, torch.Generator().manual_seed(seed)).item()
        assert streamed == tiny_tokenizer.decode([token], skip_special_tokens=True)
