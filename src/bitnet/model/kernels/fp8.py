"""FP8 tensor-core GEMMs for the training step, through `torch._scaled_mm` (docs/design.md, section "FP8").

Four switches (`KernelChoice.fp8_*`), each off by default, used when training on CUDA in bf16 (`choice.fp8_backward`,
`choice.fp8_forward`, `choice.head_cross_entropy`); whoever turns them on checks the card has FP8 tensor cores (compute capability 8.9+,
`supported`), as `bitnet-train --fp8` does:

- `fp8_grad_input`: BitLinear's dX = dY @ W_q. W_q = W_t / s with W_t in {-1, 0, +1}; the per-output-row
  scales 1/s move onto dY's columns, so the ternary matrix enters the GEMM exactly in e4m3 and only dY
  (row-scaled e4m3) rounds.
- `fp8_grad_weight`: BitLinear's dW = dY^T @ X, both operands e4m3 with one scale per output (dY's columns)
  and per input feature (X's columns). X holds int8 levels times a per-token scale; what is cast is that
  product over its feature's scale, not the level, so every value rounds to e4m3's 3 mantissa bits (at most
  1/16 relative error in its normal range; values below 2^-6 of their feature's largest fall into subnormals
  or flush to zero). Unlike the ternary weights, the int8 levels themselves are not exact in e4m3 above 16
  (17 -> 16 or 18, 100 -> 96). This touches the weight gradient only; the forward stays exact. (Under
  `fp8_forward` X holds e4m3 values times a power-of-two row scale instead of int8 levels.)
- `fp8_head`: the tied head + cross entropy. The forward logits come from e4m3 x and W (one scale each);
  one Triton kernel turns each chunk of logits into the loss and the logits' gradient g = softmax - onehot
  in e5m2 (g * 2^15; a transposed copy feeds dW), and the gradient GEMMs run
  in the forward, chunk by chunk, so no logits-sized tensor outlives its chunk. e5m2 (2 mantissa bits,
  range to 2^-16) is the gradient format: every row of g has max |g| >= 1/2 (either the target's 1 - p or
  the largest p is), so a per-row scale would gain at most one bit, and the fixed scale keeps
  probabilities down to ~5e-10 instead of e4m3's ~2e-6.

- `fp8_forward` (switch 4): BitLinear's forward GEMM from e4m3 activations and the exact e4m3 ternary
  weights, with the activations' power-of-two row scales and the weights' 1/s per output column. The
  activations are quantized onto that grid by their quantizers (`references.e4m3_act_quant`), so the GEMM's
  operand is recovered from the bf16 value exactly (`e4m3_grid_rows`) or comes from the kernel's own pass.
  This one changes the training forward's numerics; eval, sampling and exports keep int8 levels.

With the first three alone the forward of every BitLinear is unchanged (bf16 GEMM on the exact ternary and
int8 values), so eval, sampling and every export see the same model with the switches on or off.
"""

import torch
import torch.nn.functional as F

from bitnet.model.kernels.common import INTERPRET, triton
from bitnet.model.kernels.references import E4M3_MAX, EPS, IGNORE_INDEX, e4m3_row_scale

if triton is not None:
    import triton.language as tl

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
GRAD_SCALE = 2.0 ** 15
"""The head gradient g (|g| <= 1) is stored as e5m2(g * 2^15): below e5m2's maximum 57,344, a power of two."""
HEAD_CHUNK_ROWS = 8192
"""Tokens per chunk of the FP8 head: 8192 x 32000 logits are 0.5 GiB in bf16 (the exact path holds 2 GiB)."""


def supported(t: torch.Tensor) -> bool:
    """Whether t lives where FP8 tensor cores are: CUDA compute capability 8.9 (Ada) or newer."""
    return t.is_cuda and torch.cuda.get_device_capability(t.device) >= (8, 9)


def to_e4m3_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t (R, C) as row-major e4m3 (a transposed view is copied) with one fp32 scale per row: t ~= t8 * scale,
    scale (R, 1); zero rows get scale 1."""
    amax = t.abs().amax(dim=1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, 1.0)
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).contiguous(), scale


def to_e4m3(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t as e4m3 with one fp32 scale for the tensor (0-dim): t ~= t8 * scale."""
    amax = t.abs().amax().float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, 1.0)
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def e4m3_grid_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8 (M, K) e4m3, scale (M, 1) fp32) with x8 * scale == x exactly, for x (..., K) already on the FP8
    forward's grid (`references.e4m3_act_quant`): the scale is the power of two of x's own row maximum, which
    is the quantizer's or half of it, and either maps every value of the row onto e4m3 without rounding."""
    x2 = x.detach().reshape(-1, x.shape[-1])  # an operand, not a path for gradients: they go through x
    scale = e4m3_row_scale(x2.abs().amax(dim=1, keepdim=True).float().clamp(min=EPS))
    return (x2.float() / scale).to(E4M3), scale


def mm_nt(a8: torch.Tensor, a_scale: torch.Tensor, b8: torch.Tensor, b_scale: torch.Tensor,
          out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(a8 * a_scale) @ (b8 * b_scale)^T from row-major a8 (M, K) and b8 (N, K), the layout FP8 tensor cores
    take (cuBLASLt refuses others). Scales: both 0-dim (any out_dtype), or (M, 1) and (N, 1) per row (bf16 out
    only)."""
    if not (a8.is_contiguous() and b8.is_contiguous()):
        raise ValueError("mm_nt takes row-major (contiguous) operands")
    if a_scale.dim():
        b_scale = b_scale.reshape(1, -1)
    return torch._scaled_mm(a8, b8.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype)


class _TernaryLinear(torch.autograd.Function):
    """x @ w_q^T with F.linear's forward, or from e4m3 operands (x8, x_scale, w8) where given; the backward's
    GEMMs in FP8 where asked, else as F.linear's."""

    @staticmethod
    def forward(ctx, x, w_q, w_ternary_t, inv_scale, grad_input_fp8: bool, grad_weight_fp8: bool,
                x8=None, x_scale=None, w8=None):
        # only what the backward reads: the FP8 dX needs W_t and 1/s, the exact one W_q; both dW need x
        if grad_input_fp8:
            ctx.save_for_backward(x, None, w_ternary_t, inv_scale)
        else:
            ctx.save_for_backward(x, w_q, None, None)
        ctx.fp8 = grad_input_fp8, grad_weight_fp8
        if x8 is None:
            return F.linear(x, w_q)
        y = mm_nt(x8.reshape(-1, x8.shape[-1]), x_scale, w8, inv_scale, x.dtype)  # x8*scale @ (W_t/s)^T
        return y.view(*x.shape[:-1], w8.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, w_q, w_ternary_t, inv_scale = ctx.saved_tensors
        grad_input_fp8, grad_weight_fp8 = ctx.fp8
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        dx = dw = None
        if ctx.needs_input_grad[0]:
            if grad_input_fp8:  # dY @ (W_t / s) = (dY / s) @ W_t: W_t is exact in e4m3
                a8, a_scale = to_e4m3_rows(dy2 * inv_scale)
                ones = torch.ones((w_ternary_t.shape[0], 1), device=dy.device)
                dx = mm_nt(a8, a_scale, w_ternary_t, ones, dy.dtype)
            else:
                dx = dy2 @ w_q
            dx = dx.view(*dy.shape[:-1], dx.shape[-1])
        if ctx.needs_input_grad[1]:
            if grad_weight_fp8:  # dY^T @ X over the tokens: scales per output and per input feature
                a8, a_scale = to_e4m3_rows(dy2.t())
                b8, b_scale = to_e4m3_rows(x2.t())
                dw = mm_nt(a8, a_scale, b8, b_scale, dy.dtype)
            else:
                dw = dy2.t() @ x2
        return dx, dw, None, None, None, None, None, None, None


def ternary_linear(x: torch.Tensor, w_q: torch.Tensor, w_ternary: torch.Tensor, inv_scale: torch.Tensor,
                   grad_input_fp8: bool, grad_weight_fp8: bool,
                   x_e4m3: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x @ w_q^T where w_q = w_ternary * inv_scale[:, None] (rows may come from several layers, each with its
    own scale); gradients flow to x and w_q as through F.linear, their GEMMs in FP8 where asked.

    x (..., K) and w_q (N, K) in the matmul dtype, w_ternary (N, K) in {-1, 0, +1}, inv_scale (N,) fp32.
    x_e4m3: (x8 (..., K) e4m3, row scales (M, 1) fp32) with x8 * scale == x: the forward GEMM in FP8 from them
    and the ternary matrix (exact in e4m3), scaled by 1/s per output column.
    """
    w_ternary = w_ternary.detach()
    w_ternary_t = w_ternary.t().contiguous().to(E4M3) if grad_input_fp8 else None
    x8, x_scale = x_e4m3 if x_e4m3 is not None else (None, None)
    w8 = w_ternary.to(E4M3) if x_e4m3 is not None else None
    return _TernaryLinear.apply(x, w_q, w_ternary_t, inv_scale.detach(), grad_input_fp8, grad_weight_fp8,
                                x8, x_scale, w8)


# ---------------------------------------------------------------------------- the tied head + cross entropy

if triton is not None:

    @triton.jit
    def _cross_entropy_fp8_kernel(LOGITS, TARGETS, LOSS, G, M, V, stride_l, stride_g, ignore_index, grad_scale,
                                  BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
        # BLOCK_M rows per program. Pass 1: an online log-sum-exp per row over BLOCK_V-wide tiles,
        # loss = lse - logit[target]. Pass 2: g = softmax - onehot(target) (0 on ignored rows), times
        # grad_scale, stored as e5m2 in G (M, V).
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        t = tl.load(TARGETS + rows, mask=row_ok, other=ignore_index)
        valid = row_ok & (t != ignore_index)
        x_t = tl.load(LOGITS + rows64 * stride_l + tl.where(valid, t, 0), mask=row_ok, other=0.0).to(tl.float32)
        m = tl.full([BLOCK_M], -1e30, tl.float32)  # finite: masked lanes never make inf - inf
        acc = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = row_ok[:, None] & (cols < V)[None, :]
            x = tl.load(LOGITS + rows64[:, None] * stride_l + cols[None, :], mask=mask, other=-1e30).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=1))
            acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
            m = m_new
        lse = m + tl.log(acc)
        tl.store(LOSS + rows, tl.where(valid, lse - x_t, 0.0), mask=row_ok)
        keep = tl.where(valid, grad_scale, 0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = row_ok[:, None] & (cols < V)[None, :]
            x = tl.load(LOGITS + rows64[:, None] * stride_l + cols[None, :], mask=mask, other=-1e30).to(tl.float32)
            g = tl.exp(x - lse[:, None])
            g = tl.where(cols[None, :] == t[:, None], g - 1.0, g) * keep[:, None]
            tl.store(G + rows64[:, None] * stride_g + cols[None, :], g.to(G.dtype.element_ty), mask=mask)


def cross_entropy_fp8_rows(logits: torch.Tensor, targets: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per row (M,) fp32, e5m2(g * 2^15) as (M, V) and as (V, M)) from logits (M, V) and targets (M,),
    g = softmax(logits) - onehot(targets), 0 on rows whose target is IGNORE_INDEX.

    The Triton kernel on CUDA (and under Triton's interpreter), then a transposing copy; the same math in
    PyTorch elsewhere. (The kernel wrote the transposed layout itself at first: on an H100 two vocabulary rows
    of it came out wrong, so the copy, about 0.7 ms per 95m step, stands until that is understood.)
    """
    M, V = logits.shape
    if triton is not None and (logits.is_cuda or INTERPRET):
        loss = torch.empty(M, dtype=torch.float32, device=logits.device)
        g8 = torch.empty((M, V), dtype=E5M2, device=logits.device)
        block_m, block_v = 32, 256
        _cross_entropy_fp8_kernel[(triton.cdiv(M, block_m),)](
            logits, targets, loss, g8, M, V, logits.stride(0), g8.stride(0), IGNORE_INDEX, GRAD_SCALE,
            BLOCK_M=block_m, BLOCK_V=block_v, num_warps=8)
        return loss, g8, g8.t().contiguous()
    return cross_entropy_fp8_rows_reference(logits, targets)


def cross_entropy_fp8_rows_reference(logits: torch.Tensor, targets: torch.Tensor
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`cross_entropy_fp8_rows` in PyTorch (fp32 math): the CPU path and the kernel's reference."""
    valid = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=-1)
    safe = torch.where(valid, targets, 0)
    loss = torch.where(valid, -logp.gather(1, safe[:, None]).squeeze(1), 0.0)
    g = logp.exp()
    g[torch.arange(len(targets), device=g.device), safe] -= 1.0
    g = g * torch.where(valid, GRAD_SCALE, 0.0)[:, None]
    g8 = g.to(E5M2)
    return loss, g8, g8.t().contiguous()


class _HeadCrossEntropyFP8(torch.autograd.Function):
    """Mean cross entropy of x @ weight^T with the head's three GEMMs in FP8; both gradients made in the forward.

    Per chunk of tokens: logits (bf16) from e4m3 operands, the kernel's loss rows and e5m2 gradient, then
    dX[chunk] = G @ W and dW += G^T @ x[chunk] (fp32 accumulation). The backward only scales them by the
    incoming gradient / the count of targets.
    """

    @staticmethod
    def forward(ctx, x2, weight, targets, chunk_rows: int):
        M = x2.shape[0]
        w8, w_scale = to_e4m3(weight)
        wt8 = w8.t().contiguous()  # (D, V): the K-major layout of W for dX = G @ W
        grad_scale = torch.full((), 1.0 / GRAD_SCALE, device=x2.device)  # no host copy: CUDA graphs capture it
        loss_rows = torch.empty(M, dtype=torch.float32, device=x2.device)
        grad_x = torch.empty(x2.shape, dtype=torch.float32, device=x2.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x2.device)
        for start in range(0, M, chunk_rows):
            rows = slice(start, min(start + chunk_rows, M))
            x8, x_scale = to_e4m3(x2[rows])
            logits = mm_nt(x8, x_scale, w8, w_scale)  # (chunk, V) bf16
            loss_rows[rows], g8, gt8 = cross_entropy_fp8_rows(logits, targets[rows])
            del logits
            grad_x[rows] = mm_nt(g8, grad_scale, wt8, w_scale, torch.float32)
            grad_w += mm_nt(gt8, grad_scale, x8.t().contiguous(), x_scale, torch.float32)
        count = (targets != IGNORE_INDEX).sum().clamp(min=1).float()
        ctx.save_for_backward(grad_x, grad_w, count)
        ctx.dtypes = x2.dtype, weight.dtype
        return loss_rows.sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w, count = ctx.saved_tensors
        scale = grad_loss.float() / count
        return (grad_x * scale).to(ctx.dtypes[0]), (grad_w * scale).to(ctx.dtypes[1]), None, None


@torch.compiler.disable  # eager, like the exact head: its chunk loop and kernel stay out of the graph
def head_cross_entropy_fp8(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           chunk_rows: int = HEAD_CHUNK_ROWS) -> torch.Tensor:
    """Mean next-token cross entropy of the logits x @ weight^T against targets (IGNORE_INDEX: not counted),
    the head's GEMMs in FP8. x (..., D), weight (V, D), targets (...)."""
    return _HeadCrossEntropyFP8.apply(x.reshape(-1, x.shape[-1]), weight, targets.reshape(-1), chunk_rows)
