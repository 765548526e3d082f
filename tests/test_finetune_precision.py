"""bf16 autocast through a whole DMF step on the CPU (JVP and finite differences): finite, loss within 2% of fp32."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import randomize, tiny_config


def first_step(precision: str, derivative: str, tmp_path):
    from flowmap_convert.finetuning.recipe import Recipe
    from flowmap_convert.finetuning.trainer import Trainer
    from flowmap_convert.model import FlowMap

    torch.manual_seed(0)
    model = randomize(FlowMap(tiny_config(num_blocks=3)), std=0.05).with_depth(2)
    g = torch.Generator().manual_seed(0)
    data = torch.randn(16, 1, 16, 16, generator=g).clamp(-1, 1), torch.arange(16) % 10
    rec = Recipe(objective="dmf", derivative=derivative, precision=precision, mg_scale=0.5, batch_size=8, steps=1)
    tr = Trainer(model, data, rec, out=tmp_path / precision, device="cpu", progress=False)
    m = tr.train_step()
    grads = [p.detach().clone() for p in tr.trainable]  # zeroed after the step; compare the updated weights instead
    return tr, m, grads


@pytest.mark.parametrize("derivative", ["jvp", "fd"])
def test_bf16_autocast_dmf_step_is_finite_and_close_to_fp32(derivative, tmp_path):
    tr16, m16, w16 = first_step("bf16", derivative, tmp_path)
    tr32, m32, w32 = first_step("fp32", derivative, tmp_path)
    assert tr16.bf16 and not tr32.bf16
    assert not m16.get("skipped") and tr16.step == 1  # a real optimizer step, not a skipped one
    for k in ("loss", "grad_norm", "fm", "mf", "dudt"):
        assert math.isfinite(m16[k]), (k, m16)
    assert abs(m16["loss"] - m32["loss"]) <= 0.02 * abs(m32["loss"]), (m16["loss"], m32["loss"])
    assert abs(m16["grad_norm"] - m32["grad_norm"]) <= 0.1 * m32["grad_norm"], (m16, m32)
    assert all(torch.isfinite(w).all() for w in w16)
    assert any(not torch.equal(a, b) for a, b in zip(w16, w32))  # bf16 really ran: not bit-equal to fp32
