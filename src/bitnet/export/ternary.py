"""2-bit packing of ternary weights and `TernaryLinear`, the frozen inference twin of `BitLinear`.

Packing layout (shared by our packed format and Hugging Face transformers' `bitlinear` class):
codes are w + 1 in {0, 1, 2}, four to a uint8 byte, packed along the output dimension (dim 0)
in blocks: with R = ceil(out / 4), byte row r holds weight rows r, R + r, 2R + r, 3R + r in bits
0-1, 2-3, 4-5, 6-7. Rows past `out` (when out % 4 != 0) are padded with code 1 (a zero weight).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitnet.model.bitlinear import BitLinear, activation_quant

VALUES_PER_BYTE = 4


def pack_ternary(w_t: torch.Tensor) -> torch.Tensor:
    """int tensor in {-1, 0, 1} of shape (out, ...) -> uint8 of shape (ceil(out / 4), ...)."""
    if w_t.dim() < 1 or w_t.numel() == 0:
        raise ValueError(f"cannot pack an empty tensor of shape {tuple(w_t.shape)}")
    if w_t.abs().max() > 1:
        raise ValueError("pack_ternary needs values in {-1, 0, 1}")
    out = w_t.shape[0]
    rows = -(-out // VALUES_PER_BYTE)
    codes = torch.ones((VALUES_PER_BYTE * rows, *w_t.shape[1:]), dtype=torch.uint8, device=w_t.device)
    codes[:out] = (w_t + 1).to(torch.uint8)
    codes = codes.view(VALUES_PER_BYTE, rows, *w_t.shape[1:])  # slot i = rows [i*R, (i+1)*R)
    packed = codes[0].clone()
    for i in range(1, VALUES_PER_BYTE):
        packed |= codes[i] << (2 * i)
    return packed


def unpack_ternary(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """Inverse of `pack_ternary`: uint8 (ceil(out / 4), ...) -> int8 in {-1, 0, 1} of shape (out, ...)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed ternary weights must be uint8, got {packed.dtype}")
    rows = packed.shape[0]
    if not (VALUES_PER_BYTE * (rows - 1) < out_features <= VALUES_PER_BYTE * rows):
        raise ValueError(f"{rows} packed rows cannot hold {out_features} output rows")
    codes = torch.cat([(packed >> (2 * i)) & 3 for i in range(VALUES_PER_BYTE)])  # (4R, ...)
    if (codes == 3).any():
        raise ValueError("packed ternary weights hold the invalid code 3 (corrupt file?)")
    return codes[:out_features].to(torch.int8) - 1


class TernaryLinear(nn.Module):
    """Inference-only BitLinear: frozen ternary weights with one fp32 scale, int8 per-token activations.

    Computes exactly what `BitLinear` computes in its forward (docs/design.md, section "model"),
    y = activation_quant(x) @ (W_t / s)^T, from the ternary form alone; it has no latent weights,
    so it cannot be trained. `weight` caches the dequantized W_t / s (made once, not saved).
    """

    def __init__(self, ternary: torch.Tensor, scale: torch.Tensor, quantized_input: bool = False):
        super().__init__()
        self.out_features, self.in_features = ternary.shape
        self.quantized_input = quantized_input  # as BitLinear's: the input comes quantized from its norm
        self.register_buffer("ternary", ternary.to(torch.int8))
        self.register_buffer("weight_scale", scale.detach().float().reshape(()))
        self.register_buffer("weight", self.ternary.float() / self.weight_scale, persistent=False)

    @classmethod
    def from_bitlinear(cls, layer: BitLinear) -> "TernaryLinear":
        return cls(*layer.ternary_weight(), quantized_input=getattr(layer, "quantized_input", False))

    def ternary_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 tensor in {-1, 0, 1}, fp32 scale s) with W_q = W_t / s, as `BitLinear.ternary_weight`."""
        return self.ternary, self.weight_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        if not self.quantized_input:
            x = activation_quant(x)
        return F.linear(x.to(dtype), self.weight.to(dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, ternary"
                + (", quantized_input=True" if self.quantized_input else ""))


def ternary_layers(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (int8 ternary weight, fp32 scale)} of every BitLinear / TernaryLinear in `model`."""
    return {name: m.ternary_weight() for name, m in model.named_modules()
            if isinstance(m, (BitLinear, TernaryLinear))}


def to_ternary_inference(model: nn.Module) -> nn.Module:
    """Replace every BitLinear of `model` (in place) by its TernaryLinear; returns the model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, BitLinear):
            model.set_submodule(name, TernaryLinear.from_bitlinear(m))
    return model
