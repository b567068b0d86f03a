"""Text generation with the KV cache: greedy, typical and stress decoding, and sample metrics.

    bitnet-generate --checkpoint runs/<id> --prompt "The history of" --mode typical --max-new-tokens 100
    (the command line: bitnet/cli/generate.py)

Modes are fixed, so samples stay comparable across steps and runs:
  greedy   argmax;
  typical  temperature 0.8, then nucleus (top-p 0.95);
  stress   temperature 1.5, then top-k 50 (shows how the tail of the distribution holds up).
Randomness comes only from a torch.Generator owned by the call: generating never touches the
global RNG streams, so sampling in the middle of a training run cannot change the run.
"""

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bitnet.model import KVCache, Transformer


@dataclass(frozen=True)
class Mode:
    temperature: float
    """Divides the logits; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1: off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: off)."""


MODES = {
    "greedy": Mode(temperature=0.0),
    "typical": Mode(temperature=0.8, top_p=0.95),
    "stress": Mode(temperature=1.5, top_k=50),
}
TOP5_POSITIONS = 10
"""Generated positions whose top-5 logits a `Generation` keeps."""
DECODE_SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
"""The attention kernels decoding may use: every one but cuDNN's.

Each decoded token attends over one more cached key, so each token brings an attention shape not seen
before. PyTorch 2.9+ tries cuDNN's attention first on H100/H200 (cuDNN > 9.15), and cuDNN builds an
execution graph for every new shape (cached per process; PyTorch's opt-in TORCH_CUDNN_SDPA_AVOID_RECOMPILE
exists for this). A sample event of the long run (5 prompts, up to 64 tokens), a prompt at a time, met 70
new shapes (65 since the prompts go in one batch): its first event in each process cost 14-25 s against
3-5 s for the next ones, which meet the same shapes again (issue 24; about 0.2 s a shape;
benchmarks/sample_cost.py times both ways). Flash, efficient and math attention need no per-shape setup. Off CUDA the choice among flash and math is unchanged."""


def stable_seed(*parts) -> int:
    """A 63-bit seed from the parts' text: the same in every process (sha256, never Python's salted hash())."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_token(logits: torch.Tensor, mode: Mode, generator: torch.Generator | None) -> torch.Tensor:
    """One token id (shape (1,)) from 1-dim logits under `mode`, drawing only from `generator`."""
    if mode.temperature == 0:
        return logits.argmax(-1, keepdim=True)
    scaled = logits.float() / mode.temperature
    if mode.top_k:
        kth = torch.topk(scaled, min(mode.top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    if mode.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs >= mode.top_p  # the tokens before it already reach top_p
        drop = torch.empty_like(drop_sorted).scatter_(0, order, drop_sorted)  # back to vocabulary order
        scaled = scaled.masked_fill(drop, -math.inf)
    return torch.multinomial(scaled.softmax(-1), 1, generator=generator)


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    """Generated ids only (an EOS that ended the generation is included)."""
    entropies: list[float] = field(default_factory=list)
    """Entropy (nats) of the model's own distribution (temperature 1) at each generated position."""
    top5: list[dict] = field(default_factory=list)
    """First TOP5_POSITIONS positions: {"token_ids": [5 ids], "logits": [5 raw logits]}."""
    seconds: float = 0.0
    """Wall time of prefill + decoding."""

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else math.nan


def generate(model: Transformer, prompt_ids: list[int], mode: str = "greedy", max_new_tokens: int = 64,
             seed: int = 0, eos_id: int | None = None, autocast=contextlib.nullcontext,
             vocab_limit: int | None = None, on_token=None) -> Generation:
    """Decode up to `max_new_tokens` after `prompt_ids` with the KV cache; stops early at `eos_id`.

    seed: seeds a private generator on the model's device (unused by greedy).
    vocab_limit: ids >= this are never produced (a model vocabulary larger than the tokenizer's).
    on_token(id): called after each generated token, for streaming.
    """
    stream = None if on_token is None else (lambda row, token: on_token(token))
    return generate_batch(model, prompt_ids, [mode], [seed], max_new_tokens, eos_id, autocast, vocab_limit,
                          stream)[0]


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Run the block with n torch CPU threads (None: unchanged), then restore the setting."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def generate_batch(model: Transformer, prompt_ids: list[int] | list[list[int]], modes: list[str], seeds: list[int],
                   max_new_tokens: int = 64, eos_id: int | None = None, autocast=contextlib.nullcontext,
                   vocab_limit: int | None = None, on_token=None, threads: int | None = 1,
                   sdpa_backends: tuple | None = DECODE_SDPA_BACKENDS) -> list[Generation]:
    """Continue prompts in several (mode, seed) rows at once: one batched forward per token.

    prompt_ids: one prompt for every row, or one prompt per row. Prompts of different lengths are
    aligned at their ends, the shorter ones padded at the start with positions no query attends to
    (`KVCache.left_pad`); RoPE sees only relative positions, so a row's logits are its own prompt's.
    Decoding is hundreds of small kernel launches per token whatever the batch, so one batch of all
    rows costs about what one row does (a sample event of 5 prompts: 64 forwards instead of 320).
    Each row draws from its own generator, so a row's tokens depend only on its prompt, mode and seed
    (rows share nothing but the batch) in exact arithmetic; in floating point its logits also move with
    the batch's shape (its GEMMs and its padding's position shift), about 1e-5 relative in fp32 and more in
    bf16, which can flip a near-tie: samples are comparable across steps of one run, not bit for bit with a
    prompt decoded alone or beside other prompts. A row that reaches EOS stops growing while the others go
    on. on_token(row, id) is called for each token a row keeps.
    threads: torch CPU threads while decoding on the CPU. Decoding is hundreds of tiny ops per
    token, which one thread runs fastest: on a busy 2-core machine, two threads made a sample round
    of the tiny model 14x slower (86 s against 6 s) by waiting on each other at every op.
    sdpa_backends: the attention kernels the decoding may use (`DECODE_SDPA_BACKENDS`); None: PyTorch's
    own choice, cuDNN included (benchmarks/sample_cost.py's "before").
    """
    if len(modes) != len(seeds) or not modes:
        raise ValueError("give one seed per mode, and at least one mode")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode {unknown[0]!r} (known: {', '.join(MODES)})")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    per_row = bool(prompt_ids) and isinstance(prompt_ids[0], (list, tuple))
    prompts = [list(p) for p in prompt_ids] if per_row else [list(prompt_ids) for _ in modes]
    if len(prompts) != len(modes):
        raise ValueError(f"give one prompt per row: {len(prompts)} prompts for {len(modes)} modes")
    if not all(prompts):
        raise ValueError("the prompt must hold at least one token (e.g. BOS)")
    longest = max(len(p) for p in prompts)
    total = longest + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {model.cfg.max_seq_len}")
    left_pad = [longest - len(p) for p in prompts]
    device = model.embed_tokens.weight.device
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    rows = len(modes)
    outs = [Generation(prompt_ids=p) for p in prompts]
    done = [False] * rows
    entropies, top5 = [], []
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        attention = sdpa_kernel(list(sdpa_backends)) if sdpa_backends is not None else contextlib.nullcontext()
        with autocast(), cpu_threads(threads if device.type == "cpu" else None), attention:
            dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                     else model.embed_tokens.weight.dtype)
            cache = KVCache.empty(model.cfg, rows, total, device, dtype, left_pad if any(left_pad) else None)
            # (rows, T): prefill the whole prompts, the shorter ones after padding ids (0) no query attends to
            idx = torch.tensor([[0] * pad + p for pad, p in zip(left_pad, prompts)], device=device)
            for i in range(max_new_tokens):
                logits = model(idx, cache=cache)[:, -1].float()  # (rows, vocab)
                if vocab_limit is not None:
                    logits[:, vocab_limit:] = -math.inf
                logp = logits.log_softmax(-1)
                entropies.append(-(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1))  # (rows,)
                if i < TOP5_POSITIONS:
                    top5.append(torch.topk(logits, 5))  # (rows, 5)
                idx = torch.cat([sample_token(logits[r], MODES[m], g) for r, (m, g) in
                                 enumerate(zip(modes, generators))]).view(rows, 1)  # (rows, 1)
                for r, token in enumerate(idx.view(-1).tolist()):  # host sync per token: EOS and streaming
                    if done[r]:
                        continue
                    outs[r].token_ids.append(token)
                    if on_token is not None:
                        on_token(r, token)
                    done[r] = token == eos_id
                if all(done):
                    break
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    entropies = torch.stack(entropies, dim=1).tolist()  # (rows, steps)
    top5 = [(t.indices.tolist(), t.values.tolist()) for t in top5]
    for r, out in enumerate(outs):
        n = len(out.token_ids)
        out.seconds = seconds
        out.entropies = entropies[r][:n]
        out.top5 = [{"token_ids": ids[r], "logits": values[r]} for ids, values in top5[:n]]
    return outs


def max_repetition(ids: list[int]) -> int:
    """Longest run of back-to-back copies of one n-gram (any n): 1 means no immediate repetition.

    "a b a b a b" -> 3 (the bigram "a b" three times), "x x x x" -> 4. For each n, a streak of
    positions j with ids[j] == ids[j - n] of length r spans 1 + r // n copies.
    """
    best = 1 if ids else 0
    for n in range(1, len(ids) // 2 + 1):
        run = 0
        for j in range(n, len(ids)):
            run = run + 1 if ids[j] == ids[j - n] else 0
            best = max(best, 1 + run // n)
    return best


def unique_ratio(ids: list[int]) -> float:
    """Distinct tokens / tokens (NaN for an empty generation)."""
    return len(set(ids)) / len(ids) if ids else math.nan


def continuation_text(tok, prompt_ids: list[int], ids: list[int]) -> str:
    """The text `ids` add after the prompt. Decoding prompt + continuation together keeps the space
    that SentencePiece-style decoders strip from the first token of a decoded string."""
    prompt_text, full = tok.decode(prompt_ids), tok.decode(list(prompt_ids) + list(ids))
    return full[len(prompt_text):] if full.startswith(prompt_text) else tok.decode(ids)


def sample_metrics(gen: Generation) -> dict:
    """The seed's sample metrics: mean entropy, max repetition and unique tokens (a count; the ratio beside it)."""
    return {"mean_entropy": sum(gen.entropies) / len(gen.entropies) if gen.entropies else math.nan,
            "max_repetition": max_repetition(gen.token_ids), "unique_tokens": len(set(gen.token_ids)),
            "unique_ratio": unique_ratio(gen.token_ids)}
