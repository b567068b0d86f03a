"""Quant stats: exact ternary shares, gamma and activation stats on hand-made layers."""

import pytest
import torch
import torch.nn as nn

from bitnet.instrumentation.quant_stats import (QuantStatsHook, activation_stats, bitlinear_layers, group_of,
                                                group_stats, quant_row, weight_stats)
from bitnet.model import PRESETS, BitLinear, ModelConfig, Transformer


def test_weight_stats_exact():
    layer = BitLinear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0, 0.0, 0.0], [2.0, -0.2, 0.1, 0.3]]))
    # gamma = 4.6 / 8 = 0.575; W / gamma = [1.74, -1.74, 0, 0, 3.48, -0.35, 0.17, 0.52] -> [1, -1, 0, 0, 1, 0, 0, 1]
    stats = weight_stats([("l", layer)])["l"]
    assert stats["neg"] == 1 / 8 and stats["zero"] == 4 / 8 and stats["pos"] == 3 / 8
    assert stats["gamma"] == pytest.approx(0.575)
    assert stats["near_boundary"] == 1 / 8  # 0.3 / 0.575 = 0.522, within 0.05 of the 0.5 rounding edge
    assert stats["numel"] == 8


def test_activation_stats_exact_and_side_effect_free():
    model = nn.Sequential(BitLinear(4, 3))
    x = torch.tensor([[[1.0, -2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]]])  # (B=1, T=2, C=4)
    rng = torch.get_rng_state()
    stats = activation_stats(model, bitlinear_layers(model), x)["0"]
    # per-token absmax 2 and 3; RMS sqrt(5/4) and 3/2 -> ratios 1.789 and 2
    assert stats["act_absmax_mean"] == pytest.approx(2.5) and stats["act_absmax_max"] == pytest.approx(3.0)
    assert stats["act_outlier_ratio"] == pytest.approx((2 / (5 / 4) ** 0.5 + 2.0) / 2)
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert not model[0]._forward_pre_hooks  # the capture hooks are gone


def test_groups_pool_by_parameter_count():
    assert group_of("layers.3.self_attn.q_proj") == "attn" and group_of("layers.0.mlp.down_proj") == "ffn"
    rows = {"layers.0.self_attn.q_proj": {"neg": 0.2, "zero": 0.6, "pos": 0.2, "gamma": 1.0, "near_boundary": 0.0,
                                          "numel": 100},
            "layers.0.self_attn.o_proj": {"neg": 0.4, "zero": 0.2, "pos": 0.4, "gamma": 2.0, "near_boundary": 0.1,
                                          "numel": 300},
            "layers.0.mlp.up_proj": {"neg": 0.3, "zero": 0.4, "pos": 0.3, "gamma": 3.0, "near_boundary": 0.0,
                                     "numel": 50}}
    groups = group_stats(rows)
    assert groups["attn"]["zero"] == pytest.approx((0.6 * 100 + 0.2 * 300) / 400)
    assert groups["attn"]["gamma"] == pytest.approx((100 + 600) / 400) and groups["attn"]["numel"] == 400
    assert groups["ffn"]["zero"] == pytest.approx(0.4)


def test_quant_row_on_tiny_model():
    model = Transformer(PRESETS["tiny"])
    model.init_weights(seed=0)
    row = quant_row(model, torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0)))
    assert len(row["layers"]) == 14 and set(row["groups"]) == {"attn", "ffn"}
    # q, k and v read the same normed input, so their activation stats agree
    q, k = row["layers"]["layers.0.self_attn.q_proj"], row["layers"]["layers.0.self_attn.k_proj"]
    assert q["act_absmax_mean"] == k["act_absmax_mean"]


def test_full_precision_twin_writes_nothing(tmp_path):
    model = Transformer(ModelConfig(**{**PRESETS["tiny"].to_dict(), "quantization": "none"}))
    hook = QuantStatsHook(tmp_path, model, None, interval=1, num_steps=2)
    hook.on_train_start(type("S", (), {"step": 0, "tokens": 0})())
    hook.close()
    assert not (tmp_path / "metrics").exists()


def test_periodic_hooks_say_when_they_work(tmp_path):
    """works_at: the loop lets the GPU drain before exactly these steps, so step_ms keeps the steps' time."""
    from bitnet.instrumentation.base import Hook
    from bitnet.instrumentation.evaluation import EvalHook
    from bitnet.instrumentation.samples import SampleHook

    want = [5, 10, 12]
    evaluation = EvalHook(tmp_path, None, [], None, torch.device("cpu"), 5, 12)
    samples = SampleHook(tmp_path, None, None, [], 5, 12, 8, 0, None)
    for hook in (evaluation, samples):
        assert [s for s in range(1, 13) if hook.works_at(s)] == want
    assert not any(Hook().works_at(s) for s in range(1, 13))
