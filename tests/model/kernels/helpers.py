"""Inputs, comparisons and skip marks the kernel tests share.

GPU tests (and the interpreter tests, run with TRITON_INTERPRET=1) poison the kernels' outputs with NaN
before they run, so an element left unwritten shows. Under Triton's CPU interpreter, casts from fp32 to
bf16 truncate instead of rounding, which the bf16 tolerances (set for GPUs) absorb.
"""

import pytest
import torch

from bitnet.model.bitlinear import activation_quant, ste
from bitnet.model.kernels.common import INTERPRET, triton
from bitnet.model.llama import RMSNorm, rope_tables

EPS = 1e-5

interpreter = pytest.mark.skipif(triton is None or not INTERPRET,
                                 reason="needs triton and TRITON_INTERPRET=1 (the kernels run on the CPU interpreter)")
cuda = pytest.mark.skipif(not torch.cuda.is_available() or triton is None, reason="needs CUDA and triton")

# (input dtype, output dtype) pairs the kernels are checked in: training's bf16 and the fp32 cases
GPU_DTYPES = [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)]


def small_model_batch(vocab: int, n_layers: int, n_heads: int, n_kv_heads: int, data_seed: int):
    """A small model (width 32, 16 positions, init seed 0) and a batch of 2 sequences with next-token targets."""
    from bitnet.model import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=vocab, dim=32, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                      ffn_dim=64, max_seq_len=16)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    idx = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(data_seed))
    return model, idx, idx.roll(-1, dims=1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def unfused(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The model's RMSNorm, then BitLinear's input quantization: what the fused norm must equal."""
    norm = RMSNorm(x.shape[-1], EPS)
    with torch.no_grad():
        norm.weight.copy_(w)
    norm.weight.requires_grad_(w.requires_grad)
    y = norm(x)
    return ste(y, activation_quant(y)).to(out_dtype), norm.weight


def inputs(shape, dtype, seed=0):
    """Activations with per-token scales, as real ones, and a norm gain near 1."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(shape[:-1] + (1,), generator=g) * 4 + 0.01
    x = (torch.randn(shape, generator=g) * scale).to(dtype)
    w = 1 + 0.2 * torch.randn(shape[-1], generator=g)
    return x, w


def swiglu_inputs(shape, dtype, seed=0):
    """gate_up (..., 2n): gate and up side by side, as the fused gate/up GEMM returns them; the norm gain (n,)."""
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(shape, generator=g) * 2
    up = torch.randn(shape, generator=g) * (torch.rand(shape[:-1] + (1,), generator=g) * 3 + 0.1)
    w = 1 + 0.2 * torch.randn(shape[-1], generator=g)
    return torch.cat([gate, up], dim=-1).to(dtype), w


def qkv_inputs(B, T, H, Hkv, D, dtype, seed):
    """A stacked q/k/v projection output (B, T, (H + 2 Hkv) D) and RoPE tables for its T positions."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, T, (H + 2 * Hkv) * D, generator=g) * 2).to(dtype)
    cos, sin = rope_tables(D, T + 5, 10000.0)
    return qkv, cos[:T].contiguous(), sin[:T].contiguous()


def head_inputs(m: int, d: int, v: int, seed: int):
    """Hidden states (m, d), a head (v, d) and targets (m,) with every third ignored (row 0 counts)."""
    from bitnet.model.kernels.references import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g)
    w = torch.randn(v, d, generator=g) * (3 / d**0.5)  # logits of std ~3: a peaked softmax
    t = torch.randint(0, v, (m,), generator=g)
    t[1::3] = IGNORE_INDEX
    return x, w, t
