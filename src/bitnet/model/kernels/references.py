"""The PyTorch formulation of every fused op: what its kernel must compute, and what runs where none does.

Plain PyTorch and nothing from the model, so the kernels, their tests and the model all import it
without a cycle. Each function equals the model's unfused modules (tests/model/kernels/ check both):
`norm_act_quant_reference` is `RMSNorm` then BitLinear's input quantization, `rope_qkv_reference` is
three projections then `apply_rope`, `head_cross_entropy_reference` is the tied head then
F.cross_entropy. Written as single expressions, they are also what inductor fuses under torch.compile.
"""

import torch
import torch.nn.functional as F

EPS = 1e-5  # the quantizers' clamp: absmean and absmax scales never divide by less (bitlinear uses it too)
IGNORE_INDEX = -100  # F.cross_entropy's default: such targets add nothing to the loss or the count
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn


def e4m3_row_scale(amax: torch.Tensor) -> torch.Tensor:
    """The power of two 2^ceil(log2(amax / 448)) per row: amax (fp32, >= EPS) lands in (224, 448] e4m3 units.

    A power of two, so scaling is exact both ways: every e4m3 value times it is exact in bf16 (4 significant
    bits of 8), and the GEMM's e4m3 operand is recovered from the bf16 one without rounding. Read off the
    fp32 bits (exponent, plus one unless the mantissa is zero), as the Triton kernel does.
    """
    bits = (amax / E4M3_MAX).view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exponent << 23).view(torch.float32)


def e4m3_act_quant(y: torch.Tensor) -> torch.Tensor:
    """Per-token fake quantization of fp32 rows y to e4m3 with a power-of-two row scale (the FP8 forward's
    grid, `KernelChoice.fp8_forward`): e4m3(y / scale) * scale, round half to even, subnormals kept."""
    scale = e4m3_row_scale(y.abs().amax(dim=-1, keepdim=True).clamp(min=EPS))
    return (y / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale


def norm_act_quant_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                             out_dtype: torch.dtype, e4m3: bool = False) -> torch.Tensor:
    """RMSNorm, then per-token absmax 8-bit fake quantization with STE, in plain PyTorch.

    The same function as the model's `RMSNorm` (fp32 math, result rounded to x's dtype) followed by
    `ste(y, activation_quant(y))`, written as one expression so torch.compile fuses it into one
    kernel; the STE makes the backward exactly the RMSNorm backward. e4m3: the FP8 forward's grid
    (`e4m3_act_quant`) instead of int8 levels.
    """
    x32 = x.float()
    y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype).float()
    if e4m3:
        y_q = e4m3_act_quant(y)
    else:
        s = 127.0 / y.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
        y_q = (y * s).round().clamp(-128, 127) / s
    return (y + (y_q - y).detach()).to(out_dtype)


def swiglu_norm_act_quant_reference(gate_up: torch.Tensor, weight: torch.Tensor, eps: float,
                                    out_dtype: torch.dtype, e4m3: bool = False) -> torch.Tensor:
    """`norm_act_quant_reference` of the SwiGLU product silu(gate) * up: the FFN's sub-norm input.

    gate_up (..., 2 * ffn): gate in the first half of the last dim, up in the second (one GEMM's output).
    """
    gate, up = gate_up.chunk(2, dim=-1)
    return norm_act_quant_reference(F.silu(gate) * up, weight, eps, out_dtype, e4m3)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head, the HF LLaMA convention. x: (B, H, T, D)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    cos, sin = cos[None, None], sin[None, None]  # (1, 1, T, D/2)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


def rope_qkv_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int,
                       n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, heads, T, D) from stacked projections qkv (B, T, (H + 2 Hkv) D), RoPE on q and k."""
    B, T, width = qkv.shape
    D = width // (n_heads + 2 * n_kv_heads)
    q, k, v = qkv.split((n_heads * D, n_kv_heads * D, n_kv_heads * D), dim=-1)
    q = q.reshape(B, T, n_heads, D).transpose(1, 2)
    k = k.reshape(B, T, n_kv_heads, D).transpose(1, 2)
    v = v.reshape(B, T, n_kv_heads, D).transpose(1, 2)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def head_cross_entropy_reference(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 dtype: torch.dtype) -> torch.Tensor:
    """F.cross_entropy over the fp32 logits x @ weight^T (the matmul in dtype); -100 targets do not count."""
    logits = F.linear(x.to(dtype), weight.to(dtype))
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)
