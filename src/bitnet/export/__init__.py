"""Use a trained model elsewhere: packed ternary export + loader, and a Hugging Face export.

  bitnet-export CHECKPOINT --format packed --out DIR   # 2-bit ternary safetensors; load_packed(DIR)
  bitnet-export CHECKPOINT --format hf --out DIR       # transformers BitNetForCausalLM + tokenizer
The command line is bitnet/cli/export.py. See docs/export.md for the formats and the parity measurements.
"""

from bitnet.export.files import ExportError
from bitnet.export.hf import export_hf
from bitnet.export.packed import export_ternary, load_packed
from bitnet.export.ternary import TernaryLinear, pack_ternary, to_ternary_inference, unpack_ternary

__all__ = ["ExportError", "TernaryLinear", "export_hf", "export_ternary", "load_packed", "pack_ternary",
           "to_ternary_inference", "unpack_ternary"]
