"""Will this run fit in memory? A lower-bound estimate checked before anything is allocated, and the
message for an out-of-memory error that happens anyway.

The estimate counts only what a step cannot do without, so that a refusal is not a false alarm:
weights, gradients and AdamW's two moments (16 bytes a parameter, fp32; a rank's 1/world_size share
of them under FSDP2), 70% of the activations the backward keeps on the exact path (about 10 x dim +
3 x ffn_dim values a token and layer, 2 bytes each; checkpointed blocks: see `step_bytes`), and one
vocabulary-wide row of logits a token (a chunk's under --head-chunk-rows or --fp8 head); plus the frozen eval set
(int64 tokens). Why 70%: the full activation term matched the measured peaks of the exact path with the fp32 stream
and the whole head (95m 11.6 GiB estimated, 11.6-11.8 measured; 700m 53.3 and 52.9), so it was no lower bound,
and with --fp8 all the activations measured 0.89 (95m) and 0.74 (700m) of it (benchmarks/RESULTS.md,
2026-12-06). tests/model/test_activation_checkpointing.py and test_residual_stream.py pin the estimate under every
peak measured since, with and without checkpointed blocks, bf16 stream and chunked head. When the weights and
their state alone do not fit, no micro-batch helps: the message says to shard them with FSDP2 instead.
"""

import os

import torch

from bitnet.model import ModelConfig, Transformer
from bitnet.model.kernels.fp8 import HEAD_CHUNK_ROWS
from bitnet.train.config import TrainConfig, checkpointed_blocks, fp8_parts

GiB = 2**30


def checkpoint_hint(activation_checkpointing: str, more_blocks: bool) -> str:
    """The end of an out-of-memory message: checkpoint more blocks, while some are left to checkpoint."""
    return (f", or checkpoint more blocks (--activation-checkpointing, now {activation_checkpointing})"
            if more_blocks else "")


STATE = "weights, grads and AdamW state"
MOMENTS = "weights and AdamW state"


ACTIVATIONS_LOWER_BOUND = 0.7
"""The share of the exact path's activation estimate counted as certain (see the module docstring)."""


def step_bytes(model_cfg: ModelConfig, micro: int, seq_len: int, shards: int = 1, fp8_head: bool = False,
               checkpointed_blocks: int = 0, residual_bytes: int = 4, head_chunk_rows: int = 0) -> dict[str, int]:
    """Lower-bound bytes of one rank's step at its peak, by part; `shards`: the ranks FSDP2 splits the weights
    over; `fp8_head`: the head's logits exist one chunk of tokens at a time; `checkpointed_blocks`: blocks whose
    activations the backward recomputes (--activation-checkpointing); `residual_bytes`: the residual stream's
    element size (4: fp32; 2 under --residual-stream bf16); `head_chunk_rows`: the exact head's logits exist
    this many tokens at a time (--head-chunk-rows; 0: all at once).

    With blocks kept, the peak is where the exact path's is: every kept block's activations, the logits and the
    weight state with gradients (checkpointed blocks' inputs left out: a lower bound). With every block
    checkpointed no block's activations outlive its backward, so the peak is the larger of the forward's end (the
    blocks' inputs, in the residual stream's dtype, and the logits, before this step's gradients: 12 bytes a
    parameter) and one block's recompute under the full weight state.
    """
    params = parameter_count(model_cfg)
    tokens = micro * seq_len
    # one block's activations; 4 x dim of the 10 are its two fp32 norm inputs, half that with a bf16 stream
    block = tokens * ((10 * model_cfg.dim + 3 * model_cfg.ffn_dim) * 2 - 2 * model_cfg.dim * (4 - residual_bytes))
    chunk = HEAD_CHUNK_ROWS if fp8_head else head_chunk_rows
    logits = (min(tokens, chunk) if chunk else tokens) * model_cfg.vocab_size * 2
    kept = model_cfg.n_layers - checkpointed_blocks
    if kept:
        return {STATE: state_bytes(params, shards), "activations": int(ACTIVATIONS_LOWER_BOUND * kept * block),
                "logits": logits}
    inputs = model_cfg.n_layers * tokens * model_cfg.dim * residual_bytes  # the residual each block keeps
    forward_end = {MOMENTS: 12 * params // shards, "block inputs": int(ACTIVATIONS_LOWER_BOUND * inputs),
                   "logits": logits}
    recompute = {STATE: state_bytes(params, shards), "one block's activations": int(ACTIVATIONS_LOWER_BOUND * block)}
    return max(forward_end, recompute, key=lambda parts: sum(parts.values()))


def parameter_count(model_cfg: ModelConfig) -> int:
    """The model's parameters, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return Transformer(model_cfg).num_params()


def state_bytes(params: int, shards: int = 1) -> int:
    """fp32 weights, gradients and AdamW's two moments: 16 bytes a parameter, a rank's share under FSDP2."""
    return 16 * params // shards


def device_bytes(device: torch.device) -> int | None:
    """Total memory of the device (GPU) or of the machine (CPU); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(cfg: TrainConfig, model_cfg: ModelConfig, micro: int, device: torch.device,
               world_size: int = 1) -> None:
    """Refuse (ValueError) sizes whose lower-bound memory exceeds the device's, naming the estimate."""
    if cfg.sample_max_tokens > model_cfg.max_seq_len:
        raise ValueError(f"--sample-max-tokens {cfg.sample_max_tokens} exceeds the model's context of "
                         f"{model_cfg.max_seq_len} tokens (a sample holds at most that many)")
    total = device_bytes(device)
    if total is None:
        return
    where = "GPU" if device.type == "cuda" else "machine"
    shards = world_size if cfg.parallel == "fsdp2" else 1
    blocks = checkpointed_blocks(cfg.activation_checkpointing, model_cfg.n_layers)
    need = step_bytes(model_cfg, micro, cfg.seq_len, shards, fp8_head="head" in fp8_parts(cfg.fp8),
                      checkpointed_blocks=blocks, residual_bytes=2 if cfg.residual_stream == "bf16" else 4,
                      head_chunk_rows=cfg.head_chunk_rows)
    state = state_bytes(parameter_count(model_cfg), shards)
    if state > total:  # no micro-batch or sequence length helps
        per_rank = f" per rank ({shards} FSDP2 ranks)" if shards > 1 else ""
        raise ValueError(f"the {STATE} (fp32, 16 bytes a parameter) alone need {state / GiB:,.1f} GiB"
                         f"{per_rank}, more than the {where}'s {total / GiB:,.1f} GiB; shard them over more GPUs: "
                         f"torchrun --nproc_per_node=N -m bitnet.train --parallel fsdp2 (docs/distributed.md)")
    if sum(need.values()) > total:
        parts = ", ".join(f"{k} {v / GiB:,.1f}" for k, v in need.items())
        raise ValueError(f"a step of micro-batch {micro} x --seq-len {cfg.seq_len} needs at least "
                         f"{sum(need.values()) / GiB:,.1f} GiB ({parts} GiB), more than the {where}'s "
                         f"{total / GiB:,.1f} GiB; lower --micro-batch-size, --batch-size or --seq-len"
                         f"{checkpoint_hint(cfg.activation_checkpointing, blocks < model_cfg.n_layers)}")
    eval_bytes = 0 if cfg.no_eval else cfg.eval_sequences * (cfg.seq_len + 1) * 8
    if eval_bytes > total:
        raise ValueError(f"--eval-sequences {cfg.eval_sequences} x {cfg.seq_len + 1} tokens needs at least "
                         f"{eval_bytes / GiB:,.1f} GiB, more than the machine's {total / GiB:,.1f} GiB")


def out_of_memory_message(step: int, device: torch.device, cfg: TrainConfig, micro: int,
                          n_layers: int | None = None) -> str:
    """One line for an out-of-memory error at `step`: the memory figures and the flags that lower it."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        figures = (f"{torch.cuda.memory_allocated(device) / GiB:.2f} GiB allocated, "
                   f"{torch.cuda.memory_reserved(device) / GiB:.2f} GiB reserved, "
                   f"peak {torch.cuda.max_memory_allocated(device) / GiB:.2f} GiB, "
                   f"{free / GiB:.2f} of {total / GiB:.2f} GiB free")
    else:
        total = device_bytes(device)
        figures = f"machine memory {total / GiB:.1f} GiB" if total else "machine memory unknown"
    more_blocks = n_layers is None or checkpointed_blocks(cfg.activation_checkpointing, n_layers) < n_layers
    return (f"out of memory at step {step} on {device} ({figures}); lower --micro-batch-size (now {micro}), "
            f"--batch-size (now {cfg.batch_size}) or --seq-len (now {cfg.seq_len})"
            f"{checkpoint_hint(cfg.activation_checkpointing, more_blocks)}")
