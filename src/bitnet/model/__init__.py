"""BitNet b1.58 model: config and presets, quantizers and BitLinear, the transformer."""

from bitnet.model.bitlinear import BitLinear, activation_quant, weight_quant
from bitnet.model.config import PRESETS, ModelConfig
from bitnet.model.llama import KVCache, Transformer

__all__ = ["BitLinear", "KVCache", "ModelConfig", "PRESETS", "Transformer", "activation_quant", "weight_quant"]
