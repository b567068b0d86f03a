"""The two-stage LR / WD schedule: formula values at the named points, and what the optimizer sees."""

import pytest
import torch

from bitnet.model import PRESETS, Transformer
from bitnet.train.config import TrainConfig, resolve_derived
from bitnet.train.optim import build_optimizer, set_schedule
from bitnet.train.schedule import lr_at, wd_at

CFG = TrainConfig(num_steps=400_000)
B = resolve_derived(CFG, 1, 1024)["stage_boundary_step"]


def test_boundary_is_half_of_the_steps():
    assert B == 200_000


@pytest.mark.parametrize("step,expected", [
    (1, 1.5e-3 / 375),                                   # first step: first warmup value, not the peak
    (375, 1.5e-3),                                       # end of warmup
    (375 + (B - 375) // 2, None),                        # mid stage 1 (checked below)
    (B - 1, 1.0e-3 + 0.5e-3 / (B - 375)),                # boundary - 1
    (B, 1.0e-3),                                         # last stage-1 step
    (B + 1, 1.0e-3),                                     # first stage-2 step
    (400_000, 1.5e-5),                                   # end
])
def test_lr_formula(step, expected):
    if expected is None:
        t = (step - 375) / (B - 375)
        expected = 1.5e-3 + (1.0e-3 - 1.5e-3) * t
    assert lr_at(step, CFG, B) == pytest.approx(expected, rel=1e-12)


def test_lr_is_monotone_in_each_stage_and_wd_switches_exactly():
    stage1 = [lr_at(s, CFG, B) for s in range(376, B + 1, 997)]
    stage2 = [lr_at(s, CFG, B) for s in range(B + 1, 400_001, 997)]
    assert all(a >= b for a, b in zip(stage1, stage1[1:]))
    assert all(a >= b for a, b in zip(stage2, stage2[1:]))
    assert wd_at(1, CFG, B) == wd_at(B, CFG, B) == 0.1
    assert wd_at(B + 1, CFG, B) == wd_at(400_000, CFG, B) == 0.0


def test_optimizer_groups_follow_the_schedule():
    model = Transformer(PRESETS["tiny"])
    opt = build_optimizer(model, CFG, fused=False)
    decay, no_decay = opt.param_groups
    assert all(p.dim() == 2 for p in decay["params"])
    assert model.embed_tokens.weight in no_decay["params"]  # embeddings (and the tied head) not decayed
    assert all(p.dim() == 1 for p in no_decay["params"] if p is not model.embed_tokens.weight)
    set_schedule(opt, lr_at(B, CFG, B), wd_at(B, CFG, B))
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    set_schedule(opt, lr_at(B + 1, CFG, B), wd_at(B + 1, CFG, B))
    assert decay["weight_decay"] == 0.0 and no_decay["weight_decay"] == 0.0
    assert decay["lr"] == no_decay["lr"] == pytest.approx(1.0e-3)


def test_every_schedule_number_is_configurable():
    cfg = TrainConfig(num_steps=100, warmup_steps=10, lr_peak=2e-3, lr_stage1_end=1e-3, lr_stage2_start=5e-4,
                      lr_end=0.0, stage_boundary=0.6, wd_stage1=0.05, wd_stage2=0.01)
    b = resolve_derived(cfg, 1, 1024)["stage_boundary_step"]
    assert b == 60
    assert lr_at(10, cfg, b) == pytest.approx(2e-3)
    assert lr_at(60, cfg, b) == pytest.approx(1e-3)
    assert lr_at(61, cfg, b) == pytest.approx(5e-4)
    assert lr_at(100, cfg, b) == pytest.approx(0.0)
    assert (wd_at(60, cfg, b), wd_at(61, cfg, b)) == (0.05, 0.01)
