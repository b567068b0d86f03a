"""Samples every N steps: fixed prompts x {greedy, typical, stress}, to samples/samples.jsonl.

Each sample's seed is a pure function of (run seed, step, prompt index, mode) through sha256, so
it is the same in every process, and it seeds a private generator: sampling never consumes the
training RNG streams, and turning samples on or off leaves training bit-identical.
"""

import contextlib
import time
from importlib import resources
from pathlib import Path

from bitnet.generation import MODES, continuation_text, generate_batch, sample_metrics, stable_seed
from bitnet.instrumentation.base import Hook, due
from bitnet.run import layout
from bitnet.run.jsonl import JsonlWriter


BATCH_SCORES = 1 << 26
"""The most prefill attention scores (rows x heads x longest prompt^2) one sample batch may make: with the
padding mask, attention on CUDA takes the math backend, which holds them all (256 MiB in fp32). The long
run's 15 rows of prompts up to 8 tokens make 11,520; prompts of 1,000 tokens go a prompt at a time."""


def load_prompts(path: str = "") -> list[str]:
    """Prompts of a file (one a line; blank lines and '#' comments skipped); "" reads the packaged default."""
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"cannot read --sample-prompts {path}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"--sample-prompts {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    else:
        text = resources.files("bitnet").joinpath("prompts.txt").read_text(encoding="utf-8")
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"no prompts in {path or 'the packaged prompts.txt'}")
    return prompts


def sample_seed(seed: int, step: int, prompt_index: int, mode: str) -> int:
    return stable_seed("sample", seed, step, prompt_index, mode)


def _piece(tok, token_id: int) -> str:
    """The vocabulary piece of an id ('▁the' shows the word start), or its decoded text."""
    hf = getattr(tok, "tok", None)
    piece = hf.id_to_token(token_id) if hf is not None else None
    return piece if piece is not None else tok.decode([token_id])


def sample_rows(model, tok, prompts: list[str], step: int, seed: int, max_new_tokens: int,
                autocast=contextlib.nullcontext) -> list[dict]:
    """One row per (prompt, mode), in prompt then mode order: the samples.jsonl format.

    Prompts with room for max_new_tokens in the context are decoded together (prompts x modes rows in a batch,
    as many prompts as BATCH_SCORES allows); a prompt without that room goes alone, with the tokens its
    context leaves."""
    prompt_ids = [tok.encode(prompt, add_bos=True) for prompt in prompts]
    context = model.cfg.max_seq_len
    for i, ids in enumerate(prompt_ids):
        if len(ids) >= context:
            raise ValueError(f"sample prompt {i} ({len(ids)} tokens) fills the model's context")
    modes = list(MODES)
    roomy = [i for i, ids in enumerate(prompt_ids) if len(ids) + max_new_tokens <= context]
    groups = []
    for i in roomy:  # in prompt order; a new batch where the next prompt would pass the scores' limit
        if groups:
            longest = max(len(prompt_ids[j]) for j in groups[-1] + [i])
            if (len(groups[-1]) + 1) * len(modes) * model.cfg.n_heads * longest ** 2 <= BATCH_SCORES:
                groups[-1].append(i)
                continue
        groups.append([i])
    groups += [[i] for i in range(len(prompts)) if i not in roomy]
    gens = {}
    for group in groups:
        budget = min(max_new_tokens, context - max(len(prompt_ids[i]) for i in group))
        keys = [(i, mode) for i in group for mode in modes]
        seeds = [sample_seed(seed, step, i, mode) for i, mode in keys]
        batch = generate_batch(model, [prompt_ids[i] for i, _ in keys], [m for _, m in keys], seeds, budget,
                               eos_id=tok.eos_id, autocast=autocast, vocab_limit=tok.vocab_size)
        gens.update({key: (s, gen) for key, s, gen in zip(keys, seeds, batch)})
    rows = []
    for i, prompt in enumerate(prompts):
        for mode in modes:
            s, gen = gens[(i, mode)]
            top5 = [{"position": p, "token_ids": t["token_ids"], "tokens": [_piece(tok, j) for j in t["token_ids"]],
                     "logits": t["logits"]} for p, t in enumerate(gen.top5)]
            rows.append({"step": step, "prompt": prompt, "prompt_index": i, "mode": mode, "seed": s,
                         "text": continuation_text(tok, prompt_ids[i], gen.token_ids), "token_ids": gen.token_ids,
                         **sample_metrics(gen), "top5": top5})
    return rows


class SampleHook(Hook):
    """Generates with the plain (uncompiled) model, so varying lengths never trigger recompiles."""

    def __init__(self, run_dir: Path, model, tok, prompts: list[str], interval: int, num_steps: int,
                 max_new_tokens: int, seed: int, autocast=contextlib.nullcontext):
        self.model, self.tok, self.prompts = model, tok, prompts
        self.interval, self.num_steps, self.max_new_tokens, self.seed = interval, num_steps, max_new_tokens, seed
        self.autocast = autocast
        self.writer = JsonlWriter(Path(run_dir) / layout.SAMPLES_FILE)

    def works_at(self, step):
        return due(step, self.interval, self.num_steps)

    def on_step_end(self, state, out):
        if not self.works_at(state.step):
            return
        now = time.time()
        for row in sample_rows(self.model, self.tok, self.prompts, state.step, self.seed, self.max_new_tokens,
                               self.autocast):
            self.writer.write({**row, "tokens": state.tokens, "time": now})

    def close(self):
        self.writer.close()
