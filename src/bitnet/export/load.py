"""Load a model back from a Hugging Face export directory written by `bitnet-export --format hf`
(bitnet-generate reads export directories through bitnet/cli/load.py).

The HF directory is read without transformers: its config.json maps onto `ModelConfig` field for
field (hf.py writes it), its tensors are ours under `model.`. Packed ("bitlinear") weights become
`TernaryLinear`s, exactly as `load_packed` rebuilds them; "online" ("autobitlinear") bf16 weights
load as BitLinear latent weights, which quantize back to the exported ternary values on the fly.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from bitnet.export.files import ExportError
from bitnet.export.hf import PREFIX
from bitnet.export.ternary import TernaryLinear, unpack_ternary
from bitnet.model.bitlinear import BitLinear
from bitnet.model.config import ModelConfig
from bitnet.model.llama import Transformer


def hf_model_config(config: dict, where: str) -> ModelConfig:
    """`ModelConfig` of a transformers BitNet config.json (the inverse of hf.hf_config)."""
    if config.get("model_type") != "bitnet":
        raise ExportError(f"{where}: model_type {config.get('model_type')!r}, expected 'bitnet'")
    rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    try:
        return ModelConfig(vocab_size=config["vocab_size"], dim=config["hidden_size"],
                           n_layers=config["num_hidden_layers"], n_heads=config["num_attention_heads"],
                           n_kv_heads=config["num_key_value_heads"], ffn_dim=config["intermediate_size"],
                           max_seq_len=config["max_position_embeddings"], rope_theta=float(rope_theta),
                           norm_eps=config["rms_norm_eps"], init_std=config.get("initializer_range", 0.02))
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{where}: unusable BitNet config ({type(e).__name__}: {e})") from None


def load_hf(export_dir: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """A `Transformer` (eval mode) computing the forward of an HF BitNet export written by hf.py."""
    export_dir = Path(export_dir)
    try:
        config = json.loads((export_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{export_dir}: cannot read config.json ({type(e).__name__})") from None
    model = Transformer(hf_model_config(config, str(export_dir)))
    try:
        tensors = {k.removeprefix(PREFIX): v for k, v in load_file(str(export_dir / "model.safetensors")).items()}
    except Exception as e:  # safetensors raises its own error types on a torn or foreign file
        raise ExportError(f"{export_dir}: cannot read model.safetensors: {str(e).splitlines()[0][:200]}") from None
    packed = (config.get("quantization_config") or {}).get("linear_class") == "bitlinear"
    for name, module in list(model.named_modules()):
        if not (packed and isinstance(module, BitLinear)):
            continue
        try:
            w_t = unpack_ternary(tensors.pop(f"{name}.weight"), module.out_features)
            scale = tensors.pop(f"{name}.weight_scale")
        except KeyError as e:
            raise ExportError(f"{export_dir}: model.safetensors lacks {PREFIX}{e.args[0]}") from None
        except ValueError as e:
            raise ExportError(f"{export_dir}: {name}: {e}") from None
        if tuple(w_t.shape) != (module.out_features, module.in_features):
            raise ExportError(f"{export_dir}: {name} has shape {tuple(w_t.shape)}, "
                              f"expected {(module.out_features, module.in_features)}")
        model.set_submodule(name, TernaryLinear(w_t, scale, quantized_input=module.quantized_input))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k.rsplit(".", 1)[-1] not in ("ternary", "weight_scale")]
    if missing or unexpected:
        raise ExportError(f"{export_dir}: tensors missing {missing[:3]} / unexpected {unexpected[:3]}")
    return model.to(device).eval()

