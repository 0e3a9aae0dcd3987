"""Rebuild the toy pretrained aMUSEd from scratch: ``python -m amused_tune.toy build [--out DIR]``.

Three stages, each deterministic (fixed seeds, fixed thread count) and small enough for a laptop CPU:

1. the world: `world.sample_specs` draws every (shape, colour, background) of the six world colours with a
   little jitter of position and size;
2. the VQ model: a `VQModel` (32 px -> 8x8 tokens, codebook of 128) trained as an autoencoder on those images
   (L1 + MSE reconstruction + the quantizer's codebook/commitment loss; unused codes are restarted on random
   encoder outputs so the whole codebook gets used);
3. the text encoder: a random, frozen 2-layer CLIP over the kit's character-level tokenizer (seeded); the U-ViT
   learns to read it;
4. the U-ViT: pretrained on the world's captions and VQ tokens with the MaskGIT objective (`amused_tune.masking`).

The result is written with `Components.save_pretrained` to `amused_tune/toy/weights/` (or ``--out``).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AmusedScheduler, UVit2DModel, VQModel
from transformers import CLIPTextModelWithProjection

from amused_tune.models import Components, build_tiny_tokenizer, encode_images, tiny_text_encoder_config
from amused_tune.toy import world

CODEBOOK = 128
TEXT_HIDDEN = 64
SEED = 0


def log(msg: str) -> None:
    print(f"[toy {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------- models


def new_vqvae() -> VQModel:
    return VQModel(
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=16,
        num_vq_embeddings=CODEBOOK,
        norm_num_groups=8,
        sample_size=world.SIZE,
        mid_block_add_attention=False,
        lookup_from_codebook=True,
        force_upcast=False,
    )


def new_text_encoder(tokenizer) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(tiny_text_encoder_config(tokenizer, hidden=TEXT_HIDDEN, layers=2)).eval()


def new_transformer() -> UVit2DModel:
    return UVit2DModel(
        hidden_size=128,
        cond_embed_dim=TEXT_HIDDEN,
        micro_cond_encode_dim=16,
        micro_cond_embed_dim=5 * 16,
        encoder_hidden_size=TEXT_HIDDEN,
        vocab_size=CODEBOOK + 1,
        codebook_size=CODEBOOK,
        in_channels=64,
        block_out_channels=128,
        num_res_blocks=1,
        block_num_heads=4,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        sample_size=world.SIZE // 4,
    )


# --------------------------------------------------------------------------------------------- VQ


def _images(specs: list[world.ShapeSpec]) -> torch.Tensor:
    return torch.from_numpy(world.to_array([world.render(s) for s in specs]))


def train_vq(vq: VQModel, images: torch.Tensor, steps: int, batch_size: int = 64, lr: float = 2e-3, seed: int = SEED):
    """Train `vq` as an autoencoder on `images` [N, 3, H, W] in [0, 1]; restarts dead codes during the first 70%."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vq.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    emb = vq.quantize.embedding.weight
    usage = torch.zeros(CODEBOOK)
    vq.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=g)
        x = images[idx]
        flip = torch.rand(batch_size, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        h = vq.encode(x).latents
        z_q, q_loss, (_, _, ids) = vq.quantize(h)
        rec = vq.decoder(vq.post_quant_conv(z_q))
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + q_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        usage += torch.bincount(ids.flatten(), minlength=CODEBOOK).float()
        if (step + 1) % 100 == 0:
            dead = usage == 0
            if dead.any() and step < 0.7 * steps:  # restart unused codes on random encoder outputs
                with torch.no_grad():
                    flat = h.detach().permute(0, 2, 3, 1).reshape(-1, h.shape[1])
                    pick = torch.randint(len(flat), (int(dead.sum()),), generator=g)
                    emb.data[dead] = flat[pick] + 0.01 * torch.randn(len(pick), flat.shape[1], generator=g)
            log(f"vq step {step + 1}/{steps} loss {loss.item():.4f} l1 {F.l1_loss(rec, x).item():.4f} "
                f"codes used {int((usage > 0).sum())}/{CODEBOOK} ({time.time() - t0:.0f}s)")
            usage.zero_()
    vq.eval()
    return vq
