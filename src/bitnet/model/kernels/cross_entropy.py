"""The tied head and the next-token cross entropy as one autograd function, around one Triton kernel.

Its forward runs the head GEMM, then one kernel reads each bf16 logits row for an online log-sum-exp and
again (mostly from L2) to write the gradient over it: the loss's backward is gone, and with it a read and a
write of the 2 GiB logits (32 x 1024 x 32000 in bf16); no second logits-sized buffer exists. The backward is
the head's two GEMMs. Reference: `references.head_cross_entropy_reference` (fp32 logits).
"""

from dataclasses import dataclass

import torch

from bitnet.model.kernels.common import triton
from bitnet.model.kernels.references import IGNORE_INDEX

if triton is not None:
    import triton.language as tl

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


@dataclass(frozen=True)
class CrossEntropyLaunch:
    """Launch settings of the cross entropy kernel, and how many rows of the head run at once; block and
    warps default to the shipped ones, chunk_rows to the whole batch (the trainer sets it from
    --head-chunk-rows, 4096 by default).

    On an H100 at 32768 x 32000 bf16 the kernel takes 1.68 ms (2.50 TB/s) against 1.75 with 8 warps and
    2.12 with the whole row held in registers in one read (benchmarks/kernel_speed.py --ce-sweep;
    benchmarks/NOTES.md, run 5).
    """

    block: int = 4096
    warps: int = 16
    chunk_rows: int = 0  # > 0: the head in chunks of this many rows (`_LinearCrossEntropy`); 0: all rows at once

    def __post_init__(self):
        if type(self.chunk_rows) is not int or self.chunk_rows < 0:
            raise ValueError(f"CrossEntropyLaunch.chunk_rows must be an int >= 0, got {self.chunk_rows!r}")


def launch_cross_entropy(logits2: torch.Tensor, targets: torch.Tensor, count: torch.Tensor, loss_rows: torch.Tensor,
                         launch: CrossEntropyLaunch = CrossEntropyLaunch()) -> None:
    """Fill loss_rows (M,) from logits2 (M, V) and targets (M,), then overwrite logits2 with the
    gradient of loss_rows.sum() / count (count: 0-dim fp32 on the device). Tests poison loss_rows."""
    M, V = logits2.shape
    block = min(launch.block, triton.next_power_of_2(V))
    _cross_entropy_kernel[(M,)](logits2, targets, loss_rows, count, V, logits2.stride(0), IGNORE_INDEX,
                                BLOCK=block, num_warps=launch.warps)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross entropy of the logits x @ weight^T; their gradient is made in the forward, over them.

    The backward only multiplies: grad_x = G @ W and grad_W = G^T @ x, each scaled by the incoming
    gradient (a number known only then), on the small side of each GEMM. Between the head's GEMMs the
    logits are read once and written once, where a loss with a backward of its own reads them twice.

    With launch.chunk_rows > 0 (and training) the logits exist one chunk of rows at a time: each chunk's
    gradient GEMMs run in the forward, G @ W into its rows of grad_x and G^T @ x added to an fp32 grad_W,
    and what is kept for the backward is those two (M x D and V x D) instead of the M x V logits: 2 GiB
    at the 95m's 32 x 1024 x 32000, 0.5 GiB in chunks of 8192 rows. The loss is the same row by row;
    grad_W sums the chunks' bf16 products in fp32 where one GEMM accumulates all rows before rounding.
    """

    @staticmethod
    def forward(ctx, x2, weight, targets, dtype, launch, grad_in_forward):
        x_mm, w_mm = x2.to(dtype), weight.to(dtype)
        count = (targets != IGNORE_INDEX).sum().clamp(min=1).float()  # stays on the device: no sync
        loss_rows = torch.empty(x2.shape[0], dtype=torch.float32, device=x2.device)
        ctx.dtypes, ctx.chunked = (x2.dtype, weight.dtype), grad_in_forward
        if not grad_in_forward:
            logits = x_mm @ w_mm.t()  # (M, V): becomes its own gradient below
            launch_cross_entropy(logits, targets, count, loss_rows, launch)
            ctx.save_for_backward(logits, x_mm, w_mm)
            return loss_rows.sum() / count
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x = torch.empty_like(x_mm) if need_x else None
        grad_w = torch.zeros(w_mm.shape, dtype=torch.float32, device=w_mm.device) if need_w else None
        for start in range(0, x2.shape[0], launch.chunk_rows):
            part = slice(start, start + launch.chunk_rows)
            logits = x_mm[part] @ w_mm.t()
            launch_cross_entropy(logits, targets[part], count, loss_rows[part], launch)
            if need_x:
                torch.matmul(logits, w_mm, out=grad_x[part])
            if need_w:
                _accumulate_product(grad_w, logits.t(), x_mm[part])
            del logits
        ctx.save_for_backward(grad_x, grad_w)
        return loss_rows.sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        scale = grad_loss.float()
        grad_x = grad_w = None
        if ctx.chunked:
            made_x, made_w = ctx.saved_tensors
            if ctx.needs_input_grad[0]:
                grad_x = _scale_into(made_x, scale, ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                grad_w = _scale_into(made_w, scale, ctx.dtypes[1])
            return grad_x, grad_w, None, None, None, None
        grad_logits, x_mm, w_mm = ctx.saved_tensors
        if ctx.needs_input_grad[0]:
            grad_x = _scale_into(grad_logits @ w_mm, scale, ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_w = _scale_into(grad_logits.t() @ x_mm, scale, ctx.dtypes[1])
        return grad_x, grad_w, None, None, None, None


_ADDMM_OUT_DTYPE = hasattr(torch.ops.aten.addmm, "dtype_out")
"""torch.addmm(..., out_dtype=...) exists (PyTorch 2.8 and later; CUDA kernels only)."""


def _accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for an fp32 acc: on CUDA one GEMM that reads and writes acc in fp32 (cuBLAS accumulates the
    bf16 product in fp32 and adds it to acc), where a bf16 product and then an add would write, read and add a
    V x D temporary per chunk; elsewhere (no such kernel on the CPU, or a torch before 2.8) the product, then
    the add."""
    if _ADDMM_OUT_DTYPE and acc.is_cuda and a.dtype != acc.dtype:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += a @ b


def _scale_into(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t * scale as a new tensor of dtype, in one pass (a multiply in place and then a cast would be two)."""
    return torch.mul(t, scale, out=torch.empty(t.shape, dtype=dtype, device=t.device))


@torch.compiler.disable  # eager on purpose: its forward writes a gradient into a tensor autograd saved
def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype,
                         launch: CrossEntropyLaunch = CrossEntropyLaunch()) -> torch.Tensor:
    """Mean next-token cross entropy of the logits x @ weight^T (matmul in dtype) against targets: the
    Triton kernel (CUDA tensors, or CPU ones under Triton's interpreter).

    x (..., D), weight (V, D), targets (...) with IGNORE_INDEX for positions that do not count.
    """
    x2 = x.reshape(-1, x.shape[-1])
    chunked = 0 < launch.chunk_rows < x2.shape[0] and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(x2, weight, targets.reshape(-1), dtype, launch, chunked)
