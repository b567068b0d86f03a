"""BitLinear: ternary weights, 256-level activations, STE gradients, integer-arithmetic parity."""

import pytest
import torch

from bitnet.model import bitlinear
from bitnet.model.bitlinear import BitLinear, activation_quant, activation_scale, weight_quant, weight_scale


def test_weights_are_ternary_times_one_scale():
    torch.manual_seed(0)
    w = torch.randn(48, 96) * 0.02
    wq = weight_quant(w)
    gamma = w.abs().mean()
    levels = torch.unique(wq)
    assert len(levels) == 3
    torch.testing.assert_close(levels, torch.tensor([-1.0, 0.0, 1.0]) * gamma)


def test_activation_has_at_most_256_levels_per_token_and_keeps_the_max():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 1000) * 3
    xq = activation_quant(x)
    for row_x, row_q in zip(x.reshape(-1, 1000), xq.reshape(-1, 1000)):
        assert torch.unique(row_q).numel() <= 256
        # the per-token absmax maps to exactly +-127 / s, i.e. is preserved
        torch.testing.assert_close(row_q.abs().max(), row_x.abs().max())
        # every value lies on the grid k / s with integer k in [-128, 127]
        s = 127.0 / row_x.abs().max()
        k = row_q * s
        torch.testing.assert_close(k, k.round(), atol=1e-4, rtol=0)


def test_zero_input_stays_finite():
    assert torch.isfinite(activation_quant(torch.zeros(2, 8))).all()
    assert torch.isfinite(weight_quant(torch.zeros(4, 8))).all()


def test_ste_passes_gradients_to_latent_weights_and_inputs():
    torch.manual_seed(0)
    layer = BitLinear(16, 8)
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).sum().backward()
    # identity STE: d(sum(x_q @ w_q^T))/dW = sum_t x_q[t], d/dx = sum_o w_q[o]
    torch.testing.assert_close(layer.weight.grad, activation_quant(x.detach()).sum(0).expand(8, 16))
    torch.testing.assert_close(x.grad, weight_quant(layer.weight.detach()).sum(0).expand(3, 16))


def test_fake_quant_forward_equals_integer_reference():
    torch.manual_seed(1)
    for shape in [(5, 64, 32), (2, 3, 128, 96)]:
        *lead, n_in, n_out = shape
        layer = BitLinear(n_in, n_out)
        torch.nn.init.normal_(layer.weight, std=0.05)
        x = torch.randn(*lead, n_in) * 2
        y = layer(x)
        # integer path: int8 activations x ternary weights, accumulated exactly in int64, then scaled
        sx = activation_scale(x)
        x_int = (x * sx).round().clamp(-128, 127).to(torch.int64)
        w_int, sw = layer.ternary_weight()
        acc = x_int @ w_int.to(torch.int64).T
        y_ref = acc.double() / (sx.double() * sw.double())
        assert set(w_int.unique().tolist()) <= {-1, 0, 1}
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
        assert torch.allclose(weight_scale(layer.weight), sw)


def test_no_grad_forward_caches_the_ternary_weight_and_refreshes_it_on_update(monkeypatch):
    torch.manual_seed(2)
    layer = BitLinear(32, 16)
    x = torch.randn(3, 32)
    with torch.no_grad():
        first = layer(x)
        cached = layer._inference_cache[1]
        quantized = []
        monkeypatch.setattr(bitlinear, "weight_quant", lambda w: quantized.append(1) or weight_quant(w))
        assert torch.equal(layer(x), first)
        assert quantized == [] and layer._inference_cache[1] is cached  # served from the cache, not requantized
        layer.weight.mul_(-1.0)  # an in-place update (like AdamW's) bumps the version counter
        flipped = layer(x)
        assert quantized == [1] and layer._inference_cache[1] is not cached  # the update requantized once
        monkeypatch.undo()
        layer.load_state_dict({"weight": torch.randn(16, 32)})
        loaded = layer(x)
    torch.testing.assert_close(flipped, -first)
    assert torch.equal(loaded, torch.nn.functional.linear(activation_quant(x), weight_quant(layer.weight.detach())))
    torch.testing.assert_close(loaded, layer(x).detach())  # the autograd path: same values up to STE rounding


def test_cache_refreshes_after_a_fused_adamw_step_through_train_step():
    # fused AdamW updates weights without bumping their version counter; train_step signals the update
    from bitnet.model import PRESETS, Transformer
    from bitnet.train.step import train_step

    torch.manual_seed(3)
    model = Transformer(PRESETS["tiny"])
    model.init_weights(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    x = torch.randint(0, 32000, (2, 9))
    with torch.no_grad():
        before = model(x[:, :-1])
    train_step(model, opt, [(x[:, :-1], x[:, 1:])], __import__("contextlib").nullcontext, 1.0, 1e-2, 0.0,
               torch.device("cpu"))
    with torch.no_grad():
        after = model(x[:, :-1])
        model_fresh = Transformer(PRESETS["tiny"])
        model_fresh.load_state_dict(model.state_dict())
        expected = model_fresh(x[:, :-1])
    assert not torch.equal(before, after)
    assert torch.equal(after, expected)


def test_fused_linear_equals_the_layers_one_by_one():
    """One GEMM over stacked W_q: same outputs and gradients (x and every latent weight) as separate calls."""
    import torch.nn.functional as F

    from bitnet.model.bitlinear import fused_linear

    g = torch.Generator().manual_seed(7)
    layers = [BitLinear(32, n, quantized_input=True) for n in (32, 16, 16)]
    for layer, std in zip(layers, (0.02, 0.05, 0.1)):  # different absmean scales per tensor
        torch.nn.init.normal_(layer.weight, std=std, generator=g)
    x = activation_quant(torch.randn(2, 5, 32, generator=g)).requires_grad_()
    out = fused_linear(x, layers)
    assert out.shape == (2, 5, 64)
    dy = torch.randn(out.shape, generator=g)
    out.backward(dy)
    fused_grads = [x.grad.clone()] + [layer.weight.grad.clone() for layer in layers]
    x.grad = None
    for layer in layers:
        layer.weight.grad = None
    separate = torch.cat([layer(x) for layer in layers], dim=-1)
    torch.testing.assert_close(out, separate)
    separate.backward(dy)
    for a, b in zip(fused_grads, [x.grad] + [layer.weight.grad for layer in layers]):
        torch.testing.assert_close(a, b)
    # a plain input is quantized once for all layers; mixing the two kinds is refused
    plain = [BitLinear(32, 8), BitLinear(32, 8)]
    xp = torch.randn(3, 32, generator=g)
    torch.testing.assert_close(fused_linear(xp, plain), torch.cat([m(xp) for m in plain], dim=-1))
    with pytest.raises(ValueError, match="mixed"):
        fused_linear(xp, [plain[0], layers[1]])
    # nn.Linear (the bf16 twin) stacks its weights as they are
    lin = [torch.nn.Linear(32, 4, bias=False), torch.nn.Linear(32, 6, bias=False)]
    torch.testing.assert_close(fused_linear(xp, lin), torch.cat([F.linear(xp, m.weight) for m in lin], dim=-1))


def test_model_fused_projections_match_the_unfused_model():
    """Training forwards (gate and up as one GEMM) give the logits and grads of one GEMM per projection,
    and the no-grad forward (each projection alone, cached weights) the same logits."""
    from bitnet.model import PRESETS, Transformer
    from bitnet.model.llama import MLP

    for quantization in ("bitnet", "none"):
        cfg = PRESETS["tiny"]
        cfg = type(cfg)(**{**cfg.to_dict(), "quantization": quantization})
        fused, unfused = Transformer(cfg), Transformer(cfg)
        fused.init_weights(seed=0)
        unfused.load_state_dict(fused.state_dict())
        for m in unfused.modules():
            if isinstance(m, MLP):
                m.fused_projections = False
        idx = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(8))
        la, lb = fused(idx), unfused(idx)
        torch.testing.assert_close(la, lb)
        la.square().mean().backward()
        lb.square().mean().backward()
        for (name, pa), pb in zip(fused.named_parameters(), unfused.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, msg=f"{quantization} {name}")
        with torch.no_grad():
            torch.testing.assert_close(fused(idx), la.detach())
