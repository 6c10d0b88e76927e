"""Adapter surgery on whole models: targets, freezing, activation, strength, merge/unmerge/unload, training."""

import pytest
import torch

import loratune
from loratune import LoraConfig
from loratune.adapters import adapter_parameters, find_targets, lora_layers, merged_adapters
from loratune.errors import ConfigError
from loratune.layers import LoraEmbedding, LoraLinear
from tiny_models import TwoLayerNet, tiny_gpt2, tiny_llama, token_batch


def randomize_b(model, name="default", seed=1):
    """Give adapter ``name`` a non-zero B so that it changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.lora_B:
                B = layer.lora_B[name]
                B.copy_(torch.randn(B.shape, generator=generator) * 0.1)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def adapted_paths(model):
    return [path for path, _ in lora_layers(model)]


# --- targets ----------------------------------------------------------------------------------------


def test_all_linear_targets_every_linear_layer_except_the_output_head():
    model = tiny_llama()
    loratune.add_adapter(model, LoraConfig(target_modules="all-linear"))
    paths = adapted_paths(model)
    assert len(paths) == 2 * 7
    assert "lm_head" not in paths
    assert all(isinstance(m, LoraLinear) for _, m in lora_layers(model))


def test_list_targets_match_exact_names_and_dotted_suffixes():
    model = tiny_llama()
    loratune.add_adapter(model, LoraConfig(target_modules=["q_proj", "model.layers.1.mlp.down_proj"]))
    assert adapted_paths(model) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ]


def test_string_target_is_a_full_match_regex():
    model = tiny_llama()
    loratune.add_adapter(model, LoraConfig(target_modules=r".*\.0\.self_attn\.(q|v)_proj"))
    assert adapted_paths(model) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_exclude_modules_and_layers_to_transform_narrow_the_targets():
    model = tiny_llama(layers=3)
    config = LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"], layers_to_transform=[0, 2])
    loratune.add_adapter(model, config)
    assert adapted_paths(model) == ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]


def test_rank_and_alpha_patterns_set_per_module_rank_and_scaling():
    model = tiny_llama()
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32},
    )
    loratune.add_adapter(model, config)
    layers = dict(lora_layers(model))
    assert layers["model.layers.0.self_attn.v_proj"].specs["default"].r == 2
    assert layers["model.layers.0.self_attn.v_proj"].specs["default"].scaling == 4.0
    assert layers["model.layers.0.self_attn.q_proj"].specs["default"].scaling == 2.0
    assert layers["model.layers.1.self_attn.q_proj"].specs["default"].scaling == 8.0


def test_embeddings_and_conv1d_layers_get_lora():
    model = tiny_gpt2()
    loratune.add_adapter(model, LoraConfig(target_modules=["wte", "c_attn", "c_fc"]))
    kinds = {path.rsplit(".", 1)[-1]: type(m).__name__ for path, m in lora_layers(model)}
    assert kinds == {"wte": "LoraEmbedding", "c_attn": "LoraConv1D", "c_fc": "LoraConv1D"}


def test_works_on_a_plain_pytorch_model():
    model = TwoLayerNet()
    ids = torch.randint(0, 20, (3, 5))
    before = model(ids)
    loratune.add_adapter(model, LoraConfig(r=2, target_modules=["embed", "fc1", "fc2"]))
    assert torch.equal(model(ids), before)
    assert isinstance(model.embed, LoraEmbedding)
    assert not isinstance(model.head, LoraLinear)


# --- identity, freezing, training ----------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_freshly_initialised_adapter_leaves_outputs_bit_identical(make):
    model = make()
    ids = token_batch()
    before = logits(model, ids)
    loratune.add_adapter(model, LoraConfig(target_modules="all-linear"))
    assert torch.equal(logits(model, ids), before)


def test_adding_an_adapter_freezes_everything_else():
    model = tiny_llama()
    loratune.add_adapter(model, LoraConfig(r=4, modules_to_save=["lm_head"]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(".lora_A." in n or ".lora_B." in n or n.startswith("lm_head.copies.default.") for n in trainable)


def test_training_steps_change_only_adapter_and_modules_to_save_parameters():
    model = tiny_llama(tie=False)
    loratune.add_adapter(model, LoraConfig(r=4, modules_to_save=["lm_head"]))
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_batch()
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    adapter = {name for name, p in model.named_parameters() if p.requires_grad}
    assert changed == adapter
    for name, p in model.named_parameters():
        if name not in adapter:
            assert p.grad is None
            assert p.detach().numpy().tobytes() == before[name].numpy().tobytes()


def test_same_seed_gives_the_same_adapter():
    def build():
        model = tiny_llama()
        torch.manual_seed(123)
        loratune.add_adapter(model, LoraConfig(r=4))
        return [p.detach().clone() for p in adapter_parameters(model, "default")]

    assert all(torch.equal(a, b) for a, b in zip(build(), build()))


# --- several adapters, strength ------------------------------------------------------------------------


def two_adapter_model():
    model = tiny_llama()
    loratune.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), name="a")
    loratune.add_adapter(model, LoraConfig(r=2, target_modules=["v_proj", "down_proj"]), name="b")
    randomize_b(model, "a", seed=1)
    randomize_b(model, "b", seed=2)
    return model


def test_several_active_adapters_sum_their_effects():
    model = two_adapter_model()
    ids = token_batch()
    # Sum at the layer level: compare each LoRA layer's output (one forward per setting on the same input).
    x = torch.randn(2, 5, 32)
    layer = dict(lora_layers(model))["model.layers.0.self_attn.v_proj"]
    loratune.set_active(model, [])
    base = layer(x)
    loratune.set_active(model, "a")
    delta_a = layer(x) - base
    loratune.set_active(model, "b")
    delta_b = layer(x) - base
    loratune.set_active(model, ["a", "b"])
    torch.testing.assert_close(layer(x) - base, delta_a + delta_b, rtol=1e-5, atol=1e-6)
    assert loratune.active_adapters(model) == ["a", "b"]
    assert not torch.equal(logits(model, ids), logits(tiny_llama(), ids))


def test_strength_scales_the_adapter_effect_linearly():
    model = two_adapter_model()
    x = torch.randn(2, 5, 32)
    layer = dict(lora_layers(model))["model.layers.0.self_attn.q_proj"]
    loratune.set_active(model, "a")
    full = layer(x) - layer.base_layer(x)
    loratune.set_active(model, "a", scales=0.5)
    torch.testing.assert_close(layer(x) - layer.base_layer(x), 0.5 * full, rtol=1e-5, atol=1e-6)
    loratune.set_strength(model, "a", 1.5)
    torch.testing.assert_close(layer(x) - layer.base_layer(x), 1.5 * full, rtol=1e-5, atol=1e-6)


def test_strength_zero_equals_the_base_model():
    model = two_adapter_model()
    ids = token_batch()
    loratune.set_active(model, ["a", "b"], scales=[0.0, 0.0])
    torch.testing.assert_close(logits(model, ids), logits(tiny_llama(), ids), rtol=0, atol=1e-6)


def test_no_active_adapter_and_the_disabled_context_run_the_base():
    model = two_adapter_model()
    ids = token_batch()
    base = logits(tiny_llama(), ids)
    with loratune.disabled_adapters(model):
        assert torch.equal(logits(model, ids), base)
    assert not torch.equal(logits(model, ids), base)  # adapter "b" is back
    loratune.set_active(model, [])
    assert torch.equal(logits(model, ids), base)


def test_deleting_an_adapter_leaves_the_others_bit_identical():
    model = two_adapter_model()
    ids = token_batch()
    loratune.set_active(model, "a")
    only_a = logits(model, ids)
    loratune.delete_adapter(model, "b")
    assert torch.equal(logits(model, ids), only_a)
    assert "b" not in loratune.adapters.adapters_of(model)
    assert all("b" not in layer.lora_A for _, layer in lora_layers(model))
    # down_proj carried only "b": its LoRA layer is gone, the plain Linear is back
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear


# --- merge / unmerge / unload ---------------------------------------------------------------------------


def test_merged_unmerged_and_unloaded_after_merge_models_agree():
    model = tiny_llama(tie=False)
    loratune.add_adapter(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_b(model)
    ids = token_batch()
    unmerged = logits(model, ids)
    loratune.merge(model)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-4)
    loratune.unmerge(model)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-4)
    plain = loratune.unload(model, merge=True)
    assert not list(lora_layers(plain))
    torch.testing.assert_close(logits(plain, ids), unmerged, rtol=0, atol=1e-4)


def test_unmerge_restores_base_weights_within_1e_6():
    model = tiny_llama(tie=False)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    loratune.add_adapter(model, LoraConfig(r=4))
    randomize_b(model)
    loratune.merge(model)
    loratune.unmerge(model)
    plain = loratune.unload(model)
    for name, p in plain.named_parameters():
        assert (p - original[name]).abs().max() <= 1e-6, name


def test_merging_an_adapter_twice_warns_and_does_not_add_twice():
    model = tiny_llama(tie=False)
    loratune.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_b(model)
    loratune.merge(model)
    once = model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="'default' is already merged"):
        loratune.merge(model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight, once)


def test_merging_on_a_tied_embedding_unties_it_and_keeps_the_output_head():
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    loratune.add_adapter(model, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    randomize_b(model)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if isinstance(layer, LoraEmbedding):
                layer.lora_A["default"].normal_()
    ids = token_batch()
    unmerged = logits(model, ids)
    head_before = model.lm_head.weight.detach().clone()
    loratune.merge(model)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-4)
    assert torch.equal(model.lm_head.weight, head_before)
    loratune.unmerge(model)
    assert model.lm_head.weight is model.model.embed_tokens.base_layer.weight  # tie restored exactly
    plain = loratune.unload(model, merge=True)
    torch.testing.assert_close(logits(plain, ids), unmerged, rtol=0, atol=1e-4)
    assert torch.equal(plain.lm_head.weight, head_before)


def test_merging_a_tied_weight_can_be_refused():
    model = tiny_llama(tie=True)
    loratune.add_adapter(model, LoraConfig(r=4, target_modules=["embed_tokens"]))
    with pytest.raises(ConfigError, match="model.embed_tokens.*tied"):
        loratune.merge(model, on_tied="error")
    assert merged_adapters(model) == []


def test_safe_merge_failure_rolls_back_every_layer():
    model = tiny_llama(tie=False)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    loratune.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_b(model)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.lora_B["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="model.layers.1.self_attn.q_proj.*non-finite"):
        loratune.merge(model, safe=True)
    assert merged_adapters(model) == []
    plain = loratune.unload(model)
    assert all(torch.equal(p, original[n]) for n, p in plain.named_parameters())


def test_unload_without_merge_returns_the_original_base():
    model = tiny_llama()
    ids = token_batch()
    base = logits(model, ids)
    loratune.add_adapter(model, LoraConfig(r=4, init_lora_weights="pissa", target_modules=["q_proj", "o_proj"]))
    randomize_b(model)
    plain = loratune.unload(model)
    assert not list(lora_layers(plain))
    torch.testing.assert_close(logits(plain, ids), base, rtol=0, atol=1e-5)
    assert not hasattr(plain, "_loratune_adapters")


def test_pissa_model_starts_equal_to_the_base_and_disabled_runs_the_base():
    model = tiny_llama()
    ids = token_batch()
    base = logits(model, ids)
    loratune.add_adapter(model, LoraConfig(r=4, init_lora_weights="pissa", target_modules=["q_proj", "up_proj"]))
    torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=1e-5)
    randomize_b(model)
    with loratune.disabled_adapters(model):
        torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=1e-5)


def test_parameter_report_counts_trainable_params_and_adapter_bytes():
    model = tiny_llama()
    total_before = sum(p.numel() for p in model.parameters())
    loratune.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    report = loratune.parameter_report(model)
    # q_proj: 32 -> 32, v_proj: 32 -> 16 (GQA), two layers, A: r×in, B: out×r
    expected = 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    assert report.trainable == report.adapter_params == expected
    assert report.total == total_before + expected
    assert report.adapter_bytes == 4 * expected
    assert f"{expected:,}" in str(report)
    assert report.percent == pytest.approx(100 * expected / (total_before + expected))


# --- error paths name the offending thing ---------------------------------------------------------------


def test_unknown_config_field_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match="'LoraConfig.lora_alhpa'; did you mean 'LoraConfig.lora_alpha'"):
        LoraConfig(lora_alhpa=16)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "LoraConfig.r: .*greater than 0.*got 0"),
        ({"lora_alpha": -1}, "LoraConfig.lora_alpha"),
        ({"lora_dropout": 1.5}, "LoraConfig.lora_dropout"),
        ({"bias": "all"}, "LoraConfig.bias: only 'none'"),
        ({"init_lora_weights": "kaiming"}, "LoraConfig.init_lora_weights.*'gaussian', 'pissa'"),
        ({"target_modules": []}, "LoraConfig: target_modules must name at least one"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern.*'q_proj' must be positive"),
        (
            {"target_modules": "q_proj", "layers_to_transform": [0]},
            "layers_to_transform needs target_modules as a list",
        ),
    ],
)
def test_invalid_config_values_raise_one_line_errors_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        LoraConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_config_matching_no_module_lists_some_module_names():
    with pytest.raises(ConfigError, match=r"\['nonexistent'\] matches no module.*model.layers.0.self_attn.q_proj"):
        loratune.add_adapter(tiny_llama(), LoraConfig(target_modules=["nonexistent"]))


def test_targeting_an_unsupported_module_type_names_it():
    with pytest.raises(ConfigError, match="'model.norm' is a LlamaRMSNorm"):
        loratune.add_adapter(tiny_llama(), LoraConfig(target_modules=["norm"]))


def test_modules_to_save_matching_nothing_is_an_error_and_leaves_no_adapter():
    model = tiny_llama()
    with pytest.raises(ConfigError, match=r"modules_to_save=\['classifier'\] matches no module"):
        loratune.add_adapter(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["classifier"]))
    assert not list(lora_layers(model))


def test_duplicate_adapter_name_is_refused():
    model = tiny_llama()
    loratune.add_adapter(model, LoraConfig(target_modules=["q_proj"]), name="task")
    with pytest.raises(ConfigError, match="'task' already exists"):
        loratune.add_adapter(model, LoraConfig(target_modules=["q_proj"]), name="task")


@pytest.mark.parametrize("name", ["", "a.b", "__base__"])
def test_invalid_adapter_names_are_refused(name):
    with pytest.raises(ConfigError, match="adapter name .* is invalid"):
        loratune.add_adapter(tiny_llama(), LoraConfig(target_modules=["q_proj"]), name=name)


def test_activating_an_unknown_adapter_names_it_and_the_existing_ones():
    model = tiny_llama()
    loratune.add_adapter(model, LoraConfig(target_modules=["q_proj"]), name="task")
    with pytest.raises(ConfigError, match="no adapter named 'other'.*'task'"):
        loratune.set_active(model, ["other"])


def test_mismatched_scales_are_refused():
    model = two_adapter_model()
    with pytest.raises(ConfigError, match="1 scales given for 2 adapters"):
        loratune.set_active(model, ["a", "b"], scales=[0.5])


def test_changing_active_adapters_or_deleting_while_merged_asks_to_unmerge():
    model = two_adapter_model()
    loratune.merge(model)
    with pytest.raises(ConfigError, match=r"adapters \['b'\] are merged.*unmerge"):
        loratune.set_active(model, "a")
    with pytest.raises(ConfigError, match="'b' is merged; unmerge"):
        loratune.delete_adapter(model, "b")
    with pytest.raises(ConfigError, match="cannot run the base model.*merged"), loratune.disabled_adapters(model):
        pass


def test_two_active_adapters_with_their_own_copy_of_a_module_are_refused():
    model = tiny_llama(tie=False)
    loratune.add_adapter(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]), name="a")
    loratune.add_adapter(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]), name="b")
    with pytest.raises(ConfigError, match=r"\['a', 'b'\] each train their own copy of 'lm_head'"):
        loratune.set_active(model, ["a", "b"])


def test_pissa_on_a_tied_weight_is_refused():
    with pytest.raises(ConfigError, match="PiSSA.*tied"):
        loratune.add_adapter(tiny_llama(tie=True), LoraConfig(target_modules=["lm_head"], init_lora_weights="pissa"))


def test_find_targets_lists_pairs_in_model_order():
    model = tiny_gpt2()
    paths = [p for p, _ in find_targets(model, LoraConfig(target_modules=["c_attn"]))]
    assert paths == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_adapter_state_lives_in_the_layers_so_an_enclosing_module_sees_it():
    model = tiny_llama()
    loratune.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]), "a")
    loratune.add_adapter(model, LoraConfig(r=2, target_modules=["v_proj"]), "b")
    assert not [name for name in vars(model) if "loratune" in name]  # nothing stored on the user's model
    outer = torch.nn.ModuleDict({"inner": model})
    assert list(loratune.adapters.adapters_of(outer)) == ["a", "b"]
    loratune.set_active(outer, ["b", "a"], scales=[0.5, 1.0])
    assert loratune.active_adapters(model) == ["b", "a"]
    assert loratune.adapters.adapter_strength(model, "b") == 0.5
