"""Calibration of the anomaly detector (instrumentation/anomalies.py): false positives on healthy
runs and detection of injected faults, on the real trainer (CPU, tiny preset).

    python benchmarks/anomaly_calibration.py                     # ~20 min on 2 busy CPU cores
    python benchmarks/anomaly_calibration.py --only quickstart     # the quick start's own run, ~150 steps
    python benchmarks/anomaly_calibration.py --report              # the tables of every saved part

Healthy runs: the tiny preset (150 steps, warmup 15) at 4 x 64 tokens a step, seeds 1, 2, 3, 4.
Faults, each injected at step FAULT_STEP of the same run with seed 42 (which then stops AFTER_FAULT
steps later): an LR spike (x100 for one step), three corrupted batches (uniform random tokens), NaN
gradients in one step, and one weight (layers.0.mlp.down_proj) scaled by 100. The detector's events
are the run's anomalies/ dumps. Every step's loss and grad norm are also recorded, so the table can
show what the previous detector (mean/std z-score > 6 over 100 steps, 20 of history, no warmup
rule) would have flagged on the same steps.
"""

import argparse
import json
import math
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bitnet.cli.train import train_main  # noqa: E402
from bitnet.train import loop, step as step_module  # noqa: E402

FAULT_STEP = 40
AFTER_FAULT = 10
SHAPE = ["--batch-size", "4", "--seq-len", "64"]
"""4 x 64 tokens a step, a quarter of the quick start's 8 x 128: a noisier gradient (a harder test for false
positives) at a cost a busy 2-core machine can pay for eight runs. The quick start itself is measured by
scripts/quickstart.sh (docs/anomalies.md)."""
SCALED_WEIGHT = "layers.0.mlp.down_proj.weight"
HEALTHY = {"tiny 4x64 seed 1": 1, "tiny 4x64 seed 2": 2, "tiny 4x64 seed 3": 3, "tiny 4x64 seed 4": 4}
QUICKSTART = "quick start (tiny preset as is: 8x128, seed 42)"
FAULTS = ["lr_spike", "corrupted_batches", "nan_grads", "weight_x100"]


def old_detector(trace: list[tuple[int, float, float]]) -> list[tuple[int, str]]:
    """The detector before calibration: mean/std z-score > 6 over the last 100 finite values, >= 20 of them."""
    events, hist = [], {"loss": [], "grad": []}
    for step, loss, grad in trace:
        if not (math.isfinite(loss) and math.isfinite(grad)):
            continue  # non-finite steps are caught by the same rule in both detectors
        for name, value in (("loss", loss), ("grad", grad)):
            h = hist[name][-100:]
            if len(h) >= 20:
                mean = sum(h) / len(h)
                std = max(math.sqrt(sum((x - mean) ** 2 for x in h) / len(h)), 1e-3 * abs(mean), 1e-12)
                if (value - mean) / std > 6.0:
                    events.append((step, f"{name}_spike"))
            hist[name].append(value)
    return events


def instrument(fault: str | None, trace: list):
    """Patch the loop's train_step (and lr_at) to record every step and inject `fault` at FAULT_STEP."""
    real_step, real_lr = step_module.train_step, loop.lr_at
    calls = {"n": 0}

    def lr_at(step, cfg, boundary):
        lr = real_lr(step, cfg, boundary)
        return lr * 100 if fault == "lr_spike" and step == FAULT_STEP else lr

    def train_step(model, optimizer, micro_batches, *args, **kwargs):
        calls["n"] += 1
        step = loop_step = calls["n"]
        hook = None
        if fault == "corrupted_batches" and FAULT_STEP <= step < FAULT_STEP + 3:
            g = torch.Generator().manual_seed(step)
            micro_batches = [(torch.randint(3, 32000, x.shape, generator=g), torch.randint(3, 32000, y.shape, generator=g))
                             for x, y in micro_batches]
        if fault == "nan_grads" and step == FAULT_STEP:
            hook = model.get_parameter("layers.1.self_attn.q_proj.weight").register_hook(
                lambda grad: torch.full_like(grad, math.nan))
        if fault == "weight_x100" and step == FAULT_STEP:
            with torch.no_grad():
                model.get_parameter(SCALED_WEIGHT).mul_(100)
            step_module.weights_updated()
        out = real_step(model, optimizer, micro_batches, *args, **kwargs)
        if hook is not None:
            hook.remove()
        trace.append((loop_step, out.loss.item(), out.grad_norm.item()))
        if fault is not None and step == FAULT_STEP + AFTER_FAULT:
            signal.raise_signal(signal.SIGINT)  # the loop's graceful stop: checks pending steps, saves, ends
        return out

    loop.lr_at, loop.train_step = lr_at, train_step
    return lambda: setattr(loop, "lr_at", real_lr) or setattr(loop, "train_step", real_step)


def run(runs: Path, name: str, seed: int, fault: str | None, shape: list[str] = SHAPE) -> dict:
    trace = []
    restore = instrument(fault, trace)
    run_id = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")  # a valid run id
    flags = ["--preset", "tiny", *shape, "--seed", str(seed), "--runs-dir", str(runs), "--run-id", run_id, "--quiet"]
    if fault is not None:
        flags += ["--sample-interval", "0"]
    t0 = time.perf_counter()
    try:
        rc = train_main(flags)
    finally:
        restore()
    events = sorted((int(p.name.split("_")[1]), p.name.split("_", 2)[2]) for p in (runs / run_id / "anomalies").iterdir())
    return {"name": name, "seed": seed, "fault": fault, "exit": rc, "steps": len(trace), "seconds": time.perf_counter() - t0,
            "events": events, "old_detector_events": old_detector(trace),
            "trace": [[s, lo, g] for s, lo, g in trace]}


def tables(results: list[dict]) -> str:
    lines = ["| healthy run | steps | events (calibrated) | events (previous detector) |", "|---|---|---|---|"]
    for r in results:
        if r["fault"] is None:
            fmt = lambda ev: ", ".join(f"{e} @ {s}" for s, e in ev) or "none"  # noqa: E731
            lines.append(f"| {r['name']} | {r['steps']} | {len(r['events'])} ({fmt(r['events'])}) | "
                         f"{len(r['old_detector_events'])} ({fmt(r['old_detector_events'])}) |")
    lines += ["", f"| fault at step {FAULT_STEP} | first event (calibrated) | caught after | events before the fault "
              "| previous detector |", "|---|---|---|---|---|"]
    for r in results:
        if r["fault"] is not None:
            after = [(s, e) for s, e in r["events"] if s >= FAULT_STEP]
            before = [(s, e) for s, e in r["events"] if s < FAULT_STEP]
            old = [(s, e) for s, e in r["old_detector_events"] if s >= FAULT_STEP]
            old_text = f"{old[0][1]} @ {old[0][0]}" if old else "(non-finite rule)" if r["fault"] == "nan_grads" else "missed"
            first = f"{after[0][1]} @ {after[0][0]}" if after else "MISSED"
            lag = f"{after[0][0] - FAULT_STEP} steps" if after else "-"
            lines.append(f"| {r['fault']} | {first} | {lag} | {len(before)} | {old_text} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["healthy", "faults", "quickstart"],
                    help="run one part (the quick start's own run is a part of its own: 150 steps of 8 x 128)")
    ap.add_argument("--report", action="store_true", help="print the tables of every saved part, run nothing")
    args = ap.parse_args()
    results_dir = Path(__file__).parent / "results"
    if args.report:
        saved = [json.loads(p.read_text()) for p in sorted(results_dir.glob("anomaly_calibration*.json"))]
        print(tables([r for part in saved for r in part["results"]]))
        return 0
    out = results_dir / f"anomaly_calibration{'_' + args.only if args.only else ''}.json"
    torch.set_num_threads(1)  # one core each for this and whatever else runs: less contention on 2 cores
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "faults"):
            for fault in FAULTS:
                results.append(run(Path(tmp), f"fault {fault}", 42, fault))
                print(f"{fault}: {results[-1]['events']} ({results[-1]['seconds']:.0f} s)", flush=True)
        if args.only == "quickstart":
            results.append(run(Path(tmp), QUICKSTART, 42, None, shape=[]))
            print(f"quick start: {results[-1]['events']} ({results[-1]['seconds']:.0f} s)", flush=True)
        if args.only in (None, "healthy"):
            for name, seed in HEALTHY.items():
                results.append(run(Path(tmp), name, seed, None))
                print(f"{name}: {results[-1]['events']} ({results[-1]['seconds']:.0f} s)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": "2-core CPU (shared)",
                                          "torch": torch.__version__, "fault_step": FAULT_STEP,
                                          "results": results}, indent=1) + "\n")
    print(tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
