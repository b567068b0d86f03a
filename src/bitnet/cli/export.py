"""`bitnet-export`: turn a training checkpoint into a packed ternary or a Hugging Face export.

  bitnet-export runs/demo --format packed --out exports/demo-packed
  bitnet-export runs/demo/checkpoints/step_000500 --format hf --out exports/demo-hf
  bitnet-export exports/demo-packed --format hf --out exports/demo-hf   # from a packed export
  bitnet-export runs/demo --format gguf --out exports/demo.gguf          # llama.cpp (TQ2_0)
Bad input (missing or non-BitNet checkpoint, unknown format or GGUF type, unwritable output) prints
one line and exits 2. The formats live in bitnet/export/; docs/design.md, section "command-line tools".
"""

import argparse
import sys

import torch

from bitnet import exits
from bitnet.cli.args import OneLineParser, parse_or_exit
from bitnet.cli.load import load_source
from bitnet.data.tokenizer import VENDORED
from bitnet.export.files import ExportError, check_writable, dir_size_bytes
from bitnet.export.gguf_export import GGUF_TYPES, check_writable_file, export_gguf
from bitnet.export.hf import HF_WEIGHTS, export_hf
from bitnet.export.packed import export_ternary
from bitnet.model.llama import Transformer
from bitnet.run.checkpoint import CheckpointError
from bitnet.run.files import os_error_message

FORMATS = ("packed", "hf", "gguf")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="bitnet-export", description="Export a BitNet checkpoint: 'packed' (2-bit ternary "
                "safetensors, load with bitnet.export.load_packed), 'hf' (transformers BitNetForCausalLM) or "
                "'gguf' (one file for llama.cpp's bitnet architecture).")
    p.add_argument("checkpoint", help="checkpoint.pt, its step directory, a run directory (latest checkpoint), "
                   "or a packed export directory")
    p.add_argument("--format", default="packed", metavar="FORMAT",
                   help=f"one of {', '.join(FORMATS)} (default: packed)")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="output directory (packed, hf) or .gguf file (gguf); written atomically")
    p.add_argument("--hf-weights", default="packed", metavar="FORM",
                   help="hf only: 'packed' (transformers' bitlinear, 2-bit; default) or 'online' (autobitlinear, bf16)")
    p.add_argument("--gguf-type", default="tq2_0", metavar="TYPE",
                   help="gguf only: the linear weights' type, tq2_0 (2.06 bits a weight; default), tq1_0 "
                        "(1.69 bits) or f16; rows not a multiple of 256 fall back to Q8_0 / F16 (exact)")
    p.add_argument("--tokenizer", default=None, metavar="SPEC",
                   help="hf and gguf: tokenizer to ship (default: the one the checkpoint trained with, else llama2)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    return p


def run(args: argparse.Namespace) -> str:
    """Do the export; returns the summary line."""
    if args.format not in FORMATS:
        raise ExportError(f"unknown format {args.format!r} (choose from {', '.join(FORMATS)})")
    if args.hf_weights not in HF_WEIGHTS:
        raise ExportError(f"unknown --hf-weights {args.hf_weights!r} (choose from {', '.join(HF_WEIGHTS)})")
    if args.format == "gguf":
        return run_gguf(args)
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


def run_gguf(args: argparse.Namespace) -> str:
    """The GGUF export; returns the summary line (sizes and the types chosen)."""
    if args.gguf_type not in GGUF_TYPES:
        raise ExportError(f"unknown --gguf-type {args.gguf_type!r} (choose from {', '.join(GGUF_TYPES)})")
    check_writable_file(args.out, args.overwrite)  # before the (slow) checkpoint load
    model, source = load_source(args.checkpoint, bitnet_only=args.gguf_type != "f16")
    tokenizer = args.tokenizer or source.get("tokenizer") or VENDORED
    report = export_gguf(model, args.out, tokenizer=tokenizer, gguf_type=args.gguf_type, overwrite=args.overwrite,
                         name=f"bitnet-train step {source.get('step')}")
    size = report.path.stat().st_size
    return (f"wrote llama.cpp GGUF ({args.gguf_type.upper()}) of step {source.get('step')} to {report.path}: "
            f"{size / 1e6:.2f} MB; {report.summary()}")


def main(argv: list[str] | None = None) -> int:
    """`bitnet-export`: exit 0 on success, 2 on bad input."""
    args = parse_or_exit(build_parser(), sys.argv[1:] if argv is None else argv)
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
