"""The training objective's two MUSE levers: label smoothing and the minimum masking rate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from amused_tune.model.masking import mask_tokens, masked_cross_entropy, masking_rate
from amused_tune.recipe import Recipe, RecipeError


def smoothed_ce(logits_row: torch.Tensor, target: int, eps: float) -> float:
    """(1 - eps) * -log p[target] + eps * mean_c(-log p[c]), written out."""
    logp = logits_row.double().log_softmax(-1)
    return float((1 - eps) * -logp[target] + eps * -logp.mean())


# --------------------------------------------------------------------------------------------- label smoothing


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_label_smoothing_matches_its_formula_per_masked_token(eps):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 7, 2, 3, generator=g) * 3
    tokens = torch.randint(0, 7, (1, 2, 3), generator=g)
    mask = torch.tensor([[[True, False, True], [False, False, True]]])
    positions = [(0, 0), (0, 2), (1, 2)]
    expected = sum(smoothed_ce(logits[0, :, i, j], int(tokens[0, i, j]), eps) for i, j in positions) / 3
    got = masked_cross_entropy(logits, tokens, mask, label_smoothing=eps)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # and it is exactly what torch's own smoothed cross-entropy gives on those tokens
    rows = torch.stack([logits[0, :, i, j] for i, j in positions])
    targets = torch.stack([tokens[0, i, j] for i, j in positions])
    assert got.item() == pytest.approx(F.cross_entropy(rows, targets, label_smoothing=eps).item(), rel=1e-6)


def test_label_smoothing_keeps_per_image_averaging():
    """Image 0 has 1 masked token, image 1 has 3: the loss is the mean of the two per-image means."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 2, 2, generator=g)
    tokens = torch.randint(0, 5, (2, 2, 2), generator=g)
    mask = torch.tensor([[[True, False], [False, False]], [[True, True], [True, False]]])
    eps = 0.2
    img0 = smoothed_ce(logits[0, :, 0, 0], int(tokens[0, 0, 0]), eps)
    img1 = sum(smoothed_ce(logits[1, :, i, j], int(tokens[1, i, j]), eps) for i, j in [(0, 0), (0, 1), (1, 0)]) / 3
    got = masked_cross_entropy(logits, tokens, mask, label_smoothing=eps)
    assert got.item() == pytest.approx((img0 + img1) / 2, rel=1e-5)
    assert got.item() != pytest.approx(masked_cross_entropy(logits, tokens, mask).item(), rel=1e-3)


def test_smoothing_penalises_a_confident_correct_prediction():
    logits = torch.full((1, 4, 1, 1), -20.0)
    logits[0, 2] = 20.0  # p(code 2) ~ 1
    tokens, mask = torch.full((1, 1, 1), 2), torch.ones(1, 1, 1, dtype=torch.bool)
    assert masked_cross_entropy(logits, tokens, mask).item() < 1e-6
    # e = 0.1: 0.1 * mean(-log p) = 0.1 * (3 * 40) / 4 = 3.0
    assert masked_cross_entropy(logits, tokens, mask, label_smoothing=0.1).item() == pytest.approx(3.0, rel=1e-4)


# --------------------------------------------------------------------------------------------- minimum masking rate


def test_masking_rate_is_the_cosine_rate_clipped_from_below():
    r = torch.tensor([0.0, 0.5, 2 / 3, 0.9, 0.999])
    assert masking_rate(r).tolist() == pytest.approx([1.0, math.cos(math.pi / 4), 0.5, math.cos(0.45 * math.pi),
                                                      math.cos(0.4995 * math.pi)], abs=1e-6)
    assert masking_rate(r, 0.5).tolist() == pytest.approx([1.0, math.cos(math.pi / 4), 0.5, 0.5, 0.5], abs=1e-6)


def test_min_masking_rate_raises_low_draws_and_keeps_the_rest():
    tokens = torch.zeros(3000, 4, 4, dtype=torch.long)
    _, plain = mask_tokens(tokens, 99, torch.Generator().manual_seed(0))
    _, floored = mask_tokens(tokens, 99, torch.Generator().manual_seed(0), min_masking_rate=0.5)
    n_plain, n_floor = plain.flatten(1).sum(1), floored.flatten(1).sum(1)
    assert int(n_floor.min()) == 8  # round(16 * 0.5)
    # images the cosine already masked more than 8 of 16 of: the same draws, the same masks
    above = n_plain > 8
    assert torch.equal(floored[above], plain[above])
    # the others are raised to exactly 8: round(16 max(cos(r pi/2), 0.5)) = 8 <=> cos(r pi/2) < 8.5/16
    assert bool((n_floor[n_plain < 8] == 8).all())
    share_at_8 = 1 - 2 * math.acos(8.5 / 16) / math.pi  # 0.356 (0.333 below the floor + the rounding band)
    assert (n_floor == 8).float().mean().item() == pytest.approx(share_at_8, abs=0.025)
    # mean masked share: E[max(cos(r pi/2), 0.5)] = (2/pi) sin(pi/3) + 0.5 / 3
    expected = 2 / math.pi * math.sin(math.pi / 3) + 0.5 / 3
    assert (n_floor.float() / 16).mean().item() == pytest.approx(expected, abs=0.015)


def test_max_masking_rate_lowers_high_draws_and_keeps_the_rest():
    tokens = torch.zeros(3000, 4, 4, dtype=torch.long)
    _, plain = mask_tokens(tokens, 99, torch.Generator().manual_seed(0))
    _, capped = mask_tokens(tokens, 99, torch.Generator().manual_seed(0), max_masking_rate=0.5)
    n_plain, n_cap = plain.flatten(1).sum(1), capped.flatten(1).sum(1)
    assert int(n_plain.max()) == 16 and int(n_cap.max()) == 8  # round(16 * 0.5)
    below = n_plain < 8  # the cosine masked fewer: the same draws, the same masks
    assert torch.equal(capped[below], plain[below])
    assert bool((n_cap[n_plain > 8] == 8).all())
    # round(16 min(cos(r pi/2), 0.5)) = 8 <=> cos(r pi/2) >= 7.5/16
    assert (n_cap == 8).float().mean().item() == pytest.approx(2 * math.acos(7.5 / 16) / math.pi, abs=0.025)


def test_recipe_refuses_out_of_range_objective_values():
    for key, value in (("label_smoothing", 1.0), ("label_smoothing", -0.1), ("min_masking_rate", 1.5),
                       ("min_masking_rate", -0.2), ("max_masking_rate", 0.0), ("max_masking_rate", 1.5)):
        recipe = Recipe()
        setattr(recipe.train, key, value)
        with pytest.raises(RecipeError, match=f"train.{key}"):
            recipe.resolve().validate()
    recipe = Recipe()
    recipe.train.min_masking_rate, recipe.train.max_masking_rate = 0.6, 0.5
    with pytest.raises(RecipeError, match="train.max_masking_rate must be in .* >= train.min_masking_rate"):
        recipe.resolve().validate()
    recipe = Recipe()
    recipe.train.label_smoothing, recipe.train.min_masking_rate, recipe.train.max_masking_rate = 0.1, 0.3, 0.5
    assert recipe.resolve().validate().train.label_smoothing == 0.1


def test_trainer_passes_both_levers_to_the_objective(tmp_path, image_folder, monkeypatch):
    from amused_tune.model.bases import build_tiny
    from amused_tune.recipe import AdapterConfig, DataConfig, ModelConfig, OutputConfig, TrainConfig
    from amused_tune.train import loop, step

    seen = {}
    real_mask, real_loss = step.mask_tokens, step.masked_cross_entropy  # the objective's one call site

    def mask_spy(tokens, mask_id, generator, min_masking_rate=0.0, max_masking_rate=1.0):
        seen["min_masking_rate"], seen["max_masking_rate"] = min_masking_rate, max_masking_rate
        return real_mask(tokens, mask_id, generator, min_masking_rate, max_masking_rate)

    def loss_spy(logits, tokens, mask, label_smoothing=0.0):
        seen["label_smoothing"] = label_smoothing
        seen["masked_share"] = mask.float().mean().item()
        return real_loss(logits, tokens, mask, label_smoothing)

    monkeypatch.setattr(step, "mask_tokens", mask_spy)
    monkeypatch.setattr(step, "masked_cross_entropy", loss_spy)
    recipe = Recipe(model=ModelConfig(base="tiny"), data=DataConfig(source="imagefolder", path=str(image_folder),
                                                                    cache=False),
                    adapter=AdapterConfig(kind="lora", rank=4), output=OutputConfig(dir=str(tmp_path / "run"),
                                                                                    loss_plot=False),
                    train=TrainConfig(batch_size=2, max_steps=1, precision="fp32", label_smoothing=0.2,
                                      min_masking_rate=0.9, max_masking_rate=0.95))
    loop.train(recipe, components=build_tiny())
    assert seen["label_smoothing"] == 0.2 and seen["min_masking_rate"] == 0.9 and seen["max_masking_rate"] == 0.95
    assert 58 / 64 <= seen["masked_share"] <= 61 / 64  # round(64 * 0.9) = 58 .. round(64 * 0.95) = 61 of 8x8 tokens


def test_masks_are_each_images_lowest_scores_drawn_without_reading_a_value_back():
    """Per image, in generator order: r, then one score per token; the round(rate * n) lowest scores are masked.
    The whole batch is tensor operations: no `.item()` (a wait for the device on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Syncs(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Syncs.n += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    tokens = torch.randint(0, 99, (3, 8, 8), generator=torch.Generator().manual_seed(1))
    with Syncs():
        input_ids, mask = mask_tokens(tokens, 99, torch.Generator().manual_seed(5), min_masking_rate=0.1)
    assert Syncs.n == 0
    g = torch.Generator().manual_seed(5)
    for b in range(3):  # the definition, image by image
        r = torch.rand(1, generator=g)
        k = int((masking_rate(r, 0.1) * 64).round().clamp(1, 64))
        scores = torch.rand(64, generator=g)
        expected = torch.zeros(64, dtype=torch.bool)
        expected[scores.argsort()[:k]] = True
        assert torch.equal(mask[b].flatten(), expected) and int(mask[b].sum()) == k
    assert torch.equal(input_ids, torch.where(mask, 99, tokens))
