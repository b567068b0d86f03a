"""Instrumentation overhead: a short run (tiny preset by default) with and without eval, samples, quant stats.

    python benchmarks/instrumentation_overhead.py                  # CPU: 4 runs of 200 steps, minutes
    python benchmarks/instrumentation_overhead.py --preset 95m --device cuda --steps 200 --repeats 1 \
        --data shards:DIR --compare-skip

Measurements, one JSON line at the end:
- end to end: wall and CPU time of the training loop with everything on (the tiny preset's
  intervals: eval, samples and quant stats every 100 steps, a log row every 10) against
  everything off (the anomaly checks are always on);
- per event: the seconds spent inside each hook at its event steps, timed in the "on" runs. The
  first event of a kind pays one-time costs (kernel compilation, eval's recompile), so it is
  reported apart; the later ones give the steady cost, from which the script projects the overhead
  at the 95m defaults (log 100, quant 1000, eval and samples 5000);
- with --compare-skip, one more run without instrumentation under --anomaly-policy skip: the
  median step time against warn is the cost of its per-step host sync.
On a shared CPU the end-to-end figure is noisy; the per-event one is not.
"""

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bitnet.cli.train import resolve_config  # noqa: E402
from bitnet.instrumentation import anomalies, console, evaluation, jsonl, quant_stats, samples  # noqa: E402,F401
from bitnet.instrumentation.base import Hook  # noqa: E402
from bitnet.run.jsonl import read_jsonl  # noqa: E402
from bitnet.train.loop import train  # noqa: E402

HOOK_STEP_SECONDS = defaultdict(lambda: defaultdict(float))  # class name -> step -> seconds
LOOP = {}
DEFAULTS_95M = {"quant": 1000, "eval": 5000, "samples": 5000}
EVENT_HOOKS = {"eval": "EvalHook", "samples": "SampleHook", "quant": "QuantStatsHook"}


def time_hooks() -> None:
    """Wrap every Hook subclass's methods to add their wall time to HOOK_STEP_SECONDS[class][step]."""
    def timed(cls, fn):
        def wrapper(self, state, *args):
            t0 = time.perf_counter()
            try:
                return fn(self, state, *args)
            finally:
                HOOK_STEP_SECONDS[cls.__name__][getattr(state, "step", -1)] += time.perf_counter() - t0
        return wrapper

    for cls in Hook.__subclasses__():
        for name in ("on_train_start", "on_step_end", "on_log", "on_checkpoint", "on_train_end"):
            if name in vars(cls):
                setattr(cls, name, timed(cls, vars(cls)[name]))
    # the loop's own span: from the first hook call to the last
    first, last = jsonl.ScalarsLogger.on_train_start, jsonl.ScalarsLogger.on_train_end

    def start(self, state):
        LOOP["t0"], LOOP["cpu0"] = time.perf_counter(), time.process_time()
        return first(self, state)

    def end(self, state):
        LOOP["t1"], LOOP["cpu1"] = time.perf_counter(), time.process_time()
        return last(self, state)

    jsonl.ScalarsLogger.on_train_start, jsonl.ScalarsLogger.on_train_end = start, end


def run(runs_dir: Path, name: str, args, instrumented: bool, policy: str = "warn") -> dict:
    HOOK_STEP_SECONDS.clear()
    argv = ["--preset", args.preset, "--data", args.data, "--runs-dir", str(runs_dir), "--run-id", name,
            "--num-steps", str(args.steps), "--device", args.device, "--checkpoint-interval", str(10 * args.steps),
            "--anomaly-policy", policy, "--quiet", *args.train_args.split()]
    if args.preset != "tiny":  # the tiny preset's intervals, so that a short run sees each event
        argv += ["--log-interval", "10", "--eval-interval", "100", "--sample-interval", "100",
                 "--quant-interval", "100"]
    if not instrumented:
        argv += ["--no-eval", "--sample-interval", "0", "--quant-interval", "0"]
    cfg, model_cfg, _, _ = resolve_config(argv)
    result = train(cfg, model_cfg, quiet=True)
    steps = {"eval": [r["step"] for r in read_jsonl(result.run_dir / "eval/eval_results.jsonl")],
             "samples": sorted({r["step"] for r in read_jsonl(result.run_dir / "samples/samples.jsonl")}),
             "quant": [r["step"] for r in read_jsonl(result.run_dir / "metrics/quant.jsonl")]}
    # seconds of each event, in step order (a hook's time at a step with an event is that event)
    event_s = {kind: [HOOK_STEP_SECONDS[EVENT_HOOKS[kind]][s] for s in at] for kind, at in steps.items()}
    scalars = read_jsonl(result.run_dir / "metrics/scalars.jsonl")
    step_ms = [r["step_ms"] for r in scalars][1:]  # the first row holds the compile
    # the anomaly checks: a list append every step, one read of the buffered values at log steps
    anomaly = HOOK_STEP_SECONDS["AnomalyHook"]
    log_steps = {r["step"] for r in scalars}
    plain = [v for s, v in anomaly.items() if s not in log_steps and s > 0]
    checks = [v for s, v in anomaly.items() if s in log_steps]
    # checkpoints are not instrumentation: the loop saves only the milestones in every run
    return {"loop_s": LOOP["t1"] - LOOP["t0"], "loop_cpu_s": LOOP["cpu1"] - LOOP["cpu0"], "event_s": event_s,
            "hook_s": {k: sum(v.values()) for k, v in HOOK_STEP_SECONDS.items()}, "cfg": cfg,
            "step_ms_median": statistics.median(step_ms) if step_ms else None,
            "anomaly_step_s": statistics.median(plain) if plain else 0.0,
            "anomaly_check_s": statistics.median(checks) if checks else 0.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared box)")
    p.add_argument("--preset", default="tiny", help="model preset (tiny: the CPU measurement)")
    p.add_argument("--data", default="embedded", help="--data of the runs (e.g. shards:DIR)")
    p.add_argument("--train-args", default="", help="more bitnet-train flags for every run, as one string")
    p.add_argument("--compare-skip", action="store_true", help="also time a run under --anomaly-policy skip")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    time_hooks()
    off, on, skip = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):  # alternate, so drifting machine load hits both alike
            off.append(run(Path(tmp), f"off{i}", args, instrumented=False))
            on.append(run(Path(tmp), f"on{i}", args, instrumented=True))
            if args.compare_skip:
                skip.append(run(Path(tmp), f"skip{i}", args, instrumented=False, policy="skip"))
    med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    off_s, on_s = med(off, "loop_s"), med(on, "loop_s")
    off_cpu, on_cpu = med(off, "loop_cpu_s"), med(on, "loop_cpu_s")
    step_s = med(off, "step_ms_median") / 1000

    events = {kind: [s for r in on for s in r["event_s"][kind]] for kind in EVENT_HOOKS}
    first_ms = {kind: 1000 * statistics.mean(r["event_s"][kind][0] for r in on) for kind in EVENT_HOOKS}
    # steady cost: the events after each run's first (or the first, if a run had only one)
    steady = {kind: statistics.median([s for r in on for s in r["event_s"][kind][1:]]
                                      or [r["event_s"][kind][0] for r in on]) for kind in EVENT_HOOKS}
    # per step at the 95m defaults: the plain step's cost, plus a check every 100 steps
    anomaly_per_step_s = med(on, "anomaly_step_s") + med(on, "anomaly_check_s") / 100
    projected = {kind: steady[kind] / DEFAULTS_95M[kind] / step_s for kind in EVENT_HOOKS}
    projected["anomaly"] = anomaly_per_step_s / step_s
    instr_s = statistics.median(sum(r["hook_s"].get(EVENT_HOOKS[k], 0.0) for k in EVENT_HOOKS)
                                + r["hook_s"].get("AnomalyHook", 0.0) for r in on)
    cfg = on[0]["cfg"]
    out = {
        "benchmark": "instrumentation_overhead", "device": args.device, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "threads": args.threads,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "preset": args.preset, "steps": args.steps, "batch": f"{cfg.batch_size}x{cfg.seq_len}",
        "repeats": args.repeats,
        "intervals": {"log": cfg.log_interval, "eval": cfg.eval_interval, "samples": cfg.sample_interval,
                      "quant": cfg.quant_interval, "sample_max_tokens": cfg.sample_max_tokens},
        "events": {kind: len(v) // args.repeats for kind, v in events.items()},
        "loop_s_off": [round(r["loop_s"], 2) for r in off], "loop_s_on": [round(r["loop_s"], 2) for r in on],
        "overhead_end_to_end_wall_pct": 100 * (on_s - off_s) / off_s,
        "overhead_end_to_end_cpu_time_pct": 100 * (on_cpu - off_cpu) / off_cpu,
        "overhead_in_hooks_pct": 100 * instr_s / (on_s - instr_s),
        "step_ms": 1000 * step_s,
        "first_event_ms": first_ms, "steady_event_ms": {k: 1000 * v for k, v in steady.items()},
        "anomaly_ms": {"plain_step": 1000 * med(on, "anomaly_step_s"),
                       "log_step_check": 1000 * med(on, "anomaly_check_s"),
                       "whole_run": 1000 * statistics.median(r["hook_s"].get("AnomalyHook", 0.0) for r in on)},
        "projected_overhead_at_95m_defaults_pct": {k: 100 * v for k, v in projected.items()}
                                                  | {"total": 100 * sum(projected.values())},
    }
    if skip:
        out["step_ms_warn_vs_skip"] = [med(off, "step_ms_median"), med(skip, "step_ms_median")]
        out["skip_policy_overhead_pct"] = 100 * (med(skip, "step_ms_median") / med(off, "step_ms_median") - 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
