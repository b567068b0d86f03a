"""Everything ternary: BitNet b1.58 quantizers, the straight-through estimator and `BitLinear`.

BitNet b1.58 (Ma et al. 2024, "The Era of 1-bit LLMs", eqs. 1-3; training tips in
"The Era of 1-bit LLMs: Training Tips, Code and FAQ"):
  weights      gamma = mean(|W|),  W_q = clip(round(W / gamma), -1, 1) * gamma      (absmean, per tensor)
  activations  s = 127 / max|x| per token,  x_q = clip(round(x * s), -128, 127) / s  (absmax int8)
Both use the straight-through estimator: the forward sees the quantized value, the backward
treats quantization as the identity, so the fp32 latent weights keep learning.

In our SubLN layout every BitLinear input is an RMSNorm output, so the model quantizes activations
inside the norm (`norm_act_quant`: one pass over each row) and builds its BitLinears with
`quantized_input=True`; a BitLinear used on its own quantizes its input itself.
"""

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitnet.model.kernels import choice, fp8
from bitnet.model.kernels.references import EPS, e4m3_act_quant  # EPS: the quantizers' clamp, as the kernels'


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """Absmean scale s = 1 / max(mean|W|, eps), so W * s lands near {-1, 0, +1}."""
    return 1.0 / w.abs().mean().clamp(min=EPS)


def ternary_parts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_t, s): W_t = clip(round(W * s), -1, 1) in fp32 and the absmean scale s, so W_q = W_t / s."""
    w32 = w.float()
    s = weight_scale(w32)
    return (w32 * s).round().clamp(-1, 1), s


def weight_quant(w: torch.Tensor) -> torch.Tensor:
    """Fake-quantize a weight tensor to {-1, 0, +1} / s (computed in fp32)."""
    w_t, s = ternary_parts(w)
    return (w_t / s).to(w.dtype)


def activation_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax scale s = 127 / max(max|x|, eps), shape (..., 1)."""
    return 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)


def activation_quant(x: torch.Tensor, e4m3: bool = False) -> torch.Tensor:
    """Fake-quantize activations per token to 8 bits (computed in fp32, returned in x's dtype): int8 levels,
    or with e4m3 the FP8 forward's grid (`references.e4m3_act_quant`)."""
    x32 = x.float()
    if e4m3:
        return e4m3_act_quant(x32).to(x.dtype)
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


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the next matmul runs in: autocast's (bf16 on CUDA) when enabled, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def norm_act_quant(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x) * weight, fake-quantized per token to 8 bits (STE), in the dtype of the next matmul.

    What `RMSNorm` followed by BitLinear's input quantization computes, in one pass over each row
    (the Triton kernel or its reference, as `kernels.choice` picks).
    """
    return choice.norm_act_quant(x, weight, eps, matmul_dtype(x))


def swiglu_norm_act_quant(gate_up: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(silu(gate) * up) * weight, fake-quantized per token to 8 bits (STE), in the next matmul's dtype.

    gate_up (..., 2 * ffn): gate and up side by side in the last dim, as `fused_linear` returns them.
    """
    return choice.swiglu_norm_act_quant(gate_up, weight, eps, matmul_dtype(gate_up))


def swiglu_norm_act_quant_for_gemm(gate_up: torch.Tensor, weight: torch.Tensor, eps: float
                                   ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """`swiglu_norm_act_quant` and, under the FP8 forward, the down GEMM's e4m3 operand and row scales where the
    kernel wrote them (else None): what `BitLinear.forward` takes."""
    return choice.swiglu_norm_act_quant_for_gemm(gate_up, weight, eps, matmul_dtype(gate_up))


_weights_generation = 0


def weights_updated() -> None:
    """Tell every BitLinear its weights changed (call after optimizer.step; train_step does)."""
    global _weights_generation
    _weights_generation += 1


class BitLinear(nn.Linear):
    """Drop-in for `nn.Linear` (no bias) whose forward uses ternary weights and int8 activations (e4m3 ones
    while training under `KernelChoice.fp8_forward`).

    The parameter `weight` stays full precision (the latent weights AdamW updates). The input is
    expected to be normalized already: in our SubLN layout an RMSNorm precedes every BitLinear
    (docs/design.md, section "model"), so BitLinear itself holds no norm. With `quantized_input=True` the input
    is taken as already quantized (the output of `norm_act_quant`), so it is not quantized twice.
    """

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None, *,
                 quantized_input: bool = False):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.quantized_input = quantized_input
        self._inference_cache = None  # (key, w_q) for forwards without autograd; see _inference_weight

    def forward(self, x: torch.Tensor, x_e4m3: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x_e4m3: under the FP8 forward, x's e4m3 values and row scales if its quantizer wrote them."""
        # Quantize in fp32, then hand the matmul operands to autocast's dtype (bf16 holds the
        # integers -128..127 and {-1,0,1} exactly; only the scales round).
        dtype = matmul_dtype(x)
        if not self.quantized_input:
            if x_e4m3 is not None:
                raise ValueError("BitLinear: x_e4m3 is the e4m3 form of an already quantized input "
                                 "(quantized_input=True); this layer quantizes its own")
            x = ste(x, activation_quant(x, choice.fp8_forward(x, dtype)))
        return ternary_matmul(x.to(dtype), [self], dtype, x_e4m3)

    def quantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W_q in dtype: with the STE under autograd (and inside torch.compile), else the no-grad cache."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return ste(self.weight, weight_quant(self.weight)).to(dtype)
        return self._inference_weight(dtype)

    def _inference_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """Quantized weight for no-grad forwards (eval, sampling), recomputed only when the weight changed.

        Decoding runs one forward per token: re-quantizing every weight each time was most of a
        sample's kernel launches. The key holds the tensor's version counter (bumped by ordinary
        in-place updates and load_state_dict) and the global generation that `weights_updated()`
        bumps: fused AdamW writes the weights without touching the version counter.
        """
        w = self.weight
        key = (_weights_generation, w._version, w.data_ptr(), w.device, dtype)
        if self._inference_cache is None or self._inference_cache[0] != key:
            self._inference_cache = (key, weight_quant(w.detach()).to(dtype))
        return self._inference_cache[1]

    @torch.no_grad()
    def ternary_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The true ternary form: (int8 tensor in {-1,0,1}, fp32 scale s) with W_q = W_t / s."""
        w32 = self.weight.float()
        s = weight_scale(w32)
        return (w32 * s).round().clamp(-1, 1).to(torch.int8), s

    def extra_repr(self) -> str:
        return super().extra_repr() + (", quantized_input=True" if self.quantized_input else "")


def fused_linear(x: torch.Tensor, layers: Sequence[nn.Linear]) -> torch.Tensor:
    """x @ [W_1; W_2; ...]^T: linears that read the same input as one GEMM, outputs side by side in the last dim.

    Each BitLinear keeps its own ternary scale (its W_q is quantized alone, then the W_q are stacked), so
    the result equals the layers called one by one. One GEMM instead of three for q/k/v (two for gate/up)
    runs the small projections at the efficiency of a wide one, and its backward gives the input's
    gradient from one GEMM instead of a sum of several. Plain linears (the bf16 twin's) stack as they are.
    """
    dtype = matmul_dtype(x)
    quantized_input = {layer.quantized_input for layer in layers if isinstance(layer, BitLinear)}
    if len(quantized_input) > 1:
        raise ValueError("fused_linear: BitLinears that quantize their input mixed with ones that do not")
    if quantized_input == {False}:  # the same input quantized once for all of them
        x = ste(x, activation_quant(x, choice.fp8_forward(x, dtype)))
    if all(isinstance(layer, BitLinear) for layer in layers):
        return ternary_matmul(x.to(dtype), layers, dtype)
    weights = [layer.quantized_weight(dtype) if isinstance(layer, BitLinear) else layer.weight.to(dtype)
               for layer in layers]
    return F.linear(x.to(dtype), torch.cat(weights))


def ternary_matmul(x: torch.Tensor, layers: Sequence[BitLinear], dtype: torch.dtype,
                   x_e4m3: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x @ [W_q1; W_q2; ...]^T for already-quantized x in dtype; under the FP8 switches (`KernelChoice.fp8_*`,
    training on FP8 hardware) the backward's GEMMs run in FP8 (`kernels/fp8.py`), and under the FP8 forward
    the forward's too, from x's e4m3 values (x_e4m3, or recovered from x: exact on the e4m3 grid)."""
    out_features = sum(layer.out_features for layer in layers)
    grad_input_fp8, grad_weight_fp8 = choice.fp8_backward(x, out_features)
    forward_fp8 = choice.fp8_forward_gemm(x, out_features)
    if not (grad_input_fp8 or grad_weight_fp8 or forward_fp8):
        weights = [layer.quantized_weight(dtype) for layer in layers]
        return F.linear(x, weights[0] if len(weights) == 1 else torch.cat(weights))
    w_q, w_t, inv_s = [], [], []
    for layer in layers:  # one ternary quantization per layer feeds the forward and the FP8 GEMMs
        t, s = ternary_parts(layer.weight)
        w_q.append(ste(layer.weight, (t / s).to(layer.weight.dtype)).to(dtype))
        w_t.append(t)
        inv_s.append((1.0 / s).expand(layer.out_features))
    if forward_fp8 and x_e4m3 is None:
        x_e4m3 = fp8.e4m3_grid_rows(x)
    return fp8.ternary_linear(x, torch.cat(w_q), torch.cat(w_t), torch.cat(inv_s), grad_input_fp8, grad_weight_fp8,
                              x_e4m3 if forward_fp8 else None)


def make_linear(in_features: int, out_features: int, quantization: str, quantized_input: bool = False) -> nn.Linear:
    """BitLinear for 'bitnet', plain bias-free nn.Linear for 'none' (the full-precision twin).

    quantized_input: the caller feeds `norm_act_quant` outputs (ignored for 'none').
    """
    if quantization == "bitnet":
        return BitLinear(in_features, out_features, quantized_input=quantized_input)
    return nn.Linear(in_features, out_features, bias=False)
