"""What the kernel files share: the Triton import, the interpreter switch and the row-block helpers.

Triton is optional: on CPU-only installs `triton` is None here and only the references run (the
choice module checks `available()` before it calls a kernel).
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the references serve every call
    triton = None

# Triton's CPU interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors: tests use it.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """True when the Triton kernels can run on CUDA tensors here."""
    return triton is not None and torch.cuda.is_available()


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(M, N) view with unit column stride (copies only if the last dim is strided)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def unit_last(t: torch.Tensor) -> torch.Tensor:
    """t itself if its last dim is contiguous, else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def backward_programs(m: int, rows: int, device: torch.device, per_sm: int = 2) -> tuple[int, int]:
    """(programs, rows per program) for a row-looping backward: about per_sm programs per SM, whole row
    blocks each."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    per = triton.cdiv(triton.cdiv(m, per_sm * sms), rows) * rows
    return triton.cdiv(m, per), per


if triton is not None:

    @triton.jit
    def row_block(first, M, col_ok, ROWS: tl.constexpr):
        # Rows first .. first + ROWS - 1: their indices (int64 for the addresses) and masks.
        rows = first + tl.arange(0, ROWS)
        row_ok = rows < M
        return rows, row_ok, row_ok[:, None] & col_ok[None, :], rows.to(tl.int64)

    @triton.jit
    def e4m3_quant_rows(y, amax):
        # references.e4m3_act_quant on a (ROWS, BLOCK_N) fp32 tile with its rows' amax (>= the quantizers' eps):
        # (r, scale) with r = y / scale rounded to e4m3 in fp32 and scale (ROWS,) the power of two
        # 2^ceil(log2(amax / 448)). The rounding is done in fp32 arithmetic, not by a cast, so it is the same
        # on every target (Triton's interpreter rounds fp8 casts differently): e4m3 keeps 3 mantissa bits, so
        # the quantum of |v| in [2^e, 2^(e+1)) is 2^(e-3), and 2^-9 below the smallest normal 2^-6; adding
        # and subtracting 1.5 * 2^23 quanta rounds half to even onto it.
        bits = tl.div_rn(amax, 448.0).to(tl.int32, bitcast=True)
        exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        scale = (exponent << 23).to(tl.float32, bitcast=True)
        v = y * ((254 - exponent) << 23).to(tl.float32, bitcast=True)[:, None]  # y / scale, exactly
        v_exponent = (v.to(tl.int32, bitcast=True) >> 23) & 0xFF
        magic = ((tl.maximum(v_exponent, 121) - 3) << 23).to(tl.float32, bitcast=True) * 12582912.0
        r = tl.minimum(tl.maximum((v + magic) - magic, -448.0), 448.0)
        return r, scale

    @triton.jit
    def load_rows(PTR, rows64, stride, cols, mask):
        # A (ROWS, BLOCK_N) tile of a row-major matrix in fp32, zeros where masked.
        return tl.load(PTR + rows64[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
