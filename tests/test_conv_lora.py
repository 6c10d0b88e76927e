"""LoRA on convolutions (PEFT's Conv layers): the definition, merging, training, and interop with real PEFT."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import loratune
from loratune.errors import ConfigError
from loratune.layers import LoraConv

ATOL = 1e-5


class ConvNet(nn.Module):
    """A small image model: 3×3, strided, 1×1 and 1-D convolutions, and a Linear head."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.proj = nn.Conv2d(12, 6, 1)
        self.seq = nn.Conv1d(6, 5, 3, padding=1)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        h = F.silu(self.proj(F.silu(self.down(F.silu(self.conv_in(x))))))  # B × 6 × 4 × 4
        h = self.seq(h.flatten(2))  # B × 5 × 16
        return self.head(h.mean(-1))


TARGETS = ["conv_in", "down", "proj", "seq"]


def images(rows: int = 3) -> torch.Tensor:
    return torch.randn(rows, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def perturb(model: nn.Module, seed: int = 7) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))


def dense_conv_output(layer: LoraConv, x: torch.Tensor, scale: float) -> torch.Tensor:
    """The base convolution run with the kernel W0 + s·B·A, formed densely."""
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    kernel = layer.base_layer.weight + scale * (B.flatten(1) @ A.flatten(1)).reshape(layer.base_layer.weight.shape)
    return layer.base_layer._conv_forward(x, kernel, layer.base_layer.bias)


def test_the_low_rank_path_is_the_change_of_kernel_s_b_a_and_merging_adds_exactly_that():
    model = loratune.add_adapter(
        ConvNet(), loratune.LoraConfig(r=2, lora_alpha=6, target_modules=TARGETS, init_lora_weights=False)
    )
    layer = model.down
    assert isinstance(layer, LoraConv)
    assert layer.lora_A["default"].shape == (2, 8, 3, 3) and layer.lora_B["default"].shape == (12, 2, 1, 1)
    x = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(layer(x), dense_conv_output(layer, x, 3.0), atol=ATOL, rtol=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if "base_layer" in name}
    unmerged = model(images())
    loratune.merge(model)
    torch.testing.assert_close(model(images()), unmerged, atol=ATOL, rtol=0)
    loratune.unmerge(model)
    for name, param in model.named_parameters():
        if name in before:
            torch.testing.assert_close(param, before[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("options", [dict(dilation=2), dict(padding_mode="reflect")], ids=["dilation", "reflect"])
def test_the_low_rank_path_keeps_the_base_s_dilation_and_padding_mode(options):
    # (PEFT's A ignores both, so there its unmerged output differs from its merged one)
    conv = nn.Sequential(nn.Conv2d(4, 6, 3, padding=2, **options))
    model = loratune.add_adapter(conv, loratune.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(model(x), dense_conv_output(model[0], x, 8.0), atol=ATOL, rtol=0)


def test_training_moves_only_the_factors_and_lowers_the_loss():
    model = loratune.add_adapter(ConvNet(), loratune.LoraConfig(r=4, target_modules=TARGETS))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(TARGETS)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    x, target = images(8), torch.randn(8, 4)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_peft_conv_adapter_loads_in_loratune_with_the_same_outputs_merged_and_unmerged(tmp_path):
    source = peft.get_peft_model(
        ConvNet(), peft.LoraConfig(r=3, lora_alpha=5, target_modules=TARGETS, init_lora_weights=False)
    )
    perturb(source)
    expected = source(images())
    source.save_pretrained(tmp_path)
    model = ConvNet()
    base = model(images())
    loratune.load_adapter(model, tmp_path)
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(model(images()), expected, atol=ATOL, rtol=0)
    loratune.merge(model)
    torch.testing.assert_close(model(images()), source.merge_and_unload()(images()), atol=ATOL, rtol=0)


def test_loratune_conv_adapter_loads_in_peft_with_the_same_keys_and_outputs(tmp_path):
    config = dict(r=3, lora_alpha=5, target_modules=TARGETS)
    model = loratune.add_adapter(ConvNet(), loratune.LoraConfig(**config))
    perturb(model)
    expected = model(images())
    loratune.save_adapter(model, tmp_path / "ours")
    peft.get_peft_model(ConvNet(), peft.LoraConfig(**config)).save_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file

    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    loaded = peft.PeftModel.from_pretrained(ConvNet(), str(tmp_path / "ours"))
    torch.testing.assert_close(loaded(images()), expected, atol=ATOL, rtol=0)


def test_a_fresh_conv_adapter_starts_as_the_base_with_peft_s_initialisation():
    model = loratune.add_adapter(ConvNet(), loratune.LoraConfig(r=4, target_modules=TARGETS))
    torch.testing.assert_close(model(images()), ConvNet()(images()))
    A = model.conv_in.lora_A["default"]
    bound = 1 / (3 * 3 * 3) ** 0.5  # Kaiming-uniform (a = √5) over the kernel's fan-in, as nn.Conv2d and PEFT
    assert A.abs().max() <= bound and A.abs().max() > 0.8 * bound


@pytest.mark.parametrize("case", ["groups", "dora", "pissa"])
def test_what_convolutions_cannot_take_is_refused_in_one_line(case):
    if case == "groups":
        model, config = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), loratune.LoraConfig(target_modules=["0"])
    else:
        model = ConvNet()
        config = loratune.LoraConfig(
            target_modules=["conv_in"], **({"use_dora": True} if case == "dora" else {"init_lora_weights": "pissa"})
        )
    with pytest.raises(ConfigError) as error:
        loratune.add_adapter(model, config)
    message = str(error.value)
    assert "\n" not in message
    assert {"groups": "groups = 1", "dora": "DoRA", "pissa": "PiSSA"}[case] in message
