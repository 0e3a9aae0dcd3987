"""model/lean.py: the lean LoRA linear and RMS norm give peft's and diffusers' results and gradients with fewer
operators; everything they do not cover keeps its own path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from amused_tune.model import lean
from amused_tune.model.adapters import attach_lora, set_adapter_scales
from amused_tune.model.bases import build_tiny
from conftest import tiny_uvit_inputs, tiny_with_random_lora


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def loss_and_grads(transformer, inputs=None):
    inputs = inputs or tiny_uvit_inputs()
    transformer.zero_grad(set_to_none=True)
    logits = transformer(**inputs)
    loss = (logits.float().square().mean() + logits.float().mean())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}
    return loss.detach(), logits.detach(), grads


def test_lean_uvit_gives_the_same_loss_logits_and_lora_gradients_with_fewer_operators():
    comps = tiny_with_random_lora()
    plain = comps.transformer.train()
    leaned = copy.deepcopy(plain)
    done = lean.make_lean(leaned)
    assert done["lora_linear"] == len([m for m in plain.modules() if type(m).__name__ == "Linear"
                                       and hasattr(m, "lora_A")])
    assert done["lora_linear"] > 0 and done["rms_norm"] == len([m for m in plain.modules()
                                                                if type(m).__name__ == "RMSNorm"])
    with CountOps() as before:
        loss0, logits0, grads0 = loss_and_grads(plain)
    with CountOps() as after:
        loss1, logits1, grads1 = loss_and_grads(leaned)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits1, logits0, rtol=1e-5, atol=1e-5)
    assert set(grads1) == set(grads0) and len(grads0) == 2 * done["lora_linear"]  # A and B of every LoRA
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6, msg=name)
    assert after.n < 0.85 * before.n, (after.n, before.n)  # the tiny model has few LoRA layers per norm and conv


def test_one_lean_lora_linear_takes_under_60_percent_of_pefts_operators_forward_and_backward():
    holder = torch.nn.Module()
    holder.to_q = torch.nn.Linear(24, 40, bias=False)
    attach_lora(holder, rank=4, alpha=8, targets=["to_q"])
    counts = []
    for leaned in (False, True):
        if leaned:
            lean.make_lean(holder)
        x = torch.randn(1, 5, 24, requires_grad=True)
        y = holder.to_q(x)
        g = torch.ones_like(y)
        with CountOps() as ops:
            y = holder.to_q(x)
            y.backward(g)
        counts.append(ops.n)
    assert counts[0] >= 38 and counts[1] <= 22, counts  # both with the 3 gradient accumulations (detach)


def test_lean_lora_linear_matches_peft_under_autocast_and_with_a_bias():
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.to_q = torch.nn.Linear(24, 40, bias=True)
    attach_lora(holder, rank=4, alpha=12, targets=["to_q"])
    torch.nn.init.normal_(holder.to_q.lora_B["default"].weight, std=0.1)
    leaned = copy.deepcopy(holder)
    lean.make_lean(leaned)
    x = torch.randn(2, 5, 24)
    for autocast in (False, True):
        outs = []
        for model in (holder, leaned):
            model.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = model.to_q(xi)
            y.float().sin().sum().backward()
            outs.append((y.detach().float(), xi.grad, model.to_q.lora_A["default"].weight.grad,
                         model.to_q.lora_B["default"].weight.grad, y.dtype))
        (y0, gx0, ga0, gb0, dt0), (y1, gx1, ga1, gb1, dt1) = outs
        assert dt0 == dt1 == (torch.bfloat16 if autocast else torch.float32)
        for got, want in ((y1, y0), (gx1, gx0), (ga1, ga0), (gb1, gb0)):  # bf16: within a few roundings of the largest
            atol = 2 ** -6 * want.abs().max().item() if autocast else 1e-5
            torch.testing.assert_close(got.float(), want.float(), rtol=0 if autocast else 1e-5, atol=atol)
        if autocast:  # one rounding of the LoRA product where peft's path rounds three times: no further from fp32
            fp32 = holder.to_q(x.bfloat16().float()).detach()
            assert (y1 - fp32).abs().max() <= (y0 - fp32).abs().max() * 1.5
        assert gb0.dtype == gb1.dtype == torch.float32  # the LoRA weights' gradients in their own dtype


def test_two_adapters_dropout_and_merged_layers_keep_peft_path():
    comps = build_tiny()
    model = comps.transformer
    attach_lora(model, rank=4, alpha=8, adapter_name="one")
    attach_lora(model, rank=2, alpha=2, adapter_name="two", dropout=0.1)
    model.eval()  # the dropout of "two" draws nothing: both paths are deterministic
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    inputs = tiny_uvit_inputs()
    with torch.no_grad():
        for scales in ({"one": 1.0}, {"one": 0.5, "two": 1.0}, {"two": 1.5}):
            set_adapter_scales(model, scales)
            want = model(**inputs)
            lean.make_lean(model)
            got = model(**inputs)
            lean.undo_lean(model)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not any("forward" in vars(m) for m in model.modules())  # undo_lean restored every module


def test_lean_rms_norm_gives_diffusers_values_and_gradients_also_for_the_weight():
    from diffusers.models.normalization import RMSNorm

    torch.manual_seed(0)
    for affine in (True, False):
        plain = RMSNorm(16, 1e-6, elementwise_affine=affine)
        if affine:
            torch.nn.init.normal_(plain.weight)
        leaned = copy.deepcopy(plain)
        assert lean.make_lean(torch.nn.Sequential(leaned))["rms_norm"] == 1
        x = torch.randn(2, 3, 16) * 3
        outs = []
        for norm in (plain, leaned):
            xi = x.clone().requires_grad_(True)
            y = norm(xi)
            (y * torch.linspace(-1, 2, 16)).sum().backward()
            outs.append((y.detach(), xi.grad, norm.weight.grad if affine else None))
        assert torch.equal(outs[1][0], outs[0][0])  # the forward: diffusers' operations in its order
        torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-6)
        if affine:
            torch.testing.assert_close(outs[1][2], outs[0][2], rtol=1e-5, atol=1e-6)
    if lean.FUSED_RMS_NORM:  # the CUDA path's operator, run here on the CPU: the same values
        torch.testing.assert_close(torch.ops.aten._fused_rms_norm(x, [16], plain.weight, 1e-6)[0],
                                   RMSNorm.forward(plain, x), rtol=1e-6, atol=1e-6)


def test_lean_rms_norm_leaves_a_norm_with_a_bias_or_another_dtype_alone():
    from diffusers.models.normalization import RMSNorm

    norm = RMSNorm(16, 1e-6, bias=True)
    holder = torch.nn.Sequential(norm)
    lean.make_lean(holder)
    x = torch.randn(3, 16)
    torch.testing.assert_close(norm(x), RMSNorm.forward(norm, x))
    plain = RMSNorm(16, 1e-6)
    torch.nn.init.normal_(plain.weight)
    lean.make_lean(torch.nn.Sequential(plain))
    torch.testing.assert_close(plain(x), RMSNorm.forward(plain, x), rtol=1e-6, atol=1e-6)
    xb = x.bfloat16()  # bf16 input, fp32 weight: diffusers' own path (its result is fp32)
    assert plain(xb).dtype == RMSNorm.forward(plain, xb).dtype == torch.float32
