"""fused_projections: q/k/v and gate/up as one matmul compute what the separate projections compute."""

import pytest
import torch
import torch.nn as nn

from bitnet.model import ModelConfig, Transformer
from bitnet.model import llama
from bitnet.model.bitlinear import BitLinear, fused_projections

TINY = dict(vocab_size=101, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16)


def _loss_and_grads(model, idx):
    model.zero_grad(set_to_none=True)
    logits = model(idx)
    loss = logits.float().square().mean()
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("quantization", ["bitnet", "none"])
def test_fused_model_matches_per_module_forward_and_grads(quantization, monkeypatch):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY, quantization=quantization))
    model.init_weights(seed=0)
    idx = torch.randint(0, 101, (3, 16))
    monkeypatch.setattr(llama, "FUSED_PROJECTIONS", frozenset())
    ref_logits, ref_grads = _loss_and_grads(model, idx)
    monkeypatch.setattr(llama, "FUSED_PROJECTIONS", frozenset({"qkv", "gate_up"}))
    calls = []
    monkeypatch.setattr(llama, "fused_projections", lambda x, ls: calls.append(len(ls)) or fused_projections(x, ls))
    logits, grads = _loss_and_grads(model, idx)
    assert calls == [3, 2] * TINY["n_layers"]  # q/k/v and gate/up fused in every block
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_default_fuses_qkv_only(monkeypatch):
    model = Transformer(ModelConfig(**TINY))
    calls = []
    monkeypatch.setattr(llama, "fused_projections", lambda x, ls: calls.append(len(ls)) or fused_projections(x, ls))
    model(torch.randint(0, 101, (1, 8))).sum().backward()
    assert calls == [3] * TINY["n_layers"]


def test_each_bitlinear_keeps_its_own_scale():
    torch.manual_seed(0)
    a, b = BitLinear(8, 4, quantized_input=True), BitLinear(8, 6, quantized_input=True)
    with torch.no_grad():
        b.weight.mul_(100.0)  # a scale 100x a's: one shared absmean would zero most of a
    x = torch.randn(5, 8)
    ya, yb = fused_projections(x, [a, b])
    assert ya.shape == (5, 4) and yb.shape == (5, 6)
    torch.testing.assert_close(ya, a(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(yb, b(x), rtol=1e-5, atol=1e-6)


def test_no_grad_and_hooked_projections_call_each_module(monkeypatch):
    model = Transformer(ModelConfig(**TINY))
    seen = []
    monkeypatch.setattr(llama, "FUSED_PROJECTIONS", frozenset({"qkv", "gate_up"}))
    model.layers[0].self_attn.k_proj.register_forward_pre_hook(lambda m, args: seen.append("k"))
    model.layers[1].mlp.up_proj.register_forward_pre_hook(lambda m, args: seen.append("up"))
    idx = torch.randint(0, 101, (1, 8))
    model(idx).sum().backward()  # autograd on, but hooked modules must see their input
    assert seen == ["k", "up"]
    monkeypatch.setattr(llama, "fused_projections", lambda *a: pytest.fail("fused without autograd"))
    with torch.no_grad():
        model(idx)
    assert seen == ["k", "up", "k", "up"]


def test_rejects_biased_or_unquantized_inputs():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="bias-free"):
        fused_projections(x, [nn.Linear(8, 4), nn.Linear(8, 4, bias=False)])
    with pytest.raises(ValueError, match="quantized input"):
        fused_projections(x, [BitLinear(8, 4), BitLinear(8, 4, quantized_input=True)])


def test_state_dict_names_unchanged():
    names = set(Transformer(ModelConfig(**TINY)).state_dict())
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert f"layers.0.self_attn.{proj}.weight" in names
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert f"layers.1.mlp.{proj}.weight" in names
