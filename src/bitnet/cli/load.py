"""The one model-from-checkpoint loader of the console scripts (docs/design.md, section
"command-line tools"): bitnet-generate and bitnet-export build their model here.
"""

from pathlib import Path

import torch

from bitnet.export.files import ExportError
from bitnet.export.load import load_hf
from bitnet.export.packed import CONFIG_FILE, load_packed, read_config
from bitnet.model.config import ModelConfig
from bitnet.model.llama import Transformer
from bitnet.model import checkpoint_fit


def model_from_checkpoint(state: dict, where: str = "checkpoint", bitnet_only: bool = True) -> Transformer:
    """The Transformer of a loaded training checkpoint (eval mode, CPU); ExportError if it is not one.

    bitnet_only (export): refuse a quantization="none" model, which has no ternary weights;
    bitnet-generate passes False.
    """
    model_cfg = (state.get("config") or {}).get("model")
    if not isinstance(model_cfg, dict):
        raise ExportError(f"{where} has no model config (config.model): not a bitnet-train checkpoint")
    try:
        cfg = ModelConfig.from_dict(model_cfg)
    except (TypeError, ValueError) as e:
        raise ExportError(f"{where} has an unusable model config: {e}") from None
    if bitnet_only and cfg.quantization != "bitnet":
        raise ExportError(f"{where} holds a quantization={cfg.quantization!r} model, not a BitNet one: "
                          "it has no ternary weights to export")
    weights = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state["model"].items()}
    model = Transformer(cfg)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # torch lists every bad key on lines after a header line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__)[:200]
        raise ExportError(f"{where}: weights do not fit its model config: {detail}") from None
    return model.eval()


def load_checkpoint_model(path: str, device: torch.device, bitnet_only: bool = True) -> tuple[Transformer, dict]:
    """(model on `device`, the loaded checkpoint) of checkpoint.pt, its step dir or a run dir (its newest
    checkpoint that loads); CheckpointError or ExportError if there is none or it is unusable."""
    pt, state = checkpoint_fit.load_with_path(path, need="model")
    return model_from_checkpoint(state, str(pt), bitnet_only=bitnet_only).to(device), {**state, "path": str(pt)}


def load_source(path: str, bitnet_only: bool = True) -> tuple[Transformer, dict]:
    """(model, source info) for bitnet-export: a training checkpoint, or a packed export (to re-export as hf)."""
    if (Path(path) / CONFIG_FILE).is_file():
        return load_packed(path), read_config(path)["source"]
    model, state = load_checkpoint_model(path, torch.device("cpu"), bitnet_only=bitnet_only)
    tokenizer = ((state.get("config") or {}).get("train") or {}).get("tokenizer")
    return model, {"checkpoint": state["path"], "step": state.get("step"), "tokens": state.get("tokens"),
                   "tokenizer": tokenizer}


def load_for_inference(path: str, device: torch.device) -> tuple[Transformer, str | None]:
    """(model in eval mode on `device`, the tokenizer spec to use, or None for the default) for
    bitnet-generate: a training checkpoint (file, step dir or run dir), a packed or an HF export dir."""
    p = Path(path)
    if (p / CONFIG_FILE).is_file():  # packed ternary export
        return load_packed(p, device), (read_config(p).get("source") or {}).get("tokenizer")
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():  # HF export (ships its tokenizer)
        return load_hf(p, device), str(p / "tokenizer.json") if (p / "tokenizer.json").is_file() else None
    if p.is_dir() and not (p / "checkpoint.pt").is_file() and not (p / "checkpoints").is_dir():
        raise ExportError(f"{path} is neither a checkpoint, a run directory nor an export directory "
                          f"(packed: {CONFIG_FILE}; hf: config.json + model.safetensors)")
    model, state = load_checkpoint_model(path, device, bitnet_only=False)
    return model, (state["config"].get("train") or {}).get("tokenizer")
