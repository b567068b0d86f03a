"""Packed ternary export: the inference format (never the resume format; STYLE.md "Checkpointing").

A directory with
  model.safetensors    every BitLinear as `<name>.weight` (uint8, 2-bit codes, export/ternary.py)
                       plus `<name>.weight_scale` (fp32, shape (1,), W_q = W_t / s); the embedding
                       and all norm gains in bf16; names are our Transformer's state_dict names
  bitnet_config.json   format tag, ModelConfig, each ternary tensor's shape, where it came from
`load_packed(dir)` rebuilds a `bitnet.model.Transformer` whose BitLinears are `TernaryLinear`s.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open

import bitnet
from bitnet.export.files import ExportError, write_dir, write_json, write_safetensors
from bitnet.export.ternary import TernaryLinear, pack_ternary, ternary_layers, unpack_ternary
from bitnet.model.bitlinear import BitLinear
from bitnet.model.config import ModelConfig
from bitnet.model.llama import Transformer

FORMAT = "bitnet-packed-ternary"
FORMAT_VERSION = 1
CONFIG_FILE = "bitnet_config.json"
WEIGHTS_FILE = "model.safetensors"


def ternary_state_dict(model: Transformer) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """(tensors to save, {layer: [out, in]}): packed ternary + fp32 scales, everything else in bf16."""
    layers = ternary_layers(model)
    if not layers:
        raise ExportError("the model has no BitLinear layers (quantization='none'?): nothing ternary to export")
    tensors, shapes = {}, {}
    for name, (w_t, scale) in layers.items():
        tensors[f"{name}.weight"] = pack_ternary(w_t.cpu())
        tensors[f"{name}.weight_scale"] = scale.detach().float().reshape(1).cpu()
        shapes[name] = list(w_t.shape)
    for key, value in model.state_dict().items():
        if key.rsplit(".", 1)[0] not in layers:  # embedding and norm gains
            tensors[key] = value.detach().to(torch.bfloat16).cpu().contiguous()
    return tensors, shapes


def export_ternary(model: Transformer, out_dir: str | Path, source: dict | None = None,
                   overwrite: bool = False) -> Path:
    """Write `model` as a packed ternary export into out_dir (atomically); returns out_dir."""
    tensors, shapes = ternary_state_dict(model)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.cfg.to_dict(),
              "ternary_shapes": shapes, "packing": "codes w+1 in 2 bits, 4 a byte, blocks along dim 0",
              "scale": "W = W_t / weight_scale", "bitnet_version": bitnet.__version__,
              "source": source or {}}

    def fill(tmp: Path) -> None:
        # One metadata key: safetensors writes metadata in arbitrary order, and exports should be reproducible.
        write_safetensors(tmp / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, config)

    return write_dir(out_dir, fill, overwrite)


def read_config(export_dir: str | Path) -> dict:
    path = Path(export_dir) / CONFIG_FILE
    if not path.is_file():
        raise ExportError(f"{export_dir} is not a packed bitnet export (no {CONFIG_FILE})")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from None
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path} holds format {config.get('format')!r} v{config.get('format_version')}, "
                          f"expected {FORMAT!r} v{FORMAT_VERSION}")
    return config


def load_packed(export_dir: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """A `Transformer` (eval mode, fp32) that computes the exported model's quantized forward.

    Ternary weights and scales come back bit-exact; the embedding and norms hold the bf16 values.
    """
    config = read_config(export_dir)
    try:
        cfg = ModelConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{export_dir}: unusable model config in {CONFIG_FILE}: {e}") from None
    model = Transformer(cfg)
    with safe_open(str(Path(export_dir) / WEIGHTS_FILE), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    bitlinears = [name for name, m in model.named_modules() if isinstance(m, BitLinear)]
    if sorted(bitlinears) != sorted(config["ternary_shapes"]):
        raise ExportError(f"{export_dir}: ternary layers in {CONFIG_FILE} do not match the model config")
    for name in bitlinears:
        out_features, in_features = config["ternary_shapes"][name]
        try:
            w_t = unpack_ternary(tensors.pop(f"{name}.weight"), out_features)
            scale = tensors.pop(f"{name}.weight_scale")
        except KeyError as e:
            raise ExportError(f"{export_dir}: {WEIGHTS_FILE} lacks {e.args[0]}") from None
        except ValueError as e:
            raise ExportError(f"{export_dir}: {name}: {e}") from None
        if tuple(w_t.shape) != (out_features, in_features):
            raise ExportError(f"{export_dir}: {name} has shape {tuple(w_t.shape)}, "
                              f"expected {(out_features, in_features)}")
        quantized_input = getattr(model.get_submodule(name), "quantized_input", False)
        model.set_submodule(name, TernaryLinear(w_t, scale, quantized_input=quantized_input))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k.rsplit(".", 1)[-1] not in ("ternary", "weight_scale")]
    if missing or unexpected:
        raise ExportError(f"{export_dir}: tensors missing {missing[:3]} / unexpected {unexpected[:3]}")
    return model.to(device).eval()
