"""The fused RMSNorm + activation quantization: fallback == reference (CPU), Triton == fallback (GPU).

The reference is the unfused formulation: the model's `RMSNorm`, then BitLinear's input quantization
`ste(y, activation_quant(y))`. GPU tests (and the Triton-interpreter test, run with TRITON_INTERPRET=1)
poison the outputs with NaN before the kernels run, so an element left unwritten shows.
"""

import os

import pytest
import torch

from bitnet.model import PRESETS, Transformer, kernels
from bitnet.model.bitlinear import (BitLinear, activation_quant, norm_act_quant, norm_act_quant_reference, ste,
                                   swiglu_norm_act_quant, swiglu_norm_act_quant_reference)
from bitnet.model.llama import RMSNorm, head_cross_entropy_reference

EPS = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def unfused(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    norm = RMSNorm(x.shape[-1], EPS)
    with torch.no_grad():
        norm.weight.copy_(w)
    norm.weight.requires_grad_(w.requires_grad)
    y = norm(x)
    return ste(y, activation_quant(y)).to(out_dtype), norm.weight


def inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(shape[:-1] + (1,), generator=g) * 4 + 0.01  # per-token scales, as real activations
    x = (torch.randn(shape, generator=g) * scale).to(dtype)
    w = 1 + 0.2 * torch.randn(shape[-1], generator=g)
    return x, w


@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 96), (4, 768)])
def test_cpu_fallback_equals_unfused_reference_fp32(shape):
    x, w = inputs(shape, torch.float32)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    ya = norm_act_quant_reference(xa, wa, EPS, torch.float32)
    xb = x.clone().requires_grad_()
    yb, wb = unfused(xb, w.clone().requires_grad_(), torch.float32)
    assert torch.equal(ya, yb)
    g = torch.randn(shape)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(wa.grad, wb.grad)


def test_cpu_fallback_equals_unfused_reference_bf16_to_one_rounding():
    x, w = inputs((6, 256), torch.bfloat16)
    ya = norm_act_quant_reference(x, w, EPS, torch.bfloat16)
    yb, _ = unfused(x, w, torch.bfloat16)
    # the STE's x + (x_q - x) rounds once in fp32 here and twice in bf16 there: one bf16 step apart at most
    torch.testing.assert_close(ya.float(), yb.float(), rtol=2**-7, atol=0)


@pytest.mark.skipif(kernels._INTERPRET, reason="under TRITON_INTERPRET=1 CPU tensors go to the kernels")
def test_cpu_tensors_take_the_fallback():
    x, w = inputs((3, 64), torch.float32)
    assert torch.equal(kernels.rmsnorm_act_quant(x, w, EPS, torch.bfloat16),
                       norm_act_quant_reference(x, w, EPS, torch.bfloat16))
    assert torch.equal(norm_act_quant(x, w, EPS), norm_act_quant_reference(x, w, EPS, torch.float32))


def test_outputs_sit_on_the_int8_grid_of_their_token():
    x, w = inputs((5, 128), torch.float32)
    y = norm_act_quant(x, w, EPS)
    s = 127.0 / y.abs().amax(-1, keepdim=True)
    k = y * s
    torch.testing.assert_close(k, k.round(), atol=1e-4, rtol=0)
    assert (k.round().abs() <= 128).all()


def test_fused_model_equals_unfused_formulation():
    """The model's fused norms give the same logits and grads as RMSNorm + quantizing BitLinears."""
    torch.manual_seed(0)
    fused, plain = Transformer(PRESETS["tiny"]), Transformer(PRESETS["tiny"])
    fused.init_weights(seed=0)
    plain.load_state_dict(fused.state_dict())
    for m in plain.modules():
        if isinstance(m, RMSNorm):
            m.quantize_output = False
        elif isinstance(m, BitLinear):
            m.quantized_input = False
    assert sum(isinstance(m, RMSNorm) and m.quantize_output for m in fused.modules()) == 4 * PRESETS["tiny"].n_layers
    x = torch.randint(0, 32000, (2, 16))
    la, lb = fused(x), plain(x)
    torch.testing.assert_close(la, lb)
    la.square().mean().backward()
    lb.square().mean().backward()
    for (name, pa), pb in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def run_triton_vs_fallback(device: str, shapes, dtypes) -> None:
    for shape in shapes:
        for xdt, odt in dtypes:
            x, w = inputs(shape, xdt, seed=len(shape) + shape[-1])
            x, w = x.to(device), w.to(device)
            n = shape[-1]
            x2 = x.reshape(-1, n)
            y = torch.full(x2.shape, float("nan"), dtype=odt, device=device)
            rstd = torch.full((x2.shape[0],), float("nan"), device=device)
            kernels.launch_forward(x2, w, y, rstd, EPS)
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            y_ref = norm_act_quant_reference(xr, wr, EPS, odt)
            dy = torch.randn(shape, device=device).to(odt)
            y_ref.backward(dy)
            programs, per = kernels.backward_programs(x2.shape[0], kernels._rows_and_warps(n)[1], x.device)
            dx = torch.full(x2.shape, float("nan"), dtype=xdt, device=device)
            dw_partial = torch.full((programs, n), float("nan"), device=device)
            kernels.launch_backward(dy.reshape(-1, n), x2, w, rstd, dx, dw_partial, per)
            for t in (y, rstd, dx, dw_partial):
                assert not t.isnan().any(), (shape, xdt, odt)
            bf16 = torch.bfloat16 in (xdt, odt)
            assert rel(y, y_ref.detach().reshape(x2.shape)) < (2e-2 if bf16 else 1e-4), (shape, xdt, odt)
            assert rel(dx, xr.grad.reshape(x2.shape)) < (1e-2 if xdt == torch.bfloat16 else 1e-4), (shape, xdt)
            assert rel(dw_partial.sum(0), wr.grad) < 1e-4, (shape, xdt)


@pytest.mark.skipif(kernels.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs triton and TRITON_INTERPRET=1 (the kernels run on the CPU interpreter)")
def test_triton_kernels_on_the_interpreter():
    # fp32 only: the interpreter truncates fp32 -> bf16 casts instead of rounding them
    run_triton_vs_fallback("cpu", [(3, 64), (7, 100), (2, 3, 768)], [(torch.float32, torch.float32)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None, reason="needs CUDA and triton")
def test_triton_kernels_on_gpu():
    shapes = [(1, 768), (37, 768), (2, 1024, 768), (2, 513, 3072), (4096, 3072), (5, 64), (3, 1000)]
    dtypes = [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)]
    run_triton_vs_fallback("cuda", shapes, dtypes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None, reason="needs CUDA and triton")
def test_triton_op_under_compile_and_autograd():
    x, w = inputs((4, 33, 768), torch.float32)
    x, w = x.cuda().requires_grad_(), w.cuda().requires_grad_()
    f = torch.compile(lambda a, b: kernels.rmsnorm_act_quant(a, b, EPS, torch.bfloat16), fullgraph=True)
    y = f(x, w)
    y.float().square().sum().backward()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y_ref = norm_act_quant_reference(xr, wr, EPS, torch.bfloat16)
    y_ref.float().square().sum().backward()
    assert rel(y, y_ref) < 2e-2 and rel(x.grad, xr.grad) < 2e-2 and rel(w.grad, wr.grad) < 2e-2


# ---------------------------------------------------------------------------- SwiGLU + sub-norm + quantize

def swiglu_inputs(shape, dtype, seed=0):
    """gate_up (..., 2n): gate and up side by side, as the fused gate/up GEMM returns them; the norm gain (n,)."""
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(shape, generator=g) * 2
    up = torch.randn(shape, generator=g) * (torch.rand(shape[:-1] + (1,), generator=g) * 3 + 0.1)
    w = 1 + 0.2 * torch.randn(shape[-1], generator=g)
    return torch.cat([gate, up], dim=-1).to(dtype), w


def test_swiglu_fallback_is_the_mlp_formulation():
    """The fallback is RMSNorm + quantization of silu(gate) * up, as the unfused MLP computes it."""
    gate_up, w = swiglu_inputs((2, 5, 96), torch.float32)
    gua, wa = gate_up.clone().requires_grad_(), w.clone().requires_grad_()
    ya = swiglu_norm_act_quant_reference(gua, wa, EPS, torch.float32)
    gb, ub = (t.clone().requires_grad_() for t in gate_up.chunk(2, dim=-1))
    yb, wb = unfused(torch.nn.functional.silu(gb) * ub, w.clone().requires_grad_(), torch.float32)
    assert torch.equal(ya, yb)
    dy = torch.randn(ya.shape)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(gua.grad, torch.cat([gb.grad, ub.grad], dim=-1))
    torch.testing.assert_close(wa.grad, wb.grad)


@pytest.mark.skipif(kernels._INTERPRET, reason="under TRITON_INTERPRET=1 CPU tensors go to the kernels")
def test_swiglu_cpu_tensors_take_the_fallback():
    gate_up, w = swiglu_inputs((3, 64), torch.float32)
    assert torch.equal(kernels.swiglu_norm_act_quant(gate_up, w, EPS, torch.bfloat16),
                       swiglu_norm_act_quant_reference(gate_up, w, EPS, torch.bfloat16))
    assert torch.equal(swiglu_norm_act_quant(gate_up, w, EPS),
                       swiglu_norm_act_quant_reference(gate_up, w, EPS, torch.float32))


def run_swiglu_vs_fallback(device: str, shapes, dtypes, launch=None) -> None:
    """The kernels on the two halves of one (M, 2n) matrix (strided rows), as the model calls them."""
    for shape in shapes:
        for xdt, odt in dtypes:
            gate_up, w = (t.to(device) for t in swiglu_inputs(shape, xdt, seed=shape[-1] + len(shape)))
            n = shape[-1]
            g2, u2 = gate_up.reshape(-1, 2 * n).chunk(2, dim=1)
            y = torch.full(g2.shape, float("nan"), dtype=odt, device=device)
            rstd = torch.full((g2.shape[0],), float("nan"), device=device)
            kernels.launch_swiglu_forward(g2, u2, w, y, rstd, EPS, launch)
            gur, wr = gate_up.clone().requires_grad_(), w.clone().requires_grad_()
            y_ref = swiglu_norm_act_quant_reference(gur, wr, EPS, odt)
            dy = torch.randn(shape, device=device).to(odt)
            y_ref.backward(dy)
            programs, per = kernels.swiglu_backward_programs(g2.shape[0], gate_up.device, launch)
            d_gate_up = torch.full((g2.shape[0], 2 * n), float("nan"), dtype=xdt, device=device)
            dg, du = d_gate_up.chunk(2, dim=1)
            dw_partial = torch.full((programs, n), float("nan"), device=device)
            kernels.launch_swiglu_backward(dy.reshape(-1, n), g2, u2, w, rstd, dg, du, dw_partial, per, launch)
            for t in (y, rstd, d_gate_up, dw_partial):
                assert not t.isnan().any(), (shape, xdt, odt)
            bf16 = torch.bfloat16 in (xdt, odt)
            assert rel(y, y_ref.detach().reshape(g2.shape)) < (2e-2 if bf16 else 1e-4), (shape, xdt, odt)
            tol = 2e-2 if bf16 else 1e-4
            ref_dg, ref_du = gur.grad.reshape(-1, 2 * n).chunk(2, dim=1)
            assert rel(dg, ref_dg) < tol, (shape, xdt, odt)
            assert rel(du, ref_du) < tol, (shape, xdt, odt)
            assert rel(dw_partial.sum(0), wr.grad) < tol, (shape, xdt, odt)


@pytest.mark.skipif(kernels.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs triton and TRITON_INTERPRET=1 (the kernels run on the CPU interpreter)")
@pytest.mark.parametrize("change", [{}, {"fwd_rows": 2, "bwd_rows": 1, "bwd_programs_per_sm": 1},
                                    {"bwd_prefetch": True}, {"bwd_prefetch": True, "bwd_rows": 1, "bwd_programs_per_sm": 1}])
def test_swiglu_kernels_on_the_interpreter(change):
    """The shipped launch settings; two rows per forward program with all rows in one backward program;
    the backward prefetching the next row block (across a program's last rows and the matrix's end)."""
    run_swiglu_vs_fallback("cpu", [(3, 64), (7, 100), (2, 3, 3072)], [(torch.float32, torch.float32)],
                           launch=kernels.SWIGLU_LAUNCH | change)


@pytest.mark.skipif(kernels.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs triton and TRITON_INTERPRET=1 (the kernels run on the CPU interpreter)")
def test_swiglu_op_through_autograd_on_the_interpreter():
    """The registered op: gate_up's gradient comes back as one tensor, the odd width is refused."""
    gate_up, w = swiglu_inputs((2, 3, 64), torch.float32)
    gua, wa = gate_up.clone().requires_grad_(), w.clone().requires_grad_()
    y = kernels.swiglu_norm_act_quant(gua, wa, EPS, torch.float32)
    gur, wr = gate_up.clone().requires_grad_(), w.clone().requires_grad_()
    y_ref = swiglu_norm_act_quant_reference(gur, wr, EPS, torch.float32)
    assert y.shape == (2, 3, 64) and rel(y, y_ref) < 1e-4
    dy = torch.randn(y.shape)
    y.backward(dy)
    y_ref.backward(dy)
    assert gua.grad.shape == (2, 3, 128) and rel(gua.grad, gur.grad) < 1e-4 and rel(wa.grad, wr.grad) < 1e-4
    with pytest.raises(ValueError, match="even last dim"):
        kernels.swiglu_norm_act_quant(torch.randn(4, 9), torch.ones(4), EPS, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None, reason="needs CUDA and triton")
@pytest.mark.parametrize("change", [{}, {"bwd_prefetch": not kernels.SWIGLU_LAUNCH.get("bwd_prefetch")},
                                    {"bwd_stages": 2, "bwd_prefetch": False}])
def test_swiglu_kernels_on_gpu(change):
    shapes = [(1, 3072), (37, 3072), (2, 1024, 3072), (4096, 3072), (5, 64), (3, 1000), (2, 7, 768)]
    dtypes = [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.float32, torch.bfloat16)]
    run_swiglu_vs_fallback("cuda", shapes, dtypes, launch=kernels.SWIGLU_LAUNCH | change)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None, reason="needs CUDA and triton")
def test_swiglu_op_under_compile_and_autograd():
    gate_up, w = (t.cuda() for t in swiglu_inputs((4, 33, 3072), torch.bfloat16))
    gua, wa = gate_up.clone().requires_grad_(), w.clone().requires_grad_()
    f = torch.compile(lambda a, b: kernels.swiglu_norm_act_quant(a, b, EPS, torch.bfloat16), fullgraph=True)
    y = f(gua, wa)
    y.float().square().sum().backward()
    gur, wr = gate_up.clone().requires_grad_(), w.clone().requires_grad_()
    y_ref = swiglu_norm_act_quant_reference(gur, wr, EPS, torch.bfloat16)
    y_ref.float().square().sum().backward()
    assert rel(y, y_ref) < 2e-2
    for a, b in ((gua, gur), (wa, wr)):
        assert rel(a.grad, b.grad) < 3e-2


# ---------------------------------------------------------------------------- q/k/v split + RoPE

def qkv_inputs(B, T, H, Hkv, D, dtype, seed):
    from bitnet.model.llama import rope_tables

    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, T, (H + 2 * Hkv) * D, generator=g) * 2).to(dtype)
    cos, sin = rope_tables(D, T + 5, 10000.0)
    return qkv, cos[:T].contiguous(), sin[:T].contiguous()


def run_rope_qkv_vs_reference(device: str, cases, dtypes) -> None:
    """Forward into poisoned q/k/v, backward from gradients laid out as attention returns them ((B, h, T, D)
    contiguous, seen as (B, T, h, D)) into a poisoned stacked gradient, both against rope_qkv_reference."""
    from bitnet.model.llama import rope_qkv_reference

    for B, T, H, Hkv, D in cases:
        for dt in dtypes:
            qkv, cos, sin = (t.to(device) for t in qkv_inputs(B, T, H, Hkv, D, dt, seed=T + H))
            q, k, v = (torch.full((B, T, h, D), float("nan"), dtype=dt, device=device) for h in (H, Hkv, Hkv))
            kernels.launch_rope_qkv_forward(qkv, cos, sin, q, k, v)
            ref_in = qkv.clone().requires_grad_()
            refs = rope_qkv_reference(ref_in, cos, sin, H, Hkv)
            tol = 1e-2 if dt == torch.bfloat16 else 1e-6
            for out, ref in zip((q, k, v), refs):
                assert not out.isnan().any(), (B, T, H, Hkv, D, dt)
                assert rel(out, ref.detach().transpose(1, 2)) < tol, (B, T, H, Hkv, D, dt)
            grads = [torch.randn(ref.shape, device=device).to(dt) for ref in refs]  # (B, h, T, D) contiguous
            torch.autograd.backward(refs, grads)
            dqkv = torch.full(qkv.shape, float("nan"), dtype=dt, device=device)
            kernels.launch_rope_qkv_backward(*(gr.transpose(1, 2) for gr in grads), cos, sin, dqkv)
            assert not dqkv.isnan().any() and rel(dqkv, ref_in.grad) < tol, (B, T, H, Hkv, D, dt)


@pytest.mark.skipif(kernels.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs triton and TRITON_INTERPRET=1 (the kernels run on the CPU interpreter)")
def test_rope_qkv_kernels_on_the_interpreter():
    # the 95m heads (12 + 2 x 6 of 64), head counts and head sizes (48, 80, 6) that are not powers of two
    run_rope_qkv_vs_reference("cpu", [(2, 3, 12, 6, 64), (1, 5, 3, 1, 8), (2, 2, 5, 3, 16), (1, 3, 8, 4, 48),
                                      (1, 2, 4, 2, 80), (2, 2, 3, 3, 6)], [torch.float32])


@pytest.mark.skipif(kernels.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs triton and TRITON_INTERPRET=1 (the kernels run on the CPU interpreter)")
def test_rope_qkv_op_through_autograd_on_the_interpreter():
    from bitnet.model.llama import rope_qkv_reference

    qkv, cos, sin = qkv_inputs(2, 4, 4, 2, 16, torch.float32, seed=3)
    a, b = qkv.clone().requires_grad_(), qkv.clone().requires_grad_()
    outs, refs = kernels.rope_qkv(a, cos, sin, 4, 2), rope_qkv_reference(b, cos, sin, 4, 2)
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape and rel(out, ref) < 1e-6
    grads = [torch.randn(ref.shape) for ref in refs]
    torch.autograd.backward(outs, grads)
    torch.autograd.backward(refs, grads)
    assert rel(a.grad, b.grad) < 1e-6
    with pytest.raises(ValueError, match="does not split"):
        kernels.rope_qkv(torch.randn(2, 4, 100), cos, sin, 4, 2)


@pytest.mark.skipif(kernels.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs triton and TRITON_INTERPRET=1 (the kernels run on the CPU interpreter)")
def test_stacked_projections_and_rope_kernel_match_three_projections_on_the_interpreter():
    """What Attention runs in training (fused_linear + rope_qkv) against three BitLinears + apply_rope:
    q, k, v and the gradients of x and of each latent weight."""
    from bitnet.model.bitlinear import BitLinear, fused_linear
    from bitnet.model.llama import apply_rope, rope_tables

    g = torch.Generator().manual_seed(9)
    B, T, C, H, Hkv, D = 2, 5, 32, 4, 2, 8
    layers = [BitLinear(C, h * D, quantized_input=True) for h in (H, Hkv, Hkv)]
    for layer in layers:
        torch.nn.init.normal_(layer.weight, std=0.1, generator=g)
    x = activation_quant(torch.randn(B, T, C, generator=g)).requires_grad_()
    cos, sin = (t[:T].contiguous() for t in rope_tables(D, T, 10000.0))
    fused = kernels.rope_qkv(fused_linear(x, layers), cos, sin, H, Hkv)
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
    from bitnet.model.llama import apply_rope, rope_qkv_reference

    qkv, cos, sin = qkv_inputs(2, 6, 4, 2, 8, torch.float32, seed=5)
    q, k, v = rope_qkv_reference(qkv, cos, sin, 4, 2)
    q_raw = qkv[..., :32].reshape(2, 6, 4, 8).transpose(1, 2)
    k_raw = qkv[..., 32:48].reshape(2, 6, 2, 8).transpose(1, 2)
    assert torch.equal(q, apply_rope(q_raw, cos, sin)) and torch.equal(k, apply_rope(k_raw, cos, sin))
    assert torch.equal(v, qkv[..., 48:].reshape(2, 6, 2, 8).transpose(1, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None, reason="needs CUDA and triton")
def test_rope_qkv_kernels_on_gpu():
    run_rope_qkv_vs_reference("cuda", [(32, 1024, 12, 6, 64), (3, 7, 12, 6, 64), (2, 9, 5, 3, 16), (2, 5, 8, 4, 48)],
                              [torch.bfloat16, torch.float32])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None, reason="needs CUDA and triton")
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


# ---------------------------------------------------------------------------- cross entropy

def head_inputs(m: int, d: int, v: int, seed: int):
    """Hidden states (m, d), a head (v, d) and targets (m,) with every third ignored (row 0 counts)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g)
    w = torch.randn(v, d, generator=g) * (3 / d**0.5)  # logits of std ~3: a peaked softmax
    t = torch.randint(0, v, (m,), generator=g)
    t[1::3] = kernels.IGNORE_INDEX
    return x, w, t


def test_head_cross_entropy_fallback_is_the_reference():
    import torch.nn.functional as F

    from bitnet.model.llama import head_cross_entropy

    x, w, t = head_inputs(10, 16, 300, seed=0)
    xa, wa, xb, wb = (a.clone().requires_grad_() for a in (x, w, x, w))
    la = head_cross_entropy(xa.view(2, 5, 16), wa, t.view(2, 5))
    lb = F.cross_entropy(xb @ wb.t(), t, ignore_index=kernels.IGNORE_INDEX)
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
    (la * 3).backward()  # the incoming gradient scales both results
    (lb * 3).backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(wa.grad, wb.grad)


def test_model_loss_equals_cross_entropy_of_its_logits():
    import torch.nn.functional as F

    from bitnet.model import ModelConfig

    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=16)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    y = idx.roll(-1, dims=1)
    logits = model(idx)
    torch.testing.assert_close(model(idx, targets=y), F.cross_entropy(logits.reshape(-1, 97), y.reshape(-1)))


def run_cross_entropy_vs_reference(device: str, cases, dtypes) -> None:
    import torch.nn.functional as F

    for m, d, v in cases:
        x, w, t = head_inputs(m, d, v, seed=m + v)
        x, w, t = x.to(device), w.to(device), t.to(device)
        for dt in dtypes:
            # the kernel alone: loss rows (poisoned first) and the gradient written over the logits
            logits = F.linear(x.to(dt), w.to(dt))
            ref = logits.float().requires_grad_()
            ref_rows = F.cross_entropy(ref, t, reduction="none", ignore_index=kernels.IGNORE_INDEX)
            (ref_rows.sum() / (t != kernels.IGNORE_INDEX).sum()).backward()
            rows = torch.full((m,), float("nan"), device=device)
            count = (t != kernels.IGNORE_INDEX).sum().float()
            kernels.launch_cross_entropy(logits, t, count, rows)
            assert not rows.isnan().any() and not logits.isnan().any()
            assert rel(rows, ref_rows) < 1e-5, (m, v, dt)
            assert rel(logits, ref.grad) < (1e-2 if dt == torch.bfloat16 else 1e-5), (m, v, dt)
            # through autograd, with an incoming gradient other than 1, against the unfused head + loss
            xa, wa, xb, wb = (a.clone().requires_grad_() for a in (x, w, x, w))
            loss = kernels.linear_cross_entropy(xa, wa, t, dt)
            ref_loss = head_cross_entropy_reference(xb, wb, t, dt)
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
            (loss / 3).backward()
            (ref_loss / 3).backward()
            tol = 2e-2 if dt == torch.bfloat16 else 1e-5
            assert xa.grad.dtype == x.dtype and wa.grad.dtype == w.dtype
            assert rel(xa.grad, xb.grad) < tol and rel(wa.grad, wb.grad) < tol, (m, v, dt)


@pytest.mark.skipif(kernels.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs triton and TRITON_INTERPRET=1 (the kernels run on the CPU interpreter)")
def test_cross_entropy_kernels_on_the_interpreter(monkeypatch):
    monkeypatch.setitem(kernels.CE_LAUNCH, "block", 256)  # several strips per row at these sizes
    run_cross_entropy_vs_reference("cpu", [(5, 8, 1000), (3, 16, 700), (4, 8, 100)], [torch.float32])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None, reason="needs CUDA and triton")
def test_cross_entropy_kernels_on_gpu():
    run_cross_entropy_vs_reference("cuda", [(1, 768, 32000), (1000, 768, 32000), (333, 64, 1000), (64, 32, 100)],
                                   [torch.bfloat16, torch.float32])
