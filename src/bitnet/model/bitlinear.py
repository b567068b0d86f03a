"""Everything ternary: BitNet b1.58 quantizers, the straight-through estimator and `BitLinear`.

BitNet b1.58 (Ma et al. 2024, "The Era of 1-bit LLMs", eqs. 1-3; training tips in
"The Era of 1-bit LLMs: Training Tips, Code and FAQ"):
  weights      gamma = mean(|W|),  W_q = clip(round(W / gamma), -1, 1) * gamma      (absmean, per tensor)
  activations  s = 127 / max|x| per token,  x_q = clip(round(x * s), -128, 127) / s  (absmax int8)
Both use the straight-through estimator: the forward sees the quantized value, the backward
treats quantization as the identity, so the fp32 latent weights keep learning.
"""

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
    """Straight-through estimator: forward returns x_q, backward passes the gradient to x unchanged."""
    return x + (x_q - x).detach()


class BitLinear(nn.Linear):
    """Drop-in for `nn.Linear` (no bias) whose forward uses ternary weights and int8 activations.

    The parameter `weight` stays full precision (the latent weights AdamW updates). The input is
    expected to be normalized already: in our SubLN layout an RMSNorm precedes every BitLinear
    (DESIGN.md section 2), so BitLinear itself holds no norm.
    """

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if torch.is_autocast_enabled(x.device.type):
            # Quantize in fp32, then hand the matmul operands to autocast's dtype (bf16 holds the
            # integers -128..127 and {-1,0,1} exactly; only the scales round).
            dtype = torch.get_autocast_dtype(x.device.type)
        else:
            dtype = x.dtype
        x_q = ste(x, activation_quant(x)).to(dtype)
        w_q = ste(w, weight_quant(w)).to(dtype)
        return F.linear(x_q, w_q)

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
