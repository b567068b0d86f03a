"""The seed's two-stage LR / weight-decay schedule as pure functions of the step.

Steps are counted from 1 (step s is the s-th optimizer update), with B = the stage boundary:
  1 <= s <= W          warmup     lr = lr_peak * s / W             (step 1 uses lr_peak / W, never the peak)
  W <  s <= B          stage 1    lr linear lr_peak -> lr_stage1_end (reached at s = B),    wd = wd_stage1
  B <  s <= N          stage 2    lr linear lr_stage2_start (s = B+1) -> lr_end (s = N),   wd = wd_stage2
Training-tips paper (Ma et al. 2024): the LR drop and the weight-decay cut at mid-training are
what make ternary training settle; both happen between step B and step B + 1.
"""

from bitnet.train.config import TrainConfig


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * min(max(t, 0.0), 1.0)


def lr_at(step: int, cfg: TrainConfig, boundary: int) -> float:
    if step <= cfg.warmup_steps:
        return cfg.lr_peak * step / cfg.warmup_steps
    if step <= boundary:
        return _lerp(cfg.lr_peak, cfg.lr_stage1_end, (step - cfg.warmup_steps) / max(boundary - cfg.warmup_steps, 1))
    span = max(cfg.num_steps - boundary - 1, 1)
    return _lerp(cfg.lr_stage2_start, cfg.lr_end, (step - boundary - 1) / span)


def wd_at(step: int, cfg: TrainConfig, boundary: int) -> float:
    return cfg.wd_stage1 if step <= boundary else cfg.wd_stage2


def stage_at(step: int, boundary: int) -> int:
    return 1 if step <= boundary else 2
