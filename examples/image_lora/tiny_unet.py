"""A tiny Stable Diffusion pipeline and two LoRAs trained on it, to try the image-model LoRA tools offline.

    python examples/image_lora/tiny_unet.py --out runs/tiny-sd

writes runs/tiny-sd/pipeline/ (a random diffusers pipeline: UNet, CLIP text encoder, VAE, scheduler; no
tokenizer) and two PEFT pipeline adapters trained with loratune for a few denoising steps on random latents:
runs/tiny-sd/style-a/ (UNet attention and resnet convolutions, plus the text encoder's attention in
text_encoder/) and runs/tiny-sd/style-b/ (UNet attention only). Nothing is downloaded; it takes seconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import loratune

UNET_SIZE = dict(
    block_out_channels=(8, 16),
    layers_per_block=1,
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16,
    attention_head_dim=2,
    norm_num_groups=4,
)
TEXT_SIZE = dict(
    hidden_size=16,
    intermediate_size=32,
    num_attention_heads=2,
    num_hidden_layers=2,
    vocab_size=100,
    max_position_embeddings=16,
    projection_dim=16,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)


def tiny_pipeline(seed: int = 0):
    """A random Stable Diffusion pipeline small enough to run anywhere."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return StableDiffusionPipeline(
        vae=AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, sample_size=8),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT_SIZE)),
        tokenizer=None,
        unet=UNet2DConditionModel(**UNET_SIZE),
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def train_lora(pipeline, unet_targets, text_targets, seed: int, steps: int = 30):
    """Train a LoRA on the pipeline's UNet (and text encoder) to predict the noise of random latents whose
    mean is shifted by the seed: a stand-in for a style. Returns the per-step losses."""
    unet, text_encoder = pipeline.unet, pipeline.text_encoder
    loratune.add_adapter(unet, loratune.LoraConfig(r=4, lora_alpha=4, target_modules=unet_targets))
    if text_targets:
        loratune.add_adapter(text_encoder, loratune.LoraConfig(r=4, lora_alpha=4, target_modules=text_targets))
    params = [p for model in (unet, text_encoder) for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[0, 5 + seed, 9, 1]])
    losses = []
    for _ in range(steps):
        latents = torch.randn(4, 4, 8, 8, generator=generator) + 0.5 * seed
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, 1000, (4,), generator=generator)
        noisy = pipeline.scheduler.add_noise(latents, noise, t)
        text = text_encoder(input_ids=ids.expand(4, -1)).last_hidden_state
        loss = F.mse_loss(unet(noisy, t, text).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/tiny-sd", help="directory for the pipeline and the adapters")
    args = parser.parse_args(argv)
    out = Path(args.out)
    tiny_pipeline().save_pretrained(out / "pipeline")
    styles = {
        "style-a": (
            ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
            ["q_proj", "k_proj", "v_proj", "out_proj"],
            1,
        ),
        "style-b": (["to_q", "to_k", "to_v", "to_out.0"], [], 2),
    }
    for name, (unet_targets, text_targets, seed) in styles.items():
        pipeline = tiny_pipeline()
        losses = train_lora(pipeline, unet_targets, text_targets, seed)
        loratune.save_adapter(pipeline.unet, out / name)
        if text_targets:
            loratune.save_adapter(pipeline.text_encoder, out / name / "text_encoder")
        print(f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f} ({len(losses)} steps) -> {out / name}")
    print(f"pipeline -> {out / 'pipeline'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
