"""The rank tools (``loratune.analysis`` and the ``rank``, ``resize``, ``extract``, ``compare`` verbs) against
float64 reference SVDs, Eckart–Young, and PEFT."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import loratune
from loratune.adapters import read_adapter, write_adapter
from loratune.analysis import (
    WeightReader,
    adapter_spectrum,
    compare_adapters,
    delta_svd,
    extract_adapter,
    full_finetune_spectrum,
    resize_adapter,
    subspace_similarity,
)
from loratune.errors import ConfigError
from loratune.models.structure import model_structure
from test_cli import assert_one_line_error, cli
from test_mix import add_trained, as_input, assert_peft_gives_our_logits, deltas
from tiny_models import tiny_gpt2, tiny_llama, token_batch

peft = pytest.importorskip("peft")

# Ranks and alphas that differ per module, rsLoRA, an embedding.
CONFIG = dict(
    r=6,
    lora_alpha=8,
    use_rslora=True,
    target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"],
    rank_pattern={"v_proj": 3},
    alpha_pattern={"up_proj": 2},
)


@pytest.fixture(scope="module")
def adapted():
    model = tiny_llama()
    add_trained(model, "a", 1, **CONFIG)
    add_trained(model, "b", 2, r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    return model


def reference_sigma(delta: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(delta.double())


def test_singular_values_and_energy_match_a_float64_svd_of_the_dense_update(adapted):
    report = adapter_spectrum(*as_input(adapted, "a"), thresholds=[0.5, 0.9, 0.99])
    expected = deltas(adapted, "a")
    assert {m["name"] for m in report["modules"]} == set(expected)
    for m in report["modules"]:
        delta = expected[m["name"]]
        sigma = reference_sigma(delta)[: m["r"]]
        got = torch.tensor(m["singular_values"], dtype=torch.float64)
        assert torch.allclose(got, sigma, rtol=1e-5, atol=1e-12 * float(sigma[0]))
        energy = (sigma**2).cumsum(0) / (sigma**2).sum()
        assert torch.allclose(torch.tensor(m["energy"], dtype=torch.float64), energy, rtol=1e-5)
        for t, k in m["rank_at"].items():
            assert k == int((energy < float(t) - 1e-12).sum()) + 1
        assert m["r"] == len(m["singular_values"])
    by_name = {m["name"]: m for m in report["modules"]}
    assert by_name["model.layers.0.self_attn.v_proj"]["r"] == 3  # rank_pattern
    assert by_name["model.layers.0.mlp.up_proj"]["scale"] == pytest.approx(2 / 6**0.5)  # alpha_pattern, rsLoRA
    assert by_name["model.embed_tokens"]["shape"] == [96, 32]  # an embedding's weight shape
    assert report["recommended_rank"] == {
        t: max(m["rank_at"][t] for m in report["modules"]) for t in ("0.5", "0.9", "0.99")
    }


def test_conv1d_update_spectrum_matches_the_dense_update():
    model = tiny_gpt2()
    add_trained(model, "g", 3, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"])
    report = adapter_spectrum(*as_input(model, "g"))
    expected = deltas(model, "g")
    for m in report["modules"]:
        sigma = reference_sigma(expected[m["name"]])[: m["r"]]
        assert torch.allclose(torch.tensor(m["singular_values"], dtype=torch.float64), sigma, rtol=1e-5)
        assert m["shape"] == list(expected[m["name"]].shape)


@pytest.mark.parametrize("rank", [1, 2, 5])
def test_resize_error_is_the_eckart_young_error(adapted, rank, tmp_path):
    result = resize_adapter(*as_input(adapted, "a"), rank=rank)
    write_adapter(tmp_path / "resized", result.config, result.tensors)
    fresh = tiny_llama()
    loratune.load_adapter(fresh, tmp_path / "resized", name="r")
    resized = deltas(fresh, "r")
    for path, delta in deltas(adapted, "a").items():
        sigma = reference_sigma(delta)
        error = float((resized[path] - delta).norm() ** 2)
        optimal = float((sigma[rank:] ** 2).sum())  # Σ_{i>k} σᵢ²
        assert error == pytest.approx(optimal, rel=1e-4, abs=1e-10 * float((sigma**2).sum())), path
    assert {m["k"] for m in result.modules} <= {rank, 3}  # v_proj has r = 3
    assert all(m["k"] == min(rank, m["r"]) for m in result.modules)


def test_resize_by_energy_keeps_at_least_that_share_in_every_module(adapted):
    result = resize_adapter(*as_input(adapted, "a"), energy=0.8)
    for m in result.modules:
        assert m["energy"] >= 0.8 - 1e-9
        assert 1 <= m["k"] <= m["r"]
    ranks = {m["k"] for m in result.modules}
    assert len(ranks) > 1 and result.config.rank_pattern  # differing ranks go to rank_pattern


@pytest.mark.filterwarnings("ignore:.*ensure_weight_tying")  # PEFT's note on an adapted tied embedding
def test_resized_adapter_loads_in_peft_with_the_same_logits(adapted, tmp_path):
    result = resize_adapter(*as_input(adapted, "a"), rank=2)
    write_adapter(tmp_path / "resized", result.config, result.tensors)
    assert_peft_gives_our_logits(tmp_path / "resized")


def test_subspace_similarity_matches_its_definition():
    generator = torch.Generator().manual_seed(0)
    A1, A2 = torch.randn(4, 20, generator=generator), torch.randn(6, 20, generator=generator)
    phi = subspace_similarity(A1, A2)
    U1 = torch.linalg.svd(A1.double(), full_matrices=False)[2].T
    U2 = torch.linalg.svd(A2.double(), full_matrices=False)[2].T
    for i in range(1, 5):
        for j in range(1, 7):
            expected = float((U1[:, :i].T @ U2[:, :j]).norm() ** 2) / min(i, j)
            assert float(phi[i - 1, j - 1]) == pytest.approx(expected, rel=1e-9)
    assert torch.allclose(subspace_similarity(A1, 3 * A1).diagonal(), torch.ones(4, dtype=torch.float64))
    row_space = torch.randn(2, 4, generator=generator) @ A1  # lies inside A1's row space
    assert float(subspace_similarity(row_space, A1)[1, 3]) == pytest.approx(1.0)


def test_compare_reports_phi_for_common_modules_and_the_amplification(adapted, tmp_path):
    adapted_base = tiny_llama()
    adapted_base.save_pretrained(tmp_path / "base", safe_serialization=True)
    report = compare_adapters(
        as_input(adapted, "a"),
        as_input(adapted, "b"),
        base=WeightReader(tmp_path / "base"),
        kinds=model_structure(tmp_path / "base").kinds,
    )
    names = [m["name"] for m in report["modules"]]
    assert names == sorted(names) and all(n.endswith(("q_proj", "v_proj")) for n in names)
    assert "model.embed_tokens" in report["only_in_a"]
    for m in report["modules"]:
        assert len(m["phi"]) == m["r_a"] and len(m["phi"][0]) == m["r_b"]
        assert m["phi_top"] == m["phi"][0][0]
        assert m["phi_full"] == m["phi"][min(m["r_a"], m["r_b"]) - 1][min(m["r_a"], m["r_b"]) - 1]
        assert all(0 <= v <= 1 for row in m["phi"] for v in row)
        assert m["amplification_a"] > 0 and m["amplification_b"] > 0
    # the amplification factor, by hand, for one module
    layer = dict(loratune.adapters.lora_layers(adapted))["model.layers.1.self_attn.q_proj"]
    delta = deltas(adapted, "a")["model.layers.1.self_attn.q_proj"]
    U, _S, Vh = torch.linalg.svd(delta, full_matrices=False)
    r = layer.specs["a"].r
    W = layer.base_layer.weight.double()
    expected = float(delta.norm()) / float((U[:, :r].T @ W @ Vh[:r].T).norm())
    got = next(m for m in report["modules"] if m["name"] == "model.layers.1.self_attn.q_proj")["amplification_a"]
    assert got == pytest.approx(expected, rel=1e-6)


# --- full fine-tunes: rank --tuned and extract ---------------------------------------------------------------


def fully_tuned(seed: int = 0, tie: bool = True, steps: int = 4):
    """A tiny Llama trained in full (every weight, including norms and embeddings) for a few steps."""
    torch.manual_seed(seed)
    model = tiny_llama(tie=tie).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for step in range(steps):
        ids = token_batch(seed=step, batch=4, length=16)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    paths = {}
    for tie in (True, False):
        tiny_llama(tie=tie).save_pretrained(root / f"base-{tie}", safe_serialization=True)
        fully_tuned(tie=tie).save_pretrained(root / f"tuned-{tie}", safe_serialization=True)
        paths[tie] = (root / f"base-{tie}", root / f"tuned-{tie}")
    return paths


def test_rank_of_a_full_finetune_matches_the_svd_of_the_weight_difference(checkpoints):
    base_dir, tuned_dir = checkpoints[False]
    base, tuned = WeightReader(base_dir), WeightReader(tuned_dir)
    report = full_finetune_spectrum(base, tuned, thresholds=[0.9], max_rank=8)
    assert report["modules"] and all(m["r"] is None for m in report["modules"])
    assert any(name.endswith("norm.weight") for name in report["other_changed"])
    for m in report["modules"]:
        delta = tuned.get(m["name"] + ".weight").double() - base.get(m["name"] + ".weight").double()
        sigma = reference_sigma(delta)
        assert len(m["singular_values"]) == min(8, len(sigma))
        assert torch.allclose(torch.tensor(m["singular_values"], dtype=torch.float64), sigma[:8], rtol=1e-5)
        assert m["energy"][-1] == pytest.approx(float((sigma[:8] ** 2).sum() / (sigma**2).sum()), rel=1e-6)
        k = m["rank_at"]["0.9"]
        assert k is None or float((sigma[:k] ** 2).sum() / (sigma**2).sum()) >= 0.9 - 1e-9


def test_randomized_svd_finds_the_top_singular_values_of_a_large_matrix():
    generator = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(3000, 40, generator=generator))[0]
    V = torch.linalg.qr(torch.randn(2000, 40, generator=generator))[0]
    sigma = torch.logspace(1, -2, 40)
    noise = 1e-4 * torch.randn(3000, 2000, generator=generator)
    matrix = (U * sigma) @ V.T + noise
    result = delta_svd(lambda a, b: matrix[a:b], tuple(matrix.shape), 8, vectors=True)
    assert result.method == "randomized"
    assert torch.allclose(result.S.float(), torch.linalg.svdvals(matrix)[:8], rtol=1e-4)
    assert result.total == pytest.approx(float(matrix.double().square().sum()), rel=1e-9)
    approx = (result.U * result.S) @ result.Vh
    assert torch.allclose(approx.float(), (U[:, :8] * sigma[:8]) @ V[:, :8].T, atol=1e-3)
    reads = []
    zero = delta_svd(lambda a, b: reads.append(a) or torch.zeros(b - a, 2000), (3000, 2000), 8)
    assert zero.total == 0 and not zero.S.any()
    assert len(reads) == len(set(reads))  # an unchanged matrix is read once, not once per power iteration


@pytest.mark.parametrize("tie", [True, False])
def test_extracted_adapter_reproduces_the_tuned_model_through_peft(checkpoints, tie):
    base_dir, tuned_dir = checkpoints[tie]
    base, tuned = WeightReader(base_dir), WeightReader(tuned_dir)
    structure = model_structure(tuned_dir)
    assert (structure.tied is not None) == tie
    tuned_model = loratune_free_model(tuned_dir)
    ids = token_batch(seed=9, batch=2, length=12)
    with torch.no_grad():
        expected = tuned_model(ids).logits
    errors = []
    for rank in (1, 4, 64):  # 64 ≥ every dimension: full rank
        result = extract_adapter(base, tuned, structure.kinds, rank=rank, tied=structure.tied)
        directory = base_dir.parent / f"extracted-{tie}-{rank}"
        write_adapter(directory, result.config, result.tensors)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*missing adapter keys.*")
            warnings.filterwarnings("ignore", message=".*ensure_weight_tying.*")  # PEFT's note on tied layers
            model = peft.PeftModel.from_pretrained(loratune_free_model(base_dir), str(directory)).eval()
        with torch.no_grad():
            errors.append(float((model(ids).logits - expected).abs().max()))
        if tie:
            assert "lm_head" in result.config.target_modules  # the tied weight's change reaches the output too
        assert any(name.endswith("norm") for name in result.modules_to_save)
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-4


def loratune_free_model(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def test_extract_by_energy_keeps_that_share_and_skips_unchanged_modules(checkpoints, tmp_path):
    base_dir, _ = checkpoints[False]
    model = tiny_llama(tie=False)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.01 * torch.randn(64, 32))
    model.save_pretrained(tmp_path / "tuned", safe_serialization=True)
    readers = WeightReader(base_dir), WeightReader(tmp_path / "tuned")
    result = extract_adapter(*readers, model_structure(base_dir).kinds, energy=0.9, max_rank=32)
    assert [m["name"] for m in result.modules] == ["model.layers.0.mlp.up_proj"]
    assert result.modules[0]["energy"] >= 0.9 and result.modules_to_save == []
    assert result.modules[0]["k"] < 32  # the smallest rank that keeps 90%
    capped = extract_adapter(*readers, model_structure(base_dir).kinds, energy=0.9, max_rank=4)
    assert capped.modules[0]["k"] == 4 and capped.modules[0]["energy"] < 0.9  # --max-rank caps it
    assert result.unchanged == len([k for k in WeightReader(base_dir).keys() if k.endswith("proj.weight")]) + 2 - 1


# --- the command line ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_dirs(adapted, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for name in ("a", "b"):
        loratune.save_adapter(adapted, root / name, name=name)
    return root


def test_rank_json_is_the_report_and_nothing_else_on_stdout(adapter_dirs, capsys, tmp_path):
    status, out, err = cli(
        capsys, "rank", adapter_dirs / "a", "--energy", "0.9,0.5", "--json", "--plot", tmp_path / "energy.png"
    )
    assert status == 0, err
    report = json.loads(out)
    assert set(report["recommended_rank"]) == {"0.5", "0.9"}
    assert report == json.loads(json.dumps(adapter_spectrum(*read_adapter(adapter_dirs / "a"), [0.5, 0.9])))
    assert (tmp_path / "energy.png").read_bytes().startswith(b"\x89PNG")
    status, out, err = cli(capsys, "rank", adapter_dirs / "a", "--plot", tmp_path / "energy.png")
    assert_one_line_error(status, err, "rank", "--overwrite")  # an existing file is not replaced silently
    assert cli(capsys, "rank", adapter_dirs / "a", "--plot", tmp_path / "energy.png", "--overwrite")[0] == 0


def test_resize_and_compare_from_the_command_line(adapter_dirs, capsys, tmp_path):
    status, out, err = cli(capsys, "resize", adapter_dirs / "a", "--rank", "2", "--out", tmp_path / "small", "--json")
    assert status == 0, err
    assert all(m["k"] == 2 for m in json.loads(out)["modules"])
    status, out, err = cli(
        capsys, "compare", adapter_dirs / "a", tmp_path / "small", "--json", "--plot", tmp_path / "phi.png"
    )
    assert status == 0, err
    report = json.loads(out)
    assert all(len(m["phi"]) == m["r_a"] and len(m["phi"][0]) == 2 for m in report["modules"])
    assert (tmp_path / "phi.png").read_bytes().startswith(b"\x89PNG")
    status, out, err = cli(capsys, "compare", adapter_dirs / "a", tmp_path / "small")
    assert status == 0 and "φ(1,1)" in out


def test_extract_from_the_command_line_writes_an_adapter_loratune_loads(checkpoints, capsys, tmp_path):
    base_dir, tuned_dir = checkpoints[True]
    status, out, err = cli(
        capsys, "extract", "--model", base_dir, "--tuned", tuned_dir, "--rank", "64", "--out", tmp_path / "x", "--json"
    )
    assert status == 0, err
    assert json.loads(out)["modules"]
    model = loratune_free_model(base_dir)
    loratune.load_adapter(model, tmp_path / "x")
    ids = token_batch(seed=3)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loratune_free_model(tuned_dir)(ids).logits, atol=1e-4)
    status, out, err = cli(capsys, "rank", "--model", base_dir, "--tuned", tuned_dir, "--max-rank", "4", "--json")
    assert status == 0 and len(json.loads(out)["modules"][0]["singular_values"]) == 4


@pytest.mark.parametrize(
    "args, named",
    [
        (["rank", "{empty}"], "adapter_config.json"),
        (["rank", "{a}", "--energy", "1.5"], "(0, 1]"),
        (["rank", "{a}", "--energy", "0"], "(0, 1]"),
        (["resize", "{a}", "--rank", "0", "--out", "{out}"], "at least 1"),
        (["resize", "{a}", "--energy", "2", "--out", "{out}"], "(0, 1]"),
        (["rank", "--tuned", "{tuned}"], "--model"),
        (["extract", "--model", "{other}", "--tuned", "{tuned}", "--rank", "2", "--out", "{out}"], "different"),
        (["compare", "{a}", "{empty}"], "adapter_config.json"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(args, named, adapter_dirs, checkpoints, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    other = tmp_path / "other"
    tiny_llama(layers=3).save_pretrained(other, safe_serialization=True)
    values = {
        "empty": tmp_path / "empty",
        "a": adapter_dirs / "a",
        "out": tmp_path / "out",
        "tuned": checkpoints[True][1],
        "other": other,
    }
    status, _out, err = cli(capsys, *[a.format(**values) for a in args])
    assert_one_line_error(status, err, args[0], named)
    assert not (tmp_path / "out").exists()


def test_an_adapter_without_tensors_is_refused(adapter_dirs, capsys, tmp_path):
    config, _ = read_adapter(adapter_dirs / "a")
    write_adapter(tmp_path / "hollow", config, {})
    status, _, err = cli(capsys, "rank", tmp_path / "hollow")
    assert_one_line_error(status, err, "rank", "no LoRA factors")
    with pytest.raises(ConfigError, match="no LoRA factors"):
        resize_adapter(config, {}, rank=2)


def test_modules_named_to_save_are_copied_whole_and_still_reproduce_the_tuned_model(checkpoints, tmp_path):
    base_dir, tuned_dir = checkpoints[False]
    structure = model_structure(tuned_dir)
    result = extract_adapter(
        WeightReader(base_dir), WeightReader(tuned_dir), structure.kinds, rank=64, save_modules=["lm_head", "up_proj"]
    )
    assert "lm_head" in result.modules_to_save and "model.layers.1.mlp.up_proj" in result.modules_to_save
    assert not any(name.endswith(("lm_head", "up_proj")) for name in result.config.target_modules)
    write_adapter(tmp_path / "x", result.config, result.tensors)
    model = peft.PeftModel.from_pretrained(loratune_free_model(base_dir), str(tmp_path / "x")).eval()
    ids = token_batch(seed=4)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loratune_free_model(tuned_dir)(ids).logits, atol=1e-4)
