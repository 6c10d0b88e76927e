"""LoRA+ and the residual starts (OLoRA, randomized PiSSA), each against PEFT's definition: OLoRA's factors equal
PEFT's on the same weights; pissa_niter_N has PiSSA's defining properties; LoRA+ gives every parameter the
learning rate PEFT's ``create_loraplus_optimizer`` gives it, and a run keeps its groups through a resume."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import loratune
from loratune.errors import ConfigError
from loratune.train.config import TrainSection
from loratune.train.optimizer import build_optimizer
from test_cli import cli
from tiny_models import tiny_llama, token_batch

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

TARGETS = ["q_proj", "v_proj", "down_proj"]


def layers(model):
    return dict(loratune.adapters.lora_layers(model))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- OLoRA and randomized PiSSA ---------------------------------------------------------------------------------


def test_olora_factors_and_residual_base_equal_peft_s():
    theirs = peft.get_peft_model(
        tiny_llama(0), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="olora")
    )
    ours = loratune.add_adapter(
        tiny_llama(0), loratune.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="olora")
    )
    peft_modules = dict(theirs.base_model.model.named_modules())
    for path, layer in layers(ours).items():
        their = peft_modules[path]
        torch.testing.assert_close(layer.lora_A["default"], their.lora_A["default"].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.lora_B["default"], their.lora_B["default"].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.base_weight, their.base_layer.weight, atol=1e-6, rtol=1e-5)
    ids = token_batch(1)
    torch.testing.assert_close(logits(ours, ids), logits(tiny_llama(0), ids), atol=1e-5, rtol=1e-5)  # starts at W0


def test_pissa_niter_has_pissa_s_defining_properties():
    torch.manual_seed(3)
    # a weight with a decaying spectrum, as trained weights have: the randomized SVD then finds the top directions
    U, _ = torch.linalg.qr(torch.randn(48, 48))
    V, _ = torch.linalg.qr(torch.randn(40, 40))
    S = 2.0 ** -torch.arange(40, dtype=torch.float32)
    linear = nn.Linear(40, 48, bias=False)
    with torch.no_grad():
        linear.weight.copy_(U[:, :40] * S @ V.T)
    original = linear.weight.detach().clone()
    model = nn.Sequential(linear)
    loratune.add_adapter(
        model, loratune.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights="pissa_niter_4")
    )
    layer = model[0]
    A, B, s = layer.lora_A["default"].detach(), layer.lora_B["default"].detach(), layer.specs["default"].scaling
    top = U[:, :4] * S[:4] @ V[:, :4].T
    assert ((s * B @ A - top).norm() / top.norm()).item() < 1e-3  # s·B·A is W0's best rank-r part
    torch.testing.assert_close(layer.base_weight + s * B @ A, original, atol=1e-6, rtol=1e-5)  # residual kept
    gram_a, gram_b = A @ A.T, B.T @ B  # √S split: A·Aᵀ = Bᵀ·B = diag(S)/s
    torch.testing.assert_close(gram_a, torch.diag(S[:4] / s), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gram_b, torch.diag(S[:4] / s), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("init", ["olora", "pissa_niter_2"])
def test_residual_start_adapters_save_as_plain_lora_that_peft_loads_on_the_original_base(init, tmp_path):
    model = loratune.add_adapter(
        tiny_llama(0), loratune.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
    )
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.add_(0.05 * torch.randn_like(param))
    ids = token_batch(1)
    expected = logits(model, ids)
    loratune.save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["init_lora_weights"] is True and written["r"] == 8
    loaded = peft.PeftModel.from_pretrained(tiny_llama(0), str(tmp_path)).eval()
    assert (expected - logits(tiny_llama(0), ids)).abs().max() > 1e-3
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-5, rtol=1e-5)


def test_an_unknown_start_names_the_choices_in_one_line():
    with pytest.raises(ConfigError, match="pissa_niter_N") as error:
        loratune.LoraConfig(init_lora_weights="pissa_niter_0")
    assert "\n" not in str(error.value)


# --- LoRA+ ------------------------------------------------------------------------------------------------------


def peft_key(name: str) -> str:
    """A PEFT parameter name in loratune's spelling."""
    name = (
        name.removeprefix("base_model.model.").replace("lora_embedding_", "lora_").replace("modules_to_save", "copies")
    )
    for factor in ("lora_A", "lora_B", "lora_magnitude_vector"):
        name = name.replace(f".{factor}.default.weight", f".{factor}.default")
    return name


def test_loraplus_groups_give_every_parameter_peft_s_learning_rate():
    from peft.optimizers import create_loraplus_optimizer

    lora = dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
        use_dora=True,
    )
    theirs = peft.get_peft_model(tiny_llama(0, tie=False), peft.LoraConfig(**lora))
    peft_optimizer = create_loraplus_optimizer(
        theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_lr_embedding=1e-5
    )
    ours = loratune.add_adapter(tiny_llama(0, tie=False), loratune.LoraConfig(**lora))
    train = TrainSection(lr=1e-3, loraplus_lr_ratio=16, loraplus_lr_embedding=1e-5)
    optimizer = build_optimizer(ours, train)

    def rates(model, optimizer, rename):
        by_id = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        return {rename(name): by_id[id(p)] for name, p in model.named_parameters() if p.requires_grad}

    expected = rates(theirs, peft_optimizer, peft_key)
    got = rates(ours, optimizer, lambda name: name)
    assert got.keys() == expected.keys()
    assert {round(v / 1e-3, 6) for v in got.values()} == {1.0, 16.0, 0.01}  # A, B and magnitudes, embeddings
    assert got == pytest.approx(expected)


def test_a_loraplus_run_keeps_its_groups_in_checkpoints_and_through_a_resume(capsys, tiny_llama_dir, tmp_path):
    from run_helpers import addition_rows, config_dict, write_config, write_jsonl

    data = write_jsonl(tmp_path / "chat.jsonl", addition_rows(8))
    config = write_config(
        tmp_path / "run.yaml",
        config_dict(
            tiny_llama_dir,
            data,
            tmp_path / "run",
            lora={"target_modules": ["q_proj", "v_proj"]},
            train={"max_steps": 4, "save_every": 2, "lr": 1e-3, "loraplus_lr_ratio": 8, "scheduler": "constant"},
        ),
    )
    status, _, err = cli(capsys, "train", config, "--no-progress", "--set", "train.max_steps=2")
    assert status == 0, err
    checkpoint = tmp_path / "run" / "checkpoints" / "step-2"
    meta = json.loads((checkpoint / "trainer_state.json").read_text())
    group_rates = sorted(round(g["lr_scale"], 6) for g in find_param_groups(meta))
    assert group_rates == [1.0, 8.0]
    status, _, err = cli(capsys, "train", config, "--no-progress", "--resume", "--set", "train.max_steps=4")
    assert status == 0, err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r][-1] == 4


def find_param_groups(meta) -> list[dict]:
    if isinstance(meta, dict):
        if "param_groups" in meta:
            return meta["param_groups"]
        for value in meta.values():
            found = find_param_groups(value)
            if found:
                return found
    return []
