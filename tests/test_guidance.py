"""Guidance strategies and schedules, each against its formula; the sampler uses them step by step."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_with_random_lora

from amused_tune.sampling.guidance import (
    ClassifierFree,
    NoGuidance,
    Passes,
    SampleError,
    StyleDropGuidance,
    adapters_disabled,
    choose_guidance,
    guidance_scales,
)
from amused_tune.model.bases import build_tiny, micro_conditioning
from amused_tune.sampling.sampler import generate, step_plan

STEPS = [0, 1, 5, 10, 11]  # steps checked of T = 12


# --------------------------------------------------------------------------------------------- schedules


def test_constant_schedule_is_g_at_every_step():
    assert guidance_scales(4.0, 12, "constant") == [4.0] * 12


@pytest.mark.parametrize("g", [3.0, 7.5])
def test_linear_schedule_ramps_from_0_to_g(g):
    scales = guidance_scales(g, 12, "linear")
    for i in STEPS:
        assert scales[i] == pytest.approx(g * i / 11, abs=1e-12)
    assert scales[0] == 0.0 and scales[-1] == pytest.approx(g)
    assert guidance_scales(g, 4, "linear") == pytest.approx([0.0, g / 3, 2 * g / 3, g])


@pytest.mark.parametrize("g", [3.0, 7.5])
def test_cosine_schedule_follows_the_mask_schedule_up_to_g(g):
    scales = guidance_scales(g, 12, "cosine")
    ratios, _ = step_plan(12)  # share still masked after step i: cos((i + 1) / 12 * pi / 2)
    for i in STEPS:
        assert scales[i] == pytest.approx(g * math.cos((1 - (i + 1) / 12) * math.pi / 2), abs=1e-12)
        # = g * sin((i + 1) / T * pi / 2) = g * sqrt(1 - ratio_i ** 2)
        assert scales[i] == pytest.approx(g * math.sqrt(1 - ratios[i] ** 2), abs=1e-5)
    assert scales[0] == pytest.approx(g * math.sin(math.pi / 24)) and scales[-1] == pytest.approx(g)
    assert scales == sorted(scales)  # rises as tokens are decided


@pytest.mark.parametrize("g", [3.0, 7.5])
def test_ramp1_schedule_ramps_from_1_to_g(g):
    scales = guidance_scales(g, 12, "ramp1")
    for i in STEPS:
        assert scales[i] == pytest.approx(1 + (g - 1) * i / 11, abs=1e-12)
    assert scales[0] == 1.0 and scales[-1] == pytest.approx(g)


def test_one_step_ramps_give_g_and_unknown_schedule_is_an_error():
    for schedule in ("constant", "linear", "cosine", "ramp1"):
        assert guidance_scales(5.0, 1, schedule) == pytest.approx([5.0])
    with pytest.raises(SampleError, match="guidance_schedule must be one of constant, linear, cosine, ramp1"):
        guidance_scales(3.0, 12, "exponential")


def test_choose_guidance_picks_the_strategy():
    assert isinstance(choose_guidance(1.0, 12), NoGuidance)
    cfg = choose_guidance(3.0, 4, "linear")
    assert isinstance(cfg, ClassifierFree) and cfg.scales == pytest.approx((0.0, 1.0, 2.0, 3.0))
    sd = choose_guidance(10.0, 12, "cosine", styledrop=(2.0, 5.0))
    assert sd == StyleDropGuidance(2.0, 5.0)
    assert not NoGuidance.needs_uncond and ClassifierFree.needs_uncond and StyleDropGuidance.needs_uncond


# --------------------------------------------------------------------------------------------- strategies


class FixedPasses:
    """Stands in for the U-ViT: fixed conditional / unconditional logits."""

    def __init__(self, cond: torch.Tensor, uncond: torch.Tensor):
        self.c, self.u = cond, uncond

    def cond(self, tokens):
        return self.c

    def pair(self, tokens):
        return self.u, self.c


def test_classifier_free_combines_with_each_steps_scale():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 9, 3, 3, generator=g), torch.randn(2, 9, 3, 3, generator=g)
    passes = FixedPasses(cond, uncond)
    strategy = ClassifierFree(tuple(guidance_scales(6.0, 12, "cosine")))
    for i in STEPS:
        s = 6.0 * math.sin((i + 1) / 12 * math.pi / 2)
        torch.testing.assert_close(strategy.logits(passes, None, i), uncond + s * (cond - uncond))
    assert torch.equal(NoGuidance().logits(passes, None, 3), cond)


@pytest.fixture(scope="module")
def styled():
    comps = tiny_with_random_lora(seed=1)
    comps.transformer.eval()
    return comps


@torch.no_grad()
def test_styledrop_matches_its_formula_with_nonzero_lambdas(styled):
    from amused_tune.sampling.sampler import encode_texts, empty_prompt_embeds

    model = styled.transformer
    cond, uncond = encode_texts(styled, ["a cat", "a dog"]), empty_prompt_embeds(styled)
    micro = micro_conditioning(32, 32)
    passes = Passes(model, cond, uncond, micro, (8, 8), 2, torch.device("cpu"))
    tokens = torch.randint(0, 65, (2, 64), generator=torch.Generator().manual_seed(2))
    grid = tokens.reshape(2, 8, 8)

    def run(hidden, pooled):
        return model(grid, micro_conds=micro.expand(2, 5), pooled_text_emb=pooled.expand(2, -1),
                     encoder_hidden_states=hidden.expand(2, -1, -1)).float()

    adapter = run(*cond)
    with adapters_disabled(model):
        base, base_uncond = run(*cond), run(*uncond)
    assert not torch.allclose(adapter, base, atol=1e-3) and not torch.allclose(base, base_uncond, atol=1e-3)
    for la, lb in [(2.0, 5.0), (0.5, -1.0), (1.0, 0.0), (0.0, 3.0)]:
        got = StyleDropGuidance(la, lb).logits(passes, tokens, 0)
        expected = adapter + la * (adapter - base) + lb * (base - base_uncond)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # and the adapters are on again afterwards
    torch.testing.assert_close(run(*cond), adapter)


# --------------------------------------------------------------------------------------------- in the sampler


def record_scales(monkeypatch) -> list[float]:
    seen: list[float] = []
    original = ClassifierFree.combine

    def spy(uncond, cond, scale):
        seen.append(scale)
        return original(uncond, cond, scale)

    monkeypatch.setattr(ClassifierFree, "combine", staticmethod(spy))
    return seen


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine", "ramp1"])
def test_sampler_applies_each_steps_scale(monkeypatch, schedule):
    tiny = build_tiny()
    seen = record_scales(monkeypatch)
    generate(tiny, ["a cat"], [0], steps=5, guidance=4.0, guidance_schedule=schedule)
    assert seen == pytest.approx(guidance_scales(4.0, 5, schedule))
    seen.clear()  # variation at strength 0.4 runs the last 2 of 5 steps: their scales
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    generate(tiny, ["a cat"], [0], steps=5, guidance=4.0, guidance_schedule=schedule, image=image, strength=0.4)
    assert seen == pytest.approx(guidance_scales(4.0, 5, schedule)[3:])


def test_schedules_change_the_image_and_constant_is_the_default():
    tiny = build_tiny()
    default, _ = generate(tiny, ["a red dog on grass"], [3], guidance=6.0)
    constant, _ = generate(tiny, ["a red dog on grass"], [3], guidance=6.0, guidance_schedule="constant")
    linear, _ = generate(tiny, ["a red dog on grass"], [3], guidance=6.0, guidance_schedule="linear")
    assert torch.equal(default, constant) and not torch.equal(constant, linear)
    with pytest.raises(SampleError, match="guidance_schedule"):
        generate(tiny, ["a cat"], [0], guidance_schedule="warmup")
