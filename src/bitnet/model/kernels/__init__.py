"""Triton kernels for the BitNet training step (CUDA), each beside the PyTorch reference of its function.

One file per kernel, none importing anything from the model (the model imports them):
  rmsnorm        RMSNorm + per-token int8 fake quantization (the norms before every BitLinear)
  swiglu         silu(gate) * up + the FFN's sub-norm + int8 fake quantization
  rope           the stacked q/k/v projections split, with RoPE on q and k
  cross_entropy  the tied head + cross entropy, the logits' gradient made in the forward
  embedding      the embedding with a scatter-add backward (PyTorch ops, no Triton)
  attention      causal attention: torch's SDPA, or FlashAttention-4 (an optional package) as custom ops
  references     the PyTorch formulation of each: the definition the kernels are tested against, and
                 what runs off CUDA
  common         the optional Triton import, the interpreter switch, the row-block helpers
  choice         `KernelChoice`: the one place that picks kernel or reference, per op
tests/model/kernels/ checks every kernel against its reference, on a GPU or Triton's CPU interpreter.
"""

from bitnet.model.kernels.choice import KernelChoice, current_kernels, set_kernels, use_kernels
from bitnet.model.kernels.cross_entropy import CrossEntropyLaunch
from bitnet.model.kernels.swiglu import SwigluLaunch

__all__ = ["CrossEntropyLaunch", "KernelChoice", "SwigluLaunch", "current_kernels", "set_kernels", "use_kernels"]
