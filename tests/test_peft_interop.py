"""Interoperability with the real PEFT library: adapters cross between loratune and PEFT unchanged.

The contract (DESIGN.md, "Adapter directory"): an adapter loratune saves loads in PEFT, an adapter PEFT saves
loads in loratune, and both give the same outputs; the tensor keys and ``adapter_config.json`` follow PEFT.

Every case builds the same tiny random model twice (same seed = same weights): one copy carries the adapter on
the saving side, a fresh copy loads it. Adapters get non-zero B (``init_lora_weights=False``) and all trainable
tensors (A, B, modules_to_save copies) are perturbed, so a dropped or misplaced tensor changes the logits.
Everything runs in float32 and eval mode (no dropout).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import loratune
from loratune.adapters import ModulesToSaveWrapper, adapters_of
from loratune.layers import LoraLayer
from tiny_models import VOCAB, tiny_gpt2, tiny_llama, token_batch

peft = pytest.importorskip("peft")

ATOL = 1e-5  # max abs logit difference allowed between the two libraries (float32)
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
CONTRACT_CONFIG_KEYS = {
    "peft_type",
    "r",
    "lora_alpha",
    "target_modules",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "lora_dropout",
    "bias",
    "modules_to_save",
    "task_type",
    "base_model_name_or_path",
}

pytestmark = [
    # Noise from PEFT and transformers about tied embeddings, Conv1D and tiny configs; not what is tested here.
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


# --- cases ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One adapter configuration on one tiny model; ``lora`` holds kwargs both libraries' LoraConfig accept."""

    id: str
    build: Callable[[int], torch.nn.Module]
    lora: dict = field(default_factory=dict)


def llama(seed: int = 0):
    return tiny_llama(seed)  # tied input/output embeddings


def untied_llama(seed: int = 0):
    return tiny_llama(seed, tie=False)


def gpt2(seed: int = 0):
    return tiny_gpt2(seed)


GPT2_CONV1D = ["c_attn", "c_proj", "c_fc"]

CASES = [
    Case("plain", llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    Case(
        "rank_and_alpha_pattern",
        llama,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
            alpha_pattern={"down_proj": 3, "layers.0.self_attn.v_proj": 5},
        ),
    ),
    Case("rslora", llama, dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "o_proj", "up_proj"])),
    Case("embedding_llama", llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])),
    Case(
        "embedding_gpt2",
        gpt2,
        dict(r=4, lora_alpha=8, target_modules=["wte", "c_attn"], fan_in_fan_out=True),
    ),
    Case(
        "modules_to_save_head",
        untied_llama,
        dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    ),
    Case(
        "modules_to_save_final_norm",
        llama,
        dict(r=4, lora_alpha=8, target_modules=["v_proj"], modules_to_save=["model.norm"]),
    ),
    # PEFT before 0.22 matched modules_to_save by plain string suffix ("norm" also selected every
    # input_layernorm); 0.22 by module name, as loratune does (files of older PEFTs load as they were written).
    Case(
        "modules_to_save_norm_suffix",
        llama,
        dict(r=4, lora_alpha=8, target_modules=["v_proj"], modules_to_save=["norm"]),
    ),
    Case("regex_targets", llama, dict(r=4, lora_alpha=8, target_modules=r".*\.layers\.1\.self_attn\.(q|k)_proj")),
    Case(
        "layers_to_transform",
        llama,
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
    ),
    Case(
        "layers_pattern_and_single_index",
        llama,
        dict(r=4, lora_alpha=8, target_modules=["k_proj", "gate_proj"], layers_to_transform=0, layers_pattern="layers"),
    ),
    Case("all_linear_llama", llama, dict(r=4, lora_alpha=8, target_modules="all-linear")),
    Case(
        "exclude_modules",
        llama,
        dict(
            r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["down_proj", "layers.0.self_attn.o_proj"]
        ),
    ),
    Case("conv1d_gpt2", gpt2, dict(r=4, lora_alpha=8, target_modules=GPT2_CONV1D, fan_in_fan_out=True)),
    Case("all_linear_gpt2", gpt2, dict(r=4, lora_alpha=8, target_modules="all-linear", fan_in_fan_out=True)),
]

PISSA_CASES = [
    Case("pissa_llama", llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    Case(
        "pissa_rank_and_alpha_pattern",
        llama,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"q_proj": 5},
        ),
    ),
    Case("pissa_rslora", llama, dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "up_proj"])),
    Case(
        "pissa_rslora_with_patterns",
        llama,
        dict(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"q_proj": 5},
        ),
    ),
    Case("pissa_conv1d_gpt2", gpt2, dict(r=4, lora_alpha=8, target_modules=GPT2_CONV1D, fan_in_fan_out=True)),
]

# PEFT's save-time conversion refuses rsLoRA combined with rank/alpha patterns.
PEFT_CONVERTIBLE_PISSA_CASES = [
    c
    for c in PISSA_CASES
    if not (c.lora.get("use_rslora") and (c.lora.get("rank_pattern") or c.lora.get("alpha_pattern")))
]


def by_id(cases):
    return pytest.mark.parametrize("case", cases, ids=[c.id for c in cases])


# --- helpers ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def input_ids():
    return token_batch(seed=1)


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    difference = (actual - expected).abs().max().item()
    assert difference <= atol, f"max abs logit difference {difference:.3g} > {atol}"


def assert_adapter_changes_logits(adapted: torch.Tensor, base: torch.Tensor) -> None:
    """Guards against a vacuous comparison: the adapter must visibly change the model."""
    assert (adapted - base).abs().max().item() > 1e-3, "the adapter does not change the logits; test is vacuous"


def perturb_trainable(model: torch.nn.Module, seed: int = 123, size: float = 0.1) -> None:
    """Stand-in for training: add noise to every trainable tensor (A, B and modules_to_save copies)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(size * torch.randn(param.shape, generator=generator))


def peft_config(case: Case, **overrides):
    return peft.LoraConfig(task_type="CAUSAL_LM", **{**case.lora, **overrides})


def loratune_config(case: Case, **overrides):
    return loratune.LoraConfig(**{**case.lora, **overrides})


def peft_model(case: Case, seed: int = 0, *, trained: bool = True, **overrides):
    """A PEFT model of ``case`` on a fresh base, in eval mode; ``trained``: perturbed after initialisation."""
    model = peft.get_peft_model(case.build(seed), peft_config(case, **overrides))
    if trained:
        perturb_trainable(model)
    return model.eval()


def loratune_model(case: Case, seed: int = 0, **overrides):
    """A loratune model of ``case`` on a fresh base, trained (perturbed), in eval mode."""
    model = loratune.add_adapter(case.build(seed), loratune_config(case, **overrides))
    perturb_trainable(model)
    return model.eval()


def peft_from_pretrained(base: torch.nn.Module, directory: Path):
    """``PeftModel.from_pretrained``, failing if PEFT reports adapter tensors missing from the file."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys.*")
        return peft.PeftModel.from_pretrained(base, str(directory)).eval()


def tensor_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(directory / WEIGHTS), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / WEIGHTS), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def assert_model_has_no_adapter(model: torch.nn.Module) -> None:
    assert adapters_of(model) == {}
    assert loratune.active_adapters(model) == []
    leftovers = [path for path, m in model.named_modules() if isinstance(m, (LoraLayer, ModulesToSaveWrapper))]
    assert leftovers == []


# --- PEFT -> loratune -------------------------------------------------------------------------------------------------


@by_id(CASES)
def test_peft_adapter_loads_in_loratune_with_same_logits(case, input_ids, tmp_path):
    source = peft_model(case, init_lora_weights=False)
    expected = logits(source, input_ids)
    # Adapter tensors only: see the dedicated test for the base embedding PEFT adds by default.
    source.save_pretrained(tmp_path, save_embedding_layers=False)

    model = case.build(0)
    base = logits(model, input_ids)
    loratune.load_adapter(model, tmp_path)

    assert_adapter_changes_logits(expected, base)
    assert_same_logits(logits(model, input_ids), expected)


def test_peft_embedding_adapter_saved_with_defaults_loads_in_loratune(input_ids, tmp_path):
    # PEFT's default save_embedding_layers="auto" also writes the targeted embedding's own weight as
    # "...embed_tokens.base_layer.weight" when target_modules names embed_tokens.
    case = next(c for c in CASES if c.id == "embedding_llama")
    source = peft_model(case, init_lora_weights=False)
    expected = logits(source, input_ids)
    source.save_pretrained(tmp_path)
    assert "base_model.model.model.embed_tokens.base_layer.weight" in tensor_shapes(tmp_path)

    model = case.build(0)
    loratune.load_adapter(model, tmp_path)

    assert_same_logits(logits(model, input_ids), expected)


# --- loratune -> PEFT -------------------------------------------------------------------------------------------------


@by_id(CASES)
def test_loratune_adapter_loads_in_peft_with_same_logits(case, input_ids, tmp_path):
    source = loratune_model(case, init_lora_weights=False)
    expected = logits(source, input_ids)
    loratune.save_adapter(source, tmp_path)

    base_model = case.build(0)
    base = logits(base_model, input_ids)
    loaded = peft_from_pretrained(base_model, tmp_path)

    assert_adapter_changes_logits(expected, base)
    assert_same_logits(logits(loaded, input_ids), expected)


def test_loratune_conv1d_adapter_without_fan_in_fan_out_loads_in_peft(input_ids, tmp_path):
    # loratune detects Conv1D by type, so fan_in_fan_out may be left False; PEFT must still read it right.
    case = Case("conv1d_default_flag", gpt2, dict(r=4, lora_alpha=8, target_modules=GPT2_CONV1D))
    source = loratune_model(case, init_lora_weights=False)
    expected = logits(source, input_ids)
    loratune.save_adapter(source, tmp_path)

    loaded = peft_from_pretrained(gpt2(0), tmp_path)

    assert_same_logits(logits(loaded, input_ids), expected)


# --- key format and adapter_config.json ------------------------------------------------------------------------------


@by_id(CASES)
def test_loratune_writes_the_same_tensor_keys_and_shapes_as_peft(case, tmp_path):
    peft_model(case).save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    loratune.save_adapter(loratune_model(case), tmp_path / "loratune")

    assert tensor_shapes(tmp_path / "loratune") == tensor_shapes(tmp_path / "peft")


@by_id(CASES)
def test_loratune_adapter_config_has_the_contract_keys(case, tmp_path):
    loratune.save_adapter(loratune_model(case), tmp_path, base_model_name_or_path="tiny/random-model")
    written = json.loads((tmp_path / CONFIG).read_text())

    assert written.keys() >= CONTRACT_CONFIG_KEYS
    assert written["peft_type"] == "LORA"
    assert written["task_type"] == "CAUSAL_LM"
    assert written["base_model_name_or_path"] == "tiny/random-model"
    assert written["r"] == case.lora["r"]
    assert written["lora_alpha"] == case.lora["lora_alpha"]
    assert written["use_rslora"] == case.lora.get("use_rslora", False)
    assert written["rank_pattern"] == case.lora.get("rank_pattern", {})
    assert written["alpha_pattern"] == case.lora.get("alpha_pattern", {})
    assert written["lora_dropout"] == 0.0
    assert written["bias"] == "none"
    assert written["modules_to_save"] == case.lora.get("modules_to_save")


def test_loratune_adapter_config_names_the_base_model_directory_it_was_loaded_from(tmp_path):
    llama(0).save_pretrained(tmp_path / "base")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    loratune.add_adapter(model, loratune.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    loratune.save_adapter(model, tmp_path / "adapter")

    written = json.loads((tmp_path / "adapter" / CONFIG).read_text())
    assert written["base_model_name_or_path"] == str(tmp_path / "base")


def test_peft_reads_the_loratune_config_as_the_same_lora_config(tmp_path):
    case = next(c for c in CASES if c.id == "rank_and_alpha_pattern")
    loratune.save_adapter(loratune_model(case), tmp_path)

    config = peft.PeftConfig.from_pretrained(str(tmp_path))

    assert config.peft_type == peft.PeftType.LORA
    assert (config.r, config.lora_alpha) == (4, 8)
    assert config.rank_pattern == case.lora["rank_pattern"]
    assert config.alpha_pattern == case.lora["alpha_pattern"]
    assert set(config.target_modules) == set(case.lora["target_modules"])


# --- PiSSA ------------------------------------------------------------------------------------------------------------


@by_id(PISSA_CASES)
def test_loratune_pissa_adapter_saves_as_rank_2r_lora_that_peft_loads_on_the_original_base(case, input_ids, tmp_path):
    source = loratune_model(case, init_lora_weights="pissa")  # base weights now hold the residual
    expected = logits(source, input_ids)
    loratune.save_adapter(source, tmp_path)

    written = json.loads((tmp_path / CONFIG).read_text())
    assert written["init_lora_weights"] is True  # PEFT must not redo the PiSSA split on load
    assert written["r"] == 2 * case.lora["r"]
    base_model = case.build(0)
    base = logits(base_model, input_ids)
    loaded = peft_from_pretrained(base_model, tmp_path)

    assert_adapter_changes_logits(expected, base)
    assert_same_logits(logits(loaded, input_ids), expected)


@by_id(PEFT_CONVERTIBLE_PISSA_CASES)
def test_peft_pissa_adapter_converted_on_save_loads_in_loratune_on_the_original_base(case, input_ids, tmp_path):
    # PEFT's recipe: save the PiSSA start right after init, train, then save with
    # path_initial_model_for_weight_conversion, which writes [A; A0], [B, -B0] with r and alpha doubled.
    source = peft_model(case, trained=False, init_lora_weights="pissa")
    source.save_pretrained(tmp_path / "pissa_init")
    perturb_trainable(source)
    expected = logits(source, input_ids)
    source.save_pretrained(
        tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "pissa_init")
    )
    assert json.loads((tmp_path / "converted" / CONFIG).read_text())["r"] == 2 * case.lora["r"]

    model = case.build(0)
    base = logits(model, input_ids)
    loratune.load_adapter(model, tmp_path / "converted")

    assert_adapter_changes_logits(expected, base)
    assert_same_logits(logits(model, input_ids), expected)


@by_id(PEFT_CONVERTIBLE_PISSA_CASES)
def test_a_peft_pissa_adapter_with_its_residual_loads_as_plain_lora_on_the_untouched_base(case, input_ids, tmp_path):
    source = peft_model(case, init_lora_weights="pissa")
    expected = logits(source, input_ids)
    source.save_pretrained(tmp_path)  # A, B of the residual start: the base must be split again to use them
    model = case.build(0)
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    loratune.load_adapter(model, tmp_path, name="p", as_plain=True)
    assert_same_logits(logits(model, input_ids), expected)
    layers = dict(loratune.adapters.lora_layers(model))
    assert layers and not any(layer.pissa for layer in layers.values())
    residual = case.build(0)
    loratune.load_adapter(residual, tmp_path, name="p")
    ranks = {path: layer.lora_A["p"].shape[0] for path, layer in loratune.adapters.lora_layers(residual)}
    assert {path: layer.lora_A["p"].shape[0] for path, layer in layers.items()} == {p: 2 * r for p, r in ranks.items()}
    loratune.delete_adapter(model, "p")
    assert all(torch.equal(v, base_weights[k]) for k, v in model.state_dict().items())


@by_id(PEFT_CONVERTIBLE_PISSA_CASES)
def test_loratune_pissa_save_writes_the_same_keys_shapes_and_config_as_peft_conversion(case, tmp_path):
    source = peft_model(case, trained=False, init_lora_weights="pissa")
    source.save_pretrained(tmp_path / "pissa_init")
    source.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "pissa_init"))
    loratune.save_adapter(loratune_model(case, init_lora_weights="pissa"), tmp_path / "loratune")

    assert tensor_shapes(tmp_path / "loratune") == tensor_shapes(tmp_path / "peft")
    ours, theirs = (json.loads((tmp_path / side / CONFIG).read_text()) for side in ("loratune", "peft"))
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights", "use_rslora"):
        assert ours[key] == pytest.approx(theirs[key]), key


@by_id(PISSA_CASES)
def test_peft_pissa_adapter_saved_unconverted_loads_in_loratune_on_the_original_base(case, input_ids, tmp_path):
    # Without conversion the file holds the trained A, B and the config says init_lora_weights="pissa": the
    # loader must split the original base by SVD again (W_res = W - s·B0·A0) before using A and B, as PEFT does.
    source = peft_model(case, trained=False, init_lora_weights="pissa")
    perturb_trainable(source)
    expected = logits(source, input_ids)
    source.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG).read_text())["init_lora_weights"] == "pissa"

    model = case.build(0)
    base = logits(model, input_ids)
    loratune.load_adapter(model, tmp_path)

    assert_adapter_changes_logits(expected, base)
    assert_same_logits(logits(model, input_ids), expected)


@pytest.mark.parametrize("init", ["pissa_niter_4", "olora"])
def test_peft_adapter_saved_unconverted_from_another_base_rewriting_start_is_never_misread(init, input_ids, tmp_path):
    # These PEFT starts also rewrite the base weight (W_res = W - s·B0·A0) and the file holds only the trained A,
    # B: loading them as plain LoRA on the original base gives wrong outputs. Loratune must refuse them loudly
    # (naming init_lora_weights) or rebuild the same residual as PEFT.
    case = next(c for c in PISSA_CASES if c.id == "pissa_llama")
    source = peft_model(case, trained=False, init_lora_weights=init)
    perturb_trainable(source)
    expected = logits(source, input_ids)
    source.save_pretrained(tmp_path)

    model = case.build(0)
    try:
        loratune.load_adapter(model, tmp_path)
    except loratune.AdapterLoadError as error:
        assert "init_lora_weights" in str(error)
        assert_model_has_no_adapter(model)
    else:
        assert_same_logits(logits(model, input_ids), expected)


# --- mismatches: loud errors, model left untouched -------------------------------------------------------------------


def wide_llama(seed: int = 0, hidden: int = 48) -> LlamaForCausalLM:
    """Like ``tiny_llama`` but wider: same module names, different shapes."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def test_peft_adapter_for_a_wider_model_fails_naming_the_key_and_both_shapes(input_ids, tmp_path):
    case = Case("wide", wide_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj"]))
    peft_model(case, init_lora_weights=False).save_pretrained(tmp_path)
    model = llama(0)
    before = logits(model, input_ids)

    with pytest.raises(loratune.AdapterLoadError) as error:
        loratune.load_adapter(model, tmp_path)

    message = str(error.value)
    assert "self_attn.q_proj.lora_" in message
    assert "(4, 48)" in message or "(48, 4)" in message  # the file's shape
    assert "(4, 32)" in message or "(32, 4)" in message  # the model's shape
    assert_model_has_no_adapter(model)
    assert torch.equal(logits(model, input_ids), before)


def test_loratune_adapter_with_an_extra_tensor_fails_naming_it(input_ids, tmp_path):
    case = next(c for c in CASES if c.id == "plain")
    loratune.save_adapter(loratune_model(case), tmp_path)
    extra = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    tensors = read_tensors(tmp_path)
    save_file({**tensors, extra: torch.ones(4, 32)}, str(tmp_path / WEIGHTS), metadata={"format": "pt"})
    model = llama(0)
    before = logits(model, input_ids)

    with pytest.raises(loratune.AdapterLoadError, match=extra.replace(".", r"\.")):
        loratune.load_adapter(model, tmp_path)

    assert_model_has_no_adapter(model)
    assert torch.equal(logits(model, input_ids), before)


def test_loratune_adapter_with_a_missing_tensor_fails_naming_it(input_ids, tmp_path):
    case = next(c for c in CASES if c.id == "modules_to_save_head")
    loratune.save_adapter(loratune_model(case), tmp_path)
    missing = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    tensors = read_tensors(tmp_path)
    del tensors[missing]
    save_file(tensors, str(tmp_path / WEIGHTS), metadata={"format": "pt"})
    model = untied_llama(0)
    before = logits(model, input_ids)

    with pytest.raises(loratune.AdapterLoadError, match=missing.replace(".", r"\.")):
        loratune.load_adapter(model, tmp_path)

    assert_model_has_no_adapter(model)
    assert torch.equal(logits(model, input_ids), before)


def test_failed_load_of_an_unconverted_pissa_adapter_restores_the_original_base(input_ids, tmp_path):
    # Loading a PiSSA adapter rewrites the base weight into the residual first; a failure must undo that.
    case = next(c for c in PISSA_CASES if c.id == "pissa_llama")
    peft_model(case, trained=False, init_lora_weights="pissa").save_pretrained(tmp_path)
    tensors = read_tensors(tmp_path)
    extra = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    save_file({**tensors, extra: torch.ones(4, 32)}, str(tmp_path / WEIGHTS), metadata={"format": "pt"})
    model = llama(0)
    before = logits(model, input_ids)

    with pytest.raises(loratune.AdapterLoadError, match=extra.replace(".", r"\.")):
        loratune.load_adapter(model, tmp_path)

    assert_model_has_no_adapter(model)
    assert_same_logits(logits(model, input_ids), before)


SUFFIX_MATCHED = {
    "model.norm",
    *(f"model.layers.{i}.{n}" for i in (0, 1) for n in ("input_layernorm", "post_attention_layernorm")),
}


@pytest.mark.parametrize(
    "peft_version, saved",
    [
        (None, {"model.norm"}),
        ("0.22.0", {"model.norm"}),
        ("not a version", {"model.norm"}),  # unreadable: taken as current
        ("0.21.2", SUFFIX_MATCHED),
        ("0.17.1.dev0", SUFFIX_MATCHED),
    ],
)
def test_modules_to_save_names_modules_as_the_peft_that_wrote_the_adapter(peft_version, saved):
    """PEFT 0.22 matches modules_to_save by module name ("norm": model.norm); before, by a plain string suffix
    ("norm" also selected every input_layernorm): an adapter those versions wrote (its peft_version) carries
    those modules' tensors, and loads as written."""
    from loratune.adapters.config import LoraConfig
    from loratune.adapters.modules_to_save import ModulesToSaveWrapper
    from loratune.adapters.surgery import inject_adapter

    data = {"r": 4, "lora_alpha": 8, "target_modules": ["v_proj"], "modules_to_save": ["norm"]}
    config = LoraConfig.from_peft_dict({**data, **({"peft_version": peft_version} if peft_version else {})})
    model = llama()
    inject_adapter(model, config, "a")
    wrapped = {path for path, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)}
    assert wrapped == saved
    assert "modules_to_save_plain_suffix" not in config.to_peft_dict()  # never written out
