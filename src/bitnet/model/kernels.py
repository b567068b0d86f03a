"""Triton kernels for the BitNet training step (CUDA), each beside a PyTorch fallback of the same function.

`rmsnorm_act_quant`: RMSNorm followed by BitNet's per-token absmax 8-bit fake quantization, one
read of each row and one write of its quantized form (forward); the backward is the RMSNorm
backward in one pass (the STE makes the quantizer the identity), with the norm gain's gradient
reduced from per-program partial sums. Registered as the custom ops `bitnet::rmsnorm_act_quant`
and `bitnet::rmsnorm_backward`, so torch.compile and autograd see them as single nodes.
Fallback: `bitlinear.norm_act_quant_reference`.

`swiglu_norm_act_quant`: the FFN's middle, silu(gate) * up, then the sub-norm and the 8-bit fake
quantization (what `ffn_sub_norm` computes on the SwiGLU product), in one read of gate and up and one
write of the quantized row; the product is never stored, the backward recomputes it from gate and up
and writes both gradients in one pass. Its neighbours are GEMMs on both sides, so unlike the plain
norm kernel it takes no fusion away from inductor. Per 95m layer on an H100: forward 0.21 ms against
inductor's 0.39 (2.9 TB/s), backward 0.59 against 0.55; -1.0 ms per step (benchmarks/NOTES.md, run 4).
Registered as `bitnet::swiglu_norm_act_quant` and `bitnet::swiglu_norm_backward`.
Fallback: `bitlinear.swiglu_norm_act_quant_reference`.

`rope_qkv`: the stacked q/k/v projections' output (one GEMM) split into q, k and v with RoPE applied to q
and k, one token row per program; the backward writes the stacked gradient's rows in place from the
three incoming gradients, so the stacked GEMM's backward needs no concatenation (which inductor wrote at a
quarter of this rate). Registered as `bitnet::rope_qkv` and `bitnet::rope_qkv_backward`.
Fallback: `llama.rope_qkv_reference`.

`linear_cross_entropy`: the tied head and the next-token cross entropy as one autograd function. Its
forward runs the head GEMM, then one kernel reads each bf16 logits row for an online log-sum-exp and
again (mostly from L2) to write the gradient over it: the loss's backward is gone, and with it a read
and a write of the 2 GiB logits (32 x 1024 x 32000 in bf16); no second logits-sized buffer exists. The
backward is the head's two GEMMs. Fallback: `llama.head_cross_entropy_reference` (fp32 logits).
tests/model/test_kernels.py checks every kernel against its fallback.
"""

import os

import torch

from bitnet.model.bitlinear import EPS, norm_act_quant_reference, swiglu_norm_act_quant_reference
from bitnet.model.llama import head_cross_entropy_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the fallback serves every call
    triton = None

# Triton's CPU interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors: tests use it.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """True when the Triton kernels can run on CUDA tensors here."""
    return triton is not None and torch.cuda.is_available()


def rmsnorm_act_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm(x) * weight, fake-quantized per token to 8 bits with STE, returned in out_dtype.

    The Triton kernels on CUDA (or under Triton's interpreter); otherwise the PyTorch fallback.
    """
    if triton is None or not (x.is_cuda or _INTERPRET):
        return norm_act_quant_reference(x, weight, eps, out_dtype)
    y, _ = torch.ops.bitnet.rmsnorm_act_quant(x, weight, eps, out_dtype)
    return y


if triton is not None:

    @triton.jit
    def _row_block(first, M, col_ok, ROWS: tl.constexpr):
        # Rows first .. first + ROWS - 1: their indices (int64 for the addresses) and masks.
        rows = first + tl.arange(0, ROWS)
        row_ok = rows < M
        return rows, row_ok, row_ok[:, None] & col_ok[None, :], rows.to(tl.int64)

    @triton.jit
    def _load_rows(PTR, rows64, stride, cols, mask):
        # A (ROWS, BLOCK_N) tile of a row-major matrix in fp32, zeros where masked.
        return tl.load(PTR + rows64[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _rmsnorm_act_quant_fwd_kernel(X, W, Y, RSTD, M, N, stride_x, stride_y, eps, quant_eps,
                                      ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        # ROWS rows per program, each whole in registers: two row reductions (sum of squares, then
        # absmax of the normed row) and one store; the math is the fallback's, in fp32.
        cols = tl.arange(0, BLOCK_N)
        rows, row_ok, mask, rows64 = _row_block(tl.program_id(0) * ROWS, M, cols < N, ROWS)
        x = _load_rows(X, rows64, stride_x, cols, mask)
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
            rows, row_ok, mask, rows64 = _row_block(start + r0, M, col_ok, ROWS)
            dy = _load_rows(DY, rows64, stride_dy, cols, mask)
            x = _load_rows(X, rows64, stride_x, cols, mask)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            xhat = x * rstd[:, None]
            wdy = dy * w[None, :]
            c = tl.sum(xhat * wdy, axis=1) / N
            dx = (wdy - xhat * c[:, None]) * rstd[:, None]
            tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            dw += tl.sum(dy * xhat, axis=0)
        tl.store(DW_PARTIAL + pid * N + cols, dw, mask=col_ok)


def _rows_and_warps(n: int) -> tuple[int, int, int]:
    """(BLOCK_N, rows per program, warps): about 4096 elements a program (768 -> 4 rows, 3072 -> 1)."""
    block = triton.next_power_of_2(n)
    rows = max(1, 4096 // block)
    warps = 8 if block * rows >= 4096 else 4
    return block, rows, warps


def launch_forward(x2: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor, eps: float) -> None:
    """Fill y (M, N) and rstd (M,) from x2 (M, N); tests pass poisoned y and rstd to see every write."""
    M, N = x2.shape
    block, rows, warps = _rows_and_warps(N)
    _rmsnorm_act_quant_fwd_kernel[(triton.cdiv(M, rows),)](
        x2, weight, y, rstd, M, N, x2.stride(0), y.stride(0), eps, EPS,
        ROWS=rows, BLOCK_N=block, num_warps=warps)


def backward_programs(m: int, rows: int, device: torch.device, per_sm: int = 2) -> tuple[int, int]:
    """(programs, rows per program) for the backward: about per_sm programs per SM, whole row blocks each."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    per = triton.cdiv(triton.cdiv(m, per_sm * sms), rows) * rows
    return triton.cdiv(m, per), per


def launch_backward(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                    dx: torch.Tensor, dw_partial: torch.Tensor, rows_per_program: int) -> None:
    """Fill dx (M, N) and dw_partial (programs, N); the caller sums dw_partial over programs."""
    M, N = x2.shape
    block, rows, warps = _rows_and_warps(N)
    assert rows_per_program % rows == 0 and dw_partial.shape[0] * rows_per_program >= M
    _rmsnorm_bwd_kernel[(dw_partial.shape[0],)](
        dy2, x2, weight, rstd, dx, dw_partial, M, N, dy2.stride(0), x2.stride(0), dx.stride(0),
        rows_per_program, ROWS=rows, BLOCK_N=block, num_warps=warps)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(M, N) view with unit column stride (copies only if the last dim is strided)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


if triton is not None:

    @torch.library.custom_op("bitnet::rmsnorm_act_quant", mutates_args=())
    def _rmsnorm_act_quant_op(x: torch.Tensor, weight: torch.Tensor, eps: float,
                              out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        x2 = _rows(x)
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
        x2, dy2 = _rows(x), _rows(dy)
        dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        programs, per = backward_programs(x2.shape[0], _rows_and_warps(x2.shape[1])[1], x.device)
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


# ---------------------------------------------------------------------------- SwiGLU + sub-norm + quantize


def swiglu_norm_act_quant(gate_up: torch.Tensor, weight: torch.Tensor, eps: float,
                          out_dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm(silu(gate) * up) * weight, fake-quantized per token to 8 bits with STE, in out_dtype.

    gate_up (..., 2 * ffn) holds gate and up side by side; its gradient comes back as one tensor too, so
    the fused gate/up GEMM's backward reads it without a copy. The Triton kernels on CUDA (or under
    Triton's interpreter); otherwise the PyTorch fallback.
    """
    if triton is None or not (gate_up.is_cuda or _INTERPRET):
        return swiglu_norm_act_quant_reference(gate_up, weight, eps, out_dtype)
    y, _ = torch.ops.bitnet.swiglu_norm_act_quant(gate_up, weight, eps, out_dtype)
    return y


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
    def _swiglu_norm_quant_fwd_kernel(G, U, W, Y, RSTD, M, N, stride_g, stride_u, stride_y, eps, quant_eps,
                                      ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        # As _rmsnorm_act_quant_fwd_kernel, on h = silu(g) * u formed in registers and never stored.
        cols = tl.arange(0, BLOCK_N)
        rows, row_ok, mask, rows64 = _row_block(tl.program_id(0) * ROWS, M, cols < N, ROWS)
        g = _load_rows(G, rows64, stride_g, cols, mask)
        u = _load_rows(U, rows64, stride_u, cols, mask)
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
        _, _, h = _swiglu_product(g, u, G.dtype.element_ty)  # masked lanes: silu(0) * 0 = 0
        rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(h * h, axis=1) / N + eps))
        y = (h * rstd[:, None] * w[None, :]).to(G.dtype.element_ty).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(y), axis=1), quant_eps)
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
        # The RMSNorm backward of _rmsnorm_bwd_kernel on the recomputed h, then the SwiGLU backward:
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
            _, _, mask, rows64 = _row_block(start, end, col_ok, ROWS)
            dy_next = _load_raw(DY, rows64, stride_dy, cols, mask)
            g_next = _load_raw(G, rows64, stride_g, cols, mask)
            u_next = _load_raw(U, rows64, stride_u, cols, mask)
        for r0 in tl.range(0, rows_per_program, ROWS, num_stages=STAGES):
            rows, row_ok, mask, rows64 = _row_block(start + r0, end, col_ok, ROWS)
            if PREFETCH:
                dy_raw, g_raw, u_raw = dy_next, g_next, u_next
                _, _, next_mask, next64 = _row_block(start + r0 + ROWS, end, col_ok, ROWS)
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
# --bwd-sweep) and the 95m step on an H100 (benchmarks/NOTES.md, runs 4 and 5): the backward alone takes
# 0.41 ms with one prefetched row per iteration over 16 warps, against 0.60 ms without the prefetch.
SWIGLU_LAUNCH = {"fwd_rows": 1, "fwd_warps": 8, "bwd_rows": 1, "bwd_warps": 16, "bwd_programs_per_sm": 4,
                 "bwd_prefetch": True, "bwd_stages": 1}


def swiglu_backward_programs(m: int, device: torch.device, launch: dict | None = None) -> tuple[int, int]:
    """(programs, rows per program) of the SwiGLU backward under `launch` (default SWIGLU_LAUNCH)."""
    launch = SWIGLU_LAUNCH if launch is None else launch
    return backward_programs(m, launch["bwd_rows"], device, launch["bwd_programs_per_sm"])


def launch_swiglu_forward(g2: torch.Tensor, u2: torch.Tensor, weight: torch.Tensor, y: torch.Tensor,
                          rstd: torch.Tensor, eps: float, launch: dict | None = None) -> None:
    """Fill y (M, N) and rstd (M,) from gate and up (M, N); tests pass poisoned y and rstd."""
    launch = SWIGLU_LAUNCH if launch is None else launch
    M, N = g2.shape
    rows = launch["fwd_rows"]
    _swiglu_norm_quant_fwd_kernel[(triton.cdiv(M, rows),)](
        g2, u2, weight, y, rstd, M, N, g2.stride(0), u2.stride(0), y.stride(0), eps, EPS,
        ROWS=rows, BLOCK_N=triton.next_power_of_2(N), num_warps=launch["fwd_warps"])


def launch_swiglu_backward(dy2: torch.Tensor, g2: torch.Tensor, u2: torch.Tensor, weight: torch.Tensor,
                           rstd: torch.Tensor, dg: torch.Tensor, du: torch.Tensor, dw_partial: torch.Tensor,
                           rows_per_program: int, launch: dict | None = None) -> None:
    """Fill dg, du (M, N) and dw_partial (programs, N); the caller sums dw_partial over programs.

    programs and rows_per_program come from `swiglu_backward_programs` with the same `launch`.
    """
    launch = SWIGLU_LAUNCH if launch is None else launch
    M, N = g2.shape
    rows = launch["bwd_rows"]
    assert rows_per_program % rows == 0 and dw_partial.shape[0] * rows_per_program >= M
    _swiglu_norm_bwd_kernel[(dw_partial.shape[0],)](
        dy2, g2, u2, weight, rstd, dg, du, dw_partial, M, N, dy2.stride(0), g2.stride(0), u2.stride(0),
        dg.stride(0), du.stride(0), rows_per_program, ROWS=rows, BLOCK_N=triton.next_power_of_2(N),
        PREFETCH=launch.get("bwd_prefetch", False), STAGES=launch.get("bwd_stages", 1), num_warps=launch["bwd_warps"])


def _halves(t2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up halves (M, N) of a (M, 2N) row matrix, as strided views."""
    if t2.shape[1] % 2:
        raise ValueError(f"gate_up needs an even last dim (gate and up side by side), got {t2.shape[1]}")
    return t2.chunk(2, dim=1)


if triton is not None:

    @torch.library.custom_op("bitnet::swiglu_norm_act_quant", mutates_args=())
    def _swiglu_norm_act_quant_op(gate_up: torch.Tensor, weight: torch.Tensor, eps: float,
                                  out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        g2, u2 = _halves(_rows(gate_up))
        y = torch.empty(g2.shape, dtype=out_dtype, device=gate_up.device)
        rstd = torch.empty(g2.shape[0], dtype=torch.float32, device=gate_up.device)
        launch_swiglu_forward(g2, u2, weight, y, rstd, eps)
        return y.view(*gate_up.shape[:-1], g2.shape[1]), rstd

    @_swiglu_norm_act_quant_op.register_fake
    def _(gate_up, weight, eps, out_dtype):
        return (gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2), dtype=out_dtype),
                gate_up.new_empty(gate_up.numel() // gate_up.shape[-1], dtype=torch.float32))

    @torch.library.custom_op("bitnet::swiglu_norm_backward", mutates_args=())
    def _swiglu_norm_backward_op(dy: torch.Tensor, gate_up: torch.Tensor, weight: torch.Tensor,
                                 rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gu2, dy2 = _rows(gate_up), _rows(dy)
        g2, u2 = _halves(gu2)
        d_gate_up = torch.empty(gu2.shape, dtype=gate_up.dtype, device=gate_up.device)
        dg, du = _halves(d_gate_up)  # the kernel writes both halves of one tensor
        programs, per = swiglu_backward_programs(g2.shape[0], gate_up.device)
        dw_partial = torch.empty(programs, g2.shape[1], dtype=torch.float32, device=gate_up.device)
        launch_swiglu_backward(dy2, g2, u2, weight, rstd, dg, du, dw_partial, per)
        return d_gate_up.view(gate_up.shape), dw_partial.sum(0).to(weight.dtype)

    @_swiglu_norm_backward_op.register_fake
    def _(dy, gate_up, weight, rstd):
        return torch.empty_like(gate_up), torch.empty_like(weight)

    def _swiglu_setup_context(ctx, inputs, output):
        gate_up, weight, _, _ = inputs
        ctx.save_for_backward(gate_up, weight, output[1])
        ctx.mark_non_differentiable(output[1])

    def _swiglu_backward(ctx, dy, _drstd):
        gate_up, weight, rstd = ctx.saved_tensors
        d_gate_up, dw = torch.ops.bitnet.swiglu_norm_backward(dy, gate_up, weight, rstd)
        return d_gate_up, dw, None, None

    _swiglu_norm_act_quant_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup_context)


# ---------------------------------------------------------------------------- q/k/v split + RoPE


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int,
             n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, heads, T, D) from the stacked q/k/v projections' output qkv (B, T, (H + 2 Hkv) D),
    with RoPE applied to q and k (cos, sin: (T, D / 2)).

    One kernel reads each token's row and writes q, k (rotated) and v; the backward writes the gradient
    of qkv as one tensor, each row from the three incoming gradients, so the stacked GEMM's backward reads
    it without a concatenation. The Triton kernels on CUDA (or under Triton's interpreter); otherwise
    `llama.rope_qkv_reference`.
    """
    from bitnet.model.llama import rope_qkv_reference

    if triton is None or not (qkv.is_cuda or _INTERPRET):
        return rope_qkv_reference(qkv, cos, sin, n_heads, n_kv_heads)
    q, k, v = torch.ops.bitnet.rope_qkv(qkv, cos, sin, n_heads, n_kv_heads)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T, h, D) stored, (B, h, T, D) seen


if triton is not None:

    @triton.jit
    def _rope_qkv_fwd_kernel(QKV, COS, SIN, Q, K, V, T, stride_row, NQ: tl.constexpr, NKV: tl.constexpr,
                             QK_P2: tl.constexpr, KV_P2: tl.constexpr, HALF: tl.constexpr,
                             HALF_P2: tl.constexpr):
        # One token per program: its q and k heads as (heads, D/2) halves x1, x2, rotated in fp32 as
        # (x1 cos - x2 sin, x2 cos + x1 sin), and its v heads copied; outputs stored (token, head, D).
        # Head counts and D/2 are padded to powers of two (tl.arange's), the padding masked.
        m = tl.program_id(0).to(tl.int64)
        t = m % T
        heads = tl.arange(0, QK_P2)
        cols = tl.arange(0, HALF_P2)
        col_ok = cols < HALF
        ok = (heads < NQ + NKV)[:, None] & col_ok[None, :]
        row = QKV + m * stride_row + heads[:, None] * (2 * HALF) + cols[None, :]
        x1 = tl.load(row, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(row + HALF, mask=ok, other=0.0).to(tl.float32)
        c = tl.load(COS + t * HALF + cols, mask=col_ok, other=0.0)[None, :]
        s = tl.load(SIN + t * HALF + cols, mask=col_ok, other=0.0)[None, :]
        o1 = (x1 * c - x2 * s).to(Q.dtype.element_ty)
        o2 = (x2 * c + x1 * s).to(Q.dtype.element_ty)
        is_q = ok & (heads < NQ)[:, None]
        q_at = Q + m * (NQ * 2 * HALF) + heads[:, None] * (2 * HALF) + cols[None, :]
        tl.store(q_at, o1, mask=is_q)
        tl.store(q_at + HALF, o2, mask=is_q)
        is_k = ok & (heads >= NQ)[:, None]
        k_at = K + m * (NKV * 2 * HALF) + (heads - NQ)[:, None] * (2 * HALF) + cols[None, :]
        tl.store(k_at, o1, mask=is_k)
        tl.store(k_at + HALF, o2, mask=is_k)
        vh = tl.arange(0, KV_P2)
        vd = tl.arange(0, 2 * HALF_P2)
        v_ok = (vh < NKV)[:, None] & (vd < 2 * HALF)[None, :]
        v_row = QKV + m * stride_row + (NQ + NKV) * 2 * HALF
        v = tl.load(v_row + vh[:, None] * (2 * HALF) + vd[None, :], mask=v_ok)
        tl.store(V + m * (NKV * 2 * HALF) + vh[:, None] * (2 * HALF) + vd[None, :], v, mask=v_ok)

    @triton.jit
    def _load_heads(PTR, b, t, sb, st, sh, heads, cols, mask):
        # (heads, cols) of one token of a (B, T, heads, D) gradient with arbitrary strides (unit last dim).
        return tl.load(PTR + b * sb + t * st + heads[:, None] * sh + cols[None, :], mask=mask, other=0.0)

    @triton.jit
    def _rope_qkv_bwd_kernel(DQ, DK, DV, COS, SIN, DQKV, T, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
                             stride_row, NQ: tl.constexpr, NKV: tl.constexpr, Q_P2: tl.constexpr,
                             KV_P2: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr):
        # The rotation's transpose, dx1 = d1 cos + d2 sin, dx2 = d2 cos - d1 sin, for q's and k's heads,
        # and v's gradient copied: one row of dqkv per program, written once.
        m = tl.program_id(0).to(tl.int64)
        b, t = m // T, m % T
        cols = tl.arange(0, HALF_P2)
        col_ok = cols < HALF
        c = tl.load(COS + t * HALF + cols, mask=col_ok, other=0.0)[None, :]
        s = tl.load(SIN + t * HALF + cols, mask=col_ok, other=0.0)[None, :]
        out = DQKV + m * stride_row
        hq = tl.arange(0, Q_P2)
        q_ok = (hq < NQ)[:, None] & col_ok[None, :]
        d1 = _load_heads(DQ, b, t, sqb, sqt, sqh, hq, cols, q_ok).to(tl.float32)
        d2 = _load_heads(DQ, b, t, sqb, sqt, sqh, hq, cols + HALF, q_ok).to(tl.float32)
        at = out + hq[:, None] * (2 * HALF) + cols[None, :]
        tl.store(at, (d1 * c + d2 * s).to(DQKV.dtype.element_ty), mask=q_ok)
        tl.store(at + HALF, (d2 * c - d1 * s).to(DQKV.dtype.element_ty), mask=q_ok)
        hk = tl.arange(0, KV_P2)
        k_ok = (hk < NKV)[:, None] & col_ok[None, :]
        d1 = _load_heads(DK, b, t, skb, skt, skh, hk, cols, k_ok).to(tl.float32)
        d2 = _load_heads(DK, b, t, skb, skt, skh, hk, cols + HALF, k_ok).to(tl.float32)
        at = out + (NQ + hk)[:, None] * (2 * HALF) + cols[None, :]
        tl.store(at, (d1 * c + d2 * s).to(DQKV.dtype.element_ty), mask=k_ok)
        tl.store(at + HALF, (d2 * c - d1 * s).to(DQKV.dtype.element_ty), mask=k_ok)
        vd = tl.arange(0, 2 * HALF_P2)
        v_ok = (hk < NKV)[:, None] & (vd < 2 * HALF)[None, :]
        dv = _load_heads(DV, b, t, svb, svt, svh, hk, vd, v_ok)
        tl.store(out + (NQ + NKV + hk)[:, None] * (2 * HALF) + vd[None, :], dv.to(DQKV.dtype.element_ty), mask=v_ok)


def _qkv_geometry(qkv: torch.Tensor, cos: torch.Tensor, n_heads: int, n_kv_heads: int) -> tuple[int, int, int]:
    """(B, T, D) of a stacked q/k/v tensor, checked against the head counts and the RoPE table."""
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be (B, T, (H + 2 Hkv) D), got shape {tuple(qkv.shape)}")
    B, T, width = qkv.shape
    heads = n_heads + 2 * n_kv_heads
    if width % heads or (width // heads) % 2 or cos.shape != (T, width // heads // 2):
        raise ValueError(f"qkv width {width} does not split into {n_heads} + 2 x {n_kv_heads} heads of even "
                         f"size matching RoPE tables {tuple(cos.shape)} for {T} positions")
    return B, T, width // heads


def launch_rope_qkv_forward(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q: torch.Tensor,
                            k: torch.Tensor, v: torch.Tensor) -> None:
    """Fill q (B, T, H, D), k and v (B, T, Hkv, D), contiguous, from qkv (B, T, (H + 2 Hkv) D), contiguous;
    tests pass them poisoned."""
    B, T, _ = qkv.shape
    H, Hkv, D = q.shape[2], k.shape[2], q.shape[3]
    _rope_qkv_fwd_kernel[(B * T,)](qkv, cos, sin, q, k, v, T, qkv.stride(1), NQ=H, NKV=Hkv,
                                   QK_P2=triton.next_power_of_2(H + Hkv), KV_P2=triton.next_power_of_2(Hkv),
                                   HALF=D // 2, HALF_P2=triton.next_power_of_2(D // 2), num_warps=4)


def launch_rope_qkv_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor, dqkv: torch.Tensor) -> None:
    """Fill dqkv (B, T, (H + 2 Hkv) D) from the gradients of q, k, v given as (B, T, heads, D) with any
    strides whose last is 1."""
    B, T, H, D = dq.shape
    Hkv = dk.shape[2]
    _rope_qkv_bwd_kernel[(B * T,)](dq, dk, dv, cos, sin, dqkv, T, *dq.stride()[:3], *dk.stride()[:3],
                                   *dv.stride()[:3], dqkv.stride(1), NQ=H, NKV=Hkv, Q_P2=triton.next_power_of_2(H),
                                   KV_P2=triton.next_power_of_2(Hkv), HALF=D // 2,
                                   HALF_P2=triton.next_power_of_2(D // 2), num_warps=4)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


if triton is not None:

    @torch.library.custom_op("bitnet::rope_qkv", mutates_args=())
    def _rope_qkv_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int,
                     n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, D = _qkv_geometry(qkv, cos, n_heads, n_kv_heads)
        qkv = qkv.contiguous()  # rows indexed as b * T + t (a GEMM's output already is)
        q = qkv.new_empty(B, T, n_heads, D)
        k, v = qkv.new_empty(B, T, n_kv_heads, D), qkv.new_empty(B, T, n_kv_heads, D)
        launch_rope_qkv_forward(qkv, cos.contiguous(), sin.contiguous(), q, k, v)
        return q, k, v

    @_rope_qkv_op.register_fake
    def _(qkv, cos, sin, n_heads, n_kv_heads):
        B, T, D = _qkv_geometry(qkv, cos, n_heads, n_kv_heads)
        return (qkv.new_empty(B, T, n_heads, D), qkv.new_empty(B, T, n_kv_heads, D),
                qkv.new_empty(B, T, n_kv_heads, D))

    @torch.library.custom_op("bitnet::rope_qkv_backward", mutates_args=())
    def _rope_qkv_backward_op(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                              sin: torch.Tensor) -> torch.Tensor:
        B, T, H, D = dq.shape
        dqkv = dq.new_empty(B, T, (H + 2 * dk.shape[2]) * D)
        launch_rope_qkv_backward(_unit_last(dq), _unit_last(dk), _unit_last(dv), cos.contiguous(),
                                 sin.contiguous(), dqkv)
        return dqkv

    @_rope_qkv_backward_op.register_fake
    def _(dq, dk, dv, cos, sin):
        B, T, H, D = dq.shape
        return dq.new_empty(B, T, (H + 2 * dk.shape[2]) * D)

    def _rope_setup_context(ctx, inputs, output):
        _, cos, sin, _, _ = inputs
        ctx.save_for_backward(cos, sin)

    def _rope_backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        return torch.ops.bitnet.rope_qkv_backward(dq, dk, dv, cos, sin), None, None, None, None

    _rope_qkv_op.register_autograd(_rope_backward, setup_context=_rope_setup_context)


# ---------------------------------------------------------------------------- cross entropy

IGNORE_INDEX = -100  # F.cross_entropy's default: such targets add nothing to the loss or the count

if triton is not None:

    @triton.jit
    def _cross_entropy_kernel(LOGITS, TARGETS, LOSS, COUNT, V, stride, ignore_index, BLOCK: tl.constexpr):
        # One row per program. Pass 1: an online log-sum-exp over the vocabulary in BLOCK-wide strips
        # (each lane keeps its own running max and sum, merged at the end), loss = lse - logit[target].
        # Pass 2: the gradient of sum(loss) / count, (softmax - onehot(target)) / count, written over the
        # row; its reads find most of the row in L2, where pass 1 asked to keep it.
        row = tl.program_id(0).to(tl.int64)
        base = LOGITS + row * stride
        # The target's logit is read first: once any warp of this program reaches pass 2 it overwrites the
        # row, and warps do not wait for each other between the passes.
        t = tl.load(TARGETS + row)
        valid = t != ignore_index
        x_t = tl.load(base + tl.where(valid, t, 0)).to(tl.float32)
        m = tl.full([BLOCK], -1e30, tl.float32)  # finite: masked lanes never make inf - inf
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=-1e30, eviction_policy="evict_last").to(tl.float32)
            m_new = tl.maximum(m, x)
            acc = acc * tl.exp(m - m_new) + tl.exp(x - m_new)
            m = m_new
        mx = tl.max(m, axis=0)
        lse = mx + tl.log(tl.sum(acc * tl.exp(m - mx), axis=0))
        tl.store(LOSS + row, tl.where(valid, lse - x_t, 0.0))
        scale = tl.where(valid, 1.0 / tl.load(COUNT), 0.0)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            x = tl.load(base + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
            g = tl.exp(x - lse)
            g = tl.where(cols == t, g - 1.0, g) * scale
            tl.store(base + cols, g.to(LOGITS.dtype.element_ty), mask=mask)


# Launch settings of the cross entropy kernel. On an H100 at 32768 x 32000 bf16 the kernel takes 1.68 ms
# (2.50 TB/s) against 1.75 with 8 warps and 2.12 with the whole row held in registers in one read
# (benchmarks/kernel_speed.py --ce-sweep; benchmarks/NOTES.md, run 5).
CE_LAUNCH = {"block": 4096, "warps": 16}


def launch_cross_entropy(logits2: torch.Tensor, targets: torch.Tensor, count: torch.Tensor,
                         loss_rows: torch.Tensor) -> None:
    """Fill loss_rows (M,) from logits2 (M, V) and targets (M,), then overwrite logits2 with the
    gradient of loss_rows.sum() / count (count: 0-dim fp32 on the device). Tests poison loss_rows."""
    M, V = logits2.shape
    block = min(CE_LAUNCH["block"], triton.next_power_of_2(V))
    _cross_entropy_kernel[(M,)](logits2, targets, loss_rows, count, V, logits2.stride(0), IGNORE_INDEX,
                                BLOCK=block, num_warps=CE_LAUNCH["warps"])


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross entropy of the logits x @ weight^T; their gradient is made in the forward, over them.

    The backward only multiplies: grad_x = G @ W and grad_W = G^T @ x, each scaled by the incoming
    gradient (a number known only then), on the small side of each GEMM. Between the head's GEMMs the
    logits are read once and written once, where a loss with a backward of its own reads them twice.
    """

    @staticmethod
    def forward(ctx, x2, weight, targets, dtype):
        x_mm, w_mm = x2.to(dtype), weight.to(dtype)
        logits = x_mm @ w_mm.t()  # (M, V): becomes its own gradient below
        count = (targets != IGNORE_INDEX).sum().clamp(min=1).float()  # stays on the device: no sync
        loss_rows = torch.empty(x2.shape[0], dtype=torch.float32, device=x2.device)
        launch_cross_entropy(logits, targets, count, loss_rows)
        ctx.save_for_backward(logits, x_mm, w_mm)
        ctx.dtypes = x2.dtype, weight.dtype
        return loss_rows.sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_logits, x_mm, w_mm = ctx.saved_tensors
        scale = grad_loss.float()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _scale_into(grad_logits @ w_mm, scale, ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_w = _scale_into(grad_logits.t() @ x_mm, scale, ctx.dtypes[1])
        return grad_x, grad_w, None, None


def _scale_into(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t * scale as a new tensor of dtype, in one pass (a multiply in place and then a cast would be two)."""
    return torch.mul(t, scale, out=torch.empty(t.shape, dtype=dtype, device=t.device))


@torch.compiler.disable  # eager on purpose: its forward writes a gradient into a tensor autograd saved
def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         dtype: torch.dtype) -> torch.Tensor:
    """Mean next-token cross entropy of the logits x @ weight^T (matmul in dtype) against targets.

    x (..., D), weight (V, D), targets (...) with IGNORE_INDEX for positions that do not count. The
    Triton kernel on CUDA (or under Triton's interpreter); elsewhere `head_cross_entropy_reference`.
    """
    if triton is None or not (x.is_cuda or _INTERPRET):
        return head_cross_entropy_reference(x, weight, targets, dtype)
    return _LinearCrossEntropy.apply(x.reshape(-1, x.shape[-1]), weight, targets.reshape(-1), dtype)
