"""Cost as the model grows (issue 25): the real trainer on the 95m preset and the BitNet b1.58 paper's 700m, 1.3b
and 3b, one GPU, 32 x 1024 tokens a step, each preset at its train defaults (micro-batch: 1.3b 16; the 3b the whole
batch with every block checkpointed).

    PYTHONPATH=src python benchmarks/model_sizes.py --out sizes.json     # ~200 s on one H100/H200
    PYTHONPATH=src python benchmarks/model_sizes.py --rows 3b:16         # one row at another micro-batch
    PYTHONPATH=src python benchmarks/model_sizes.py --rows 3b:4,3b:32+ac # with every block checkpointed (+ac4: 4)
    PYTHONPATH=src python benchmarks/model_sizes.py --smoke              # CPU, tiny preset: the plumbing

Each row is one trainer run in a fresh process (empty compile caches): this script re-runs itself with --child,
which calls `bitnet.cli.train.train_main` (what `python -m bitnet.train` runs) with `--data embedded --compile on
--no-eval --sample-interval 0 --quant-interval 0`, CUDA graphs as the trainer picks them (on for one GPU), a
scalars row every few steps. Two things differ from a plain `python -m bitnet.train`, both for the measurement:
- checkpoints are not written (`Checkpointer.save` does nothing): the 3b's would be 13 GB at step 0 and 40 GB
  with the optimizer state later. The trainer keeps checkpoint time out of step_ms anyway;
- the end of the first optimizer step is timed (a wrapper around `train_step`, synchronized), for the time to
  first step: from the child's launch (imports, data, model init, compile, first step) to that point.
`--stage-boundary 0.9 --wd-stage2 0.1` keep every step in one weight-decay setting (a changed decay recaptures
the CUDA graph) and the anomaly detector's spike windows unfilled; neither changes a step's cost.

Per row:
- tok/s: the median of the scalars rows after the first --skip (compile, the uncaptured steps, the capture;
  all rows when no other is left);
- MFU: model.flops_per_token(seq_len) x tok/s / 989.4 TFLOP/s, the dense bf16 peak of the H100 SXM datasheet
  (the H200 has the same tensor cores, so the same peak); flops_per_token = 6 x (matmul params incl. the tied
  head) + attention's 12 x layers x dim x seq_len;
- peak memory: torch.cuda.max_memory_allocated over the run (the scalars rows' mem_gib), and the reserved peak;
- vs 6NT: the measured step time over 6 x N x T / 989.4 TFLOP/s, N = the matmul parameters that flops_per_token
  counts (all but the norm gains, the tied head once), T = tokens a step; 1.0 would be all-matmul at peak.
Before the table, a fit of step_ms ~ N^k over the plain rows (no +fp8 or +ac; the last row of a size counts; k = 1:
the step grows like 6NT). Prints the table last;
writes JSON (--out).
"""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

PEAK_FLOPS = 989.4e12
"""Dense bf16 tensor-core peak of an H100 SXM (datasheet); the H200's is the same."""

# steps, log interval, seconds before the row is killed: a few dozen steps for the small models, fewer for the
# large ones, so that the four rows take about 200 s of GPU time (each row's setup and compile take 20-60 s,
# the 3b's steps about 2 s each), and even four timeouts stay under 10 minutes. The rows that hold steps 1-4 (compile, the two uncaptured steps, the CUDA
# graph's capture) stay out of the medians (--skip).
PLAN = {"95m": (30, 5, 100), "700m": (15, 3, 130), "1.3b": (12, 3, 140), "3b": (10, 2, 180), "tiny": (4, 2, 120)}
WARM_STEPS = 4


class Row(NamedTuple):
    label: str
    preset: str
    micro: int | None
    """None: the preset's default micro-batch"""
    fp8: bool
    """--fp8 all"""
    activation_checkpointing: str | None
    """--activation-checkpointing (all or a number of blocks); None: the preset's default"""


def parse_rows(spec: str) -> list[Row]:
    """'95m,3b:16,700m+fp8,3b:32+ac,1.3b:32+ac12': preset[:micro-batch][+fp8][+ac[N]], where +fp8 runs --fp8 all
    and +ac --activation-checkpointing all (+acN: the first N blocks, +ac0: none); without +ac, the preset's
    default (the 3b's: all)."""
    from bitnet.model import PRESETS

    rows = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        head, *options = item.split("+")
        name, _, micro = head.partition(":")
        if name not in PRESETS:
            raise SystemExit(f"error: unknown preset {name!r} in --rows (known: {', '.join(PRESETS)})")
        if micro and not (micro.isdigit() and int(micro) > 0):
            raise SystemExit(f"error: micro-batch {micro!r} in --rows {item!r} is not a positive integer")
        ac = [o.removeprefix("ac") or "all" for o in options if o.startswith("ac")]
        unknown = [o for o in options if o != "fp8" and not (o.startswith("ac") and (o == "ac" or o[2:].isdigit()))]
        if unknown:
            raise SystemExit(f"error: {'+' + unknown[0]!r} in --rows {item!r} is neither +fp8 nor +ac[N]")
        rows.append(Row(item, name, int(micro) if micro else None, "fp8" in options, ac[-1] if ac else None))
    if not rows:
        raise SystemExit("error: --rows names no preset")
    return rows


def model_counts(preset: str, seq_len: int) -> dict:
    """Parameters, the matmul parameters flops_per_token counts, and flops_per_token, from a meta-device model."""
    import torch

    from bitnet.model import PRESETS, Transformer

    cfg = PRESETS[preset]
    with torch.device("meta"):
        model = Transformer(cfg)
    params = model.num_params()
    matmul = params - sum(p.numel() for p in model.parameters() if p.dim() == 1)
    return {"params": params, "non_embedding_params": params - cfg.vocab_size * cfg.dim, "matmul_params": matmul,
            "flops_per_token": model.flops_per_token(seq_len)}


# ---------------------------------------------------------------------------- the child: one trainer run

def child(a) -> None:
    import torch

    import bitnet.train.checkpointer as checkpointer
    import bitnet.train.components as components
    import bitnet.train.graphed as graphed
    from bitnet.cli.train import train_main

    cuda = a.device != "cpu" and torch.cuda.is_available()
    first = {}
    inner = components.train_step

    def timed_train_step(*args, **kw):
        out = inner(*args, **kw)
        if not first:
            if cuda:
                torch.cuda.synchronize()
            first["t"] = time.time()
        return out

    components.train_step = graphed.train_step = timed_train_step  # the graphed step's first steps run uncaptured
    checkpointer.Checkpointer.save = lambda self, milestone, must_succeed=False: None  # see the module docstring
    rc = train_main(json.loads(a.argv))
    res = {"rc": rc, "ttfs_s": first.get("t", math.nan) - a.t0}
    if cuda:
        res.update(gpu=torch.cuda.get_device_name(),
                   gpu_total_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
                   peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
    Path(a.json).write_text(json.dumps(res))


# ---------------------------------------------------------------------------- the parent: one row per preset

def run_row(row: Row, a, work: Path, seconds_left: float = math.inf) -> dict:
    from bitnet.run import layout
    from bitnet.run.jsonl import read_jsonl

    label, preset, micro = row.label, row.preset, row.micro

    steps, log_interval, timeout = PLAN.get(preset, PLAN["95m"])
    timeout = min(a.row_timeout_s or timeout, seconds_left)
    steps, log_interval = a.steps or steps, a.log_interval or log_interval
    run_id = label.replace(":", "_m").replace("+", "_")
    argv = ["--preset", preset, "--data", "embedded", "--batch-size", str(a.batch), "--seq-len", str(a.seq_len),
            "--num-steps", str(steps), "--log-interval", str(log_interval), "--stage-boundary", "0.9",
            "--wd-stage2", "0.1", "--no-eval", "--sample-interval", "0", "--quant-interval", "0",
            "--runs-dir", str(work), "--run-id", run_id, "--overwrite", "--quiet", "--seed", "42",
            "--device", a.device, "--compile", "off" if a.device == "cpu" else "on"]
    if micro:
        argv += ["--micro-batch-size", str(micro)]
    if row.fp8:
        argv += ["--fp8", "all"]
    if row.activation_checkpointing:
        argv += ["--activation-checkpointing", row.activation_checkpointing]
    out_json = work / f"{run_id}.json"
    t0 = time.time()
    cmd = [sys.executable, __file__, "--child", "--argv", json.dumps(argv), "--json", str(out_json),
           "--t0", repr(t0), "--device", a.device]
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"[{label}] timed out after {timeout:.0f} s", flush=True)
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.time() - t0}
    wall = time.time() - t0
    child_res = json.loads(out_json.read_text()) if out_json.exists() else {}
    if proc.returncode or child_res.get("rc"):
        lines = [line for line in (proc.stderr + proc.stdout).strip().splitlines() if line.strip()]
        tail = [line for line in lines if line.startswith("error") or "Error" in line][-3:] or lines[-4:]
        print(f"[{label}] FAILED rc {proc.returncode or child_res.get('rc')}:\n  " + "\n  ".join(tail), flush=True)
        return {"error": tail[-1] if tail else f"rc {proc.returncode}", "wall_s": wall}
    rows = [r for r in read_jsonl(work / run_id / layout.SCALARS) if "loss" in r]
    skip = a.skip if a.skip is not None else math.ceil(WARM_STEPS / log_interval)
    steady = rows[skip:] or rows
    tokens = a.batch * a.seq_len
    counts = model_counts(preset, a.seq_len)
    config = json.loads((work / run_id / layout.CONFIG).read_text())["train"]
    res = {"preset": preset, "micro_batch": a.batch // config["grad_accum"], "grad_accum": config["grad_accum"],
           "checkpointed_blocks": config["checkpointed_blocks"],
           "steps": steps, "log_interval": log_interval, "rows_skipped": len(rows) - len(steady),
           "rows_used": len(steady), **counts,
           "tok_s": statistics.median(r["tok_s"] for r in steady),
           "step_ms": statistics.median(r["step_ms"] for r in steady),
           "tok_s_rows": [round(r["tok_s"]) for r in rows],
           "mem_gib": max(r.get("mem_gib", 0.0) for r in rows), "losses": [r["loss"] for r in rows],
           "wall_s": wall, **{k: v for k, v in child_res.items() if k != "rc"}}
    res["mfu"] = counts["flops_per_token"] * res["tok_s"] / PEAK_FLOPS
    res["est_6nt_ms"] = 6 * counts["matmul_params"] * tokens / PEAK_FLOPS * 1000
    res["vs_6nt"] = res["step_ms"] / res["est_6nt_ms"]
    print(f"[{label}] {res['tok_s']:,.0f} tok/s, {res['step_ms']:.1f} ms/step, MFU {100 * res['mfu']:.1f}%, "
          f"peak {res['mem_gib']:.1f} GiB, first step {res['ttfs_s']:.0f} s, wall {wall:.0f} s", flush=True)
    return res


def growth(results: dict) -> dict | None:
    """Least-squares exponent k of step_ms ~ N^k (N: matmul params) over the rows with distinct N."""
    points = {r["matmul_params"]: r["step_ms"] for label, r in results.items()
              if "error" not in r and "+" not in label}
    if len(points) < 2:
        return None
    xs, ys = [math.log(n) for n in points], [math.log(ms) for ms in points.values()]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    k = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"exponent": k, "points": len(points)}


def table(results: dict) -> str:
    head = (f"{'row':<14} {'params':>7} {'micro':>5} {'tok/s':>9} {'ms/step':>8} {'MFU':>6} {'vs 6NT':>6} "
            f"{'peak GiB':>8} {'rsv GiB':>7} {'1st step':>8}")
    lines = [head, "-" * len(head)]
    for label, r in results.items():
        if "error" in r:
            lines.append(f"{label:<14} failed: {r['error'][:80]}")
            continue
        lines.append(f"{label:<14} {r['params'] / 1e6:6,.0f}M {r['micro_batch']:>5} {r['tok_s']:>9,.0f} "
                     f"{r['step_ms']:8.1f} {100 * r['mfu']:5.1f}% {r['vs_6nt']:6.2f} {r['mem_gib']:8.1f} "
                     f"{r.get('peak_reserved_gib', math.nan):7.1f} {r['ttfs_s']:7.0f}s")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="95m,700m,1.3b,3b",
                   help="comma list of PRESET[:MICRO][+fp8][+ac[N]]: the micro-batch (default: the preset's), "
                        "--fp8 all, --activation-checkpointing all or N (see parse_rows)")
    p.add_argument("--batch", type=int, default=32, help="sequences a step")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=0, help="steps of every row (0: the row's plan, PLAN)")
    p.add_argument("--log-interval", type=int, default=0, help="steps a scalars row (0: the row's plan)")
    p.add_argument("--skip", type=int, default=None,
                   help=f"leading scalars rows left out of the medians (default: those holding steps 1-{WARM_STEPS})")
    p.add_argument("--row-timeout-s", type=float, default=0, help="seconds before a row is killed (0: the plan's)")
    p.add_argument("--budget-s", type=float, default=0, help="seconds for all rows (0: no limit): a row is killed at "
                                                             "the end, and one with under 30 s left is skipped")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="", help="JSON file of every row")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny preset, 4 x 32 tokens, a few steps: the plumbing")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--argv", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a)
        return
    if a.smoke:
        a.device, a.batch, a.seq_len = "cpu", 4, 32
        if a.rows == p.get_default("rows"):
            a.rows = "tiny,tiny:2"
    rows = parse_rows(a.rows)
    work = Path(tempfile.mkdtemp(prefix="model_sizes_"))
    results = {}
    deadline = time.time() + (a.budget_s or math.inf)
    for row in rows:
        if deadline - time.time() < 30:
            print(f"[{row.label}] skipped: under 30 s of --budget-s {a.budget_s:.0f} left", flush=True)
            results[row.label] = {"error": f"skipped: under 30 s of --budget-s {a.budget_s:.0f} left"}
            continue
        results[row.label] = run_row(row, a, work, deadline - time.time())
    fit = growth(results)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:], "batch": a.batch, "seq_len": a.seq_len,
            "peak_flops": PEAK_FLOPS, "growth": fit}
    import torch

    meta.update(torch=torch.__version__, device=a.device)
    shutil.rmtree(work, ignore_errors=True)  # the run directories: no checkpoints, their scalars are in `results`
    if a.out:
        Path(a.out).write_text(json.dumps({**meta, "results": results}, indent=1))
    print(json.dumps(meta))
    if fit:
        print(f"step time ~ N^{fit['exponent']:.2f} over {fit['points']} sizes (N: matmul params; 1.00 = as 6NT)")
    print(table(results))


if __name__ == "__main__":
    main()
