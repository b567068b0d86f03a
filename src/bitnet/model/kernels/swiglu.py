"""The FFN's middle as one Triton kernel: silu(gate) * up, the sub-norm, and the 8-bit fake quantization.

What `ffn_sub_norm` computes on the SwiGLU product, in one read of gate and up and one write of the
quantized row; the product is never stored, the backward recomputes it from gate and up and writes both
gradients in one pass. Its neighbours are GEMMs on both sides, so unlike the plain norm kernel it takes no
fusion away from inductor. Per 95m layer on an H100: forward 0.21 ms against inductor's 0.39 (2.9 TB/s),
backward 0.59 against 0.55; -1.0 ms per step (benchmarks/NOTES.md, run 4). Registered as
`bitnet::swiglu_norm_act_quant` and `bitnet::swiglu_norm_backward`; their launch settings travel as an
argument (`SwigluLaunch`), so a benchmark picks them through `KernelChoice` rather than a global.
Reference: `references.swiglu_norm_act_quant_reference`.
"""

from dataclasses import dataclass

import torch

from bitnet.model.kernels.common import as_rows, backward_programs, triton
from bitnet.model.kernels.references import EPS

if triton is not None:
    import triton.language as tl

    from bitnet.model.kernels.common import e4m3_quant_rows, load_rows, row_block


@dataclass(frozen=True)
class SwigluLaunch:
    """Launch settings of the SwiGLU kernels; the defaults are the shipped ones.

    Rows per program and warps, and for the backward, programs per SM (each loops over its share of rows,
    keeping the norm gain's gradient in registers), the prefetch of the next row and Triton's load
    pipelining (stages). Chosen by benchmarks/kernel_speed.py (--sweep, --bwd-sweep) and the 95m step on an
    H100 (benchmarks/NOTES.md, runs 4 and 5): the backward alone takes 0.41 ms with one prefetched row per
    iteration over 16 warps, against 0.60 ms without the prefetch.
    """

    fwd_rows: int = 1
    fwd_warps: int = 8
    bwd_rows: int = 1
    bwd_warps: int = 16
    bwd_programs_per_sm: int = 4
    bwd_prefetch: bool = True
    bwd_stages: int = 1

    def as_ints(self) -> list[int]:
        """The fields in order, as the custom ops take them (an op argument cannot be a dataclass); plain
        attribute reads, which torch.compile traces without a graph break."""
        return [self.fwd_rows, self.fwd_warps, self.bwd_rows, self.bwd_warps, self.bwd_programs_per_sm,
                int(self.bwd_prefetch), self.bwd_stages]

    @classmethod
    def from_ints(cls, values: list[int]) -> "SwigluLaunch":
        fwd_rows, fwd_warps, bwd_rows, bwd_warps, per_sm, prefetch, stages = values
        return cls(fwd_rows, fwd_warps, bwd_rows, bwd_warps, per_sm, bool(prefetch), stages)


def swiglu_norm_act_quant(gate_up: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype,
                          launch: SwigluLaunch = SwigluLaunch()) -> torch.Tensor:
    """RMSNorm(silu(gate) * up) * weight, fake-quantized per token to 8 bits with STE, in out_dtype: the
    Triton kernels (CUDA tensors, or CPU ones under Triton's interpreter).

    gate_up (..., 2 * ffn) holds gate and up side by side; its gradient comes back as one tensor too, so
    the fused gate/up GEMM's backward reads it without a copy.
    """
    y, _, _, _ = torch.ops.bitnet.swiglu_norm_act_quant(gate_up, weight, eps, out_dtype, launch.as_ints(), False)
    return y


def swiglu_norm_act_quant_e4m3(gate_up: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype,
                               launch: SwigluLaunch = SwigluLaunch()
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`swiglu_norm_act_quant` on the FP8 forward's e4m3 grid (`references.e4m3_act_quant`): (y, y8, scale)
    with y as before (the STE's output, what the backward reads), and from the same pass the down GEMM's
    operand y8 (..., ffn) e4m3 with its power-of-two row scales (M, 1) fp32, y = y8 * scale exactly."""
    y, _, y8, scale = torch.ops.bitnet.swiglu_norm_act_quant(gate_up, weight, eps, out_dtype, launch.as_ints(), True)
    return y, y8, scale


if triton is not None:

    @triton.jit
    def _swiglu_product(g, u, DTYPE: tl.constexpr):
        # silu(g) * u with eager's roundings: silu's result and the product each in the inputs' dtype.
        # The sigmoid from exp2 and the fast reciprocal: a handful of instructions per element, which
        # keeps this memory-bound kernel from waiting on its arithmetic.
        sig = 1.0 / (1.0 + tl.exp2(g * -1.4426950408889634))
        a = (g * sig).to(DTYPE).to(tl.float32)
        return sig, a, (a * u).to(DTYPE).to(tl.float32)

    @triton.jit
    def _swiglu_norm_quant_fwd_kernel(G, U, W, Y, RSTD, Y8, SCALE, M, N, stride_g, stride_u, stride_y, stride_y8,
                                      eps, quant_eps, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                                      E4M3: tl.constexpr):
        # As rmsnorm.py's forward kernel, on h = silu(g) * u formed in registers and never stored.
        # E4M3: the FP8 forward's grid instead of int8 levels, and also its e4m3 values and row scales
        # (Y8, SCALE) for the next GEMM.
        cols = tl.arange(0, BLOCK_N)
        rows, row_ok, mask, rows64 = row_block(tl.program_id(0) * ROWS, M, cols < N, ROWS)
        g = load_rows(G, rows64, stride_g, cols, mask)
        u = load_rows(U, rows64, stride_u, cols, mask)
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
        _, _, h = _swiglu_product(g, u, G.dtype.element_ty)  # masked lanes: silu(0) * 0 = 0
        rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(h * h, axis=1) / N + eps))
        y = (h * rstd[:, None] * w[None, :]).to(G.dtype.element_ty).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(y), axis=1), quant_eps)
        if E4M3:
            q, step = e4m3_quant_rows(y, amax)
            tl.store(Y8 + rows64[:, None] * stride_y8 + cols[None, :], q.to(Y8.dtype.element_ty), mask=mask)
            tl.store(SCALE + rows, step, mask=row_ok)
        else:
            v = y * tl.div_rn(127.0, amax)[:, None]
            q = tl.minimum(tl.maximum((v + 12582912.0) - 12582912.0, -128.0), 127.0)  # round half to even
            # q / s as q * (max|y| / 127): a multiply per element instead of a division (at most an ulp of
            # fp32 apart, which the bf16 output does not see)
            step = amax / 127.0
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], (q * step[:, None]).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=row_ok)

    @triton.jit
    def _load_raw(PTR, rows64, stride, cols, mask):
        # A (ROWS, BLOCK_N) tile as stored (bf16 in training): half the registers of fp32 while in flight.
        return tl.load(PTR + rows64[:, None] * stride + cols[None, :], mask=mask, other=0.0,
                       eviction_policy="evict_first")

    @triton.jit
    def _swiglu_norm_bwd_kernel(DY, G, U, W, RSTD, DG, DU, DW_PARTIAL, M, N, stride_dy, stride_g, stride_u,
                                stride_dg, stride_du, rows_per_program, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                                PREFETCH: tl.constexpr, STAGES: tl.constexpr):
        # The RMSNorm backward of rmsnorm.py's kernel on the recomputed h, then the SwiGLU backward:
        # du = dh * silu(g), dg = dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))).
        # PREFETCH: the next row block's loads are issued before this one's arithmetic, so a program keeps
        # memory busy while it computes (few programs fit an SM: a whole row lives in registers).
        # STAGES > 1: Triton's software pipelining of the loop's loads instead.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        start = pid * rows_per_program
        end = tl.minimum(start + rows_per_program, M)  # a prefetch past this program's rows loads nothing
        if PREFETCH:
            _, _, mask, rows64 = row_block(start, end, col_ok, ROWS)
            dy_next = _load_raw(DY, rows64, stride_dy, cols, mask)
            g_next = _load_raw(G, rows64, stride_g, cols, mask)
            u_next = _load_raw(U, rows64, stride_u, cols, mask)
        for r0 in tl.range(0, rows_per_program, ROWS, num_stages=STAGES):
            rows, row_ok, mask, rows64 = row_block(start + r0, end, col_ok, ROWS)
            if PREFETCH:
                dy_raw, g_raw, u_raw = dy_next, g_next, u_next
                _, _, next_mask, next64 = row_block(start + r0 + ROWS, end, col_ok, ROWS)
                dy_next = _load_raw(DY, next64, stride_dy, cols, next_mask)
                g_next = _load_raw(G, next64, stride_g, cols, next_mask)
                u_next = _load_raw(U, next64, stride_u, cols, next_mask)
            else:
                dy_raw = _load_raw(DY, rows64, stride_dy, cols, mask)
                g_raw = _load_raw(G, rows64, stride_g, cols, mask)
                u_raw = _load_raw(U, rows64, stride_u, cols, mask)
            dy, g, u = dy_raw.to(tl.float32), g_raw.to(tl.float32), u_raw.to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            sig, a, h = _swiglu_product(g, u, G.dtype.element_ty)
            hhat = h * rstd[:, None]
            wdy = dy * w[None, :]
            c = tl.sum(hhat * wdy, axis=1) / N
            dh = (wdy - hhat * c[:, None]) * rstd[:, None]
            tl.store(DU + rows64[:, None] * stride_du + cols[None, :], (dh * a).to(DU.dtype.element_ty), mask=mask)
            dg = dh * u * sig * (1.0 + g * (1.0 - sig))
            tl.store(DG + rows64[:, None] * stride_dg + cols[None, :], dg.to(DG.dtype.element_ty), mask=mask)
            dw += tl.sum(dy * hhat, axis=0)
        tl.store(DW_PARTIAL + pid * N + cols, dw, mask=col_ok)


# Launch settings of the SwiGLU kernels: rows per program and warps, and for the backward, programs per
# SM (each loops over its share of rows, keeping the norm gain's gradient in registers), the prefetch of
# the next row and Triton's load pipelining (stages). Chosen by benchmarks/kernel_speed.py (--sweep,


def swiglu_backward_programs(m: int, device: torch.device, launch: SwigluLaunch = SwigluLaunch()) -> tuple[int, int]:
    """(programs, rows per program) of the SwiGLU backward under `launch`."""
    return backward_programs(m, launch.bwd_rows, device, launch.bwd_programs_per_sm)


def launch_swiglu_forward(g2: torch.Tensor, u2: torch.Tensor, weight: torch.Tensor, y: torch.Tensor,
                          rstd: torch.Tensor, eps: float, launch: SwigluLaunch = SwigluLaunch(),
                          y8: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> None:
    """Fill y (M, N) and rstd (M,) from gate and up (M, N); with y8 (M, N) e4m3 and scale (M,) the FP8
    forward's grid and its operand too. Tests pass poisoned outputs."""
    M, N = g2.shape
    rows = launch.fwd_rows
    e4m3 = y8 is not None
    _swiglu_norm_quant_fwd_kernel[(triton.cdiv(M, rows),)](
        g2, u2, weight, y, rstd, y8 if e4m3 else y, scale if e4m3 else rstd, M, N, g2.stride(0), u2.stride(0),
        y.stride(0), y8.stride(0) if e4m3 else 0, eps, EPS,
        ROWS=rows, BLOCK_N=triton.next_power_of_2(N), E4M3=e4m3, num_warps=launch.fwd_warps)


def launch_swiglu_backward(dy2: torch.Tensor, g2: torch.Tensor, u2: torch.Tensor, weight: torch.Tensor,
                           rstd: torch.Tensor, dg: torch.Tensor, du: torch.Tensor, dw_partial: torch.Tensor,
                           rows_per_program: int, launch: SwigluLaunch = SwigluLaunch()) -> None:
    """Fill dg, du (M, N) and dw_partial (programs, N); the caller sums dw_partial over programs.

    programs and rows_per_program come from `swiglu_backward_programs` with the same `launch`.
    """
    M, N = g2.shape
    rows = launch.bwd_rows
    assert rows_per_program % rows == 0 and dw_partial.shape[0] * rows_per_program >= M
    _swiglu_norm_bwd_kernel[(dw_partial.shape[0],)](
        dy2, g2, u2, weight, rstd, dg, du, dw_partial, M, N, dy2.stride(0), g2.stride(0), u2.stride(0),
        dg.stride(0), du.stride(0), rows_per_program, ROWS=rows, BLOCK_N=triton.next_power_of_2(N),
        PREFETCH=launch.bwd_prefetch, STAGES=launch.bwd_stages, num_warps=launch.bwd_warps)


def _halves(t2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up halves (M, N) of a (M, 2N) row matrix, as strided views."""
    if t2.shape[1] % 2:
        raise ValueError(f"gate_up needs an even last dim (gate and up side by side), got {t2.shape[1]}")
    return t2.chunk(2, dim=1)


if triton is not None:

    def _e4m3_outputs(gate_up: torch.Tensor, e4m3: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The e4m3 operand (..., ffn) and its row scales (M, 1), empty unless e4m3."""
        rows, ffn = gate_up.numel() // gate_up.shape[-1], gate_up.shape[-1] // 2
        shape = (*gate_up.shape[:-1], ffn) if e4m3 else (0,)
        return (gate_up.new_empty(shape, dtype=torch.float8_e4m3fn),
                gate_up.new_empty((rows, 1) if e4m3 else (0,), dtype=torch.float32))

    @torch.library.custom_op("bitnet::swiglu_norm_act_quant", mutates_args=())
    def _swiglu_norm_act_quant_op(gate_up: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype,
                                  launch: list[int], e4m3: bool
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        g2, u2 = _halves(as_rows(gate_up))
        y = torch.empty(g2.shape, dtype=out_dtype, device=gate_up.device)
        rstd = torch.empty(g2.shape[0], dtype=torch.float32, device=gate_up.device)
        y8, scale = _e4m3_outputs(gate_up, e4m3)
        launch_swiglu_forward(g2, u2, weight, y, rstd, eps, SwigluLaunch.from_ints(launch),
                              y8.view(g2.shape) if e4m3 else None, scale.view(-1) if e4m3 else None)
        return y.view(*gate_up.shape[:-1], g2.shape[1]), rstd, y8, scale

    @_swiglu_norm_act_quant_op.register_fake
    def _(gate_up, weight, eps, out_dtype, launch, e4m3):
        return (gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2), dtype=out_dtype),
                gate_up.new_empty(gate_up.numel() // gate_up.shape[-1], dtype=torch.float32),
                *_e4m3_outputs(gate_up, e4m3))

    @torch.library.custom_op("bitnet::swiglu_norm_backward", mutates_args=())
    def _swiglu_norm_backward_op(dy: torch.Tensor, gate_up: torch.Tensor, weight: torch.Tensor,
                                 rstd: torch.Tensor, launch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        settings = SwigluLaunch.from_ints(launch)
        gu2, dy2 = as_rows(gate_up), as_rows(dy)
        g2, u2 = _halves(gu2)
        d_gate_up = torch.empty(gu2.shape, dtype=gate_up.dtype, device=gate_up.device)
        dg, du = _halves(d_gate_up)  # the kernel writes both halves of one tensor
        programs, per = swiglu_backward_programs(g2.shape[0], gate_up.device, settings)
        dw_partial = torch.empty(programs, g2.shape[1], dtype=torch.float32, device=gate_up.device)
        launch_swiglu_backward(dy2, g2, u2, weight, rstd, dg, du, dw_partial, per, settings)
        return d_gate_up.view(gate_up.shape), dw_partial.sum(0).to(weight.dtype)

    @_swiglu_norm_backward_op.register_fake
    def _(dy, gate_up, weight, rstd, launch):
        return torch.empty_like(gate_up), torch.empty_like(weight)

    def _swiglu_setup_context(ctx, inputs, output):
        gate_up, weight, _, _, launch, _ = inputs
        ctx.save_for_backward(gate_up, weight, output[1])
        ctx.mark_non_differentiable(*output[1:])  # rstd, and the e4m3 operand: the STE's gradient goes to y
        ctx.launch = launch

    def _swiglu_backward(ctx, dy, _drstd, _dy8, _dscale):
        gate_up, weight, rstd = ctx.saved_tensors
        d_gate_up, dw = torch.ops.bitnet.swiglu_norm_backward(dy, gate_up, weight, rstd, ctx.launch)
        return d_gate_up, dw, None, None, None, None

    _swiglu_norm_act_quant_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup_context)
