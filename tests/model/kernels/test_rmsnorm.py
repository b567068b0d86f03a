"""The fused RMSNorm + activation quantization: reference == unfused formulation (CPU), kernel == reference.

The reference is checked against the unfused formulation: the model's `RMSNorm`, then BitLinear's input
quantization `ste(y, activation_quant(y))`.
"""

import pytest
import torch

from bitnet.model import PRESETS, Transformer
from bitnet.model.bitlinear import BitLinear, norm_act_quant
from bitnet.model.kernels import choice, rmsnorm
from bitnet.model.kernels.references import norm_act_quant_reference
from bitnet.model.llama import RMSNorm
from tests.model.kernels.helpers import EPS, GPU_DTYPES, cuda, inputs, interpreter, rel, unfused


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


def test_cpu_tensors_take_the_fallback():
    x, w = inputs((3, 64), torch.float32)
    assert torch.equal(choice.norm_act_quant(x, w, EPS, torch.bfloat16),
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
            rmsnorm.launch_forward(x2, w, y, rstd, EPS)
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            y_ref = norm_act_quant_reference(xr, wr, EPS, odt)
            dy = torch.randn(shape, device=device).to(odt)
            y_ref.backward(dy)
            programs, per = rmsnorm.backward_programs(x2.shape[0], rmsnorm.rows_and_warps(n)[1], x.device)
            dx = torch.full(x2.shape, float("nan"), dtype=xdt, device=device)
            dw_partial = torch.full((programs, n), float("nan"), device=device)
            rmsnorm.launch_backward(dy.reshape(-1, n), x2, w, rstd, dx, dw_partial, per)
            for t in (y, rstd, dx, dw_partial):
                assert not t.isnan().any(), (shape, xdt, odt)
            bf16 = torch.bfloat16 in (xdt, odt)
            assert rel(y, y_ref.detach().reshape(x2.shape)) < (2e-2 if bf16 else 1e-4), (shape, xdt, odt)
            assert rel(dx, xr.grad.reshape(x2.shape)) < (1e-2 if xdt == torch.bfloat16 else 1e-4), (shape, xdt)
            assert rel(dw_partial.sum(0), wr.grad) < 1e-4, (shape, xdt)


@interpreter
def test_triton_kernels_on_the_interpreter():
    # fp32, and bf16 inputs or outputs as in training (the GPU test's dtype pairs)
    run_triton_vs_fallback("cpu", [(3, 64), (7, 100), (2, 3, 768)], GPU_DTYPES)


@interpreter
def test_triton_op_through_autograd_on_the_interpreter():
    """The registered op: output, input and gain gradients against the reference, fp32 and bf16."""
    for xdt, odt in GPU_DTYPES:
        x, w = inputs((2, 5, 96), xdt, seed=3)
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = rmsnorm.rmsnorm_act_quant(xa, wa, EPS, odt)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y_ref = norm_act_quant_reference(xr, wr, EPS, odt)
        assert y.dtype == odt and y.shape == x.shape
        dy = torch.randn(y.shape).to(odt)
        y.backward(dy)
        y_ref.backward(dy)
        tol = 2e-2 if torch.bfloat16 in (xdt, odt) else 1e-4
        assert rel(y, y_ref) < tol and rel(xa.grad, xr.grad) < tol and rel(wa.grad, wr.grad) < tol, (xdt, odt)


@pytest.mark.gpu
@cuda
def test_triton_kernels_on_gpu():
    shapes = [(1, 768), (37, 768), (2, 1024, 768), (2, 513, 3072), (4096, 3072), (5, 64), (3, 1000)]
    run_triton_vs_fallback("cuda", shapes, GPU_DTYPES)


@pytest.mark.gpu
@cuda
def test_triton_op_under_compile_and_autograd():
    x, w = inputs((4, 33, 768), torch.float32)
    x, w = x.cuda().requires_grad_(), w.cuda().requires_grad_()
    f = torch.compile(lambda a, b: rmsnorm.rmsnorm_act_quant(a, b, EPS, torch.bfloat16), fullgraph=True)
    y = f(x, w)
    y.float().square().sum().backward()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y_ref = norm_act_quant_reference(xr, wr, EPS, torch.bfloat16)
    y_ref.float().square().sum().backward()
    assert rel(y, y_ref) < 2e-2 and rel(x.grad, xr.grad) < 2e-2 and rel(w.grad, wr.grad) < 2e-2
