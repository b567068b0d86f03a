"""GPU: what a sample event costs, the first and the second of a process: all prompts in one batch (the hook now)
against a prompt at a time, decoding with and without cuDNN attention.

    PYTHONPATH=src python benchmarks/sample_cost.py --out $OUT/sample_cost.json          # ~60-80 s on an H100
    PYTHONPATH=src python benchmarks/sample_cost.py --kinds bitnet,bf16 --out ...          # ~2 min: both models

Issue 24: in the long run the first sample event of every trainer process cost 14-25 s, the later ones 3-5 s.
The cause found: each decoded token attends over one more cached key, so every token is a new attention
shape, and PyTorch's first pick on H100/H200 is cuDNN attention, which builds an execution graph for
each new shape. Decoding now keeps cuDNN out (`generation.DECODE_SDPA_BACKENDS`). This script measures
both ways in one process per model kind:

1. the 95m model (random init), compiled for training as the trainer does (`compile_step`), trained
   --train-steps steps at 8 x 1024 (the first one compiles);
2. sample events (the long run's 5 prompts x greedy/typical/stress, up to 64 tokens), one training step
   before each so BitLinear's weight caches are rebuilt as in training, in the order given:
     batched  all 15 rows in one batch, as the sample hook runs them now (`sample_rows`): 64 forwards;
     after    a prompt at a time (three rows a batch; 320 forwards), without cuDNN attention: the hook
              before the batching;
     before   a prompt at a time with PyTorch's own pick, cuDNN included: the hook before issue 24's fix.
   The first variant's first event pays every one-off of the process (Triton compiling the eager
   kernels for the decode shapes, lazy CUDA module loading): compare first events across variants
   only with --separate, which runs each variant in its own process; "before"'s first event adds what
   cuDNN's per-shape graphs cost. The batched event also times sample_rows' text decoding (about 1 ms).

Every forward is timed (synchronized) with its query and key length; the table gives each event's
seconds, how many forwards met a shape new to that variant and the seconds those took, and the slowest
forward. It also records which attention backend torch picks for a decode-shaped call in each variant
(`torch._fused_sdp_choice`). The table is printed last; --out gets the JSON.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

PROMPTS = Path(__file__).with_name("long_run_prompts.txt")
VARIANTS = ("batched", "after", "before")


def sdpa_choice(cfg, device, dtype, backends, query_len: int, key_len: int) -> str:
    """The attention backend torch picks for a cached forward of 3 rows at these lengths."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.zeros(3, cfg.n_heads, query_len, cfg.head_dim, device=device, dtype=dtype)
    kv = torch.zeros(3, cfg.n_kv_heads, key_len, cfg.head_dim, device=device, dtype=dtype)
    mask = torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril(diagonal=key_len - query_len)
    with sdpa_kernel(list(backends)) if backends is not None else nullcontext():
        picked = torch._fused_sdp_choice(q, kv, kv, mask, 0.0, False, scale=None, enable_gqa=True)
    names = {int(getattr(SDPBackend, n)): n.lower() for n in
             ("ERROR", "MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "OVERRIDEABLE")}
    return names.get(int(picked), str(picked))


class ForwardTimer:
    """Times every forward of the plain model (synchronized) with its query and key lengths."""

    def __init__(self, model, device):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.rows, self._t0, self._shape = [], 0.0, None
        model.register_forward_pre_hook(self._pre, with_kwargs=True)
        model.register_forward_hook(self._post)

    def _pre(self, module, args, kwargs):
        cache = kwargs.get("cache")
        t = args[0].shape[1]
        self._shape = (t, (cache.length if cache is not None else 0) + t)
        self.sync()
        self._t0 = time.perf_counter()

    def _post(self, module, args, output):
        self.sync()
        self.rows.append((*self._shape, time.perf_counter() - self._t0))


def sample_event(model, tok, prompts, step: int, max_new_tokens: int, autocast, backends,
                 batched: bool = False) -> list[list[int]]:
    """A sample step's decoding: batched, the sample hook's own call; else a prompt at a time with the
    attention backends given (the hook as it was)."""
    from bitnet.generation import MODES, generate_batch
    from bitnet.instrumentation.samples import sample_rows, sample_seed

    if batched:
        return [r["token_ids"] for r in sample_rows(model, tok, prompts, step, 0, max_new_tokens, autocast)]
    tokens = []
    for i, prompt in enumerate(prompts):
        ids = tok.encode(prompt, add_bos=True)
        modes = list(MODES)
        gens = generate_batch(model, ids, modes, [sample_seed(0, step, i, m) for m in modes],
                              min(max_new_tokens, model.cfg.max_seq_len - len(ids)), eos_id=tok.eos_id,
                              autocast=autocast, vocab_limit=tok.vocab_size, sdpa_backends=backends)
        tokens += [g.token_ids for g in gens]
    return tokens


def child(args) -> int:
    """One process: one model kind, the variants in order; writes its JSON to args.result."""
    import torch

    from bitnet.data import load_tokenizer
    from bitnet.generation import DECODE_SDPA_BACKENDS
    from bitnet.instrumentation.samples import load_prompts
    from bitnet.model import PRESETS, ModelConfig, Transformer
    from bitnet.train.config import TrainConfig
    from bitnet.train.optim import build_optimizer
    from bitnet.train.step import compile_step, train_step

    t_proc = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = partial(torch.autocast, "cuda", dtype=torch.bfloat16) if cuda else nullcontext
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = ModelConfig(**{**PRESETS[args.preset].to_dict(),
                         "quantization": "none" if args.kind == "bf16" else "bitnet"})
    model = Transformer(cfg).to(device)
    model.init_weights(seed=0)
    optimizer = build_optimizer(model, TrainConfig(), fused=cuda)
    step_model = compile_step(model) if args.compile else model
    gen = torch.Generator().manual_seed(0)
    seq = min(args.seq_len, cfg.max_seq_len)

    def train(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            x = torch.randint(0, cfg.vocab_size, (args.batch_size, seq + 1), generator=gen)
            train_step(step_model, optimizer, [(x[:, :-1], x[:, 1:])], autocast, grad_clip=1.0, lr=1e-4, wd=0.1,
                       device=device)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    first_step_s = train(1)
    more_steps_s = train(args.train_steps - 1) if args.train_steps > 1 else 0.0
    tok = load_tokenizer("llama2")
    prompts = load_prompts(str(args.prompts))
    timer = ForwardTimer(model, device)
    out = {"kind": args.kind, "preset": args.preset, "compile": args.compile, "first_train_step_s": first_step_s,
           "train_steps": args.train_steps, "more_train_steps_s": more_steps_s, "variants": {}}
    step = 0
    for variant in args.variants.split(","):
        backends = None if variant == "before" else DECODE_SDPA_BACKENDS
        seen, events = set(), []
        for _ in range(args.events):
            train(1)  # the weights change between sample events, as in training
            step += 1
            timer.rows.clear()
            t0 = time.perf_counter()
            tokens = sample_event(model, tok, prompts, step, args.max_new_tokens, autocast, backends,
                                  batched=variant == "batched")
            seconds = time.perf_counter() - t0
            new = [r for r in timer.rows if (r[0], r[1]) not in seen]
            seen.update((r[0], r[1]) for r in timer.rows)
            slow = sorted(timer.rows, key=lambda r: -r[2])[:5]
            events.append({"s": seconds, "forwards": len(timer.rows), "forward_s": sum(r[2] for r in timer.rows),
                           "new_shapes": len({(r[0], r[1]) for r in new}), "new_shape_forward_s": sum(r[2] for r in new),
                           "slowest_forward": {"query_len": slow[0][0], "key_len": slow[0][1], "s": slow[0][2]},
                           "slowest_forwards": [{"query_len": q, "key_len": k, "s": t} for q, k, t in slow],
                           "tokens": tokens})
            print(f"[{time.perf_counter() - t_proc:6.1f}s] {args.kind} {variant} event {len(events)}: {seconds:.2f} s, "
                  f"{len(new)} forwards at new shapes ({events[-1]['new_shape_forward_s']:.2f} s)", flush=True)
        longest = max(len(tok.encode(p, add_bos=True)) for p in prompts)
        out["variants"][variant] = {
            "sdpa_backends": None if backends is None else [b.name for b in backends],
            "picked_decode": sdpa_choice(cfg, device, dtype, backends, 1, longest + 1),
            "picked_prefill": sdpa_choice(cfg, device, dtype, backends, longest, longest),
            "events": events}
    out["process_s"] = time.perf_counter() - t_proc
    Path(args.result).write_text(json.dumps(out))
    return 0


def environment(device: str) -> dict:
    import torch

    env = {"torch": torch.__version__, "python": platform.python_version(), "device": device,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def table(results: list[dict]) -> str:
    lines = [f"{'model':<7} {'variant':<7} {'decode attn':<20} {'event 1 s':>9} {'event 2 s':>9} {'1 - 2 s':>8} "
             f"{'new shapes':>10} {'their fwd s':>11} {'slowest fwd (q, k) s':>22}"]
    for r in results:
        for variant, v in r["variants"].items():
            ev = v["events"]
            e1, e2 = ev[0], (ev[1] if len(ev) > 1 else None)
            slow = e1["slowest_forward"]
            lines.append(f"{r['kind']:<7} {variant:<7} {v['picked_decode']:<20} {e1['s']:>9.2f} "
                         f"{e2['s'] if e2 else float('nan'):>9.2f} {e1['s'] - e2['s'] if e2 else float('nan'):>8.2f} "
                         f"{e1['new_shapes']:>10} {e1['new_shape_forward_s']:>11.2f} "
                         f"{'(%d, %d) %.3f' % (slow['query_len'], slow['key_len'], slow['s']):>22}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", default="bitnet", help="comma-separated: bitnet, bf16 (one process each)")
    p.add_argument("--variants", default="batched,after,before", help="in this order, in one process")
    p.add_argument("--separate", action="store_true", help="each variant in its own process (one compile more each)")
    p.add_argument("--events", type=int, default=2, help="sample events per variant")
    p.add_argument("--preset", default="95m")
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the training step as the trainer does (sampling uses the plain model)")
    p.add_argument("--train-steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompts", default=str(PROMPTS))
    p.add_argument("--out", default="", help="JSON file for the results")
    p.add_argument("--kind", default="bitnet", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    kinds = args.kinds.split(",")
    variants = args.variants.split(",")
    bad = [k for k in kinds if k not in ("bitnet", "bf16")] + [v for v in variants if v not in VARIANTS]
    if bad or args.events < 1 or args.train_steps < 1:
        print(f"error: unknown kind/variant {bad[0]!r}" if bad else "error: --events and --train-steps must be >= 1",
              file=sys.stderr)
        return 2
    groups = [[v] for v in variants] if args.separate else [variants]
    print(f"planned: {len(kinds) * len(groups)} process(es), each ~25 s of start and compile plus ~5 s a sample "
          f"event (~20 s for a first 'before' event on H100/H200)", flush=True)
    t0 = time.time()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            for group in groups:
                result = Path(tmp) / f"{kind}_{'_'.join(group)}.json"
                cmd = [sys.executable, os.path.abspath(__file__), "--child", "--kind", kind, "--variants", ",".join(group),
                       "--result", str(result), "--events", str(args.events), "--preset", args.preset,
                       "--device", args.device, "--train-steps", str(args.train_steps),
                       "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                       "--max-new-tokens", str(args.max_new_tokens), "--prompts", args.prompts,
                       "--compile" if args.compile else "--no-compile"]
                code = subprocess.run(cmd).returncode
                if code:
                    print(f"error: the {kind} process exited {code}", file=sys.stderr)
                    return 1
                results.append(json.loads(result.read_text()))
    report = {"benchmark": "sample_cost", "issue": 24, **environment(args.device), "wall_s": time.time() - t0,
              "separate_processes": args.separate, "results": results}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"{report['torch']} | cuDNN {report['cudnn']} | {report.get('gpu', args.device)} | wall {report['wall_s']:.0f} s")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
