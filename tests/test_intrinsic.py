"""Intrinsic dimension (``train.method: intrinsic``): the Fastfood projection against a dense reference built
from its definition, its cost, training only θ_d (and SAID's λ) through it, the tiny artefact and loading it back."""

from __future__ import annotations

import json

import pytest
import torch

import loratune
from loratune.kernels import use_isa
from loratune.train.intrinsic import apply_intrinsic
from loratune.train.projection import FastfoodProjection, hadamard
from run_helpers import addition_rows, config_dict, write_config, write_jsonl
from test_cli import assert_one_line_error, cli


def sylvester(length: int) -> torch.Tensor:
    H = torch.ones(1, 1)
    while H.shape[0] < length:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


@pytest.mark.parametrize("length", [1, 2, 16, 64, 2048])  # one factor, two, three (32 · 32 · 2)
def test_hadamard_is_the_sylvester_matrix(length):
    x = torch.randn(3, length, dtype=torch.float64)
    torch.testing.assert_close(hadamard(x), x @ sylvester(length).double())


@pytest.mark.parametrize("d, D", [(5, 20), (8, 8), (3, 50), (20, 70)])
def test_fastfood_equals_its_dense_definition_with_unit_columns(any_isa, d, D):
    """Every way P is computed (PyTorch operations: ``none``; the compiled kernel's variants) is the matrix of
    its definition, and its gradient that matrix's transpose."""
    projection = FastfoodProjection(d, D, seed=7)
    L, blocks = projection.block, projection.blocks
    H = sylvester(L)
    generator = torch.Generator().manual_seed(7)  # the draws in the order the projection makes them
    signs = (torch.randint(0, 2, (blocks, L), generator=generator) * 2 - 1).float()
    permutation = torch.argsort(torch.rand((blocks, L), generator=generator), dim=1)
    gaussian = torch.randn((blocks, L), generator=generator)
    parts = []
    for b in range(blocks):  # V_b = H·G·Π·H·B / √(L·ΣG²), stacked, / √blocks
        Pi = torch.zeros(L, L)
        Pi[torch.arange(L), permutation[b]] = 1
        parts.append(
            H @ torch.diag(gaussian[b]) @ Pi @ H @ torch.diag(signs[b]) / torch.sqrt(L * gaussian[b].square().sum())
        )
    dense = (torch.cat(parts) / blocks**0.5)[:D, :d]
    theta = torch.randn(d)
    torch.testing.assert_close(projection(theta), dense @ theta, atol=1e-5, rtol=1e-5)
    full_columns = torch.cat(parts)[:, :d] / blocks**0.5  # before keeping the first D rows
    torch.testing.assert_close(full_columns.norm(dim=0), torch.ones(d), atol=1e-5, rtol=0)
    # the gradient is Pᵀ·g
    theta.requires_grad_(True)
    g = torch.randn(D)
    (grad,) = torch.autograd.grad(projection(theta), theta, g)
    torch.testing.assert_close(grad, dense.T @ g, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_kernel_and_pytorch_give_the_same_projection_and_gradient(kernel_isa, threads):
    """At a size with many blocks, a partial last block and more than one chunk per thread count."""
    projection = FastfoodProjection(300, 50_001, seed=5)  # L = 512: 98 blocks, the last holding 337 rows
    theta, g = torch.randn(300), torch.randn(50_001)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        theta.requires_grad_(True)
        out = projection(theta)
        (grad,) = torch.autograd.grad(out, theta, g)
        again = torch.autograd.grad(projection(theta), theta, g)[0]
    finally:
        torch.set_num_threads(before)
    with use_isa("none"):
        expected = projection(theta)
        (expected_grad,) = torch.autograd.grad(expected, theta, g)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, expected_grad, atol=1e-4, rtol=1e-5)
    assert torch.equal(grad, again)  # the transpose's sums in a fixed order


def test_the_same_seed_gives_the_same_projection_and_no_d_by_D_matrix_is_kept():
    a, b = FastfoodProjection(100, 10_000, seed=3), FastfoodProjection(100, 10_000, seed=3)
    theta = torch.randn(100)
    assert torch.equal(a(theta), b(theta))
    kept = sum(t.numel() * t.element_size() for t in (a.signs, a.permutation, a.gaussian))
    # 79 blocks of 128 rows, each row a sign byte, an int32 index and a float: O(D), never D × d
    assert kept == 79 * 128 * (1 + 4 + 4)


def intrinsic_run(capsys, model_dir, tmp_path, steps: int = 4, **intrinsic):
    """8 rows, 4 per step (2 × grad_accum 2): every 2 steps are one epoch over the same rows."""
    data = write_jsonl(tmp_path / "chat.jsonl", addition_rows(8))
    config = write_config(
        tmp_path / "run.yaml",
        config_dict(
            model_dir,
            data,
            tmp_path / "run",
            train={
                "method": "intrinsic",
                "max_steps": steps,
                "lr": 0.5,
                "save_every": 2,
                "grad_accum": 2,
                "scheduler": "constant",
            },
            intrinsic={"dim": 64, **intrinsic},
        ),
    )
    status, _, err = cli(capsys, "train", config, "--no-progress")
    assert status == 0, err
    return config


@pytest.mark.parametrize("said", [True, False])
def test_an_intrinsic_run_trains_only_theta_and_its_artefact_loads_back(capsys, tiny_llama_dir, tmp_path, said):
    intrinsic_run(capsys, tiny_llama_dir, tmp_path, steps=8, said=said)
    run = tmp_path / "run"
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert sum(losses[-2:]) < sum(losses[:2]) - 0.05  # the last epoch over the same rows: it trained
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trainable_params"] == 64  # SAID's λ counted inside d
    config = json.loads((run / "intrinsic" / "intrinsic_config.json").read_text())
    model, _ = loratune.load_model(str(tiny_llama_dir), dtype="fp32", device="cpu")
    base, _ = loratune.load_model(str(tiny_llama_dir), dtype="fp32", device="cpu")
    every = [name for name, _ in base.named_parameters()]  # the default: all of them, the tied embedding once
    assert any("norm" in name for name in every) and any("embed" in name for name in every)
    assert config["dim"] == 64 and config["said"] is said and config["targets"] == every
    assert config["theta_dim"] == 64 - (len(every) if said else 0)
    assert sum(f.stat().st_size for f in (run / "intrinsic").glob("intrinsic*")) < 10_000  # tiny

    weights = apply_intrinsic(model, run / "intrinsic")
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        adapted = model(ids).logits
        assert (adapted - base(ids).logits).abs().max() > 1e-4
        weights.bake()
        torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_a_tied_embedding_moves_as_one_tensor_and_stays_tied_when_baked(capsys, tiny_llama_dir, tmp_path):
    intrinsic_run(capsys, tiny_llama_dir, tmp_path, steps=2)
    model, _ = loratune.load_model(str(tiny_llama_dir), dtype="fp32", device="cpu")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    weights = apply_intrinsic(model, tmp_path / "run" / "intrinsic")
    before = model.get_input_embeddings().weight.detach().clone()
    assert torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        adapted = model(ids).logits
        weights.bake()
        torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=1e-5)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, before)  # the offset written once, not twice


def test_an_artefact_from_before_parameter_targets_loads_the_same(capsys, tiny_llama_dir, tmp_path):
    """Earlier artefacts list Linear layers (their weights the targets) and a dim without SAID's λ."""
    intrinsic_run(capsys, tiny_llama_dir, tmp_path, targets="all-linear")
    run = tmp_path / "run" / "intrinsic"
    model, _ = loratune.load_model(str(tiny_llama_dir), dtype="fp32", device="cpu")
    apply_intrinsic(model, run)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        now = model(ids).logits
    config = json.loads((run / "intrinsic_config.json").read_text())
    config |= {"targets": [t.removesuffix(".weight") for t in config["targets"]], "dim": config.pop("theta_dim")}
    (run / "intrinsic_config.json").write_text(json.dumps(config))
    model, _ = loratune.load_model(str(tiny_llama_dir), dtype="fp32", device="cpu")
    apply_intrinsic(model, run)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, now)


def test_an_artefact_for_another_model_is_refused_by_name(capsys, tiny_llama_dir, tmp_path):
    intrinsic_run(capsys, tiny_llama_dir, tmp_path, steps=2)
    run = tmp_path / "run" / "intrinsic"
    config = json.loads((run / "intrinsic_config.json").read_text())
    (run / "intrinsic_config.json").write_text(json.dumps(config | {"targets": ["encoder.layer.0.query.weight"]}))
    model, _ = loratune.load_model(str(tiny_llama_dir), dtype="fp32", device="cpu")
    with pytest.raises(loratune.ConfigError, match="its targets are not parameters of this model"):
        apply_intrinsic(model, run)


def test_an_intrinsic_run_resumes_to_the_same_theta(capsys, tiny_llama_dir, tmp_path):
    config = intrinsic_run(capsys, tiny_llama_dir, tmp_path)
    straight = (tmp_path / "run" / "intrinsic" / "intrinsic.safetensors").read_bytes()
    status, _, err = cli(capsys, "train", config, "--no-progress", "--overwrite", "--set", "train.max_steps=2")
    assert status == 0, err
    status, _, err = cli(capsys, "train", config, "--no-progress", "--resume", "--set", "train.max_steps=4")
    assert status == 0, err
    assert (tmp_path / "run" / "intrinsic" / "intrinsic.safetensors").read_bytes() == straight


@pytest.mark.parametrize(
    "intrinsic, named",
    [({}, "intrinsic.dim"), ({"dim": 10**9}, "larger than"), ({"dim": 20}, "one λ per target tensor")],
)
def test_bad_intrinsic_settings_are_one_line(capsys, tiny_llama_dir, tmp_path, intrinsic, named):
    data = write_jsonl(tmp_path / "chat.jsonl", addition_rows(8))
    config = write_config(
        tmp_path / "bad.yaml",
        config_dict(tiny_llama_dir, data, tmp_path / "bad", train={"method": "intrinsic"}, intrinsic=intrinsic),
    )
    status, _, err = cli(capsys, "train", config, "--no-progress")
    assert_one_line_error(status, err, "train", named)
    assert not (tmp_path / "bad").exists()


def test_loratune_merge_writes_the_intrinsic_run_into_the_weights(capsys, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    intrinsic_run(capsys, tiny_llama_dir, tmp_path)
    status, _, err = cli(
        capsys,
        "merge",
        "--model",
        tiny_llama_dir,
        "--adapter",
        tmp_path / "run" / "intrinsic",
        "--out",
        tmp_path / "merged",
    )
    assert status == 0, err
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    model, _ = loratune.load_model(str(tiny_llama_dir), dtype="fp32", device="cpu")
    apply_intrinsic(model, tmp_path / "run" / "intrinsic")
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_d90_is_the_smallest_dim_reaching_90_percent_of_the_reference():
    from loratune.experiments.results import d90

    rows = [
        {"intrinsic.dim": dim, "eval_exact_match": score}
        for dim, score in [(10, 0.2), (10, 0.3), (100, 0.71), (100, 0.75), (1000, 0.80), (1000, 0.82)]
    ]
    reference = {"eval": {"eval_exact_match": 0.8}}
    assert d90(rows, reference) == (100, 0.8, "eval_exact_match", {})  # mean 0.73 ≥ 0.9 × 0.8
    assert d90(rows, {"eval": {"eval_exact_match": 0.95}})[0] is None


def test_d90_takes_each_dims_best_learning_rate_of_a_grid_not_their_average():
    from loratune.experiments.results import d90

    rows = [  # at dim 100 lr 0.3 reaches the bar on average over its seeds; lr 1 diverges
        {"intrinsic.dim": dim, "train.lr": lr, "train.seed": seed, "eval_accuracy": score}
        for dim, lr, seed, score in [
            (10, 0.3, 0, 0.5), (10, 0.3, 1, 0.6), (10, 1.0, 0, 0.5), (10, 1.0, 1, 0.5),
            (100, 0.3, 0, 0.74), (100, 0.3, 1, 0.76), (100, 1.0, 0, 0.5), (100, 1.0, 1, 0.5),
        ]
    ]  # fmt: skip
    settings = ["intrinsic.dim", "train.lr", "train.seed"]
    assert d90(rows, {"eval": {"eval_accuracy": 0.8}}, settings) == (100, 0.8, "eval_accuracy", {"train.lr": 0.3})
    assert d90(rows, {"eval": {"eval_accuracy": 0.8}})[0] is None  # lr 0.3 and 1 averaged: 0.625 at dim 100


def test_a_sweep_over_intrinsic_dims_reports_d90_against_a_reference_run(capsys, tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", addition_rows(8))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", addition_rows(4, start=20))
    sections = dict(data={"eval": str(evaluation)}, train={"max_steps": 2, "exact_match": True})
    reference = write_config(tmp_path / "ref.yaml", config_dict(tiny_llama_dir, data, tmp_path / "ref", **sections))
    status, _, err = cli(capsys, "train", reference, "--no-progress")
    assert status == 0, err
    base = write_config(
        tmp_path / "base.yaml",
        config_dict(
            tiny_llama_dir,
            data,
            tmp_path / "unused",
            **{**sections, "train": {**sections["train"], "method": "intrinsic"}},
        ),
    )
    status, out, err = cli(
        capsys,
        "sweep",
        base,
        "--grid",
        "intrinsic.dim=32,64",
        "--reference",
        tmp_path / "ref",
        "--out",
        tmp_path / "sweep",
    )
    assert status == 0, err
    assert "d90 " in out and "90% of" in (tmp_path / "sweep" / "results.md").read_text()


def test_a_reference_without_exact_match_is_refused_before_anything_runs(capsys, tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", addition_rows(8))
    reference = write_config(tmp_path / "ref.yaml", config_dict(tiny_llama_dir, data, tmp_path / "ref"))
    assert cli(capsys, "train", reference, "--no-progress")[0] == 0
    base = write_config(
        tmp_path / "base.yaml", config_dict(tiny_llama_dir, data, tmp_path / "unused", train={"method": "intrinsic"})
    )
    status, _, err = cli(
        capsys,
        "sweep",
        base,
        "--grid",
        "intrinsic.dim=32,64",
        "--reference",
        tmp_path / "ref",
        "--out",
        tmp_path / "sweep",
    )
    assert_one_line_error(status, err, "sweep", "eval_exact_match")
    assert not (tmp_path / "sweep").exists()
