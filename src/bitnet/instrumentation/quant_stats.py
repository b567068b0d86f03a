"""Ternary health every N steps (and at the first and last step) to metrics/quant.jsonl.

Per BitLinear layer: shares of -1 / 0 / +1 in the quantized weights, gamma = mean|W| (the absmean
scale), the share of latent weights within 0.05 of a rounding boundary (|W / gamma| near 0.5: the
ones about to flip), and activation-scale stats measured on one fixed batch of the frozen eval set
through forward pre-hooks: per-token absmax of the BitLinear input (what sets the int8 scale
127 / absmax), its mean and max over tokens, and the mean absmax / RMS ratio (outliers waste int8
levels). Where the preceding norm already quantized that input, its absmax is unchanged by the
quantization (the largest entry maps to exactly +-127 / s) and its RMS nearly so. Attention (q/k/v/o) and FFN (gate/up/down) layers are also pooled by parameter count.
One forward of a few sequences and one host sync per call: negligible at a 1000-step interval.
"""

import contextlib
import time
from pathlib import Path

import torch

from bitnet.instrumentation.base import Hook, due
from bitnet.model.bitlinear import EPS, BitLinear
from bitnet.run import layout
from bitnet.run.jsonl import JsonlWriter

WEIGHT_KEYS = ("neg", "zero", "pos", "gamma", "near_boundary")
ACT_KEYS = ("act_absmax_mean", "act_absmax_max", "act_outlier_ratio")
BOUNDARY_BAND = 0.05


def bitlinear_layers(model) -> list[tuple[str, BitLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BitLinear)]


def group_of(name: str) -> str:
    """'attn' for attention projections, 'ffn' for the MLP's, 'other' for anything else."""
    if ".self_attn." in f".{name}.":
        return "attn"
    if ".mlp." in f".{name}.":
        return "ffn"
    return "other"


@torch.no_grad()
def weight_stats(layers: list[tuple[str, BitLinear]]) -> dict[str, dict]:
    rows = []
    for _, layer in layers:
        w_t, s = layer.ternary_weight()  # int8 in {-1, 0, 1}, scale 1 / max(mean|W|, eps)
        w = layer.weight.float()
        near = ((w * s).abs() - 0.5).abs() < BOUNDARY_BAND
        rows.append(torch.stack([(w_t < 0).float().mean(), (w_t == 0).float().mean(), (w_t > 0).float().mean(),
                                 w.abs().mean(), near.float().mean()]))
    values = torch.stack(rows).tolist() if rows else []  # host sync: one per quant interval
    return {name: {**dict(zip(WEIGHT_KEYS, v)), "numel": layer.weight.numel()}
            for (name, layer), v in zip(layers, values)}


@torch.no_grad()
def activation_stats(model, layers: list[tuple[str, BitLinear]], x: torch.Tensor,
                     autocast=contextlib.nullcontext) -> dict[str, dict]:
    """Input statistics of every BitLinear on one forward of `x` (uses no RNG, changes no state)."""
    captured = {}

    def capture(name):
        def pre_hook(module, args):
            a = args[0].detach().float()
            absmax = a.abs().amax(-1).clamp(min=EPS)  # (B, T): per-token absmax, as activation_quant uses
            rms = a.pow(2).mean(-1).sqrt().clamp(min=EPS)
            captured[name] = torch.stack([absmax.mean(), absmax.max(), (absmax / rms).mean()])
        return pre_hook

    handles = [layer.register_forward_pre_hook(capture(name)) for name, layer in layers]
    was_training = model.training
    model.eval()
    try:
        with autocast():
            model(x.to(next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    names = [name for name, _ in layers if name in captured]
    values = torch.stack([captured[n] for n in names]).tolist() if names else []  # host sync
    return {name: dict(zip(ACT_KEYS, v)) for name, v in zip(names, values)}


def group_stats(layer_rows: dict[str, dict]) -> dict[str, dict]:
    """Shares and gamma pooled over each group's weights (weighted by parameter count)."""
    groups = {}
    for name, row in layer_rows.items():
        g = groups.setdefault(group_of(name), {k: 0.0 for k in WEIGHT_KEYS} | {"numel": 0})
        for k in WEIGHT_KEYS:
            g[k] += row[k] * row["numel"]
        g["numel"] += row["numel"]
    return {name: {k: g[k] / g["numel"] for k in WEIGHT_KEYS} | {"numel": g["numel"]} for name, g in groups.items()}


def quant_row(model, x: torch.Tensor | None, autocast=contextlib.nullcontext) -> dict:
    """{"layers": {name: {...}}, "groups": {"attn": {...}, "ffn": {...}}} for the model's BitLinear layers."""
    layers = bitlinear_layers(model)
    rows = weight_stats(layers)
    if x is not None:
        for name, act in activation_stats(model, layers, x, autocast).items():
            rows[name].update(act)
    return {"layers": rows, "groups": group_stats(rows)}


class QuantStatsHook(Hook):
    """Writes a quant.jsonl row at the start, every `interval` steps and at the last step.

    anomalies: an object with check_ternary(state, layers) (the AnomalyHook), told of every row.
    """

    def __init__(self, run_dir: Path, model, batch: torch.Tensor | None, interval: int, num_steps: int,
                 autocast=contextlib.nullcontext, anomalies=None):
        self.model, self.batch, self.autocast, self.anomalies = model, batch, autocast, anomalies
        self.interval, self.num_steps = interval, num_steps
        self.enabled = bool(bitlinear_layers(model))  # the full-precision twin has nothing to report
        self.writer = JsonlWriter(Path(run_dir) / layout.QUANT) if self.enabled else None
        self.last = None

    def record(self, state) -> None:
        row = quant_row(self.model, self.batch, self.autocast)
        self.last = {"step": state.step, "tokens": state.tokens, "time": time.time(), **row}
        self.writer.write(self.last)
        if self.anomalies is not None:
            self.anomalies.check_ternary(state, row["layers"])

    def on_train_start(self, state):
        if self.enabled:
            self.record(state)

    def works_at(self, step):
        return self.enabled and due(step, self.interval, self.num_steps)

    def on_step_end(self, state, out):
        if self.works_at(state.step):
            self.record(state)

    def close(self):
        if self.writer is not None:
            self.writer.close()
