"""Image-model LoRA files (kohya / Civitai layout) on a tiny random Stable Diffusion UNet and CLIP text encoder:
diffusers' own loader, real PEFT, conversion, and the file-only verbs."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import loratune
from loratune.adapters.kohya import read_kohya
from test_cli import assert_one_line_error, cli
from tiny_models import tiny_clip_text, tiny_unet, unet_inputs

pytest.importorskip("diffusers")

ATOL = 1e-5
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2", "conv_in", "conv_shortcut"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]  # kohya's text-encoder targets
IDS = torch.tensor([[0, 5, 9, 23, 1], [0, 7, 7, 1, 1]])


def unet_output(unet) -> torch.Tensor:
    with torch.no_grad():
        return unet(*unet_inputs()).sample


def text_output(encoder) -> torch.Tensor:
    with torch.no_grad():
        return encoder(input_ids=IDS).last_hidden_state


def perturb(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


def trained_pipeline_adapter(root, seed: int = 1, r: int = 4):
    """A UNet and a text encoder with a perturbed ('trained') LoRA, saved as a PEFT pipeline adapter at ``root``
    (the UNet's at the root, the text encoder's in text_encoder/); returns the adapted models."""
    unet = loratune.add_adapter(
        tiny_unet(),
        loratune.LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=UNET_TARGETS, rank_pattern={"conv_in": 2}, alpha_pattern={"conv1": 3}
        ),
    )
    encoder = loratune.add_adapter(
        tiny_clip_text(), loratune.LoraConfig(r=r, lora_alpha=r, target_modules=TEXT_TARGETS)
    )
    perturb(unet, seed)
    perturb(encoder, seed + 100)
    loratune.save_adapter(unet, root)
    loratune.save_adapter(encoder, root / "text_encoder")
    return unet, encoder


def pipeline():
    """A diffusers Stable Diffusion pipeline around the tiny UNet and text encoder (no tokenizer: not needed)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, sample_size=8),
        text_encoder=tiny_clip_text(),
        tokenizer=None,
        unet=tiny_unet(),
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("kohya")
    pipeline().save_pretrained(root / "pipeline")
    unet, encoder = trained_pipeline_adapter(root / "peft")
    return root, unet_output(unet), text_output(encoder)


@pytest.fixture(scope="module")
def kohya_file(files):
    root, _, _ = files
    out = root / "lora.safetensors"
    if not out.exists():
        assert loratune.cli.main(["convert", str(root / "peft"), "--to", "kohya", "--out", str(out)]) == 0
    return out


def test_the_kohya_file_has_kohya_s_names_shapes_and_0_d_alphas(kohya_file):
    tensors = load_file(kohya_file)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{name}.lora_down.weight"].shape == (4, 8)
    assert tensors[f"{name}.alpha"].ndim == 0 and float(tensors[f"{name}.alpha"]) == 8.0
    assert float(tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 3.0  # alpha_pattern
    conv = "lora_unet_conv_in"
    assert tensors[f"{conv}.lora_down.weight"].shape == (2, 4, 3, 3)  # LoCon: rank_pattern 2, a 3×3 kernel
    assert tensors[f"{conv}.lora_up.weight"].shape == (8, 2, 1, 1)
    assert float(tensors[f"{conv}.alpha"]) == 8.0
    assert "lora_te_text_model_encoder_layers_1_mlp_fc1.lora_up.weight" in tensors
    with safe_open(str(kohya_file), framework="pt") as handle:
        assert handle.metadata()["ss_network_module"] == "networks.lora"


def test_diffusers_load_lora_weights_gives_the_outputs_loratune_gives_for_the_same_file(files, kohya_file):
    _, expected_unet, expected_text = files
    sd = pipeline()
    base = unet_output(sd.unet)
    sd.load_lora_weights(str(kohya_file))
    theirs_unet, theirs_text = unet_output(sd.unet), text_output(sd.text_encoder)
    assert (theirs_unet - base).abs().max() > 1e-2, "the file does not change the UNet; the test is vacuous"
    unet, encoder = tiny_unet(), tiny_clip_text()
    loratune.load_adapter(unet, kohya_file)  # the part whose names this model has
    loratune.load_adapter(encoder, kohya_file)
    torch.testing.assert_close(unet_output(unet), theirs_unet, atol=ATOL, rtol=0)
    torch.testing.assert_close(text_output(encoder), theirs_text, atol=ATOL, rtol=0)
    torch.testing.assert_close(unet_output(unet), expected_unet, atol=ATOL, rtol=0)  # as trained
    torch.testing.assert_close(text_output(encoder), expected_text, atol=ATOL, rtol=0)
    loratune.merge(unet)
    torch.testing.assert_close(unet_output(unet), theirs_unet, atol=ATOL, rtol=0)


def test_peft_to_kohya_and_back_is_bit_identical_and_loads_in_peft(files, kohya_file, capsys):
    root, expected_unet, expected_text = files
    back = root / "back"
    status, out, err = cli(capsys, "convert", kohya_file, "--to", "peft", "--model", root / "pipeline", "--out", back)
    assert status == 0, err
    assert "unet: " in out and "text_encoder: 12 modules" in out  # 6 targets × 2 layers
    for sub in ("", "text_encoder"):
        original, returned = (
            load_file(root / "peft" / sub / "adapter_model.safetensors"),
            load_file(back / sub / "adapter_model.safetensors"),
        )
        assert original.keys() == returned.keys()
        for key in original:
            assert original[key].dtype == returned[key].dtype and torch.equal(original[key], returned[key]), key
    loaded = peft.PeftModel.from_pretrained(tiny_unet(), str(back))
    torch.testing.assert_close(unet_output(loaded), expected_unet, atol=ATOL, rtol=0)
    encoder = peft.PeftModel.from_pretrained(tiny_clip_text(), str(back / "text_encoder"))
    torch.testing.assert_close(text_output(encoder), expected_text, atol=ATOL, rtol=0)
    again = root / "again.safetensors"
    assert cli(capsys, "convert", back, "--to", "kohya", "--out", again)[0] == 0
    first, second = load_file(kohya_file), load_file(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def deltas(path) -> dict[str, torch.Tensor]:
    """Each module's dense update (alpha / r)·up·down of a kohya file, flattened to a matrix."""
    tensors = load_file(path)
    out = {}
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            name = key.split(".")[0]
            down, up = tensors[key].double().flatten(1), tensors[f"{name}.lora_up.weight"].double().flatten(1)
            alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else down.shape[0]
            out[name] = alpha / down.shape[0] * up @ down
    return out


def test_mix_of_two_kohya_files_is_the_weighted_sum_of_their_deltas(files, kohya_file, tmp_path, capsys):
    other_root = tmp_path / "other"
    trained_pipeline_adapter(other_root, seed=5, r=3)
    other = tmp_path / "other.safetensors"
    assert cli(capsys, "convert", other_root, "--to", "kohya", "--out", other)[0] == 0
    mixed = tmp_path / "mixed.safetensors"
    status, _out, err = cli(capsys, "mix", f"{kohya_file}:0.7", f"{other}:-0.4", "--method", "cat", "--out", mixed)
    assert status == 0, err
    a, b, result = deltas(kohya_file), deltas(other), deltas(mixed)
    assert result.keys() == a.keys()
    for name, delta in result.items():
        expected = 0.7 * a[name] - 0.4 * b[name]
        assert float((delta - expected).norm() / expected.norm()) < 1e-6, name
    with safe_open(str(mixed), framework="pt") as handle:
        assert handle.metadata()["ss_network_dim"] == "Dynamic"  # ranks 7 and 5 (cat adds them)


def test_resize_by_energy_of_a_kohya_file_is_the_optimal_truncation(kohya_file, tmp_path, capsys):
    source = tmp_path / "civitai.safetensors"  # a file as a trainer wrote it, with its ss_* settings
    save_file(
        load_file(kohya_file),
        source,
        metadata={"ss_output_name": "mystyle", "ss_network_dim": "4", "ss_learning_rate": "0.0001"},
    )
    resized = tmp_path / "small.safetensors"
    status, out, err = cli(capsys, "resize", source, "--energy", "0.9", "--out", resized, "--json")
    assert status == 0, err
    modules = {m["name"]: m for m in json.loads(out)["modules"]}
    original, result = deltas(kohya_file), deltas(resized)
    assert any(m["k"] < m["r"] for m in modules.values())
    for name, delta in original.items():
        sigma = torch.linalg.svdvals(delta)
        energy = torch.cumsum(sigma**2, 0) / (sigma**2).sum()
        k = int((energy < 0.9 - 1e-12).sum()) + 1  # the smallest k keeping 90%
        assert modules[name]["k"] == k, name
        error = float((result[name] - delta).norm() ** 2)
        assert error == pytest.approx(float((sigma[k:] ** 2).sum()), rel=1e-4, abs=1e-12), name
    metadata = read_kohya(resized).metadata  # a kohya file again, its settings kept, the new ranks recorded
    assert metadata["ss_output_name"] == "mystyle" and metadata["ss_learning_rate"] == "0.0001"
    assert metadata["ss_network_dim"] == "Dynamic"


def test_inspect_describes_a_kohya_file(kohya_file, capsys):
    status, out, err = cli(capsys, "inspect", kohya_file, "--json")
    assert status == 0, err
    info = json.loads(out)
    assert info["format"] == "kohya"
    assert info["components"] == {"text_encoder": 12, "unet": sum(1 for n in info["target_modules"] if "unet" in n)}
    assert info["conv_modules"] > 0 and info["ranks"] == [2, 4]
    assert info["metadata"]["ss_network_module"] == "networks.lora"
    status, out, err = cli(capsys, "inspect", kohya_file)
    assert status == 0 and "conv_modules" in out


@pytest.mark.parametrize("key, named", [("hada_w1_a", "LoHa"), ("lokr_w1", "LoKr"), ("lora_mid.weight", "lora_mid")])
def test_a_lycoris_file_is_refused_in_one_line_naming_its_type(key, named, kohya_file, tmp_path, capsys):
    tensors = load_file(kohya_file)
    tensors[f"lora_unet_conv_in.{key}"] = torch.zeros(2, 2)
    bad = tmp_path / "lycoris.safetensors"
    save_file(tensors, bad)
    for verb in (["inspect", bad], ["resize", bad, "--rank", "1", "--out", tmp_path / "x.safetensors"]):
        status, _, err = cli(capsys, *verb)
        assert_one_line_error(status, err, verb[0], named)
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(loratune.errors.AdapterLoadError, match=named):
        loratune.load_adapter(tiny_unet(), bad)


def test_conversion_errors_are_one_line(files, kohya_file, tmp_path, capsys):
    root, _, _ = files
    status, _, err = cli(capsys, "convert", kohya_file, "--to", "peft", "--out", tmp_path / "p")
    assert_one_line_error(status, err, "convert", "--model")
    status, _, err = cli(
        capsys, "convert", kohya_file, "--to", "peft", "--model", root / "pipeline" / "unet", "--out", tmp_path / "p"
    )
    assert_one_line_error(status, err, "convert", "text_encoder")  # the file adapts a text encoder too
    tensors = load_file(kohya_file)
    renamed = {k.replace("attn1_to_q", "attn1_to_query"): v for k, v in tensors.items()}
    save_file(renamed, tmp_path / "other_model.safetensors")
    status, _, err = cli(
        capsys,
        "convert",
        tmp_path / "other_model.safetensors",
        "--to",
        "peft",
        "--model",
        root / "pipeline",
        "--out",
        tmp_path / "p",
    )
    assert_one_line_error(status, err, "convert", "attn1_to_query", "closest: ")
    assert not (tmp_path / "p").exists()
    status, _, err = cli(capsys, "resize", kohya_file, "--rank", "1", "--out", tmp_path / "dir")
    assert_one_line_error(status, err, "resize", ".safetensors")
    status, _, err = cli(capsys, "convert", kohya_file, "--to", "kohya", "--out", tmp_path / "same.safetensors")
    assert_one_line_error(status, err, "convert", "kohya format already")


def test_the_readme_example_runs_end_to_end(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[1] / "examples" / "image_lora" / "tiny_unet.py"
    spec = importlib.util.spec_from_file_location("tiny_unet_example", script)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "tiny-sd"
    assert example.main(["--out", str(out)]) == 0
    steps = [
        ["convert", out / "style-a", "--to", "kohya", "--out", out / "style-a.safetensors"],
        ["convert", out / "style-b", "--to", "kohya", "--out", out / "style-b.safetensors"],
        ["inspect", out / "style-a.safetensors"],
        ["rank", out / "style-a.safetensors", "--json"],
        ["resize", out / "style-a.safetensors", "--energy", "0.9", "--out", out / "style-a-small.safetensors"],
        [
            "mix",
            f"{out / 'style-a.safetensors'}:0.7",
            f"{out / 'style-b.safetensors'}:0.5",
            "--method",
            "cat",
            "--out",
            out / "mixed.safetensors",
        ],
        ["convert", out / "mixed.safetensors", "--to", "peft", "--model", out / "pipeline", "--out", out / "mixed"],
    ]
    for step in steps:
        status, stdout, err = cli(capsys, *step)
        assert status == 0, (step, err)
        if step[0] == "rank":
            report = json.loads(stdout)
            assert len(report["modules"]) == 56 and all(m["r"] == 4 for m in report["modules"])
    sd = example.tiny_pipeline()
    base = unet_output(sd.unet)
    sd.load_lora_weights(str(out / "mixed.safetensors"))
    unet = example.tiny_pipeline().unet
    loratune.load_adapter(unet, out / "mixed")  # the PEFT conversion of the same file
    assert (unet_output(unet) - base).abs().max() > 1e-3
    torch.testing.assert_close(unet_output(unet), unet_output(sd.unet), atol=ATOL, rtol=0)


def test_a_diffusers_lora_file_converts_to_kohya_and_back_bit_identically(tmp_path, capsys):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    unet, encoder = tiny_unet(), tiny_clip_text()
    unet.add_adapter(
        peft.LoraConfig(
            r=4,
            lora_alpha=6,
            target_modules=["to_q", "to_v", "conv1"],
            init_lora_weights=False,
            rank_pattern={"conv1": 2},
        )
    )
    text_config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=TEXT_TARGETS, init_lora_weights=False)
    peft.inject_adapter_in_model(text_config, encoder)
    expected = unet_output(unet)
    StableDiffusionPipeline.save_lora_weights(  # diffusers' own writer
        tmp_path / "diffusers",
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(encoder),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )
    original = tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"
    status, out, err = cli(capsys, "convert", original, "--to", "kohya", "--out", tmp_path / "k.safetensors")
    assert status == 0 and "(diffusers)" in out, err
    info = json.loads(cli(capsys, "inspect", original, "--json")[1])
    assert info["components"] == {"text_encoder": 12, "unet": info["components"]["unet"]} and info["ranks"] == [2, 4]
    status, _, err = cli(
        capsys,
        "convert",
        tmp_path / "k.safetensors",
        "--to",
        "diffusers",
        "--model",
        tmp_path / "pipeline-missing",
        "--out",
        tmp_path / "back.safetensors",
    )
    assert_one_line_error(status, err, "convert", "pipeline-missing")
    pipeline().save_pretrained(tmp_path / "pipeline")
    status, _, err = cli(
        capsys,
        "convert",
        tmp_path / "k.safetensors",
        "--to",
        "diffusers",
        "--model",
        tmp_path / "pipeline",
        "--out",
        tmp_path / "back.safetensors",
    )
    assert status == 0, err
    first, second = load_file(original), load_file(tmp_path / "back.safetensors")
    assert first.keys() == second.keys()
    assert all(first[k].dtype == second[k].dtype and torch.equal(first[k], second[k]) for k in first)
    sd = pipeline()
    sd.load_lora_weights(str(tmp_path / "back.safetensors"))
    torch.testing.assert_close(unet_output(sd.unet), expected, atol=ATOL, rtol=0)
    fresh = tiny_unet()
    loratune.load_adapter(fresh, tmp_path / "k.safetensors")
    torch.testing.assert_close(unet_output(fresh), expected, atol=ATOL, rtol=0)
