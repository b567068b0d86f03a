"""The stacked q/k/v projections' output split into q, k and v with RoPE on q and k, as one Triton kernel.

One token row per program; the backward writes the stacked gradient's rows in place from the three
incoming gradients, so the stacked GEMM's backward needs no concatenation (which inductor wrote at a
quarter of this rate). Registered as `bitnet::rope_qkv` and `bitnet::rope_qkv_backward`.
Reference: `references.rope_qkv_reference`.
"""

import torch

from bitnet.model.kernels.common import triton, unit_last

if triton is not None:
    import triton.language as tl


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int,
             n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, heads, T, D) from the stacked q/k/v projections' output qkv (B, T, (H + 2 Hkv) D),
    with RoPE applied to q and k (cos, sin: (T, D / 2)): the Triton kernels (CUDA tensors, or CPU ones
    under Triton's interpreter).

    One kernel reads each token's row and writes q, k (rotated) and v; the backward writes the gradient
    of qkv as one tensor, each row from the three incoming gradients, so the stacked GEMM's backward reads
    it without a concatenation.
    """
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
        launch_rope_qkv_backward(unit_last(dq), unit_last(dk), unit_last(dv), cos.contiguous(),
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

