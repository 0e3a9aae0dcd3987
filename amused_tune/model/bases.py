"""Base components of aMUSEd: load them from the Hub or a folder, or build them in code.

`load_components(base)` is the one entry point. `base` is

- ``tiny``: a deterministic, randomly initialised aMUSEd small enough to train on a CPU in seconds
  (32 px images, an 8x8 token grid, 64 codes). Nothing is read from disk.
- ``toy``: the small pretrained aMUSEd shipped inside the package (see `amused_tune.toy`).
- a local pipeline folder (``transformer/``, ``vqvae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``).
- a Hub id such as ``amused/amused-256``, loaded through the normal Hugging Face cache.

`build_real_size(256 | 512)` builds random-weight models of the real sizes for benchmarks and memory checks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AmusedScheduler, UVit2DModel, VQModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from amused_tune.common import TOY_WEIGHTS_DIR, looks_local

AESTHETIC_SCORE = 6.0
SUBFOLDERS = ("transformer", "vqvae", "text_encoder", "tokenizer", "scheduler")


class BaseModelError(ValueError):
    """A base model that cannot be loaded; the message says what to pass instead."""


@dataclass
class Components:
    """The five parts of an aMUSEd pipeline."""

    transformer: UVit2DModel
    vqvae: VQModel
    text_encoder: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    scheduler: AmusedScheduler

    @property
    def mask_id(self) -> int:
        return int(self.scheduler.config.mask_token_id)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vqvae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The image size the transformer was built for, in pixels."""
        return int(self.transformer.config.sample_size) * self.vae_scale

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write a diffusers pipeline folder that `AmusedPipeline.from_pretrained` reads."""
        path = Path(path)
        for name in SUBFOLDERS:
            getattr(self, name).save_pretrained(path / name)
        (path / "model_index.json").write_text(
            '{\n  "_class_name": "AmusedPipeline",\n  "_diffusers_version": "0.42.1",\n'
            '  "scheduler": ["diffusers", "AmusedScheduler"],\n'
            '  "text_encoder": ["transformers", "CLIPTextModelWithProjection"],\n'
            '  "tokenizer": ["transformers", "CLIPTokenizer"],\n'
            '  "transformer": ["diffusers", "UVit2DModel"],\n'
            '  "vqvae": ["diffusers", "VQModel"]\n}\n'
        )


# --------------------------------------------------------------------------------------------- tiny model


def build_tiny_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer (no merges) over lowercase letters, digits and a little punctuation."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789[].,'-!?")
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab,
        merges=[],
        model_max_length=77,
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def tiny_text_encoder_config(tokenizer: CLIPTokenizer, hidden: int = 32, layers: int = 2) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny(seed: int = 0) -> Components:
    """A consistent, deterministic, randomly initialised aMUSEd: 32 px images, 8x8 tokens, 64 codes."""
    codebook = 64
    text_hidden = 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_tiny_tokenizer()
        text_encoder = CLIPTextModelWithProjection(tiny_text_encoder_config(tokenizer, text_hidden))
        vqvae = VQModel(
            block_out_channels=(16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1,
            latent_channels=8,
            num_vq_embeddings=codebook,
            norm_num_groups=8,
            sample_size=32,
            mid_block_add_attention=False,
            lookup_from_codebook=True,
            force_upcast=False,
        )
        transformer = UVit2DModel(
            hidden_size=64,
            cond_embed_dim=text_hidden,
            micro_cond_encode_dim=8,
            micro_cond_embed_dim=5 * 8,
            encoder_hidden_size=text_hidden,
            vocab_size=codebook + 1,
            codebook_size=codebook,
            in_channels=32,
            block_out_channels=64,
            num_res_blocks=1,
            block_num_heads=2,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            sample_size=8,
        )
    scheduler = AmusedScheduler(mask_token_id=codebook)
    return Components(transformer, vqvae, text_encoder, tokenizer, scheduler)


def build_real_size(resolution: int = 256, seed: int = 0) -> Components:
    """Random-weight models with the exact shapes of amused-256 / amused-512 (for benchmarks; no download).

    The tokenizer is the tiny character-level one: its ids are valid for the real CLIP-L/14 embedding table.
    """
    if resolution not in (256, 512):
        raise ValueError(f"real sizes exist for 256 and 512, not {resolution}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_tiny_tokenizer()
        text_encoder = CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                projection_dim=768,
                hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        vqvae = VQModel(
            block_out_channels=(128, 256, 256, 512, 768),
            down_block_types=("DownEncoderBlock2D",) * 5,
            up_block_types=("UpDecoderBlock2D",) * 5,
            layers_per_block=2,
            latent_channels=64,
            num_vq_embeddings=8192,
            norm_num_groups=32,
            sample_size=resolution,
            mid_block_add_attention=False,
            lookup_from_codebook=True,
            force_upcast=False,
        )
        big = resolution == 512
        transformer = UVit2DModel(sample_size=resolution // 16, downsample=big, upsample=big)
    scheduler = AmusedScheduler(mask_token_id=transformer.config.vocab_size - 1)
    return Components(transformer, vqvae, text_encoder, tokenizer, scheduler)


# --------------------------------------------------------------------------------------------- loading


def _load_folder(path: Path, dtype: torch.dtype | None = None) -> Components:
    """Load a pipeline folder; weights from safetensors only (pickle files can run code when loaded)."""
    kw = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        return Components(
            transformer=UVit2DModel.from_pretrained(path / "transformer", use_safetensors=True, **kw),
            vqvae=VQModel.from_pretrained(path / "vqvae", use_safetensors=True, **kw),
            text_encoder=CLIPTextModelWithProjection.from_pretrained(path / "text_encoder", use_safetensors=True, **kw),
            tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
            scheduler=AmusedScheduler.from_pretrained(path / "scheduler"),
        )
    except (OSError, EnvironmentError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BaseModelError(
            f"model.base={path} could not be loaded ({reason}); the kit reads .safetensors weights only: "
            "convert .bin files with diffusers' save_pretrained(safe_serialization=True)"
        ) from err


def missing_base(base: str, label: str = "model.base") -> str | None:
    """Why a base (`label`: model.base, --base) names a local folder that does not exist (one line), or None (tiny,
    toy, a folder, a Hub id)."""
    if base in ("tiny", "toy") or Path(base).expanduser().exists() or not looks_local(base):
        return None
    return f"{label}={base!r} does not exist: pass a local pipeline folder, a Hub id such as amused/amused-256, or 'tiny'"


def load_components(base: str, dtype: torch.dtype | None = None) -> Components:
    """Load the base model named by a recipe's `model.base` (see the module docstring)."""
    if base == "tiny":
        comps = build_tiny()
    elif base == "toy":
        if not (TOY_WEIGHTS_DIR / "transformer").is_dir():
            raise BaseModelError(f"model.base=toy: the toy weights are missing from {TOY_WEIGHTS_DIR}: rebuild them "
                                 "with `python -m amused_tune.toy build`")
        comps = _load_folder(TOY_WEIGHTS_DIR)
    else:
        path = Path(base).expanduser()
        if path.is_dir():
            missing = [s for s in SUBFOLDERS if not (path / s).is_dir()]
            if missing:
                raise BaseModelError(
                    f"model.base={base!r} is a folder but lacks {', '.join(missing)}/: pass an aMUSEd pipeline folder"
                )
            comps = _load_folder(path)
        elif missing_base(base):
            raise BaseModelError(missing_base(base))
        else:
            comps = _load_hub(base)
    check_mask_id(comps, base)
    if dtype is not None:
        for name in ("transformer", "vqvae", "text_encoder"):
            getattr(comps, name).to(dtype)
    return comps


def check_mask_id(comps: Components, base: str) -> None:
    """Training masks with the scheduler's `mask_token_id`, the sampler with the U-ViT's `vocab_size - 1`: a base
    where the two differ would train and sample with different mask tokens, so it is refused at load."""
    scheduler_id, vocab_id = comps.mask_id, int(comps.transformer.config.vocab_size) - 1
    if scheduler_id != vocab_id:
        raise BaseModelError(
            f"model.base={base}: scheduler mask_token_id={scheduler_id} but the transformer's mask token is "
            f"vocab_size - 1 = {vocab_id}: fix scheduler/scheduler_config.json (mask_token_id: {vocab_id})"
        )


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """The Hub endpoint when a quick connection to it (or to the proxy in HTTPS_PROXY) fails, else None. None too
    when HF_HUB_OFFLINE is set: then nothing is asked of the network anyway. Lets a lookup fail in seconds with
    one line instead of huggingface_hub's ~30 s of retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(k)),
                 None)
    url = urlparse(proxy or constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError:
        return constants.ENDPOINT
    return None


def _load_hub(repo_id: str) -> Components:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    unreachable = hub_unreachable()
    try:  # an unreachable Hub: the cache alone answers, at once
        local = snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"],
                                  local_files_only=bool(unreachable))
    except LocalEntryNotFoundError as err:
        why = (f"the Hub at {unreachable or constants.ENDPOINT} cannot be reached"
               if unreachable or not constants.HF_HUB_OFFLINE else "HF_HUB_OFFLINE is set")
        raise BaseModelError(
            f"model.base={repo_id!r} is not in the Hugging Face cache and {why}: download it once with "
            f"`hf download {repo_id} --local-dir DIR` and pass model.base=DIR"
        ) from err
    except Exception as err:  # repository not found, gated, network errors
        raise BaseModelError(f"model.base={repo_id!r} could not be loaded from the Hub: {err}") from err
    return _load_folder(Path(local))


# --------------------------------------------------------------------------------------------- encoders


@torch.no_grad()
def encode_prompts(
    text_encoder: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer, prompts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP conditioning as aMUSEd uses it: (penultimate hidden states [B, 77, D], pooled projection [B, P])."""
    device = next(text_encoder.parameters()).device
    ids = tokenizer(
        list(prompts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids.to(device)
    out = text_encoder(ids, return_dict=True, output_hidden_states=True)
    return out.hidden_states[-2], out.text_embeds


def text_conditioning(
    text_encoder: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer, input_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as `encode_prompts`, from token ids and with gradients (for text-encoder LoRA)."""
    out = text_encoder(input_ids, return_dict=True, output_hidden_states=True)
    return out.hidden_states[-2], out.text_embeds


@torch.no_grad()
def encode_images(vqvae: VQModel, pixels: torch.Tensor) -> torch.Tensor:
    """VQ token ids [B, h, w] of images in [0, 1] of shape [B, 3, H, W]."""
    param = next(vqvae.parameters())
    latents = vqvae.encode(pixels.to(param.device, param.dtype)).latents
    _, _, (_, _, indices) = vqvae.quantize(latents)
    b, _, h, w = latents.shape
    return indices.reshape(b, h, w).long()


@torch.no_grad()
def decode_tokens(vqvae: VQModel, tokens: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] of shape [B, 3, H, W] from token ids [B, h, w]."""
    b, h, w = tokens.shape
    out = vqvae.decode(
        tokens.to(next(vqvae.parameters()).device),
        force_not_quantize=True,
        shape=(b, h, w, vqvae.config.latent_channels),
    ).sample
    return out.clamp(0, 1)


def micro_conditioning(
    orig_width: float, orig_height: float, crop_top: float = 0, crop_left: float = 0, aesthetic: float = AESTHETIC_SCORE
) -> torch.Tensor:
    """The 5 micro-conditioning values in aMUSEd's order: [orig_width, orig_height, crop_top, crop_left, aesthetic]."""
    return torch.tensor([orig_width, orig_height, crop_top, crop_left, aesthetic], dtype=torch.float32)
