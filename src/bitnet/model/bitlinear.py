"""Everything ternary: BitNet b1.58 quantizers, the straight-through estimator and `BitLinear`.

BitNet b1.58 (Ma et al. 2024, "The Era of 1-bit LLMs", eqs. 1-3; training tips in
"The Era of 1-bit LLMs: Training Tips, Code and FAQ"):
  weights      gamma = mean(|W|),  W_q = clip(round(W / gamma), -1, 1) * gamma      (absmean, per tensor)
  activations  s = 127 / max|x| per token,  x_q = clip(round(x * s), -128, 127) / s  (absmax int8)
Both use the straight-through estimator: the forward sees the quantized value, the backward
treats quantization as the identity, so the fp32 latent weights keep learning.

The GEMMs run on the integers themselves: a BitLinear multiplies x_int (-128..127) by W_t ({-1, 0, 1}),
both exact in bf16 and summed exactly in fp32, and scales the product's rows by (1 / s_x) * (1 / s_W)
afterwards. That is the same function as multiplying the fake-quantized x_int / s_x and W_t / s_W, with
fewer roundings, and measured faster on an H100 at its power cap: integer operands toggle fewer bits
(benchmarks/gemm_operands.py, benchmarks/NOTES.md run 5). Activations therefore travel as `RowScaled`
(values, per-row scale): in our SubLN layout every BitLinear input is an RMSNorm output, so the norm
quantizes (`norm_act_quant`: one pass over each row) and hands the BitLinear its integers and scales.
"""

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-5


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """Absmean scale s = 1 / max(mean|W|, eps), so W * s lands near {-1, 0, +1}."""
    return 1.0 / w.abs().mean().clamp(min=EPS)


def weight_quant(w: torch.Tensor) -> torch.Tensor:
    """Fake-quantize a weight tensor to {-1, 0, +1} / s (computed in fp32)."""
    w32 = w.float()
    s = weight_scale(w32)
    return ((w32 * s).round().clamp(-1, 1) / s).to(w.dtype)


def activation_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax scale s = 127 / max(max|x|, eps), shape (..., 1)."""
    return 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)


def activation_quant(x: torch.Tensor) -> torch.Tensor:
    """Fake-quantize activations per token to 8 bits (computed in fp32, returned in x's dtype)."""
    x32 = x.float()
    s = activation_scale(x32)
    return ((x32 * s).round().clamp(-128, 127) / s).to(x.dtype)


def ste(x: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: forward returns x_q, backward passes the gradient to x unchanged.

    Without autograd (eval, sampling, export parity) it returns x_q itself: x + (x_q - x) can differ
    from x_q by one float rounding, which would make inference differ from the ternary weights.
    """
    if not torch.is_grad_enabled():
        return x_q
    return x + (x_q - x).detach()


class RowScaled(NamedTuple):
    """A (..., N) tensor held as values * scale, one fp32 scale per row (scale's shape (..., 1)).

    Between a quantizing norm and its BitLinears: values are the int8 levels (-128..127, held exactly in
    the matmul dtype) and scale = max|y| / 127 = 1 / s. Out of a BitLinear asked to `keep_scale`: the
    integer GEMM's product and the scale its rows still need, for a consumer that applies it itself.
    """

    values: torch.Tensor
    scale: torch.Tensor


def to_tensor(x: RowScaled) -> torch.Tensor:
    """values * scale, computed in fp32 and returned in values' dtype (for rows of int8 levels: the
    fake-quantized activation x_q of DESIGN.md)."""
    return (x.values.float() * x.scale).to(x.values.dtype)


def integer_ste(v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clip(round(v), lo, hi) forward, identity backward (the STE on the integer grid).

    Exact in fp32: round(v) - v is a multiple of v's ulp no larger than |v|, so it and the sum
    v + (round(v) - v) are representable and come out as the integer itself (for |v| < 2^24).
    """
    return v + (v.round().clamp(lo, hi) - v).detach()


def quantize_rows(y: torch.Tensor, out_dtype: torch.dtype) -> RowScaled:
    """Per-token absmax 8-bit quantization with STE: values round(y * s) in out_dtype, scale 1 / s.

    s = 127 / max(max|y|, eps) per row, computed in fp32 and not differentiated (as in BitNet's STE):
    the gradient reaching y is the values' gradient times s, i.e. the fake-quantized x_q's gradient.
    """
    y32 = y.float()
    amax = y32.abs().amax(dim=-1, keepdim=True).clamp(min=EPS).detach()
    return RowScaled(integer_ste(y32 * (127.0 / amax), -128, 127).to(out_dtype), amax / 127.0)


def quantize_weight(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_t in dtype with STE, fp32 0-dim scale 1 / s): absmean ternary weights, W_q = W_t * scale."""
    w32 = w.float()
    s = weight_scale(w32).detach()
    return integer_ste(w32 * s, -1, 1).to(dtype), 1.0 / s


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the next matmul runs in: autocast's (bf16 on CUDA) when enabled, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def norm_act_quant_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                             out_dtype: torch.dtype) -> RowScaled:
    """RMSNorm, then per-token absmax 8-bit quantization with STE (`quantize_rows`), in plain PyTorch.

    The same function as the model's `RMSNorm` (fp32 math, result rounded to x's dtype) followed by
    BitLinear's input quantization, written as one expression so torch.compile fuses it into one
    kernel; the STE makes the backward the RMSNorm backward of the values' gradient times s.
    """
    x32 = x.float()
    y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return quantize_rows(y, out_dtype)


def swiglu_norm_act_quant_reference(gate: RowScaled, up: RowScaled, weight: torch.Tensor, eps: float,
                                    out_dtype: torch.dtype) -> RowScaled:
    """`norm_act_quant_reference` of the SwiGLU product silu(gate) * up: the FFN's sub-norm input.

    gate and up come as their GEMMs left them (`BitLinear(..., keep_scale=True)`): their scales are
    applied here, where the fused kernel applies them as it loads each row.
    """
    return norm_act_quant_reference(F.silu(to_tensor(gate)) * to_tensor(up), weight, eps, out_dtype)


# "auto": the Triton kernel (model/kernels.py) for CUDA tensors in eager mode; the PyTorch
# formulation on the CPU and inside torch.compile, where inductor fuses it with its neighbours
# (the residual add, the scaling of the GEMM before it), which measured faster than the standalone
# kernel on an H100 (54.1 vs 59.0 ms per 95m step, benchmarks/NOTES.md). "torch": the PyTorch
# formulation always.
NORM_QUANT_IMPL = "auto"


def norm_act_quant(x: torch.Tensor, weight: torch.Tensor, eps: float) -> RowScaled:
    """RMSNorm(x) * weight, quantized per token to 8 bits (STE): int8 levels in the next matmul's dtype
    and their per-row scale. What `RMSNorm` followed by BitLinear's input quantization computes, in one
    pass over each row."""
    out_dtype = matmul_dtype(x)
    if x.is_cuda and NORM_QUANT_IMPL == "auto" and not torch.compiler.is_compiling():
        from bitnet.model import kernels  # imported here: Triton is needed (and loaded) on CUDA only

        if kernels.available():
            return kernels.rmsnorm_act_quant(x, weight, eps, out_dtype)
    return norm_act_quant_reference(x, weight, eps, out_dtype)


# "auto": the Triton kernels (model/kernels.py) for CUDA tensors, in eager mode and inside torch.compile:
# the gate/up GEMMs before them and the down GEMM after leave inductor nothing to fuse them with, and
# their forward runs in half of inductor's time: the 95m step is 1.0 ms faster on an H100
# (benchmarks/NOTES.md, run 4). "torch": the PyTorch formulation always.
SWIGLU_NORM_QUANT_IMPL = "auto"


def swiglu_norm_act_quant(gate: RowScaled, up: RowScaled, weight: torch.Tensor, eps: float) -> RowScaled:
    """RMSNorm(silu(gate) * up) * weight, quantized per token to 8 bits (STE), in the next matmul's dtype."""
    out_dtype = matmul_dtype(gate.values)
    if gate.values.is_cuda and SWIGLU_NORM_QUANT_IMPL == "auto":
        from bitnet.model import kernels

        if kernels.available():
            return kernels.swiglu_norm_act_quant(gate, up, weight, eps, out_dtype)
    return swiglu_norm_act_quant_reference(gate, up, weight, eps, out_dtype)


def int8_rows(x: torch.Tensor | RowScaled) -> RowScaled:
    """A BitLinear's input as int8 levels and scales: a `RowScaled` as it came, a tensor quantized here."""
    return x if isinstance(x, RowScaled) else quantize_rows(x, matmul_dtype(x))


def ternary_linear(x: RowScaled, w_t: torch.Tensor, w_scale: torch.Tensor,
                   keep_scale: bool = False) -> torch.Tensor | RowScaled:
    """(x.values @ w_t^T) scaled per row by x.scale * w_scale: the GEMM multiplies only integers.

    bf16 (autocast's dtype) holds -128..127 and {-1, 0, 1} exactly and the GEMM sums in fp32, so the
    product is exact until its output rounds. keep_scale: return the product and its row scales unapplied.
    """
    out = RowScaled(F.linear(x.values.to(w_t.dtype), w_t), x.scale * w_scale)
    return out if keep_scale else to_tensor(out)


_weights_generation = 0


def weights_updated() -> None:
    """Tell every BitLinear its weights changed (call after optimizer.step; train_step does)."""
    global _weights_generation
    _weights_generation += 1


class BitLinear(nn.Linear):
    """Drop-in for `nn.Linear` (no bias) whose forward uses ternary weights and int8 activations.

    The parameter `weight` stays full precision (the latent weights AdamW updates). The input is a
    tensor, which BitLinear quantizes itself, or a `RowScaled` of int8 levels that its RMSNorm already
    quantized (our SubLN layout, DESIGN.md section 2: a norm precedes every BitLinear, so BitLinear
    itself holds none). The GEMM multiplies integers; the output is scaled per row afterwards, or, with
    `keep_scale=True`, returned as a `RowScaled` for the consumer to scale (the SwiGLU kernel).
    """

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self._inference_cache = None  # (key, W_t, scale) for forwards without autograd; see ternary_operand

    def forward(self, x: torch.Tensor | RowScaled, keep_scale: bool = False) -> torch.Tensor | RowScaled:
        x = int8_rows(x)
        return ternary_linear(x, *self.ternary_operand(matmul_dtype(x.values)), keep_scale)

    def ternary_operand(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_t in dtype, fp32 scale 1 / s): with the STE under autograd, else from a cache.

        Decoding runs one forward per token: re-quantizing every weight each time was most of a
        sample's kernel launches, so no-grad forwards (eval, sampling) reuse the last W_t until the
        weight changes. The key holds the tensor's version counter (bumped by ordinary in-place
        updates and load_state_dict) and the global generation that `weights_updated()` bumps: fused
        AdamW writes the weights without touching the version counter.
        """
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return quantize_weight(self.weight, dtype)
        w = self.weight
        key = (_weights_generation, w._version, w.data_ptr(), w.device, dtype)
        if self._inference_cache is None or self._inference_cache[0] != key:
            self._inference_cache = (key, *quantize_weight(w.detach(), dtype))
        return self._inference_cache[1], self._inference_cache[2]

    @torch.no_grad()
    def ternary_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The true ternary form: (int8 tensor in {-1,0,1}, fp32 scale s) with W_q = W_t / s."""
        w32 = self.weight.float()
        s = weight_scale(w32)
        return (w32 * s).round().clamp(-1, 1).to(torch.int8), s


def make_linear(in_features: int, out_features: int, quantization: str) -> nn.Linear:
    """BitLinear for 'bitnet', plain bias-free nn.Linear for 'none' (the full-precision twin)."""
    if quantization == "bitnet":
        return BitLinear(in_features, out_features)
    return nn.Linear(in_features, out_features, bias=False)
