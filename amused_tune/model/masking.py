"""The MaskGIT masking schedule and loss, shared by the trainer and the sampler.

Training (aMUSEd paper, section 3): draw r ~ U(0, 1) per image, mask a fraction max(cos(r * pi / 2), min_rate) of
its tokens (at least one), replace them with the mask id, and take the cross-entropy on the masked positions only,
optionally label-smoothed. Sampling walks the same schedule from t = 0 (all masked) to t = 1 (none masked).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cosine_schedule(r: torch.Tensor) -> torch.Tensor:
    """Fraction of tokens masked at progress r in [0, 1]: 1 at r = 0, 0 at r = 1."""
    return torch.cos(r * math.pi / 2)


def linear_schedule(r: torch.Tensor) -> torch.Tensor:
    return 1 - r


SCHEDULES = {"cosine": cosine_schedule, "linear": linear_schedule}


def masking_rate(r: torch.Tensor, min_masking_rate: float = 0.0, max_masking_rate: float = 1.0) -> torch.Tensor:
    """The fraction of an image's tokens masked for a draw r ~ U(0, 1): cos(r pi / 2), raised to at least
    `min_masking_rate` (diffusers' aMUSEd trainer clips the cosine rate from below the same way, so a share
    P(cos(r pi / 2) < m) = 1 - 2 acos(m) / pi of the images is masked at exactly m) and lowered to at most
    `max_masking_rate` (a share 2 acos(M) / pi of the images is masked at exactly M)."""
    return cosine_schedule(r).clamp(min=min_masking_rate, max=max_masking_rate)


def mask_tokens(
    tokens: torch.Tensor, mask_id: int, generator: torch.Generator | None = None, min_masking_rate: float = 0.0,
    max_masking_rate: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask a cos(r*pi/2) fraction of each image's tokens, r ~ U(0, 1), clamped to [min_masking_rate,
    max_masking_rate]; at least one token.

    tokens: [B, h, w] VQ ids. Returns (input_ids with mask_id at masked positions, bool mask [B, h, w]).
    Draws come from `generator` on the CPU, image by image (its r, then a score per token; the tokens with the
    lowest scores are masked), so an image's mask depends only on the generator's state when its turn comes: batch 4
    and four batches of 1 draw the same masks. The bounds change no draw: an image whose cosine rate is already
    within them gets the same mask as without them. No value is read back to the host: the whole batch is a few
    tensor operations, whatever its size.
    """
    b, h, w = tokens.shape
    n = h * w
    draws = torch.rand(b, 1 + n, generator=generator)  # row by row: r, then n scores (the draws of one image)
    num_masked = (masking_rate(draws[:, :1], min_masking_rate, max_masking_rate) * n).round().clamp(min=1, max=n)
    order = draws[:, 1:].argsort(dim=1)  # tokens by score; the first num_masked of each row are masked
    first = torch.arange(n).expand(b, n) < num_masked
    mask = torch.zeros(b, n, dtype=torch.bool).scatter_(1, order, first).view(b, h, w).to(tokens.device)
    input_ids = torch.where(mask, mask_id, tokens)
    return input_ids, mask


def masked_cross_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy on masked positions: the mean over each image's masked tokens, then the mean over images.

    logits: [B, V, h, w] (UVit2DModel output); tokens, mask: [B, h, w]. Averaging per image first makes the loss
    of a batch of B the mean of B per-image losses, so batch B x accumulation 1 and batch 1 x accumulation B give
    the same gradient (a token-level mean would weight images by how many of their tokens were masked).
    `label_smoothing` e is `F.cross_entropy`'s: each masked token's target is (1 - e) on its code plus e / V on
    every code, i.e. its loss is (1 - e) * (-log p[code]) + e * mean over the V codes of (-log p).
    """
    # [B, V, h*w] is a view of the logits: the cross-entropy reads the class dimension in place (no transposed
    # copy of B x V x h x w values; fp32 logits are not copied at all)
    per_token = F.cross_entropy(
        logits.flatten(2).float(), tokens.flatten(1), reduction="none", label_smoothing=label_smoothing,
    ).reshape(mask.shape)
    m = mask.float()
    per_image = (per_token * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp(min=1)
    return per_image.mean()
