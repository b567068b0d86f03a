"""Data-parallel scaling of the real trainer: 1..N GPUs, DDP and FSDP2, against plain one-GPU runs.

    PYTHONPATH=src python benchmarks/scaling.py --data shards:DIR --gpus 1,2 --out scaling.json
    PYTHONPATH=src python benchmarks/scaling.py --smoke        # CPU, gloo, tiny preset: the plumbing

Every row is one `bitnet-train` run in its own process(es): `python -m bitnet.train` for the plain
row, `torchrun --standalone --nproc_per_node=N -m bitnet.train` for the others, the same flags and
seed, a scalars.jsonl row every --log-interval steps. From each run:
- tok/s: the median of the rows after the first --skip rows (compile and warm-up), global tokens;
- efficiency: tok/s / (N x the plain one-GPU tok/s at the same global batch);
- max |loss - plain loss| at the logged steps among the first --compare-steps (same global batch: the same tokens
  in the same order, so only float reduction order differs); the `again` row, the plain run
  repeated, gives the noise floor: GPU runs are not bitwise reproducible (atomics, split-K) and
  a ternary weight or int8 activation that rounds the other way makes the difference grow;
- peak memory (GiB, rank 0).
Issue 7 reads the `ddp x1` row against `plain` (the DDP path at world size 1), issue 10 the rest.
NVLink multicast stays off: every child gets NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1
(bitnet.train.parallel.safe_env, which never overrides a value already set).
Prints a table last; writes JSON (--out).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bitnet.run.jsonl import read_jsonl  # noqa: E402
from bitnet.train.parallel import safe_env  # noqa: E402


def run_row(name: str, gpus: int, mode: str, batch: int, a, work: Path) -> dict:
    """One trainer run; returns its per-step rows' summary."""
    run_id = f"{name}_b{batch}"
    train_args = ["--preset", a.preset, "--data", a.data, "--num-steps", str(a.steps), "--batch-size", str(batch),
                  "--micro-batch-size", str(min(a.micro, batch // gpus)), "--seq-len", str(a.seq_len),
                  "--log-interval", str(a.log_interval),
                  "--runs-dir", str(work), "--run-id", run_id, "--overwrite", "--quiet", "--seed", "42",
                  "--no-eval", "--sample-interval", "0", "--checkpoint-interval", str(10 * a.steps)]
    if a.smoke:
        train_args += ["--device", "cpu"]
    if mode == "plain":
        cmd = [sys.executable, "-m", "bitnet.train", *train_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
               "-m", "bitnet.train", *train_args, "--parallel", mode]
    env = safe_env({**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.row_timeout_s)
    wall = time.time() - t0
    if proc.returncode:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        tail = [line for line in lines if line.startswith("[rank") or "Error" in line][-4:] or lines[-6:]
        print(f"[{run_id}] FAILED rc {proc.returncode}:\n  " + "\n  ".join(tail), flush=True)
        return {"error": tail[-1] if tail else f"rc {proc.returncode}", "wall_s": wall}
    rows = [r for r in read_jsonl(work / run_id / "metrics" / "scalars.jsonl") if "loss" in r]
    steady = rows[a.skip:] or rows
    res = {"gpus": gpus, "mode": mode, "batch": batch, "steps": len(rows),
           "tok_s": statistics.median(r["tok_s"] for r in steady),
           "step_ms": statistics.median(r["step_ms"] for r in steady),
           "mem_gib": max(r.get("mem_gib", 0.0) for r in rows), "losses": [r["loss"] for r in rows],
           "wall_s": wall}
    print(f"[{run_id}] {res['tok_s']:,.0f} tok/s, {res['step_ms']:.1f} ms/step, wall {wall:.0f}s", flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="embedded")
    p.add_argument("--gpus", default="1,2", help="comma list of world sizes (the plain row always runs)")
    p.add_argument("--modes", default="ddp,fsdp2")
    p.add_argument("--batches", default="32,256", help="global batches in sequences")
    p.add_argument("--micro", type=int, default=32, help="micro-batch per rank (accumulation makes up the rest)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--preset", default="95m")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-interval", type=int, default=1,
                   help="steps per scalars row (1: every step's loss; larger hides the host sync of each row)")
    p.add_argument("--skip", type=int, default=10, help="leading rows left out of the tok/s median")
    p.add_argument("--compare-steps", type=int, default=50, help="steps whose losses are compared")
    p.add_argument("--row-timeout-s", type=float, default=300)
    p.add_argument("--no-repeat-plain", dest="repeat_plain", action="store_false",
                   help="skip the second plain run at the first batch (the noise floor of the loss comparison)")
    p.add_argument("--out", default="")
    p.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny preset, 2 ranks, a few steps")
    a = p.parse_args()
    if a.smoke:
        a.preset, a.micro, a.seq_len, a.steps, a.skip, a.compare_steps, a.batches = "tiny", 2, 32, 6, 2, 6, "4"
    work = Path(tempfile.mkdtemp(prefix="scaling_"))
    results = {}
    batches = [int(b) for b in a.batches.split(",")]
    for batch in batches:
        results[f"plain x1 b{batch}"] = run_row("plain", 1, "plain", batch, a, work)
        if a.repeat_plain and batch == batches[0]:  # the same run again: GPU kernels are not bitwise deterministic run to run
            results[f"again x1 b{batch}"] = {**run_row("again", 1, "plain", batch, a, work), "baseline_repeat": True}
        for n in (int(g) for g in a.gpus.split(",")):
            for mode in a.modes.split(","):
                results[f"{mode} x{n} b{batch}"] = run_row(f"{mode}_x{n}", n, mode, batch, a, work)

    head = f"{'row':<16} {'GPUs':>4} {'batch':>6} {'tok/s':>11} {'ms/step':>8} {'eff.':>6} {'max|dloss|':>11} {'GiB':>6}"
    lines = [head, "-" * len(head)]
    for key, r in results.items():
        if "error" in r:
            lines.append(f"{key:<16} failed: {r['error'][:70]}")
            continue
        base = results[f"plain x1 b{r['batch']}"]
        if "error" not in base:
            r["efficiency"] = r["tok_s"] / (r["gpus"] * base["tok_s"])
            k = min(a.compare_steps // a.log_interval, len(r["losses"]), len(base["losses"]))
            r["max_abs_loss_diff"] = max(abs(x - y) for x, y in zip(r["losses"][:k], base["losses"][:k]))
            r["compared_steps"] = [a.log_interval * (i + 1) for i in range(k)]
        eff = f"{100 * r['efficiency']:5.1f}%" if "efficiency" in r else f"{'-':>6}"
        diff = f"{r['max_abs_loss_diff']:11.2e}" if "max_abs_loss_diff" in r else f"{'-':>11}"
        lines.append(f"{key:<16} {r['gpus']:>4} {r['batch']:>6} {r['tok_s']:>11,.0f} {r['step_ms']:8.1f} {eff} "
                     f"{diff} {r['mem_gib']:6.2f}")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:], "env_multicast_off": {
        k: safe_env().get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")}}
    try:
        import torch
        meta.update(torch=torch.__version__, gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    gpu_count=torch.cuda.device_count())
    except Exception:  # noqa: BLE001 (metadata only)
        pass
    if a.out:
        Path(a.out).write_text(json.dumps({**meta, "results": results}, indent=1))
    print(json.dumps(meta))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
