"""Many adapters on one base: mixed-adapter batches, strength at inference, hot load and unload."""

import pytest
import torch

import loratune
from loratune import LoraConfig
from loratune.adapters import BASE_ADAPTER, adapter_slots, lora_layers, mixed_batch
from loratune.adapters.surgery import adapter_strength
from loratune.errors import ConfigError
from loratune.inference.decode import generate_greedy
from tiny_models import tiny_gpt2, tiny_llama, token_batch

ROW_NAMES = ["a", BASE_ADAPTER, "b", "a", "c", BASE_ADAPTER, "b"]


def randomize_b(model, name, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tensor in adapter_slots(model, name):
            if tensor.dim() == 2 and tensor.shape[1] <= 8 and tensor.shape[0] > tensor.shape[1]:  # B: out × r
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)


def three_adapter_llama():
    """Adapters of different ranks and targets: plain, rsLoRA on all linear layers, embeddings + lm_head copy."""
    model = tiny_llama(tie=False)
    loratune.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "a")
    loratune.add_adapter(model, LoraConfig(r=8, lora_alpha=8, use_rslora=True, target_modules="all-linear"), "b")
    loratune.add_adapter(
        model, LoraConfig(r=2, target_modules=["embed_tokens", "down_proj"], modules_to_save=["lm_head"]), "c"
    )
    for seed, name in enumerate(["a", "b", "c"]):
        randomize_b(model, name, seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if "c" in layer.lora_A:
                layer.lora_A["c"].normal_()  # embedding A starts at zero
        model.lm_head.copies["c"].weight.add_(0.3)
    loratune.set_strength(model, "b", 0.7)
    return model


def rows_one_adapter_at_a_time(model, ids, names, **kwargs):
    """The reference: the whole batch once per adapter, keeping the rows that named it."""
    out = torch.empty(0)
    for index, name in enumerate(names):
        with torch.no_grad():
            if name == BASE_ADAPTER:
                with loratune.disabled_adapters(model):
                    row = model(ids, **kwargs).logits[index]
            else:
                loratune.set_active(model, name)
                row = model(ids, **kwargs).logits[index]
        out = torch.cat([out, row[None]])
    return out


def test_mixed_batch_rows_equal_per_adapter_runs():
    model = three_adapter_llama()
    ids = token_batch(batch=len(ROW_NAMES), length=6)
    with torch.no_grad():
        mixed = model(ids, adapter_names=ROW_NAMES).logits
    reference = rows_one_adapter_at_a_time(model, ids, ROW_NAMES)
    torch.testing.assert_close(mixed, reference, rtol=1e-5, atol=1e-5)
    base = rows_one_adapter_at_a_time(model, ids, [BASE_ADAPTER] * len(ROW_NAMES))
    for index, name in enumerate(ROW_NAMES):  # every adapter row does differ from the base
        assert torch.allclose(mixed[index], base[index]) == (name == BASE_ADAPTER)


def test_mixed_batch_works_for_conv1d_models():
    model = tiny_gpt2()
    loratune.add_adapter(model, LoraConfig(r=4, target_modules=["c_attn"]), "x")
    loratune.add_adapter(model, LoraConfig(r=2, target_modules=["c_attn", "c_fc"]), "y")
    randomize_b(model, "x", 1)
    randomize_b(model, "y", 2)
    names = ["y", BASE_ADAPTER, "x", "y"]
    ids = token_batch(batch=4)
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
    torch.testing.assert_close(mixed, rows_one_adapter_at_a_time(model, ids, names), rtol=1e-5, atol=1e-5)


def test_mixed_batch_leaves_the_active_adapters_and_strengths_as_they_were():
    model = three_adapter_llama()
    loratune.set_active(model, ["a", "b"], [1.0, 0.7])
    ids = token_batch(batch=3)
    with torch.no_grad():
        before = model(ids).logits
        model(ids, adapter_names=["c", "c", BASE_ADAPTER])
        after = model(ids).logits
    assert torch.equal(before, after)
    assert loratune.active_adapters(model) == ["a", "b"]


def test_a_single_adapter_for_every_row_equals_activating_it():
    model = three_adapter_llama()
    ids = token_batch(batch=3)
    loratune.set_active(model, "b")
    with torch.no_grad():
        expected = model(ids).logits
        loratune.set_active(model, "a")
        got = model(ids, adapter_names=["b"] * 3).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_mixed_batch_context_routes_transformers_generate():
    model = three_adapter_llama()
    ids = token_batch(batch=4, length=5)
    names = ["b", "a", BASE_ADAPTER, "c"]
    with torch.no_grad(), mixed_batch(model, names):
        mixed = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for index, name in enumerate(names):
        with torch.no_grad():
            if name == BASE_ADAPTER:
                with loratune.disabled_adapters(model):
                    alone = model.generate(ids[index : index + 1], max_new_tokens=6, do_sample=False, pad_token_id=0)
            else:
                loratune.set_active(model, name)
                alone = model.generate(ids[index : index + 1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(mixed[index], alone[0])


def test_greedy_generation_with_adapter_names_equals_each_prompt_alone(tiny_tokenizer):
    model = three_adapter_llama()
    model.generation_config.eos_token_id = None
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14, 15, 16, 17, 18], [3, 4]]
    names = ["a", "c", BASE_ADAPTER, "b", "a"]
    mixed = generate_greedy(
        model, tiny_tokenizer, prompts, max_new_tokens=5, batch_size=4, adapter_names=names, stop_ids=set()
    )
    for prompt, name, text in zip(prompts, names, mixed):
        if name == BASE_ADAPTER:
            with loratune.disabled_adapters(model):
                alone = generate_greedy(model, tiny_tokenizer, [prompt], max_new_tokens=5, stop_ids=set())
        else:
            loratune.set_active(model, name)
            alone = generate_greedy(model, tiny_tokenizer, [prompt], max_new_tokens=5, stop_ids=set())
        assert text == alone[0]
    assert len(set(mixed)) > 1


def test_gradients_reach_only_the_adapters_a_mixed_batch_uses():
    model = three_adapter_llama()
    loratune.adapters.set_trainable(model, ["a", "b", "c"])
    model(token_batch(batch=3), adapter_names=["a", BASE_ADAPTER, "a"]).logits.sum().backward()
    layers = dict(lora_layers(model))
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q.lora_B["a"].grad is not None and q.lora_B["a"].grad.abs().sum() > 0
    assert q.lora_B["b"].grad is None


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["a", "b"], "2 names but the batch has 3 rows"),
        (["a", "bb", "a"], "did you mean 'b'"),
        ("a", "one adapter name per row"),
    ],
)
def test_bad_adapter_names_are_refused_with_a_clear_error(names, message):
    model = three_adapter_llama()
    with pytest.raises(ConfigError, match=message):
        model(token_batch(batch=3), adapter_names=names)
    with torch.no_grad():  # and nothing is left half-set: a plain call runs the active adapter again
        loratune.set_active(model, "a")
        expected = rows_one_adapter_at_a_time(model, token_batch(batch=3), ["a", "a", "a"])
        assert torch.equal(model(token_batch(batch=3)).logits, expected)


def test_mixed_batch_refuses_merged_adapters():
    model = three_adapter_llama()
    loratune.set_active(model, "a")
    loratune.merge(model)
    with pytest.raises(ConfigError, match="unmerge"):
        model(token_batch(batch=2), adapter_names=["a", "b"])


# --- strength at inference -----------------------------------------------------------------------------


def test_strength_zero_equals_the_base_and_one_the_adapter_as_loaded(tmp_path):
    model = three_adapter_llama()
    ids = token_batch()
    with torch.no_grad(), loratune.disabled_adapters(model):
        base = model(ids).logits
    loratune.set_active(model, "b")
    loratune.set_strength(model, "b", 1.0)
    with torch.no_grad():
        full = model(ids).logits
    loratune.save_adapter(model, tmp_path / "b", "b")
    loratune.set_strength(model, "b", 0.0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    fresh = tiny_llama(tie=False)
    loratune.load_adapter(fresh, tmp_path / "b", scale=1.0)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, full)
        loratune.set_strength(fresh, "default", 0.5)  # changed later without reloading
        half = fresh(ids).logits
    loratune.set_active(model, "b", 0.5)
    with torch.no_grad():
        torch.testing.assert_close(half, model(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(half, full)


def test_several_active_adapters_add_up_with_their_own_strengths():
    model = three_adapter_llama()
    ids = token_batch()
    with torch.no_grad():
        with loratune.disabled_adapters(model):
            base = model(ids).logits
        loratune.set_active(model, ["a", "b"], [0.5, 2.0])
        both = model(ids).logits
        loratune.set_active(model, "a", 0.5)
        only_a = model(ids).logits
        loratune.set_active(model, "b", 2.0)
        only_b = model(ids).logits
    # The adapters touch the same layers, so the logits do not simply add; the hidden deltas do at layer 0.
    assert not torch.allclose(both, only_a) and not torch.allclose(both, only_b)
    layer = dict(lora_layers(model))["model.layers.0.self_attn.q_proj"]
    x = torch.randn(3, 32)
    loratune.set_active(model, ["a", "b"], [0.5, 2.0])
    with torch.no_grad():
        combined = layer(x) - layer.base_layer(x)
        expected = 0.5 * layer.delta_weight("a", layer.specs["a"].scaling) + 2.0 * layer.delta_weight(
            "b", layer.specs["b"].scaling
        )
    torch.testing.assert_close(combined, x @ expected.T, rtol=1e-5, atol=1e-6)
    assert not torch.equal(both, base)


# --- hot load and unload -------------------------------------------------------------------------------


def test_hot_load_and_unload_leave_the_base_and_other_adapters_bit_identical(tmp_path):
    donor = three_adapter_llama()
    loratune.save_adapter(donor, tmp_path / "b", "b")
    model = tiny_llama(tie=False)
    loratune.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "a")
    randomize_b(model, "a", 5)
    ids = token_batch()
    snapshot = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():
        before = model(ids).logits
    loratune.load_adapter(model, tmp_path / "b", "b")
    with torch.no_grad():
        loratune.set_active(model, "a")
        assert torch.equal(model(ids).logits, before)
    loratune.delete_adapter(model, "b")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    after = model.state_dict()
    assert after.keys() == snapshot.keys()
    assert all(torch.equal(after[key], snapshot[key]) for key in snapshot)


def test_a_mixed_batch_sees_strength_and_weight_changes_made_while_it_runs():
    model = three_adapter_llama()
    ids = token_batch(batch=3)
    names = ["a", "b", BASE_ADAPTER]
    with torch.no_grad(), mixed_batch(model, names):
        first = model(ids).logits
        loratune.set_strength(model, "b", 0.0)
        second = model(ids).logits
        for _, layer in lora_layers(model):
            if "a" in layer.lora_B:
                layer.lora_B["a"].mul_(2)
        third = model(ids).logits
    assert torch.equal(first[0], second[0]) and not torch.allclose(first[1], second[1])
    with torch.no_grad(), loratune.disabled_adapters(model):
        torch.testing.assert_close(second[1], model(ids).logits[1], rtol=1e-5, atol=1e-5)  # b at strength 0 = base
    assert not torch.allclose(second[0], third[0])
    torch.testing.assert_close(third, rows_one_adapter_at_a_time(model, ids, names), rtol=1e-5, atol=1e-5)


def test_mixed_batches_in_bf16_match_per_adapter_runs_up_to_bf16_rounding():
    model = three_adapter_llama().to(torch.bfloat16)
    ids = token_batch(batch=len(ROW_NAMES), length=6)
    with torch.no_grad():
        mixed = model(ids, adapter_names=ROW_NAMES).logits.float()
    reference = rows_one_adapter_at_a_time(model, ids, ROW_NAMES).float()
    assert (mixed - reference).norm() / reference.norm() < 1e-2


def test_mixed_batch_refuses_a_pissa_adapter():
    model = tiny_llama(tie=False)
    loratune.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"), "p")
    with pytest.raises(ConfigError, match="PiSSA"):
        model(token_batch(batch=2), adapter_names=["p", BASE_ADAPTER])


MIXES = [(("a", 0.5), ("b", -0.3)), (), (("b", 1.0),), (("a", 2.0),), (("b", 0.25), ("a", 1.0)), "a"]


def rows_with_strengths(model, ids, mixes):
    """The reference for mixed rows: the whole batch once per mix, its adapters active at strength × weight."""
    strengths = {name: adapter_strength(model, name) for name in ("a", "b")}
    rows = []
    for index, mix in enumerate(mixes):
        pairs = ((mix, 1.0),) if isinstance(mix, str) else mix
        with torch.no_grad():
            if not pairs:
                with loratune.disabled_adapters(model):
                    rows.append(model(ids).logits[index])
                continue
            loratune.set_active(model, [n for n, _ in pairs], [strengths[n] * w for n, w in pairs])
            rows.append(model(ids).logits[index])
    loratune.set_active(model, list(strengths), list(strengths.values()))
    return torch.stack(rows)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("rows_per_batch", [1, 40])  # few rows (the no-grad kernel's size) and many
def test_rows_that_mix_adapters_at_weights_equal_those_adapters_active_together(dora, rows_per_batch):
    model = tiny_llama()
    loratune.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=dora), "a")
    loratune.add_adapter(model, LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"), "b")
    randomize_b(model, "a", 1)
    randomize_b(model, "b", 2)
    loratune.set_strength(model, "b", 0.7)
    ids = token_batch(batch=len(MIXES), length=rows_per_batch)
    with torch.no_grad():
        mixed = model(ids, adapter_names=MIXES).logits
    reference = rows_with_strengths(model, ids, MIXES)
    torch.testing.assert_close(mixed, reference, rtol=1e-5, atol=1e-5)
    loratune.set_active(model, [])
    with torch.no_grad():
        bare = model(ids).logits
    assert torch.equal(mixed[1], bare[1]) and not torch.allclose(mixed[0], bare[0])
    for _, layer in lora_layers(model):  # the reference path computes the same rows
        layer.fast_paths = False
    with torch.no_grad():
        slow = model(ids, adapter_names=MIXES).logits
    torch.testing.assert_close(slow, reference, rtol=1e-5, atol=1e-5)


def test_a_row_cannot_mix_two_adapters_that_replace_the_same_module():
    model = tiny_llama(tie=False)
    loratune.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), "x")
    loratune.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), "y")
    with pytest.raises(ConfigError, match="modules_to_save"), torch.no_grad():
        model(token_batch(batch=2), adapter_names=[(("x", 1.0), ("y", 1.0)), "x"])
