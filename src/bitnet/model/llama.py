"""The BitNet b1.58 LLaMA-style transformer.

How it differs from plain LLaMA:
- every attention and FFN projection is a `BitLinear` (ternary weights, int8 activations);
  the embedding and the (tied) head stay full precision; the RMSNorm before each BitLinear also
  quantizes its output (`quantize_output`, one fused pass), so those BitLinears skip their own;
- SubLN norm placement, as in Hugging Face transformers' `BitNetForCausalLM`, so an export maps
  name for name: `attn_sub_norm` (hidden size) before `o_proj`, `ffn_sub_norm` (FFN width)
  before `down_proj`, besides the usual pre-norms and the final norm;
- input and output embeddings are one tensor (tied);
- `quantization='none'` builds the identical network with plain linears (the bf16 twin).
Training on CUDA runs q/k/v as one GEMM and gate/up as one (`fused_linear`), each weight quantized alone;
the kernels after them (`kernels/rope.py`, `kernels/swiglu.py`) write the stacked gradients; which
fused op runs its kernel and which its PyTorch reference, `kernels.KernelChoice` says.
`forward(idx)` returns logits; `forward(idx, targets=...)` the mean next-token loss, which on CUDA
never hands the logits out (`head_cross_entropy`).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bitnet.model.bitlinear import (fused_linear, make_linear, matmul_dtype, norm_act_quant,
                                    swiglu_norm_act_quant_for_gemm)
from bitnet.model.config import ModelConfig
from bitnet.model.kernels import choice
from bitnet.model.kernels.references import apply_rope


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (bf16 sums of squares lose too much), returned in the input dtype.

    quantize_output: the norm feeds only BitLinears, so it returns their int8-fake-quantized input
    (per-token absmax, STE) in the matmul dtype: `norm_act_quant`, one fused pass on CUDA.
    """

    def __init__(self, dim: int, eps: float, quantize_output: bool = False):
        super().__init__()
        self.eps = eps
        self.quantize_output = quantize_output
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize_output:
            return norm_act_quant(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (max_seq_len, head_dim // 2) for rotary embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


@dataclass
class KVCache:
    """Per-layer key/value buffers for incremental decoding. k, v: (B, n_kv_heads, max_len, head_dim)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int = 0
    left_pad: torch.Tensor | None = None
    """(B,) how many positions at the start of each row are padding (rows of prompts of different lengths,
    aligned at their ends): no query attends to them. None: no padding."""

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, device, dtype,
              left_pad: list[int] | None = None) -> "KVCache":
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        return cls(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
            left_pad=None if left_pad is None else torch.tensor(left_pad, device=device),
        )

    def attention_mask(self, T: int, device) -> torch.Tensor:
        """Which keys the next T queries see: (T, S) causal, or (B, 1, T, S) with the padding hidden."""
        start = self.length
        # Query i (absolute position start+i) sees keys 0..start+i.
        causal = torch.ones(T, start + T, dtype=torch.bool, device=device).tril(diagonal=start)
        if self.left_pad is None:
            return causal
        keys = torch.arange(start + T, device=device)
        real = keys >= self.left_pad[:, None]  # (B, S)
        # A padding query sees itself only, so its softmax has one key (no NaN); its output is never read.
        itself = keys == (start + torch.arange(T, device=device))[:, None]  # (T, S)
        return ((causal & real[:, None]) | itself)[:, None]  # (B, 1, T, S)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q, bitnet = cfg.quantization, cfg.quantization == "bitnet"
        # q/k/v take Block.input_layernorm's quantized output, o_proj attn_sub_norm's.
        self.q_proj = make_linear(cfg.dim, cfg.n_heads * cfg.head_dim, q, quantized_input=True)
        self.k_proj = make_linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, q, quantized_input=True)
        self.v_proj = make_linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, q, quantized_input=True)
        self.attn_sub_norm = RMSNorm(cfg.dim, cfg.norm_eps, quantize_output=bitnet)
        self.o_proj = make_linear(cfg.n_heads * cfg.head_dim, cfg.dim, q, quantized_input=True)
        # under autograd, where the rope kernel runs (`KernelChoice.rope_qkv`), q/k/v as one GEMM
        # (`fused_linear`), split and rotated by the kernel, whose backward writes their stacked gradient in
        # place. Stacked with inductor's RoPE instead, the step measured slower (benchmarks/NOTES.md, run 6).
        # False: three GEMMs.
        self.fused_projections = True

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0):
        B, T, _ = x.shape
        if self.fused_projections and torch.is_grad_enabled() and cache is None and choice.stacks_qkv(x):
            qkv = fused_linear(x, (self.q_proj, self.k_proj, self.v_proj))  # training: one GEMM, one kernel
            q, k, v = choice.rope_qkv(qkv, cos, sin, self.n_heads, self.n_kv_heads)
            return self._attend(q, k, v, cache, layer)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        return self._attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, cache, layer)

    def _attend(self, q, k, v, cache: KVCache | None, layer: int):
        """Causal attention of rotated q, k and v (B, heads, T, D), then attn_sub_norm and o_proj."""
        B, _, T, _ = q.shape
        if cache is None:
            y = choice.causal_attention(q, k, v)  # (B, T, H*D): SDPA, or FA4 where KernelChoice.attention says
        else:
            start = cache.length
            cache.k[layer][:, :, start:start + T] = k
            cache.v[layer][:, :, start:start + T] = v
            k_all = cache.k[layer][:, :, :start + T]  # (B, Hkv, S, D)
            v_all = cache.v[layer][:, :, :start + T]
            mask = cache.attention_mask(T, q.device)
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=True)
            y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(self.attn_sub_norm(y))


class MLP(nn.Module):
    """SwiGLU: down(ffn_sub_norm(silu(gate(x)) * up(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        q, bitnet = cfg.quantization, cfg.quantization == "bitnet"
        # gate/up take Block.post_attention_layernorm's quantized output, down_proj ffn_sub_norm's.
        self.gate_proj = make_linear(cfg.dim, cfg.ffn_dim, q, quantized_input=True)
        self.up_proj = make_linear(cfg.dim, cfg.ffn_dim, q, quantized_input=True)
        self.ffn_sub_norm = RMSNorm(cfg.ffn_dim, cfg.norm_eps, quantize_output=bitnet)
        self.down_proj = make_linear(cfg.ffn_dim, cfg.dim, q, quantized_input=True)
        # under autograd, gate and up as one GEMM (`fused_linear`), whose gradient the SwiGLU kernel writes
        # as one tensor; False: each alone (benchmarks' reference rows)
        self.fused_projections = True

    def forward(self, x):
        if self.fused_projections and torch.is_grad_enabled():  # training: gate and up as one GEMM
            gate_up = fused_linear(x, (self.gate_proj, self.up_proj))
            gate, up = gate_up.chunk(2, dim=-1)
        else:  # each layer alone: BitLinear's cached weights for decoding, its hooks for instrumentation
            gate_up, gate, up = None, self.gate_proj(x), self.up_proj(x)
        if self.ffn_sub_norm.quantize_output:  # the SwiGLU product, normed and quantized in one pass
            if gate_up is None:
                gate_up = torch.cat((gate, up), dim=-1)
            norm = self.ffn_sub_norm
            y, y_e4m3 = swiglu_norm_act_quant_for_gemm(gate_up, norm.weight, norm.eps)
            return self.down_proj(y) if y_e4m3 is None else self.down_proj(y, y_e4m3)
        return self.down_proj(self.ffn_sub_norm(F.silu(gate) * up))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bitnet = cfg.quantization == "bitnet"  # these norms feed only BitLinears: quantize in the norm
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, quantize_output=bitnet)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, quantize_output=bitnet)
        self.mlp = MLP(cfg)
        # activation checkpointing (`Transformer.checkpoint_blocks`): under autograd the block keeps only its
        # input and runs again in the backward; inside torch.compile the checkpoint is traced, so the compiled
        # backward holds the recompute
        self.recompute = False

    def forward(self, x, cos, sin, cache=None, layer=0):
        # grad mode first: torch.compile then guards on `recompute` only under autograd (one variant fewer)
        if cache is None and torch.is_grad_enabled() and self.recompute:
            # no RNG in a block: nothing to replay, and no RNG-state calls inside a captured CUDA graph
            return checkpoint(self._forward, x, cos, sin, use_reentrant=False, preserve_rng_state=False)
        return self._forward(x, cos, sin, cache, layer)

    def _forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def head_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of the tied head's logits x @ weight^T against targets (-100: not counted);
    on CUDA the head and the loss as one kernel whose forward also makes the logits' gradient."""
    return choice.head_cross_entropy(x, weight, targets, matmul_dtype(x))


class Transformer(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab). Names follow HF transformers' BitNet model."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # True: under autocast the residual stream between blocks is kept in the matmul dtype (bf16), as
        # modded-nanogpt's and torchtitan's bf16 runs keep it; False: fp32 (the embedding's dtype), the seed's.
        # Set by the trainer (--residual-stream) before `compile_step`, whose copy takes it then; without autocast
        # the matmul dtype is fp32 and nothing changes.
        self.residual_in_matmul_dtype = False

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, std) for matrices and the embedding; residual outputs scaled by 1/sqrt(2L) (GPT-2)."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        std = self.cfg.init_std
        resid_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:  # norm gains
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, resid_std, generator=gen)
            else:
                p.normal_(0.0, std, generator=gen)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab); with targets (B, T), the mean cross entropy instead (0-dim, fp32)."""
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x = choice.embedding(idx, self.embed_tokens.weight)  # (B, T, C)
        if self.residual_in_matmul_dtype:
            x = x.to(matmul_dtype(x))
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.length += T
        x = self.norm(x)
        if targets is not None:
            return head_cross_entropy(x, self.embed_tokens.weight, targets)
        return F.linear(x, self.embed_tokens.weight)  # tied head, (B, T, vocab)

    def checkpoint_blocks(self, n: int) -> None:
        """Activation checkpointing of the first n blocks (0: none; n_layers: all): their activations are not
        kept for the backward, which recomputes them from each block's input (one more forward of those
        blocks: about a third more of their compute, for about their whole activation memory). The first
        blocks, because their backward comes last, when the later blocks' activations are already freed."""
        if not 0 <= n <= len(self.layers):
            raise ValueError(f"cannot checkpoint {n} blocks of a model with {len(self.layers)}")
        for i, block in enumerate(self.layers):
            block.recompute = i < n

    def num_params(self) -> int:
        """Unique parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 * (non-embedding matmul params + head) + attention scores.

        6N counts forward (2N) and backward (4N) of every matmul weight, including the tied head
        (a matmul of vocab x dim); attention adds 12 * layers * dim * seq_len (PaLM appendix B,
        QK^T and AV, forward + backward, without the causal halving).
        """
        c = self.cfg
        matmul_params = self.num_params() - sum(p.numel() for p in self.parameters() if p.dim() == 1)
        return 6 * matmul_params + 12 * c.n_layers * c.dim * seq_len
