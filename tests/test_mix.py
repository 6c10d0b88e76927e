"""``mix``: combining adapters of one base into one PEFT adapter, each method checked against its definition.

Inputs are real loratune adapters on a tiny random Llama with non-zero, perturbed factors. Reference deltas
come from the LoRA layers themselves (``scaling · B·A``), and the mixed adapter is checked after loading it
into a fresh model, so its config (ranks, alphas, patterns, targets) is checked along with its tensors.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import loratune
from loratune.adapters import adapter_slots, adapter_tensors, lora_layers, read_adapter, write_adapter
from loratune.adapters.mix import dare_keep_mask, mix_adapters
from loratune.errors import ConfigError
from test_cli import assert_one_line_error, cli
from tiny_models import tiny_llama, token_batch

WEIGHTS = [0.7, -1.3]
# Different ranks, rank and alpha patterns, rsLoRA, an embedding, and modules only one adapter touches.
CONFIG_A = dict(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "v_proj", "embed_tokens"],
    rank_pattern={"v_proj": 2},
    alpha_pattern={"q_proj": 3},
)
CONFIG_B = dict(r=6, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"])
# Equal ranks in every module, for ``linear``.
CONFIG_A_EQUAL = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
CONFIG_B_EQUAL = dict(r=4, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "embed_tokens"])


def add_trained(model, name: str, seed: int, **lora) -> None:
    """Add adapter ``name`` and perturb its factors (a stand-in for training)."""
    loratune.add_adapter(model, loratune.LoraConfig(init_lora_weights=False, **lora), name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tensor in adapter_slots(model, name):
            tensor.add_(0.2 * torch.randn(tensor.shape, generator=generator))


def as_input(model, name: str):
    tensors, config = adapter_tensors(model, name)
    return config, tensors


@pytest.fixture(scope="module")
def source():
    """A tiny Llama holding adapters "a" and "b" (mixed ranks, rsLoRA, patterns) and "a4" and "b4" (equal ranks)."""
    model = tiny_llama()
    add_trained(model, "a", 1, **CONFIG_A)
    add_trained(model, "b", 2, **CONFIG_B)
    add_trained(model, "a4", 3, **CONFIG_A_EQUAL)
    add_trained(model, "b4", 4, **CONFIG_B_EQUAL)
    return model


def deltas(model, name: str) -> dict[str, torch.Tensor]:
    """{module path: scaling · B·A} (out × in, float64) of adapter ``name``, from the LoRA layers."""
    return {
        path: layer.specs[name].scaling * (layer.lora_B[name].detach().double() @ layer.lora_A[name].detach().double())
        for path, layer in lora_layers(model)
        if name in layer.lora_A
    }


def loaded_deltas(result, tmp_path) -> dict[str, torch.Tensor]:
    """The deltas of a mix result after writing it and loading it into a fresh model."""
    write_adapter(tmp_path / "mixed", result.config, result.tensors)
    fresh = tiny_llama()
    loratune.load_adapter(fresh, tmp_path / "mixed", name="mixed")
    return deltas(fresh, "mixed")


def weighted_tasks(model, names, weights) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """{module path: [(input index, wᵢ·Δᵢ)]} over the inputs that adapt the module."""
    tasks: dict[str, list] = {}
    for index, (name, weight) in enumerate(zip(names, weights)):
        for path, delta in deltas(model, name).items():
            tasks.setdefault(path, []).append((index, weight * delta))
    return tasks


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def assert_deltas_match(actual: dict, expected: dict, tolerance: float = 1e-6) -> None:
    assert actual.keys() == expected.keys()
    for path in expected:
        assert expected[path].norm() > 0, f"{path}: vacuous comparison, expected delta is zero"
        error = relative_error(actual[path], expected[path])
        assert error <= tolerance, f"{path}: relative error {error:.3g}"


# --- dense reference implementations of the definitions (independent of loratune.adapters.mix) -----------------


def reference_trim(task: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * task.numel())
    if k == 0:
        return torch.zeros_like(task)
    threshold = task.abs().flatten().sort(descending=True).values[k - 1]
    return torch.where(task.abs() >= threshold, task, torch.zeros_like(task))


def reference_dare(task, density, seed, path, index):
    return torch.where(dare_keep_mask(task.shape, density, seed, path, index), task / density, torch.zeros_like(task))


def reference_disjoint_mean(tasks: list[torch.Tensor], majority_sign: str = "total") -> torch.Tensor:
    votes = sum(tasks) if majority_sign == "total" else sum(torch.sign(t) for t in tasks)
    elected = torch.where(votes >= 0, 1.0, -1.0).double()
    agreeing = [torch.sign(t) == elected for t in tasks]
    total = sum(torch.where(agree, t, torch.zeros_like(t)) for agree, t in zip(agreeing, tasks))
    count = sum(agree.double() for agree in agreeing)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def reference(method, tasks, path, density, seed=0, majority_sign="total"):
    if method == "magnitude_prune":
        return sum(reference_trim(t, density) for _, t in tasks)
    if method == "ties":
        return reference_disjoint_mean([reference_trim(t, density) for _, t in tasks], majority_sign)
    dropped = [reference_dare(t, density, seed, path, i) for i, t in tasks]
    return sum(dropped) if method == "dare_linear" else reference_disjoint_mean(dropped, majority_sign)


# --- cat ----------------------------------------------------------------------------------------------------


def test_cat_delta_is_the_exact_weighted_sum_of_the_deltas(source, tmp_path):
    result = mix_adapters([as_input(source, "a"), as_input(source, "b")], WEIGHTS, "cat")
    expected = {path: sum(t for _, t in tasks) for path, tasks in weighted_tasks(source, "ab", WEIGHTS).items()}
    assert_deltas_match(loaded_deltas(result, tmp_path), expected)


def test_cat_ranks_add_up_per_module(source):
    result = mix_adapters([as_input(source, "a"), as_input(source, "b")], WEIGHTS, "cat")
    assert result.ranks["model.layers.0.self_attn.q_proj"] == 4 + 6
    assert result.ranks["model.layers.0.self_attn.v_proj"] == 2 + 6
    assert result.ranks["model.layers.0.mlp.up_proj"] == 6
    assert result.config.use_rslora is False
    assert result.config.lora_alpha == result.config.r
    assert result.config.alpha_pattern == {k: float(v) for k, v in result.config.rank_pattern.items()}


def test_cat_adapter_gives_the_outputs_of_its_inputs_active_with_weights_as_strengths(source, tmp_path):
    for name in "ab":
        loratune.save_adapter(source, tmp_path / name, name)
    result = loratune.mix_adapter_dirs([(tmp_path / "a", WEIGHTS[0]), (tmp_path / "b", WEIGHTS[1])], tmp_path / "m")
    ids = token_batch()
    both, mixed, base = tiny_llama(), tiny_llama(), tiny_llama()
    for name, weight in zip("ab", WEIGHTS):
        loratune.load_adapter(both, tmp_path / name, name=name, scale=weight)
    loratune.load_adapter(mixed, tmp_path / "m")
    with torch.no_grad():
        expected, actual, plain = (m(input_ids=ids).logits.double() for m in (both, mixed, base))
    assert result.energy_total is None
    assert relative_error(actual - plain, expected - plain) <= 1e-5  # float32 forward passes


def test_one_adapter_with_a_weight_is_rescaled(source, tmp_path):
    result = mix_adapters([as_input(source, "b")], [-0.25], "cat")
    expected = {path: -0.25 * d for path, d in deltas(source, "b").items()}
    assert_deltas_match(loaded_deltas(result, tmp_path), expected)


# --- svd ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_svd_error_is_the_optimal_rank_r_error(source, tmp_path, rank):
    result = mix_adapters([as_input(source, "a"), as_input(source, "b")], WEIGHTS, "svd", rank=rank)
    actual = loaded_deltas(result, tmp_path)
    for path, tasks in weighted_tasks(source, "ab", WEIGHTS).items():
        exact = sum(t for _, t in tasks)
        sigma = torch.linalg.svdvals(exact)
        optimum = float(sigma[rank:].square().sum().sqrt())
        error = float((actual[path] - exact).norm())
        assert abs(error - optimum) <= 1e-6 * float(exact.norm()), f"{path}: {error} vs optimum {optimum}"


def test_svd_reports_the_energy_kept_per_module_and_overall(source):
    rank = 3
    result = mix_adapters([as_input(source, "a"), as_input(source, "b")], WEIGHTS, "svd", rank=rank)
    kept = total = 0.0
    for path, tasks in weighted_tasks(source, "ab", WEIGHTS).items():
        squares = torch.linalg.svdvals(sum(t for _, t in tasks)).square()
        assert result.energy[path] == pytest.approx(float(squares[:rank].sum() / squares.sum()), rel=1e-9)
        kept, total = kept + float(squares[:rank].sum()), total + float(squares.sum())
    assert result.energy_total == pytest.approx(kept / total, rel=1e-9)
    assert 0 < result.energy_total < 1


def test_svd_default_rank_is_the_largest_input_rank(source):
    result = mix_adapters([as_input(source, "a"), as_input(source, "b")], WEIGHTS, "svd")
    assert set(result.ranks.values()) == {6}


# --- linear (PEFT's definition) -------------------------------------------------------------------------------


def test_linear_is_the_sqrt_weight_combination_of_the_factors(source, tmp_path):
    result = mix_adapters([as_input(source, "a4"), as_input(source, "b4")], WEIGHTS, "linear")
    expected = {}
    for path, layer in lora_layers(source):
        if "a4" not in layer.lora_A and "b4" not in layer.lora_A:
            continue
        A = B = 0
        for name, weight in zip(["a4", "b4"], WEIGHTS):
            if name in layer.lora_A:
                c = weight * layer.specs[name].scaling
                A = A + (1 if c >= 0 else -1) * abs(c) ** 0.5 * layer.lora_A[name].double()
                B = B + abs(c) ** 0.5 * layer.lora_B[name].double()
        expected[path] = (B @ A).detach()
    assert_deltas_match(loaded_deltas(result, tmp_path), expected)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_linear_equals_peft_add_weighted_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(init_lora_weights=False, **CONFIG_A_EQUAL), "a")
    model.add_adapter("b", peft.LoraConfig(init_lora_weights=False, **CONFIG_B_EQUAL))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(tmp_path, selected_adapters=["a", "b"])
    ours = mix_adapters([read_adapter(tmp_path / "a"), read_adapter(tmp_path / "b")], WEIGHTS, "linear")
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "mixed", combination_type="linear")
    theirs = get_peft_model_state_dict(model, adapter_name="mixed")
    factors = {k for k in theirs if ".lora_" in k}
    assert factors and factors <= ours.tensors.keys()
    for key in factors:
        torch.testing.assert_close(ours.tensors[key], theirs[key], rtol=1e-6, atol=1e-6)


def test_linear_refuses_unequal_ranks(source):
    with pytest.raises(ConfigError, match=r"linear needs equal ranks.*embed_tokens.*\[4, 6\].*cat"):
        mix_adapters([as_input(source, "a"), as_input(source, "b")], WEIGHTS, "linear")


# --- ties / dare / magnitude_prune ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_pruning_methods_equal_their_dense_definition(source, tmp_path, method):
    density = 0.4
    result = mix_adapters(
        [as_input(source, "a"), as_input(source, "b")], WEIGHTS, method, density=density, seed=7, rank="full"
    )
    expected = {
        path: reference(method, tasks, path, density, seed=7)
        for path, tasks in weighted_tasks(source, "ab", WEIGHTS).items()
    }
    assert_deltas_match(loaded_deltas(result, tmp_path), expected)


def test_ties_with_frequency_sign_election_equals_its_definition(source, tmp_path):
    result = mix_adapters(
        [as_input(source, "a"), as_input(source, "b")],
        WEIGHTS,
        "ties",
        density=0.5,
        majority_sign="frequency",
        rank="full",
    )
    expected = {
        path: reference("ties", tasks, path, 0.5, majority_sign="frequency")
        for path, tasks in weighted_tasks(source, "ab", WEIGHTS).items()
    }
    assert_deltas_match(loaded_deltas(result, tmp_path), expected)


def test_ties_elects_the_sign_from_the_weighted_deltas(source, tmp_path):
    # τ₁ = Δ, τ₂ = −2Δ: the weighted votes sum to −Δ, so only τ₂ agrees and the result is −2Δ. (PEFT elects
    # from the unweighted deltas, where both agree, and would give the mean −Δ/2.)
    result = mix_adapters([as_input(source, "a"), as_input(source, "a")], [1.0, -2.0], "ties", density=1.0)
    expected = {path: -2.0 * d for path, d in deltas(source, "a").items()}
    assert_deltas_match(loaded_deltas(result, tmp_path), expected)


def test_pruning_methods_with_a_rank_give_the_best_rank_r_approximation(source, tmp_path):
    result = mix_adapters([as_input(source, "a"), as_input(source, "b")], WEIGHTS, "ties", density=0.3, rank=2)
    actual = loaded_deltas(result, tmp_path)
    for path, tasks in weighted_tasks(source, "ab", WEIGHTS).items():
        dense = reference("ties", tasks, path, 0.3)
        optimum = float(torch.linalg.svdvals(dense)[2:].square().sum().sqrt())
        assert abs(float((actual[path] - dense).norm()) - optimum) <= 1e-6 * float(dense.norm())
    assert set(result.ranks.values()) == {2}


def test_dare_masks_depend_only_on_seed_module_and_input():
    shape = (64, 128)
    first = dare_keep_mask(shape, 0.3, 5, "m.q_proj", 0)
    assert torch.equal(first, dare_keep_mask(shape, 0.3, 5, "m.q_proj", 0))
    for other in ((6, "m.q_proj", 0), (5, "m.v_proj", 0), (5, "m.q_proj", 1)):
        assert not torch.equal(first, dare_keep_mask(shape, 0.3, *other))
    assert first.double().mean().item() == pytest.approx(0.3, abs=0.02)


def test_dare_result_changes_with_the_seed(source):
    inputs = [as_input(source, "a"), as_input(source, "b")]
    one, two = (mix_adapters(inputs, WEIGHTS, "dare_linear", density=0.5, seed=s) for s in (0, 1))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert not torch.allclose(one.tensors[key], two.tensors[key])


# --- inputs that cannot be mixed ----------------------------------------------------------------------------


def test_adapters_of_different_bases_are_refused(source):
    config, tensors = as_input(source, "a")
    other = config.model_copy(update={"base_model_name_or_path": "org/other-model"})
    mine = config.model_copy(update={"base_model_name_or_path": "org/my-model"})
    with pytest.raises(ConfigError, match="different base models.*org/my-model.*org/other-model"):
        mix_adapters([(mine, tensors), (other, tensors)], [1, 1], "cat")


def test_adapters_with_different_module_shapes_are_refused(source):
    wider = tiny_llama()
    loratune.add_adapter(wider, loratune.LoraConfig(**CONFIG_A, init_lora_weights=False), "a")
    config, tensors = as_input(wider, "a")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors = {**tensors, key: torch.zeros(4, 48)}
    with pytest.raises(ConfigError, match=r"model.layers.0.self_attn.q_proj is 32 × 48 in wide.*different base"):
        mix_adapters([as_input(source, "a"), (config, tensors)], [1, 1], "cat", names=["small", "wide"])


def test_identical_modules_to_save_are_carried_over(tmp_path):
    model = tiny_llama(tie=False)
    add_trained(model, "a", 1, r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    config, tensors = as_input(model, "a")
    result = mix_adapters([(config, tensors), (config, tensors)], [0.5, 0.5], "cat")
    assert torch.equal(result.tensors["base_model.model.lm_head.weight"], tensors["base_model.model.lm_head.weight"])
    assert result.config.modules_to_save == ["lm_head"]


def test_different_modules_to_save_are_refused():
    model = tiny_llama(tie=False)
    add_trained(model, "a", 1, r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    add_trained(model, "b", 2, r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(ConfigError, match="lm_head.weight.*modules_to_save"):
        mix_adapters([as_input(model, "a"), as_input(model, "b")], [1, 1], "cat")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(method="tie", density=0.5), "unknown mix method 'tie'; did you mean 'ties'"),
        (dict(method="ties"), "ties needs a density"),
        (dict(method="ties", density=0.0), r"density must be in \(0, 1\]"),
        (dict(method="dare_linear", density=1.5), r"density must be in \(0, 1\]"),
        (dict(method="cat", density=0.5), "density applies to"),
        (dict(method="cat", rank=2), "--rank applies to"),
        (dict(method="svd", rank=0), "rank must be a positive integer"),
        (dict(method="ties", density=0.5, majority_sign="most"), "majority_sign must be one of"),
    ],
)
def test_invalid_options_are_refused_in_one_line(source, options, message):
    with pytest.raises(ConfigError, match=message) as caught:
        mix_adapters([as_input(source, "a"), as_input(source, "b")], WEIGHTS, **options)
    assert "\n" not in str(caught.value)


def test_an_unconverted_pissa_adapter_is_refused(source):
    config, tensors = as_input(source, "a")
    pissa = config.model_copy(update={"init_lora_weights": "pissa"})
    with pytest.raises(ConfigError, match="unconverted adapter from init_lora_weights='pissa'"):
        mix_adapters([(pissa, tensors)], [1.0], "cat")


# --- the result is a plain PEFT adapter -----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mixed_adapter_with_rank_patterns_loads_in_peft_with_the_same_logits(source, tmp_path):
    result = mix_adapters([as_input(source, "a"), as_input(source, "b")], WEIGHTS, "cat")
    assert result.config.rank_pattern  # ranks differ between modules
    write_adapter(tmp_path / "m", result.config, result.tensors)
    assert_peft_gives_our_logits(tmp_path / "m")


def assert_peft_gives_our_logits(directory) -> None:
    """The adapter at ``directory`` gives the same logits on the tiny Llama in PEFT as in loratune (and PEFT
    finds every tensor it expects)."""
    peft = pytest.importorskip("peft")
    ours = tiny_llama()
    loratune.load_adapter(ours, directory)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys.*")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(directory)).eval()
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=1e-5)


# --- command line ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(source, tmp_path_factory):
    """Adapter directories of "a", "b", "a4" and "b4", plus "other" trained on another base name."""
    root = tmp_path_factory.mktemp("mix-inputs")
    for name in ("a", "b", "a4", "b4"):
        loratune.save_adapter(source, root / name, name, base_model_name_or_path="org/tiny")
    loratune.save_adapter(source, root / "other", "a", base_model_name_or_path="org/another")
    return root


def test_cli_mix_writes_a_loadable_adapter(capsys, saved, tmp_path):
    status, out, err = cli(
        capsys,
        "mix",
        f"{saved / 'a'}:0.7",
        f"{saved / 'b'}:-1.3",
        "--method",
        "svd",
        "--rank",
        "3",
        "--out",
        tmp_path / "m",
    )
    assert status == 0, err
    assert "energy kept" in out and "rank 3" in out
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny" and config["r"] == 3
    model = tiny_llama()
    loratune.load_adapter(model, tmp_path / "m")
    assert {layer.specs["default"].r for _, layer in lora_layers(model)} == {3}


@pytest.mark.parametrize(
    "arguments, named",
    [
        (["a", "b", "--method", "catt"], ["'catt'", "did you mean 'cat'"]),
        (["a", "other", "--method", "cat"], ["different base models", "org/another"]),
        (["a", "b", "--method", "linear"], ["equal ranks"]),
        (["a4", "b4", "--method", "ties", "--density", "1.5"], ["--density", "must be in (0, 1]"]),
        (["--method", "cat"], ["at least one adapter"]),
        (["missing", "--method", "cat"], ["missing"]),
    ],
)
def test_cli_mix_bad_input_is_one_line(capsys, saved, tmp_path, arguments, named):
    paths = [str(saved / a) if a in ("a", "b", "a4", "b4", "other", "missing") else a for a in arguments]
    status, _, err = cli(capsys, "mix", *paths, "--out", tmp_path / "m")
    assert_one_line_error(status, err, "mix", *named)
    assert not (tmp_path / "m").exists()


def test_cli_mix_refuses_a_non_empty_output_directory(capsys, saved, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("x")
    status, _, err = cli(capsys, "mix", saved / "a", "--method", "cat", "--out", tmp_path / "m")
    assert_one_line_error(status, err, "mix", "--overwrite")


def test_cli_mix_help_defines_every_method(capsys):
    status, out, _ = cli(capsys, "mix", "--help")
    assert status == 0
    for word in (
        "cat",
        "svd",
        "linear",
        "ties",
        "dare_linear",
        "dare_ties",
        "magnitude_prune",
        "--rank",
        "--density",
        "--seed",
        "--majority-sign",
        "--int8",
        "--out",
        "numerical rank",
        "1/density",
    ):
        assert word in out
