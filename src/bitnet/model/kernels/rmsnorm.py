"""RMSNorm followed by BitNet's per-token absmax 8-bit fake quantization, as one Triton kernel.

Forward: one read of each row and one write of its quantized form. Backward: the RMSNorm backward in one
pass (the STE makes the quantizer the identity), the norm gain's gradient reduced from per-program
partial sums. Registered as the custom ops `bitnet::rmsnorm_act_quant` and `bitnet::rmsnorm_backward`,
so torch.compile and autograd see them as single nodes. Reference: `references.norm_act_quant_reference`.
"""

import torch

from bitnet.model.kernels.common import as_rows, backward_programs, triton
from bitnet.model.kernels.references import EPS

if triton is not None:
    import triton.language as tl

    from bitnet.model.kernels.common import load_rows, row_block


def rmsnorm_act_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm(x) * weight, fake-quantized per token to 8 bits with STE, in out_dtype: the Triton kernels
    (CUDA tensors, or CPU ones under Triton's interpreter)."""
    y, _ = torch.ops.bitnet.rmsnorm_act_quant(x, weight, eps, out_dtype)
    return y


if triton is not None:

    @triton.jit
    def _rmsnorm_act_quant_fwd_kernel(X, W, Y, RSTD, M, N, stride_x, stride_y, eps, quant_eps,
                                      ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        # ROWS rows per program, each whole in registers: two row reductions (sum of squares, then
        # absmax of the normed row) and one store; the math is the reference's, in fp32.
        cols = tl.arange(0, BLOCK_N)
        rows, row_ok, mask, rows64 = row_block(tl.program_id(0) * ROWS, M, cols < N, ROWS)
        x = load_rows(X, rows64, stride_x, cols, mask)
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
        rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(x * x, axis=1) / N + eps))
        y = x * rstd[:, None] * w[None, :]
        y = y.to(X.dtype.element_ty).to(tl.float32)  # the norm's output in x's dtype, as RMSNorm returns it
        s = tl.div_rn(127.0, tl.maximum(tl.max(tl.abs(y), axis=1), quant_eps))
        # Round half to even, as torch.round: adding and subtracting 1.5 * 2^23 leaves the nearest
        # integer in fp32 for |v| < 2^22 (here |v| <= 127).
        v = y * s[:, None]
        q = tl.minimum(tl.maximum((v + 12582912.0) - 12582912.0, -128.0), 127.0)
        q = tl.div_rn(q, s[:, None])
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], q.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=row_ok)

    @triton.jit
    def _rmsnorm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, M, N, stride_dy, stride_x, stride_dx,
                            rows_per_program, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        # dx = rstd * (w*dy - xhat * mean(xhat * w*dy)); dw = sum over rows of dy * xhat, kept per
        # program in registers and written once as one row of DW_PARTIAL.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        start = pid * rows_per_program
        for r0 in range(0, rows_per_program, ROWS):
            rows, row_ok, mask, rows64 = row_block(start + r0, M, col_ok, ROWS)
            dy = load_rows(DY, rows64, stride_dy, cols, mask)
            x = load_rows(X, rows64, stride_x, cols, mask)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            xhat = x * rstd[:, None]
            wdy = dy * w[None, :]
            c = tl.sum(xhat * wdy, axis=1) / N
            dx = (wdy - xhat * c[:, None]) * rstd[:, None]
            tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            dw += tl.sum(dy * xhat, axis=0)
        tl.store(DW_PARTIAL + pid * N + cols, dw, mask=col_ok)


def rows_and_warps(n: int) -> tuple[int, int, int]:
    """(BLOCK_N, rows per program, warps): about 4096 elements a program (768 -> 4 rows, 3072 -> 1)."""
    block = triton.next_power_of_2(n)
    rows = max(1, 4096 // block)
    warps = 8 if block * rows >= 4096 else 4
    return block, rows, warps


def launch_forward(x2: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor, eps: float) -> None:
    """Fill y (M, N) and rstd (M,) from x2 (M, N); tests pass poisoned y and rstd to see every write."""
    M, N = x2.shape
    block, rows, warps = rows_and_warps(N)
    _rmsnorm_act_quant_fwd_kernel[(triton.cdiv(M, rows),)](
        x2, weight, y, rstd, M, N, x2.stride(0), y.stride(0), eps, EPS,
        ROWS=rows, BLOCK_N=block, num_warps=warps)


def launch_backward(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                    dx: torch.Tensor, dw_partial: torch.Tensor, rows_per_program: int) -> None:
    """Fill dx (M, N) and dw_partial (programs, N); the caller sums dw_partial over programs."""
    M, N = x2.shape
    block, rows, warps = rows_and_warps(N)
    assert rows_per_program % rows == 0 and dw_partial.shape[0] * rows_per_program >= M
    _rmsnorm_bwd_kernel[(dw_partial.shape[0],)](
        dy2, x2, weight, rstd, dx, dw_partial, M, N, dy2.stride(0), x2.stride(0), dx.stride(0),
        rows_per_program, ROWS=rows, BLOCK_N=block, num_warps=warps)


if triton is not None:

    @torch.library.custom_op("bitnet::rmsnorm_act_quant", mutates_args=())
    def _rmsnorm_act_quant_op(x: torch.Tensor, weight: torch.Tensor, eps: float,
                              out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        x2 = as_rows(x)
        y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        launch_forward(x2, weight, y, rstd, eps)
        return y.view(x.shape), rstd

    @_rmsnorm_act_quant_op.register_fake
    def _(x, weight, eps, out_dtype):
        return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)

    @torch.library.custom_op("bitnet::rmsnorm_backward", mutates_args=())
    def _rmsnorm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x2, dy2 = as_rows(x), as_rows(dy)
        dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        programs, per = backward_programs(x2.shape[0], rows_and_warps(x2.shape[1])[1], x.device)
        dw_partial = torch.empty(programs, x2.shape[1], dtype=torch.float32, device=x.device)
        launch_backward(dy2, x2, weight, rstd, dx, dw_partial, per)
        return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype)

    @_rmsnorm_backward_op.register_fake
    def _(dy, x, weight, rstd):
        return torch.empty_like(x), torch.empty_like(weight)

    def _setup_context(ctx, inputs, output):
        x, weight, _, _ = inputs
        ctx.save_for_backward(x, weight, output[1])
        ctx.mark_non_differentiable(output[1])

    def _backward(ctx, dy, _drstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = torch.ops.bitnet.rmsnorm_backward(dy, x, weight, rstd)
        return dx, dw, None, None

    _rmsnorm_act_quant_op.register_autograd(_backward, setup_context=_setup_context)
