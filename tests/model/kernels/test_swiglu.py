"""SwiGLU + sub-norm + quantization: reference == the MLP's unfused formulation (CPU), kernel == reference."""

from dataclasses import replace

import pytest
import torch

from bitnet.model.bitlinear import swiglu_norm_act_quant
from bitnet.model.kernels import SwigluLaunch, choice, swiglu
from bitnet.model.kernels.common import triton
from bitnet.model.kernels.references import swiglu_norm_act_quant_reference
from tests.model.kernels.helpers import EPS, GPU_DTYPES, cuda, interpreter, rel, swiglu_inputs, unfused


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


def test_swiglu_cpu_tensors_take_the_fallback():
    gate_up, w = swiglu_inputs((3, 64), torch.float32)
    assert torch.equal(choice.swiglu_norm_act_quant(gate_up, w, EPS, torch.bfloat16),
                       swiglu_norm_act_quant_reference(gate_up, w, EPS, torch.bfloat16))
    assert torch.equal(swiglu_norm_act_quant(gate_up, w, EPS),
                       swiglu_norm_act_quant_reference(gate_up, w, EPS, torch.float32))


def test_launch_settings_pass_through_the_ops_as_ints():
    """The custom ops take the launch settings as a list of ints: the round trip keeps every field."""
    for launch in (SwigluLaunch(), SwigluLaunch(fwd_rows=2, bwd_warps=4, bwd_prefetch=False, bwd_stages=2)):
        assert SwigluLaunch.from_ints(launch.as_ints()) == launch
    assert SwigluLaunch().as_ints() == [1, 8, 1, 16, 4, 1, 1]


def run_swiglu_vs_fallback(device: str, shapes, dtypes, launch: SwigluLaunch = SwigluLaunch()) -> None:
    """The kernels on the two halves of one (M, 2n) matrix (strided rows), as the model calls them."""
    for shape in shapes:
        for xdt, odt in dtypes:
            gate_up, w = (t.to(device) for t in swiglu_inputs(shape, xdt, seed=shape[-1] + len(shape)))
            n = shape[-1]
            g2, u2 = gate_up.reshape(-1, 2 * n).chunk(2, dim=1)
            y = torch.full(g2.shape, float("nan"), dtype=odt, device=device)
            rstd = torch.full((g2.shape[0],), float("nan"), device=device)
            swiglu.launch_swiglu_forward(g2, u2, w, y, rstd, EPS, launch)
            gur, wr = gate_up.clone().requires_grad_(), w.clone().requires_grad_()
            y_ref = swiglu_norm_act_quant_reference(gur, wr, EPS, odt)
            dy = torch.randn(shape, device=device).to(odt)
            y_ref.backward(dy)
            programs, per = swiglu.swiglu_backward_programs(g2.shape[0], gate_up.device, launch)
            d_gate_up = torch.full((g2.shape[0], 2 * n), float("nan"), dtype=xdt, device=device)
            dg, du = d_gate_up.chunk(2, dim=1)
            dw_partial = torch.full((programs, n), float("nan"), device=device)
            swiglu.launch_swiglu_backward(dy.reshape(-1, n), g2, u2, w, rstd, dg, du, dw_partial, per, launch)
            for t in (y, rstd, d_gate_up, dw_partial):
                assert not t.isnan().any(), (shape, xdt, odt)
            bf16 = torch.bfloat16 in (xdt, odt)
            assert rel(y, y_ref.detach().reshape(g2.shape)) < (2e-2 if bf16 else 1e-4), (shape, xdt, odt)
            tol = 2e-2 if bf16 else 1e-4
            ref_dg, ref_du = gur.grad.reshape(-1, 2 * n).chunk(2, dim=1)
            assert rel(dg, ref_dg) < tol, (shape, xdt, odt)
            assert rel(du, ref_du) < tol, (shape, xdt, odt)
            assert rel(dw_partial.sum(0), wr.grad) < tol, (shape, xdt, odt)


@interpreter
@pytest.mark.parametrize("change", [{}, {"fwd_rows": 2, "bwd_rows": 1, "bwd_programs_per_sm": 1}, {"bwd_prefetch": True},
                                    {"bwd_prefetch": True, "bwd_rows": 1, "bwd_programs_per_sm": 1},
                                    {"bwd_prefetch": False, "bwd_rows": 2, "bwd_programs_per_sm": 1}])
def test_swiglu_kernels_on_the_interpreter(change):
    """The shipped launch settings; two rows per forward program with all rows in one backward program;
    the backward prefetching the next row block (across a program's last rows and the matrix's end), and
    without the prefetch over two-row blocks; fp32 and training's bf16."""
    run_swiglu_vs_fallback("cpu", [(3, 64), (7, 100), (2, 3, 3072)], GPU_DTYPES,
                           launch=replace(SwigluLaunch(), **change))


@interpreter
@pytest.mark.parametrize("launch", [SwigluLaunch(), SwigluLaunch(fwd_rows=2, bwd_rows=2, bwd_programs_per_sm=1,
                                                                  bwd_prefetch=False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_op_through_autograd_on_the_interpreter(launch, dtype):
    """The registered op (under any launch settings): gate_up's gradient comes back as one tensor, the odd
    width is refused."""
    gate_up, w = swiglu_inputs((2, 3, 64), dtype)
    gua, wa = gate_up.clone().requires_grad_(), w.clone().requires_grad_()
    y = swiglu.swiglu_norm_act_quant(gua, wa, EPS, dtype, launch)
    gur, wr = gate_up.clone().requires_grad_(), w.clone().requires_grad_()
    y_ref = swiglu_norm_act_quant_reference(gur, wr, EPS, dtype)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert y.shape == (2, 3, 64) and rel(y, y_ref) < tol
    dy = torch.randn(y.shape).to(dtype)
    y.backward(dy)
    y_ref.backward(dy)
    assert gua.grad.shape == (2, 3, 128) and rel(gua.grad, gur.grad) < tol and rel(wa.grad, wr.grad) < tol
    with pytest.raises(ValueError, match="even last dim"):
        swiglu.swiglu_norm_act_quant(torch.randn(4, 9), torch.ones(4), EPS, torch.float32)


@interpreter
def test_swiglu_op_under_compile_and_autograd_on_the_interpreter():
    """The op with its launch settings as an argument compiles into one graph (fullgraph) and matches the
    reference, forward and backward."""
    gate_up, w = swiglu_inputs((4, 5, 64), torch.float32)
    launch = SwigluLaunch(fwd_rows=2, bwd_prefetch=False)
    gua, wa = gate_up.clone().requires_grad_(), w.clone().requires_grad_()
    f = torch.compile(lambda a, b: swiglu.swiglu_norm_act_quant(a, b, EPS, torch.float32, launch), fullgraph=True)
    y = f(gua, wa)
    y.square().sum().backward()
    gur, wr = gate_up.clone().requires_grad_(), w.clone().requires_grad_()
    y_ref = swiglu_norm_act_quant_reference(gur, wr, EPS, torch.float32)
    y_ref.square().sum().backward()
    assert rel(y, y_ref) < 1e-4 and rel(gua.grad, gur.grad) < 1e-4 and rel(wa.grad, wr.grad) < 1e-4


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("change", [{}, {"bwd_prefetch": not SwigluLaunch().bwd_prefetch},
                                    {"bwd_stages": 2, "bwd_prefetch": False}])
def test_swiglu_kernels_on_gpu(change):
    shapes = [(1, 3072), (37, 3072), (2, 1024, 3072), (4096, 3072), (5, 64), (3, 1000), (2, 7, 768)]
    dtypes = [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.float32, torch.bfloat16)]
    run_swiglu_vs_fallback("cuda", shapes, dtypes, launch=replace(SwigluLaunch(), **change))


@pytest.mark.gpu
@cuda
def test_swiglu_op_under_compile_and_autograd():
    gate_up, w = (t.cuda() for t in swiglu_inputs((4, 33, 3072), torch.bfloat16))
    gua, wa = gate_up.clone().requires_grad_(), w.clone().requires_grad_()
    f = torch.compile(lambda a, b: swiglu.swiglu_norm_act_quant(a, b, EPS, torch.bfloat16), fullgraph=True)
    y = f(gua, wa)
    y.float().square().sum().backward()
    gur, wr = gate_up.clone().requires_grad_(), w.clone().requires_grad_()
    y_ref = swiglu_norm_act_quant_reference(gur, wr, EPS, torch.bfloat16)
    y_ref.float().square().sum().backward()
    assert rel(y, y_ref) < 2e-2
    for a, b in ((gua, gur), (wa, wr)):
        assert rel(a.grad, b.grad) < 3e-2


def run_swiglu_e4m3_vs_reference(device: str, shapes, dtypes) -> None:
    """The forward kernel on the FP8 forward's e4m3 grid: y as the reference's (bit for bit from fp32 inputs
    on any target), and its e4m3 operand and power-of-two row scales giving y back exactly."""
    for shape in shapes:
        for xdt in dtypes:
            gate_up, w = (t.to(device) for t in swiglu_inputs(shape, xdt, seed=shape[-1]))
            n = shape[-1]
            g2, u2 = gate_up.reshape(-1, 2 * n).chunk(2, dim=1)
            y, rstd = (torch.full(s, float("nan"), dtype=d, device=device)
                       for s, d in ((g2.shape, torch.bfloat16), ((g2.shape[0],), torch.float32)))
            y8 = torch.full(g2.shape, float("nan"), device=device).to(torch.float8_e4m3fn)
            scale = torch.full((g2.shape[0],), float("nan"), device=device)
            swiglu.launch_swiglu_forward(g2, u2, w, y, rstd, EPS, SwigluLaunch(), y8, scale)
            ref = swiglu_norm_act_quant_reference(gate_up, w, EPS, torch.bfloat16, e4m3=True).reshape(g2.shape)
            assert not (y.isnan().any() or y8.float().isnan().any() or scale.isnan().any()), (shape, xdt)
            assert torch.equal(scale.log2(), scale.log2().round())
            assert torch.equal(y8.float() * scale[:, None], y.float()), (shape, xdt)
            if xdt == torch.float32 and device == "cpu":
                assert torch.equal(y, ref), (shape, xdt, rel(y, ref))
            elif device == "cuda":  # the kernel's sigmoid (exp2, fast reciprocal) is not torch's: an ulp apart
                # now and then, which can move a value across an e4m3 rounding boundary (found on an H100:
                # 2e-4 relative over 2,048 rows of 3,072)
                assert rel(y, ref) < 1e-2 and (y == ref).float().mean() > 0.999, (shape, xdt, rel(y, ref))
            else:  # the interpreter truncates bf16 casts (helpers.py): silu * up an ulp apart, and the same
                assert rel(y, ref) < 5e-2 and (y == ref).float().mean() > 0.9, (shape, xdt)


@interpreter
def test_swiglu_e4m3_kernel_on_the_interpreter():
    run_swiglu_e4m3_vs_reference("cpu", [(3, 64), (7, 100), (2, 3, 3072)], [torch.float32, torch.bfloat16])


@interpreter
def test_swiglu_e4m3_op_through_autograd_on_the_interpreter():
    """The op's e4m3 outputs carry no gradient: y's gradient is the int8 op's (the STE's identity)."""
    gate_up, w = swiglu_inputs((2, 3, 64), torch.float32)
    gua, wa = gate_up.clone().requires_grad_(), w.clone().requires_grad_()
    y, y8, scale = swiglu.swiglu_norm_act_quant_e4m3(gua, wa, EPS, torch.float32)
    assert y8.shape == (2, 3, 64) and y8.dtype == torch.float8_e4m3fn and scale.shape == (6, 1)
    assert not (y8.requires_grad or scale.requires_grad)
    gur, wr = gate_up.clone().requires_grad_(), w.clone().requires_grad_()
    y_ref = swiglu.swiglu_norm_act_quant(gur, wr, EPS, torch.float32)
    dy = torch.randn(y.shape)
    y.backward(dy)
    y_ref.backward(dy)
    assert torch.equal(gua.grad, gur.grad) and torch.equal(wa.grad, wr.grad)


@pytest.mark.gpu
@cuda
def test_swiglu_e4m3_kernel_on_gpu():
    run_swiglu_e4m3_vs_reference("cuda", [(37, 3072), (2, 1024, 3072), (5, 64), (3, 1000)],
                                 [torch.bfloat16, torch.float32])


if triton is not None:
    import triton.language as tl

    from bitnet.model.kernels.common import e4m3_quant_rows

    @triton.jit
    def _e4m3_rows_kernel(Y, R, S, N, BLOCK_N: tl.constexpr):
        # one row per program through the kernels' e4m3 helper, its amax clamped as theirs is
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        ok = cols < N
        y = tl.load(Y + row * N + cols, mask=ok, other=0.0)[None, :]
        r, scale = e4m3_quant_rows(y, tl.maximum(tl.max(tl.abs(y), axis=1), 1e-5))
        tl.store(R + row * N + cols[None, :], r, mask=ok[None, :])
        tl.store(S + row + tl.arange(0, 1), scale)


@interpreter
def test_e4m3_rounding_arithmetic_is_torchs_cast_on_every_value_and_tie():
    """The kernels round onto e4m3 by arithmetic, not by a cast: on every e4m3 value, every midpoint (a tie,
    rounded half to even) and an ulp either side of it, subnormals included, at several power-of-two scales,
    it must give torch's float8 cast exactly, and the scale of `references.e4m3_row_scale`."""
    from bitnet.model.kernels.references import e4m3_row_scale
    e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values = e4m3[e4m3.isfinite() & (e4m3 >= 0)].unique().sort().values
    ties = (values[1:] + values[:-1]) / 2
    row = torch.cat([values, ties, ties.nextafter(torch.tensor(1e9)), ties.nextafter(torch.tensor(-1e9)),
                     torch.tensor([2.0 ** -10, 3 * 2.0 ** -11, 1e-30])])
    row = torch.cat([row, -row])  # 448 is in it: the scale is 1, then 2^k below
    y = torch.stack([row * 2.0 ** k for k in (-20, -7, 0, 5, 30)] + [row * 0])
    r, scale = torch.empty_like(y), torch.empty(y.shape[0])
    _e4m3_rows_kernel[(y.shape[0],)](y, r, scale, y.shape[1], BLOCK_N=triton.next_power_of_2(y.shape[1]))
    ref_scale = e4m3_row_scale(y.abs().amax(dim=1, keepdim=True).clamp(min=EPS))
    assert torch.equal(scale, ref_scale.view(-1))
    assert torch.equal(r, (y / ref_scale).to(torch.float8_e4m3fn).float())
    assert r[2, :len(values)].tolist() == values.tolist()  # scale 1: the values themselves come back
