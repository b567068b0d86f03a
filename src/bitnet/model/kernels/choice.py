"""The one place that picks, per fused op, its Triton kernel or its PyTorch reference.

`KernelChoice` holds the pick per op ("auto": the kernel where it applies, "torch": the reference; `norm_quant`
also takes "kernel": its kernel inside compiled regions too) and the launch settings of the kernels that have them.
One choice is current in the process, `KernelChoice()` unless changed: `use_kernels(choice)` changes it for a
`with` block, `set_kernels(choice)` until changed again (benchmarks' variants). The model calls the functions
below, which read the current choice at call time; torch.compile guards on it (a changed choice recompiles),
a captured CUDA graph replays what it saw. The kernels run on CUDA tensors only (and only with Triton
installed); elsewhere every op is its reference.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
import torch.nn.functional as F

from bitnet.model.kernels import attention, cross_entropy, fp8, references, rmsnorm, rope, swiglu
from bitnet.model.kernels.common import available
from bitnet.model.kernels.cross_entropy import CrossEntropyLaunch
from bitnet.model.kernels.embedding import scatter_add_embedding
from bitnet.model.kernels.swiglu import SwigluLaunch

Impl = Literal["auto", "torch"]
IMPLS = ("auto", "torch")
AttentionImpl = Literal["sdpa", "fa4"]
ATTENTION_IMPLS = ("sdpa", "fa4")
NormImpl = Literal["auto", "torch", "kernel"]
NORM_IMPLS = ("auto", "torch", "kernel")


@dataclass(frozen=True)
class KernelChoice:
    """Kernel or reference, per op; "auto" runs the kernel where it applies (below), "torch" never.

    norm_quant: RMSNorm + int8 quantization (`rmsnorm`), on CUDA in eager mode only: inside torch.compile
        inductor fuses the reference with its neighbours (silu * up, the residual add), which measured
        faster than the standalone kernel (54.1 vs 59.0 ms per 95m step on an H100, benchmarks/NOTES.md).
        "kernel": the kernel inside compiled regions too, measured slower: 0.957x the default's 95m step on an
        H100. Its forward and backward take 4.6 ms a step where inductor's norms, residual adds included, take
        3.2, and the adds it keeps inductor from fusing cost 1.5 ms more (benchmarks/RESULTS.md, "Issue 25,
        eighth session"); kept to measure a kernel that takes the add inside.
    swiglu_norm_quant: silu(gate) * up + sub-norm + int8 quantization (`swiglu`), on CUDA, eager and
        compiled: the GEMMs around it leave inductor nothing to fuse it with; -1.0 ms per 95m step (run 4).
    rope_qkv: training's q/k/v as one GEMM split and rotated by the `rope` kernel (CUDA, under autograd, no KV
        cache); "torch": three GEMMs and `apply_rope` (stacked with inductor's RoPE the step measured
        slower, run 6).
    loss: the tied head + cross entropy with the logits' gradient made in the forward (`cross_entropy`), on
        CUDA: a read and a write of the 2 GiB logits fewer per 95m step; "torch": F.cross_entropy on fp32
        logits.
    embedding: the scatter-add embedding backward (`embedding`), on CUDA under autograd unless
        torch.use_deterministic_algorithms is on; "torch": aten's sort-based (deterministic) backward.
    fp8_head, fp8_grad_input, fp8_grad_weight: FP8 tensor cores (`fp8`) for the tied head + loss, BitLinear's
        input gradient and its weight gradient, training on CUDA only (the caller checks the card: compute
        capability 8.9+); off, or anywhere else, the exact bf16 GEMMs. Off by default (benchmarks/RESULTS.md).
    fp8_forward: BitLinear's forward GEMM in FP8, its activations quantized per token to e4m3 with a
        power-of-two scale instead of int8 levels (`references.e4m3_act_quant`): this changes what the model
        computes while it trains (training on CUDA in bf16 only). Eval, sampling and every export keep the
        int8 levels, so the trained model is used with other activations than it trained with; what that
        costs shows in eval loss. Off by default: 1.019x the trainer's speed on an H100; after 2,000 steps its
        eval loss differs from exact's with the same seed by +0.021, +0.004 and -0.020 over three seeds, inside
        the exact seeds' spread (0.027); a long-run comparison has not run (benchmarks/RESULTS.md, "Issue 25,
        ninth session" and "tenth session").
    attention: causal attention without a KV cache (training, prefill). "sdpa": torch's SDPA, whose own
        backend pick is cuDNN on Hopper. "fa4": FlashAttention-4's kernels (`kernels/attention.py`) where they
        apply (CUDA sm90/sm100, bf16/fp16, FA4 installed), else SDPA; off by default until measured
        (benchmarks/attention_speed.py).
    """

    norm_quant: NormImpl = "auto"
    swiglu_norm_quant: Impl = "auto"
    rope_qkv: Impl = "auto"
    loss: Impl = "auto"
    embedding: Impl = "auto"
    fp8_head: bool = False
    fp8_grad_input: bool = False
    fp8_grad_weight: bool = False
    fp8_forward: bool = False
    attention: AttentionImpl = "sdpa"
    swiglu_launch: SwigluLaunch = SwigluLaunch()
    cross_entropy_launch: CrossEntropyLaunch = CrossEntropyLaunch()

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_launch"):
                if not isinstance(value, f.default.__class__):
                    raise TypeError(f"KernelChoice.{f.name} must be a {f.default.__class__.__name__}, got {value!r}")
            elif f.name.startswith("fp8_"):
                if not isinstance(value, bool):
                    raise TypeError(f"KernelChoice.{f.name} must be True or False, got {value!r}")
            elif value not in (allowed := {"attention": ATTENTION_IMPLS, "norm_quant": NORM_IMPLS}.get(f.name, IMPLS)):
                raise ValueError(f"KernelChoice.{f.name} must be one of {allowed}, got {value!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "KernelChoice":
        """A choice from plain values (a benchmark's JSON tweaks): launch settings as dicts of their fields."""
        d = dict(d)
        for name, launch in (("swiglu_launch", SwigluLaunch()), ("cross_entropy_launch", CrossEntropyLaunch())):
            if isinstance(d.get(name), dict):
                d[name] = replace(launch, **d[name])
        return cls(**d)


_current = KernelChoice()


def current_kernels() -> KernelChoice:
    """The choice the model's fused ops follow now."""
    return _current


def set_kernels(choice: KernelChoice) -> KernelChoice:
    """Make `choice` current until changed again; returns the one it replaces."""
    global _current
    if not isinstance(choice, KernelChoice):
        raise TypeError(f"set_kernels takes a KernelChoice, got {choice!r}")
    if choice.attention == "fa4":
        attention.fa4_available()  # import FA4 now, outside any compiled region
    previous, _current = _current, choice
    return previous


@contextmanager
def use_kernels(choice: KernelChoice) -> Iterator[KernelChoice]:
    """`choice` is current inside the block; the previous one is restored after it, however it ends."""
    previous = set_kernels(choice)
    try:
        yield choice
    finally:
        set_kernels(previous)


def _kernel_applies(impl: Impl, t: torch.Tensor) -> bool:
    return impl == "auto" and t.is_cuda and available()


def norm_act_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm(x) * weight, fake-quantized per token to 8 bits (STE), in out_dtype: int8 levels, or the e4m3
    grid where the FP8 forward applies (`fp8_forward`; the reference then, which inductor fuses)."""
    if fp8_forward(x, out_dtype):
        return references.norm_act_quant_reference(x, weight, eps, out_dtype, e4m3=True)
    wanted = _current.norm_quant == "kernel" or (_current.norm_quant == "auto" and not torch.compiler.is_compiling())
    if wanted and x.is_cuda and available():
        return rmsnorm.rmsnorm_act_quant(x, weight, eps, out_dtype)
    return references.norm_act_quant_reference(x, weight, eps, out_dtype)


def swiglu_norm_act_quant(gate_up: torch.Tensor, weight: torch.Tensor, eps: float,
                          out_dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm(silu(gate) * up) * weight, fake-quantized per token to 8 bits (STE), in out_dtype; gate_up
    (..., 2 * ffn) holds gate and up side by side."""
    return swiglu_norm_act_quant_for_gemm(gate_up, weight, eps, out_dtype)[0]


def swiglu_norm_act_quant_for_gemm(gate_up: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype
                                   ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """`swiglu_norm_act_quant` and the next GEMM's operand: (y, None), or where the FP8 forward applies y on the
    e4m3 grid and (y8, row scales) from the kernel's same pass (None from the reference: the GEMM recovers
    them from y)."""
    e4m3 = fp8_forward(gate_up, out_dtype)
    if _kernel_applies(_current.swiglu_norm_quant, gate_up):
        if e4m3:
            y, y8, scale = swiglu.swiglu_norm_act_quant_e4m3(gate_up, weight, eps, out_dtype, _current.swiglu_launch)
            return y, (y8, scale)
        return swiglu.swiglu_norm_act_quant(gate_up, weight, eps, out_dtype, _current.swiglu_launch), None
    return references.swiglu_norm_act_quant_reference(gate_up, weight, eps, out_dtype, e4m3), None


def stacks_qkv(x: torch.Tensor) -> bool:
    """Whether a training forward of x runs q/k/v as one GEMM split by the rope kernel."""
    return _kernel_applies(_current.rope_qkv, x)


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int,
             n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, heads, T, D) from the stacked projections qkv (B, T, (H + 2 Hkv) D), RoPE on q and k."""
    if _kernel_applies(_current.rope_qkv, qkv):
        return rope.rope_qkv(qkv, cos, sin, n_heads, n_kv_heads)
    return references.rope_qkv_reference(qkv, cos, sin, n_heads, n_kv_heads)


def _fp8_training(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Training on CUDA with matmuls in bf16 (autocast): where the FP8 switches may apply."""
    return x.is_cuda and dtype == torch.bfloat16 and torch.is_grad_enabled()


def _fp8_gemm_fits(x: torch.Tensor, out_features: int) -> bool:
    """Every dimension of x @ W^T (W: out_features rows) a multiple of 16, as FP8 tensor cores need (the 1.3b
    preset's FFN width 5460 is not: its FFN layers keep the exact GEMMs)."""
    return x.shape[-1] % 16 == 0 and out_features % 16 == 0 and x.numel() // x.shape[-1] % 16 == 0


def fp8_forward(x: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether activations x, quantized for a matmul in out_dtype, take the FP8 forward's e4m3 grid."""
    return _current.fp8_forward and _fp8_training(x, out_dtype)


def fp8_forward_gemm(x: torch.Tensor, out_features: int) -> bool:
    """Whether a BitLinear's forward GEMM runs in FP8: x (in the matmul dtype) is on the e4m3 grid and the GEMM
    fits. Where it does not fit, the bf16 GEMM computes the same product (the grid is exact in bf16)."""
    return fp8_forward(x, x.dtype) and _fp8_gemm_fits(x, out_features)


def fp8_backward(x: torch.Tensor, out_features: int) -> tuple[bool, bool]:
    """Whether a BitLinear (x @ W^T, W: out_features rows) runs its (input, weight) gradient GEMMs in FP8:
    training on CUDA in bf16 (autocast), switch on, and the GEMM fits."""
    training = _fp8_training(x, x.dtype) and _fp8_gemm_fits(x, out_features)
    return training and _current.fp8_grad_input, training and _current.fp8_grad_weight


def head_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
    """Mean cross entropy of the logits x @ weight^T (matmul in dtype) against targets (-100: not counted)."""
    if (_current.fp8_head and x.is_cuda and torch.is_grad_enabled() and available()
            and x.shape[-1] % 16 == 0 and weight.shape[0] % 16 == 0 and targets.numel() % 16 == 0):
        return fp8.head_cross_entropy_fp8(x, weight, targets)
    if _kernel_applies(_current.loss, x):
        return cross_entropy.linear_cross_entropy(x, weight, targets, dtype, _current.cross_entropy_launch)
    return references.head_cross_entropy_reference(x, weight, targets, dtype)


def embedding(idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The token embedding weight[idx] (..., C)."""
    if (_current.embedding == "auto" and weight.is_cuda and torch.is_grad_enabled()
            and not torch.are_deterministic_algorithms_enabled()):
        return scatter_add_embedding(idx, weight)
    return F.embedding(idx, weight)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of rotated q (B, H, T, D), k and v (B, Hkv, T, D), as (B, T, H*D)."""
    if _current.attention == "fa4" and attention.fa4_applies(q, k):
        return attention.fa4_causal(q, k, v)
    return attention.sdpa_causal(q, k, v)
