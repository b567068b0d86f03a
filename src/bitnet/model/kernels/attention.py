"""Causal attention for training: torch's SDPA, or FlashAttention-4's CuTe DSL kernels where they run.

Why FA4: it is the FlashAttention-3-class implementation that ships as a wheel (`flash-attn-4`, pure Python
on `nvidia-cutlass-dsl`, JIT-compiled at first call) and has Hopper (sm90) forward and backward kernels at
head dim 64 with native GQA; `flash-attn` 2.x ships only source on PyPI. `benchmarks/attention_speed.py`
measures it against SDPA's cuDNN, flash and efficient backends at the 95m shapes.

FA4 runs behind two custom ops (`bitnet::fa4_causal_fwd`, `bitnet::fa4_causal_bwd`) so torch.compile sees one
opaque node per pass, with fake implementations for tracing; their outputs are allocated here and handed to
FA4 (its `out=`/`lse=`/`dq=`... arguments), so the fake and real layouts are the same by construction.
FA4's entry points `_flash_attn_fwd` and `_flash_attn_bwd` are its private API (as of 4.0.0b36, the same
ones torch's own FA4 registration calls): `fa4_available()` checks they exist before the model uses them.
Off CUDA, or where FA4 is not installed, `KernelChoice.attention == "fa4"` runs `sdpa_causal`.
"""

import importlib
import math

import torch
import torch.nn.functional as F

FA4_MODULE = "flash_attn.cute.interface"

# The probe's outcome, set once outside any compiled region (`fa4_available`, which `set_kernels` calls when a
# choice names FA4): torch.compile then reads plain module globals, never the import machinery.
_fa4 = None  # FA4's interface module once imported
_fa4_error: str | None = None  # why it is not usable here
_probed = False


def fa4_available() -> bool:
    """True when FA4 imports here (the package and its CUDA DSL libraries) and every visible GPU is a Hopper
    or Blackwell (sm90/sm100), the chips its kernels are written for. Probes once per process."""
    global _fa4, _fa4_error, _probed
    if not _probed:
        _probed = True
        majors = {torch.cuda.get_device_capability(i)[0] for i in range(torch.cuda.device_count())}
        if not majors or not majors <= {9, 10}:
            _fa4_error = f"needs CUDA GPUs of compute capability 9.x or 10.x, found {sorted(majors) or 'none'}"
        else:
            try:
                module = importlib.import_module(FA4_MODULE)
            except Exception as e:  # noqa: BLE001 - any import failure (no package, no DSL libs) means "not here"
                _fa4_error = f"import {FA4_MODULE}: {type(e).__name__}: {e}"
            else:
                if hasattr(module, "_flash_attn_fwd") and hasattr(module, "_flash_attn_bwd"):
                    _fa4 = module
                else:
                    _fa4_error = f"{FA4_MODULE} has no _flash_attn_fwd/_flash_attn_bwd (another FA4 version)"
    return _fa4 is not None


def fa4_import_error() -> str | None:
    """Why `fa4_available()` said no (None before the probe or when it said yes)."""
    return _fa4_error


def fa4_applies(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether FA4 takes these (B, heads, T, D) q and k: CUDA, bf16 or fp16, a head dim every supported chip
    covers (multiple of 8, at most 128), whole kv groups, and FA4 usable here (`fa4_available`)."""
    if not (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype):
        return False
    D = q.shape[-1]
    if D % 8 or D > 128 or q.shape[1] % k.shape[1]:
        return False
    return _fa4 is not None if _probed else fa4_available()


@torch.library.custom_op("bitnet::fa4_causal_fwd", mutates_args=(), device_types="cuda")
def fa4_causal_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax(q k^T / sqrt(D)) v for q (B, T, H, D), k and v (B, T, Hkv, D): (out (B, T, H, D),
    log-sum-exp (B, H, T) fp32, which the backward needs)."""
    B, T, H, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    _fa4._flash_attn_fwd(q, k, v, causal=True, softmax_scale=1.0 / math.sqrt(q.shape[-1]),
                                  return_lse=True, out=out, lse=lse)
    return out, lse


@fa4_causal_fwd.register_fake
def _(q, k, v):
    B, T, H, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("bitnet::fa4_causal_bwd", mutates_args=(), device_types="cuda")
def fa4_causal_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of `fa4_causal_fwd` (each contiguous, in the input's dtype)."""
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    _fa4._flash_attn_bwd(q, k, v, out, dout.contiguous(), lse,
                                  softmax_scale=1.0 / math.sqrt(q.shape[-1]), causal=True, dq=dq, dk=dk, dv=dv)
    return dq, dk, dv


@fa4_causal_bwd.register_fake
def _(dout, q, k, v, out, lse):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    return fa4_causal_bwd(dout, q, k, v, out, lse)


torch.library.register_autograd("bitnet::fa4_causal_fwd", _backward, setup_context=_setup_context)


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's SDPA (its backend pick: cuDNN on Hopper today), q (B, H, T, D), k and v (B, Hkv, T, D): (B, T, H*D)."""
    B, H, T, D = q.shape
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return y.transpose(1, 2).reshape(B, T, H * D)


def fa4_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FA4, same shapes and result as `sdpa_causal` (q, k, v given as (B, heads, T, D) views)."""
    B, H, T, D = q.shape
    out, _ = fa4_causal_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.reshape(B, T, H * D)
