"""`bitnet-export`: turn a training checkpoint into a packed ternary or a Hugging Face export.

  bitnet-export runs/demo --format packed --out exports/demo-packed
  bitnet-export runs/demo/checkpoints/step_000500 --format hf --out exports/demo-hf
  bitnet-export exports/demo-packed --format hf --out exports/demo-hf   # from a packed export
Bad input (missing or non-BitNet checkpoint, unknown format, unwritable output) prints one line
and exits 2.
"""

import argparse
import sys
from pathlib import Path

import torch

from bitnet import exits
from bitnet.data.tokenizer import VENDORED
from bitnet.fileio import os_error_message
from bitnet.export.files import ExportError, check_writable, dir_size_bytes
from bitnet.export.hf import HF_WEIGHTS, export_hf
from bitnet.export.packed import CONFIG_FILE, export_ternary, load_packed, read_config
from bitnet.model.config import ModelConfig
from bitnet.model.llama import Transformer
from bitnet.train import checkpoint
from bitnet.train.checkpoint import CheckpointError

FORMATS = ("packed", "hf")


def model_from_checkpoint(state: dict, where: str = "checkpoint") -> Transformer:
    """The BitNet Transformer of a loaded training checkpoint (eval mode); ExportError if it is not one."""
    model_cfg = (state.get("config") or {}).get("model")
    if not isinstance(model_cfg, dict):
        raise ExportError(f"{where} has no model config (config.model): not a bitnet-train checkpoint")
    try:
        cfg = ModelConfig.from_dict(model_cfg)
    except (TypeError, ValueError) as e:
        raise ExportError(f"{where} has an unusable model config: {e}") from None
    if cfg.quantization != "bitnet":
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


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage block first)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bitnet-export", description="Export a BitNet checkpoint: 'packed' (2-bit ternary "
                "safetensors, load with bitnet.export.load_packed) or 'hf' (transformers BitNetForCausalLM).")
    p.add_argument("checkpoint", help="checkpoint.pt, its step directory, a run directory (latest checkpoint), "
                   "or a packed export directory")
    p.add_argument("--format", default="packed", metavar="FORMAT",
                   help=f"one of {', '.join(FORMATS)} (default: packed)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (written atomically)")
    p.add_argument("--hf-weights", default="packed", metavar="FORM",
                   help="hf only: 'packed' (transformers' bitlinear, 2-bit; default) or 'online' (autobitlinear, bf16)")
    p.add_argument("--tokenizer", default=None, metavar="SPEC",
                   help="hf only: tokenizer to ship (default: the one the checkpoint trained with, else llama2)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    return p


def load_source(path: str) -> tuple[Transformer, dict]:
    """(model, source info) of a training checkpoint, or of a packed export (to re-export it as hf)."""
    if (Path(path) / CONFIG_FILE).is_file():
        return load_packed(path), read_config(path)["source"]
    pt, state = checkpoint.load_with_path(path, need="model")  # a run dir: its newest checkpoint that loads
    model = model_from_checkpoint(state, str(pt))
    tokenizer = ((state.get("config") or {}).get("train") or {}).get("tokenizer")
    return model, {"checkpoint": str(pt), "step": state.get("step"), "tokens": state.get("tokens"),
                   "tokenizer": tokenizer}


def run(args: argparse.Namespace) -> str:
    """Do the export; returns the summary line."""
    if args.format not in FORMATS:
        raise ExportError(f"unknown format {args.format!r} (choose from {', '.join(FORMATS)})")
    if args.hf_weights not in HF_WEIGHTS:
        raise ExportError(f"unknown --hf-weights {args.hf_weights!r} (choose from {', '.join(HF_WEIGHTS)})")
    check_writable(args.out, args.overwrite)  # before the (slow) checkpoint load
    model, source = load_source(args.checkpoint)
    if args.format == "packed":
        out = export_ternary(model, args.out, source=source, overwrite=args.overwrite)
        what = "packed ternary export"
    else:
        tokenizer = args.tokenizer or source.get("tokenizer") or VENDORED
        out = export_hf(model, args.out, tokenizer=tokenizer, weights=args.hf_weights, overwrite=args.overwrite)
        what = f"Hugging Face BitNet export ({args.hf_weights} weights)"
    with torch.device("meta"):
        fp32_bytes = 4 * Transformer(model.cfg).num_params()
    size = dir_size_bytes(out)
    return (f"wrote {what} of step {source.get('step')} to {out}: {size / 1e6:.2f} MB "
            f"({fp32_bytes / size:.1f}x smaller than the {fp32_bytes / 1e6:.1f} MB of fp32 weights)")


def main(argv: list[str] | None = None) -> int:
    """`bitnet-export`: exit 0 on success, 2 on bad input."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    exits.one_line_warnings()
    try:
        with torch.no_grad():
            summary = run(args)
    except (ExportError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
