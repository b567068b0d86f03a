"""The q/k/v split + RoPE: reference == separate projections (CPU), kernel == reference."""

import pytest
import torch

from bitnet.model import PRESETS, Transformer
from bitnet.model.bitlinear import BitLinear, activation_quant, fused_linear
from bitnet.model.kernels import rope
from bitnet.model.kernels.references import apply_rope, rope_qkv_reference
from bitnet.model.llama import rope_tables
from tests.model.kernels.helpers import cuda, interpreter, qkv_inputs, rel


def run_rope_qkv_vs_reference(device: str, cases, dtypes) -> None:
    """Forward into poisoned q/k/v, backward from gradients laid out as attention returns them ((B, h, T, D)
    contiguous, seen as (B, T, h, D)) into a poisoned stacked gradient, both against rope_qkv_reference."""
    for B, T, H, Hkv, D in cases:
        for dt in dtypes:
            qkv, cos, sin = (t.to(device) for t in qkv_inputs(B, T, H, Hkv, D, dt, seed=T + H))
            q, k, v = (torch.full((B, T, h, D), float("nan"), dtype=dt, device=device) for h in (H, Hkv, Hkv))
            rope.launch_rope_qkv_forward(qkv, cos, sin, q, k, v)
            ref_in = qkv.clone().requires_grad_()
            refs = rope_qkv_reference(ref_in, cos, sin, H, Hkv)
            tol = 1e-2 if dt == torch.bfloat16 else 1e-6
            for out, ref in zip((q, k, v), refs):
                assert not out.isnan().any(), (B, T, H, Hkv, D, dt)
                assert rel(out, ref.detach().transpose(1, 2)) < tol, (B, T, H, Hkv, D, dt)
            grads = [torch.randn(ref.shape, device=device).to(dt) for ref in refs]  # (B, h, T, D) contiguous
            torch.autograd.backward(refs, grads)
            dqkv = torch.full(qkv.shape, float("nan"), dtype=dt, device=device)
            rope.launch_rope_qkv_backward(*(gr.transpose(1, 2) for gr in grads), cos, sin, dqkv)
            assert not dqkv.isnan().any() and rel(dqkv, ref_in.grad) < tol, (B, T, H, Hkv, D, dt)


@interpreter
def test_rope_qkv_kernels_on_the_interpreter():
    # the 95m heads (12 + 2 x 6 of 64), head counts and head sizes (48, 80, 6) that are not powers of two
    run_rope_qkv_vs_reference("cpu", [(2, 3, 12, 6, 64), (1, 5, 3, 1, 8), (2, 2, 5, 3, 16), (1, 3, 8, 4, 48),
                                      (1, 2, 4, 2, 80), (2, 2, 3, 3, 6)], [torch.float32, torch.bfloat16])


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_qkv_op_through_autograd_on_the_interpreter(dtype):
    qkv, cos, sin = qkv_inputs(2, 4, 4, 2, 16, dtype, seed=3)
    a, b = qkv.clone().requires_grad_(), qkv.clone().requires_grad_()
    outs, refs = rope.rope_qkv(a, cos, sin, 4, 2), rope_qkv_reference(b, cos, sin, 4, 2)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape and rel(out, ref) < tol
    grads = [torch.randn(ref.shape).to(dtype) for ref in refs]
    torch.autograd.backward(outs, grads)
    torch.autograd.backward(refs, grads)
    assert rel(a.grad, b.grad) < tol
    with pytest.raises(ValueError, match="does not split"):
        rope.rope_qkv(torch.randn(2, 4, 100), cos, sin, 4, 2)


@interpreter
def test_stacked_projections_and_rope_kernel_match_three_projections_on_the_interpreter():
    """What Attention runs in training (fused_linear + rope_qkv) against three BitLinears + apply_rope:
    q, k, v and the gradients of x and of each latent weight."""
    g = torch.Generator().manual_seed(9)
    B, T, C, H, Hkv, D = 2, 5, 32, 4, 2, 8
    layers = [BitLinear(C, h * D, quantized_input=True) for h in (H, Hkv, Hkv)]
    for layer in layers:
        torch.nn.init.normal_(layer.weight, std=0.1, generator=g)
    x = activation_quant(torch.randn(B, T, C, generator=g)).requires_grad_()
    cos, sin = (t[:T].contiguous() for t in rope_tables(D, T, 10000.0))
    fused = rope.rope_qkv(fused_linear(x, layers), cos, sin, H, Hkv)
    grads = [torch.randn(t.shape, generator=g) for t in fused]
    torch.autograd.backward(fused, grads)
    got = [x.grad.clone()] + [layer.weight.grad.clone() for layer in layers]
    x.grad = None
    for layer in layers:
        layer.weight.grad = None
    q, k, v = (layer(x).view(B, T, -1, D).transpose(1, 2) for layer in layers)
    separate = (apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
    for a, b in zip(fused, separate):
        assert rel(a, b) < 1e-6
    torch.autograd.backward(separate, grads)
    for a, b in zip(got, [x.grad] + [layer.weight.grad for layer in layers]):
        assert rel(a, b) < 1e-5


def test_rope_qkv_fallback_is_the_separate_projections():
    """The fallback: split + RoPE of the stacked output equals RoPE of each projection's output."""
    qkv, cos, sin = qkv_inputs(2, 6, 4, 2, 8, torch.float32, seed=5)
    q, k, v = rope_qkv_reference(qkv, cos, sin, 4, 2)
    q_raw = qkv[..., :32].reshape(2, 6, 4, 8).transpose(1, 2)
    k_raw = qkv[..., 32:48].reshape(2, 6, 2, 8).transpose(1, 2)
    assert torch.equal(q, apply_rope(q_raw, cos, sin)) and torch.equal(k, apply_rope(k_raw, cos, sin))
    assert torch.equal(v, qkv[..., 48:].reshape(2, 6, 2, 8).transpose(1, 2))


@pytest.mark.gpu
@cuda
def test_rope_qkv_kernels_on_gpu():
    run_rope_qkv_vs_reference("cuda", [(32, 1024, 12, 6, 64), (3, 7, 12, 6, 64), (2, 9, 5, 3, 16), (2, 5, 8, 4, 48)],
                              [torch.bfloat16, torch.float32])


@pytest.mark.gpu
@cuda
def test_stacked_qkv_model_matches_separate_projections_on_gpu():
    """The model on CUDA: stacked q/k/v + rope kernel (compiled blocks too) against three GEMMs + torch RoPE."""
    from bitnet.model.llama import MLP, Attention
    from bitnet.train.step import compile_step

    torch.manual_seed(0)
    fused, plain = Transformer(PRESETS["tiny"]).cuda(), Transformer(PRESETS["tiny"]).cuda()
    fused.init_weights(seed=0)
    plain.load_state_dict(fused.state_dict())
    for m in plain.modules():
        if isinstance(m, (Attention, MLP)):
            m.fused_projections = False
    x = torch.randint(0, 32000, (2, 64), device="cuda")
    for model in (fused, compile_step(fused)):
        la, lb = model(x), plain(x)
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)
        la.square().mean().backward()
        lb.square().mean().backward()
        for (name, pa), pb in zip(fused.named_parameters(), plain.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-3, atol=1e-5, msg=name)
            pa.grad = pb.grad = None
