"""Rebuild the toy pretrained aMUSEd from scratch: ``python -m amused_tune.toy build [--out DIR]``.

Four stages, each deterministic (fixed seeds, one thread) and small enough for a laptop CPU:

1. the world: every (shape, colour, background) of the six world colours, one layout each: 90 captions, and
   each of them with a frame of every world colour but the background: 450 framed captions (half of each batch);
2. the VQ model (`VQModel`, 32 px -> 8x8 tokens, codebook of 16): one code per palette colour. Its codebook is a
   fixed set of orthonormal vectors, the encoder is trained to put each cell on its colour's code and the decoder
   to paint a flat cell from it, on random grids of all nine colours and on world images (held-out colours and
   the style's frame included: the VQ is the tokenizer of everything fine-tuning may ask for), or taken from
   an earlier build (``--vq-from``) when the world's palette has not changed;
3. the tokenizer (one token per word, `amused_tune.toy.text`) and a small CLIP text encoder;
4. the U-ViT, pretrained on the world's captions and tokens together with the text encoder (which is then
   frozen): MaskGIT objective (`amused_tune.model.masking`) with label smoothing, condition dropout for
   classifier-free guidance.

The pipeline is written with `Components.save_pretrained` to `amused_tune/toy/weights/` (or ``--out``) with
`sampling.json` (the toy's sampling defaults, the best guidance of the sweep) and `build_info.json`.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AmusedScheduler, UVit2DModel, VQModel
from transformers import CLIPTextModelWithProjection

from amused_tune.model.masking import mask_tokens, masked_cross_entropy
from amused_tune.model.bases import Components, encode_images, encode_prompts, micro_conditioning, tiny_text_encoder_config
from amused_tune.toy import world
from amused_tune.toy.text import build_toy_tokenizer

CODEBOOK = 16
TEXT_HIDDEN = 64
SEED = 0
COLOUR_IDS = {name: i for i, name in enumerate(world.PALETTE)}  # code i = palette colour i


def log(msg: str) -> None:
    print(f"[toy {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class BuildConfig:
    vq_steps: int = 400
    """VQ training steps (batch 32)."""
    uvit_steps: int = 2000
    """U-ViT + text-encoder pretraining steps."""
    frame_share: float = 0.5
    """Share of pretraining samples drawn from the framed captions ("... with a green frame"); the rest plain."""
    vq_from: str = ""
    """A toy pipeline folder to take the VQ from instead of training one (empty: train it). Its round trip is
    still measured."""
    batch_size: int = 32
    """Pretraining batch size."""
    lr: float = 1.5e-3
    """Peak learning rate of the pretraining (warmup 100 steps, then cosine)."""
    label_smoothing: float = 0.1
    """Label smoothing of the masked cross-entropy."""
    cond_dropout: float = 0.15
    """Probability of training a sample on the empty prompt (classifier-free guidance)."""
    res_blocks: int = 3
    """ConvNeXt blocks before and after the U-ViT's transformer: its only sense of position (zero padding of
    3x3 convolutions, one cell per block), so 2 x res_blocks must reach the grid's centre."""
    text_embed_std: float = 1.0
    """Standard deviation of the text encoder's initial token embeddings. CLIP's own 0.02 lets a new word's hidden
    state be swamped by its context, so a LoRA cannot find "[v]" in a new caption; 1.0 keeps every word distinct."""
    eval_prompts: int = 50
    """World prompts of the final evaluation (x 2 seeds)."""


# --------------------------------------------------------------------------------------------- models


def new_vqvae() -> VQModel:
    return VQModel(
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=CODEBOOK,
        num_vq_embeddings=CODEBOOK,
        norm_num_groups=8,
        sample_size=world.SIZE,
        mid_block_add_attention=False,
        lookup_from_codebook=True,
        force_upcast=False,
    )


def new_text_encoder(tokenizer) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(tiny_text_encoder_config(tokenizer, hidden=TEXT_HIDDEN, layers=2))


def new_transformer(res_blocks: int = 3) -> UVit2DModel:
    return UVit2DModel(
        hidden_size=96,
        cond_embed_dim=TEXT_HIDDEN,
        micro_cond_encode_dim=16,
        micro_cond_embed_dim=5 * 16,
        encoder_hidden_size=TEXT_HIDDEN,
        vocab_size=CODEBOOK + 1,
        codebook_size=CODEBOOK,
        in_channels=32,
        block_out_channels=96,
        num_res_blocks=res_blocks,
        block_num_heads=2,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=384,
        sample_size=world.GRID,
    )


# --------------------------------------------------------------------------------------------- VQ


def cell_ids(spec: world.ShapeSpec) -> torch.Tensor:
    """The code of every cell of `spec` [8, 8] (the palette index of its colour)."""
    return torch.tensor([[COLOUR_IDS[n] for n in row] for row in world.cells(spec)], dtype=torch.long)


def paint(ids: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, 32, 32] in [0, 1] of code grids [B, 8, 8] (each cell flat in its palette colour)."""
    rgb = torch.tensor(list(world.PALETTE.values()), dtype=torch.float32) / 255.0
    img = rgb[ids].permute(0, 3, 1, 2)  # [B, 3, 8, 8]
    return img.repeat_interleave(world.CELL, 2).repeat_interleave(world.CELL, 3)


def vq_training_grids(n: int, g: torch.Generator, specs_ids: torch.Tensor) -> torch.Tensor:
    """`n` code grids: half random cells of every palette colour, half world images (with small random edits)."""
    colours = len(world.PALETTE)
    rand = torch.randint(colours, (n // 2, world.GRID, world.GRID), generator=g)
    picked = specs_ids[torch.randint(len(specs_ids), (n - n // 2,), generator=g)].clone()
    edit = torch.rand(picked.shape, generator=g) < 0.1
    picked[edit] = torch.randint(colours, (int(edit.sum()),), generator=g)
    return torch.cat([rand, picked])


def train_vq(vq: VQModel, steps: int, batch_size: int = 32, lr: float = 2e-3, seed: int = SEED) -> VQModel:
    """Train `vq` to give every cell its colour's code and to paint each code back as a flat cell.

    The codebook is fixed (orthonormal rows); the encoder regresses each cell's latent onto its code (MSE) and the
    decoder reconstructs the image from the exact codes (L1 + MSE). Codes `len(PALETTE)`.. are never used.
    """
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(CODEBOOK, CODEBOOK, generator=g))
    vq.quantize.embedding.weight.data.copy_(q)
    vq.quantize.embedding.weight.requires_grad_(False)
    specs = world.world_specs(tuple(world.PALETTE)[:-1]) + world.world_specs(tuple(world.PALETTE)[:-1], style=True)
    specs_ids = torch.stack([cell_ids(s) for s in specs])
    params = [p for p in vq.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    codebook = vq.quantize.embedding.weight
    vq.train()
    for step in range(steps):
        ids = vq_training_grids(batch_size, g, specs_ids)
        x = paint(ids)
        h = vq.encode(x).latents
        target = codebook[ids].permute(0, 3, 1, 2)
        rec = vq.decoder(vq.post_quant_conv(target))
        enc_loss = F.mse_loss(h, target)
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        loss = enc_loss + rec_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            log(f"vq step {step + 1}/{steps} encoder {enc_loss.item():.4f} reconstruction {rec_loss.item():.4f}")
    vq.eval().requires_grad_(False)
    return vq


@torch.no_grad()
def vq_round_trip(vq: VQModel, specs: list[world.ShapeSpec]) -> dict:
    """How exactly the VQ round trip keeps world images: codes equal to the cells' colours, images read right by
    the classifier (shape, colour, background, frame and style)."""
    from amused_tune.model.bases import decode_tokens
    from amused_tune.toy.classify import classify

    pixels = torch.from_numpy(world.to_array([world.render(s) for s in specs]))
    tokens = encode_images(vq, pixels)
    want = torch.stack([cell_ids(s) for s in specs])
    rec = decode_tokens(vq, tokens)
    found = [classify(r) for r in rec]
    read = [f.matches_with_style(world.caption(s)) and f.matches_with_frame(world.caption(s)) for f, s in zip(found, specs)]
    return {"codes_exact": float((tokens == want).all(-1).all(-1).float().mean()), "read_right": sum(read) / len(read),
            "max_pixel_error": float((rec - pixels).abs().max())}


# --------------------------------------------------------------------------------------------- U-ViT


def _optimizer(comps: Components, lr: float) -> torch.optim.Optimizer:
    """AdamW; no weight decay on the text encoder's embedding tables, so that words never seen in pretraining
    (held-out colours, the style's words) keep their own distinct random embeddings."""
    embeds = list(comps.text_encoder.text_model.embeddings.parameters())
    ids = {id(p) for p in embeds}
    rest = [p for p in [*comps.transformer.parameters(), *comps.text_encoder.parameters()] if id(p) not in ids]
    return torch.optim.AdamW([{"params": rest, "weight_decay": 0.01}, {"params": embeds, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.99))


def pretrain(comps: Components, captions: list[str], tokens: torch.Tensor, cfg: BuildConfig, seed: int = SEED,
             weights: torch.Tensor | None = None) -> float:
    """Train the U-ViT and the text encoder together on (caption, tokens [N, 8, 8]), drawing caption i with
    probability proportional to weights[i] (default: uniform); returns the final loss."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.ones(len(captions)) if weights is None else weights.float()
    tok = comps.tokenizer
    ids = tok(captions + [""], padding="max_length", truncation=True, max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    empty = ids[-1]
    micro = micro_conditioning(world.SIZE, world.SIZE)[None].expand(cfg.batch_size, 5)
    opt = _optimizer(comps, cfg.lr)
    steps = cfg.uvit_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    comps.transformer.train()
    comps.text_encoder.train()
    avg, t0 = None, time.time()
    for step in range(steps):
        idx = torch.multinomial(weights, cfg.batch_size, replacement=True, generator=g)
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.cond_dropout
        batch_ids = torch.where(drop[:, None], empty[None], ids[idx])
        out = comps.text_encoder(batch_ids, output_hidden_states=True)
        inp, mask = mask_tokens(tokens[idx], comps.mask_id, g)
        logits = comps.transformer(inp, micro_conds=micro, pooled_text_emb=out.text_embeds,
                                   encoder_hidden_states=out.hidden_states[-2])
        loss = masked_cross_entropy(logits, tokens[idx], mask, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for grp in opt.param_groups for p in grp["params"]], 1.0)
        opt.step()
        sched.step()
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if (step + 1) % 100 == 0:
            log(f"u-vit step {step + 1}/{steps} loss {avg:.4f} ({time.time() - t0:.0f}s)")
    for m in (comps.transformer, comps.text_encoder):
        m.eval().requires_grad_(False)
    return float(avg)


@torch.no_grad()
def caption_similarity(comps: Components, captions: list[str]) -> dict:
    """Cosine similarity of the captions' hidden states (what the U-ViT cross-attends to): mean and max over
    pairs of different captions, and the mean to the empty prompt."""
    hidden, _ = encode_prompts(comps.text_encoder, comps.tokenizer, captions + [""])
    flat = F.normalize(hidden.flatten(1), dim=1)
    sim = flat @ flat.T
    n = len(captions)
    off = sim[:n, :n][~torch.eye(n, dtype=torch.bool)]
    return {"mean": round(float(off.mean()), 3), "max": round(float(off.max()), 3),
            "to_empty": round(float(sim[:n, n].mean()), 3)}


# --------------------------------------------------------------------------------------------- build


def build(out: Path, cfg: BuildConfig) -> dict:
    """Build the toy pipeline from scratch into `out`; returns the build record (also in build_info.json)."""
    t0 = time.time()
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    out = Path(out)

    if cfg.vq_from:
        log(f"stage 1/4: VQ from {cfg.vq_from}")
        vq = VQModel.from_pretrained(Path(cfg.vq_from) / "vqvae").eval().requires_grad_(False)
    else:
        log(f"stage 1/4: VQ ({cfg.vq_steps} steps)")
        torch.manual_seed(SEED + 1)
        vq = train_vq(new_vqvae(), cfg.vq_steps, seed=SEED + 1)
    colours = tuple(world.PALETTE)[:-1]
    round_trip = vq_round_trip(vq, world.world_specs(colours) + world.world_specs(colours, style=True)
                               + world.framed_specs(colours))
    log(f"VQ round trip: {round_trip}")
    t_vq = time.time() - t0

    log("stage 2/4: the world's captions and tokens")
    plain, framed = world.world_specs(), world.framed_specs()
    specs = plain + framed
    captions = [world.caption(s) for s in specs]
    tokens = encode_images(vq, torch.from_numpy(world.to_array([world.render(s) for s in specs])))
    weights = torch.tensor([(1 - cfg.frame_share) / len(plain)] * len(plain) + [cfg.frame_share / len(framed)] * len(framed))

    log("stage 3/4: tokenizer and text encoder")
    torch.manual_seed(SEED + 2)
    tokenizer = build_toy_tokenizer()
    text_encoder = new_text_encoder(tokenizer)
    torch.nn.init.normal_(text_encoder.text_model.embeddings.token_embedding.weight, std=cfg.text_embed_std)
    torch.manual_seed(SEED + 3)
    comps = Components(new_transformer(cfg.res_blocks), vq, text_encoder, tokenizer, AmusedScheduler(mask_token_id=CODEBOOK))
    sim_before = caption_similarity(comps, captions[: len(plain)])

    log(f"stage 4/4: U-ViT + text encoder pretraining ({cfg.uvit_steps} steps of {cfg.batch_size})")
    t1 = time.time()
    loss = pretrain(comps, captions, tokens, cfg, seed=SEED + 4, weights=weights)
    t_uvit = time.time() - t1
    sim_after = caption_similarity(comps, captions[: len(plain)])
    log(f"caption-to-caption cosine similarity before {sim_before}, after {sim_after}")

    if out.exists():
        shutil.rmtree(out)
    comps.save_pretrained(out)
    build_s = time.time() - t0

    log("evaluation (guidance sweep, then the defaults)")
    from amused_tune.toy.evaluate import SWEEP, evaluate, write_sampling_defaults

    numbers = evaluate(comps, n_prompts=cfg.eval_prompts, scales=SWEEP, defaults=None, print_fn=log)
    best = numbers["defaults"]["guidance"]  # the best guidance > 1 of the sweep
    write_sampling_defaults(out, **numbers["defaults"])
    record = {
        "build_seconds": round(build_s, 1), "vq_seconds": round(t_vq, 1), "uvit_seconds": round(t_uvit, 1),
        "config": asdict(cfg), "uvit_final_loss": loss, "vq_round_trip": round_trip, "threads": torch.get_num_threads(),
        "caption_similarity": {"before": sim_before, "after": sim_after}, "default_guidance": best, **numbers,
    }
    (out / "build_info.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"wrote {out} in {build_s:.0f}s (+ evaluation)")
    return record
