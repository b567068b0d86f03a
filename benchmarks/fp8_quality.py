"""Each FP8 switch against the exact path (issue 25): speed, memory and the loss over 2,000 real-token steps.

    PYTHONPATH=src python benchmarks/fp8_quality.py --out $OUT/fp8_quality.json          # one GPU call
    PYTHONPATH=src python benchmarks/fp8_quality.py --smoke --out /tmp/fp8q.json         # CPU plumbing

Every row is the real trainer (`python -m bitnet.train --preset 95m`, 32 x 1024, the seed's schedule compressed
to --steps, eval every --eval-interval steps, no samples) in its own process, on the corpus that
`benchmarks/long_run.py` builds on the GPU machine (mostly code and docs, not FineWeb-Edu; reused if a complete
one is in --work). Rows run in --rows order, most important first; a wall-clock guard skips the rows that
would not finish before --budget-s, and says so.
- exact-s<seed>: --fp8 none, the trainer's defaults. Two seeds give the noise floor: the same recipe, another init and data order.
- <switches>-s<seed>: --fp8 <switches> (head, grad_input, grad_weight, forward, all; several joined by '+'); bf16resid or
  fp32resid among them sets --residual-stream (e.g. fp32resid-s0, bf16resid+head-s0); exact: the trainer's defaults.
For each row: median tok/s of its scalars rows after the first (compile), peak memory, the mean train loss of
the last --tail-steps steps, every eval loss. Quality of a switch = its loss minus exact-s0's (same seed, same
tokens); it "holds" when that is within the noise floor, the largest |exact-sK - exact-s0| over the other seeds'
exact rows (tail train loss and final eval).
Prints a table last; writes JSON (--out).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from long_run import build_corpus, default_roots  # noqa: E402

from bitnet.run import layout  # noqa: E402
from bitnet.run.jsonl import read_jsonl  # noqa: E402
from bitnet.train.metrics import gpu_telemetry_medians  # noqa: E402

DEFAULT_ROWS = "exact-s0,all-s0,exact-s1,head-s0,grad_input-s0,grad_weight-s0"
RESIDUAL_SWITCHES = {"bf16resid": "bf16", "fp32resid": "fp32"}
"""Row switches that set --residual-stream (issue 25, sixth session: bf16 became the default)."""


def parse_row(name: str) -> tuple[str, int]:
    """'head-s0' -> ('head', 0); 'exact' means --fp8 none."""
    switches, _, seed = name.rpartition("-s")
    if not switches or not seed.isdigit():
        raise SystemExit(f"error: row {name!r} is not <switches>-s<seed> (e.g. exact-s0, head-s0, all-s1)")
    return switches, int(seed)


def trainer_switches(switches: str) -> tuple[str, str | None]:
    """(--fp8, --residual-stream) of a row's switches, None: the trainer's default stream. 'exact' -> ('none',
    None), 'bf16resid+head' -> ('head', 'bf16'), 'fp32resid' -> ('none', 'fp32')."""
    parts = [] if switches == "exact" else switches.split("+")
    fp8 = [p for p in parts if p not in RESIDUAL_SWITCHES]
    stream = [RESIDUAL_SWITCHES[p] for p in parts if p in RESIDUAL_SWITCHES]
    if len(stream) > 1:
        raise SystemExit(f"error: row switches {switches!r} name the residual stream twice")
    return ",".join(fp8) or "none", stream[0] if stream else None


def run_row(name: str, a, data: str, work: Path) -> dict:
    switches, seed = parse_row(name)
    fp8, residual_stream = trainer_switches(switches)
    argv = [sys.executable, "-m", "bitnet.train", "--preset", a.preset, "--data", data, "--num-steps", str(a.steps),
            "--seed", str(seed), "--fp8", fp8, *(["--residual-stream", residual_stream] if residual_stream else []),
            "--log-interval", str(a.log_interval), "--eval-interval",
            str(a.eval_interval), "--eval-sequences", str(a.eval_sequences), "--sample-interval", "0",
            "--quant-interval", "0", "--checkpoint-interval", str(10 * a.steps), "--runs-dir", str(work / "runs"),
            "--run-id", name.replace("+", "_"), "--overwrite", "--quiet"]
    if a.smoke:
        argv += ["--device", "cpu", "--batch-size", "4", "--seq-len", "64", "--warmup-steps", "5"]
    t0 = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    wall = time.time() - t0
    run = work / "runs" / name.replace("+", "_")  # a run id takes no '+'
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"rc {proc.returncode}: " + " | ".join(tail), "wall_s": wall}
    rows = read_jsonl(run / layout.SCALARS)
    trained = json.loads((run / layout.CONFIG).read_text())["train"]  # what the trainer ran, not what was asked
    evals = read_jsonl(run / layout.EVAL_RESULTS)
    tail = [r["loss"] for r in rows if r["step"] > a.steps - a.tail_steps]
    tok = [r["tok_s"] for r in rows[1:]] or [r["tok_s"] for r in rows]
    return {"fp8": trained["fp8"], "residual_stream": trained["residual_stream"],
            "head_chunk_rows": trained["head_chunk_rows"], "seed": seed, "wall_s": wall, "tok_s": statistics.median(tok),
            "peak_gib": max(r.get("mem_gib", 0.0) for r in rows), "tail_train_loss": statistics.fmean(tail),
            "final_train_loss": rows[-1]["loss"], "eval": [(e["step"], e["eval_loss"]) for e in evals],
            "final_eval_loss": evals[-1]["eval_loss"] if evals else None, **gpu_telemetry_medians(rows),
            "loss_curve": [(r["step"], r["loss"]) for r in rows]}


def compare(results: dict) -> dict:
    """Each switch row's deltas against the exact row of its own seed (exact-s0 where that seed has none:
    `paired` False), the noise floor (the largest distance of another exact seed from exact-s0), and per switch
    run on several paired seeds the mean of those deltas. Rows that failed or were skipped are left out; an eval
    delta is None where either row has no eval."""
    ran = {name: r for name, r in results.items() if "error" not in r and "skipped" not in r}
    exact = {parse_row(name)[1]: r for name, r in ran.items() if parse_row(name)[0] == "exact"}
    out, floor = {}, None
    base = exact.get(0)
    others = [r for seed, r in exact.items() if seed != 0]
    if base and others:  # the largest distance of another seed's exact run from exact-s0 (eval: where both ran)
        evals = [abs(r["final_eval_loss"] - base["final_eval_loss"]) for r in others
                 if r["final_eval_loss"] is not None and base["final_eval_loss"] is not None]
        floor = {"tail_train_loss": max(abs(r["tail_train_loss"] - base["tail_train_loss"]) for r in others),
                 "final_eval_loss": max(evals, default=0.0), "seeds": 1 + len(others)}
        out["noise_floor"] = floor
    paired = {}
    for name, r in ran.items():
        switches, seed = parse_row(name)
        ref = exact.get(seed, base)
        if switches == "exact" or ref is None:
            continue
        evals = (r["final_eval_loss"], ref["final_eval_loss"])
        d = {"against": f"exact-s{seed if seed in exact else 0}", "paired": seed in exact,
             "tok_s_ratio": r["tok_s"] / ref["tok_s"], "peak_gib_delta": r["peak_gib"] - ref["peak_gib"],
             "tail_train_loss_delta": r["tail_train_loss"] - ref["tail_train_loss"],
             "final_eval_loss_delta": evals[0] - evals[1] if None not in evals else None}
        if floor:
            d["holds"] = holds(d, floor)
        out[name] = d
        if d["paired"] and d["final_eval_loss_delta"] is not None:
            paired.setdefault(switches, []).append(d)
    for switches, ds in paired.items():
        if len(ds) > 1:  # the seeds' paired deltas averaged: a switch's own effect, less each seed's noise
            m = {"seeds": len(ds), **{k: statistics.fmean(d[k] for d in ds)
                                      for k in ("tail_train_loss_delta", "final_eval_loss_delta")}}
            if floor:
                m["holds"] = holds(m, floor)
            out[f"{switches} (mean)"] = m
    return out


def holds(d: dict, floor: dict) -> bool | None:
    """Whether both loss deltas lie within the noise floor (None: no eval delta to judge)."""
    if d["final_eval_loss_delta"] is None:
        return None
    return (abs(d["tail_train_loss_delta"]) <= floor["tail_train_loss"]
            and abs(d["final_eval_loss_delta"]) <= floor["final_eval_loss"])


def table(results: dict, deltas: dict) -> str:
    head = (f"{'row':<16} {'tok/s':>10} {'x exact':>8} {'peak GiB':>9} {'tail loss':>10} {'eval':>8} "
            f"{'d tail':>8} {'d eval':>8} {'holds':>6} {'SM MHz':>7} {'W':>5}")
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        if "error" in r or "skipped" in r:
            lines.append(f"{name:<16} {r.get('error') or r.get('skipped')}"[:150])
            continue
        d = deltas.get(name, {})
        ev = f"{r['final_eval_loss']:.4f}" if r["final_eval_loss"] is not None else "-"
        ratio = f"{d['tok_s_ratio']:.3f}" if d else "-"
        dt = f"{d['tail_train_loss_delta']:+.4f}" if d else "-"
        de = f"{d['final_eval_loss_delta']:+.4f}" if d and d["final_eval_loss_delta"] is not None else "-"
        holds = {True: "yes", False: "no"}.get(d.get("holds"), "-")
        lines.append(f"{name:<16} {r['tok_s']:>10,.0f} {ratio:>8} {r['peak_gib']:>9.2f} {r['tail_train_loss']:>10.4f} "
                     f"{ev:>8} {dt:>8} {de:>8} {holds:>6} {r.get('gpu_sm_mhz', '-'):>7} "
                     f"{round(r['gpu_power_w']) if 'gpu_power_w' in r else '-':>5}")
    for name, m in deltas.items():
        if name.endswith("(mean)"):
            holds_m = {True: "yes", False: "no"}.get(m.get("holds"), "-")
            lines.append(f"{name:<16} {'':>10} {'':>8} {'':>9} {'':>10} {'':>8} {m['tail_train_loss_delta']:>+8.4f} "
                         f"{m['final_eval_loss_delta']:>+8.4f} {holds_m:>6}   over {m['seeds']} seeds, each "
                         f"against its own seed's exact row")
    if "noise_floor" in deltas:
        f = deltas["noise_floor"]
        lines.append(f"noise floor, the largest |exact-sK - exact-s0| over {f['seeds']} seeds: "
                     f"tail {f['tail_train_loss']:.4f}, eval {f['final_eval_loss']:.4f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=DEFAULT_ROWS, help="comma list of <switches>-s<seed>, run in this order")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--preset", default="95m")
    p.add_argument("--data", default="", help="token data for every row (default: build the long-run corpus)")
    p.add_argument("--work", default="/tmp/fp8_quality")
    p.add_argument("--workers", type=int, default=0, help="corpus build processes (0: every core)")
    p.add_argument("--log-interval", type=int, default=25)
    p.add_argument("--eval-interval", type=int, default=500)
    p.add_argument("--eval-sequences", type=int, default=256)
    p.add_argument("--tail-steps", type=int, default=200, help="steps at the end whose train loss is averaged")
    p.add_argument("--budget-s", type=float, default=570, help="skip rows that would end after this many seconds")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny preset, embedded corpus: the plumbing")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="no runs: join the rows of these result files "
                   "(rows split over GPU calls on one machine), compare, print the table")
    p.add_argument("--out", default="fp8_quality.json")
    a = p.parse_args(argv)
    if a.merge:
        parts = [json.loads(Path(f).read_text()) for f in a.merge]
        results = {name: r for part in parts for name, r in part["results"].items() if "skipped" not in r}
        out = {**parts[0], "results": results, "comparison": compare(results), "merged_from": a.merge}
        Path(a.out).write_text(json.dumps(out, indent=1))
        print(table(results, out["comparison"]))
        return 0
    t0 = time.time()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = None
    if a.smoke:
        a.preset, a.steps, a.log_interval, a.eval_interval, a.eval_sequences, a.tail_steps = "tiny", 20, 2, 10, 4, 6
        data = "embedded"
    elif a.data:
        data = a.data
    else:
        corpus = build_corpus(work / "corpus", default_roots(), a.workers)
        data = f"shards:{work / 'corpus' / 'shards'}"
        print(f"[corpus] {corpus.get('train_tokens', 0):,} train tokens in {time.time() - t0:.0f} s", flush=True)
    names = [n for n in a.rows.split(",") if n]
    for n in names:
        parse_row(n)
    results, row_walls = {}, []
    for name in names:
        elapsed = time.time() - t0
        expect = max(row_walls) if row_walls else 0.0
        if elapsed + expect > a.budget_s:
            results[name] = {"skipped": f"skipped: {elapsed:.0f} s used, a row takes ~{expect:.0f} s, "
                                        f"budget {a.budget_s:.0f} s"}
            print(f"[{name}] {results[name]['skipped']}", flush=True)
            continue
        results[name] = run_row(name, a, data, work)
        row_walls.append(results[name]["wall_s"])
        r = results[name]
        print(f"[{name}] " + (r["error"] if "error" in r else
                              f"{r['tok_s']:,.0f} tok/s, peak {r['peak_gib']:.2f} GiB, tail loss "
                              f"{r['tail_train_loss']:.4f}, eval {r['final_eval_loss']}, {r['wall_s']:.0f} s"),
              flush=True)
    deltas = compare(results)
    out = {"steps": a.steps, "preset": a.preset, "data": data, "corpus": corpus, "results": results,
           "comparison": deltas, "wall_s": time.time() - t0}
    try:
        import torch
        out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        out["torch"] = torch.__version__
    except Exception:  # noqa: BLE001 - the report is written either way
        pass
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(table(results, deltas), flush=True)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
