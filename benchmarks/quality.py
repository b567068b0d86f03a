"""Does it learn? BitNet-95M against its full-precision twin on the same tokens (issue 9).

    # on the GPU (token shards carried in .carry/):
    PYTHONPATH=src python benchmarks/quality.py run --data shards:.carry/sotu_shards --steps 600 --out $OUT/quality.json
    # here, to draw the curves:
    python benchmarks/quality.py plot benchmarks/quality.json benchmarks/quality.png

Three runs of the 95m preset, same data order and seed, the seed's schedule compressed to
--steps (warmup 10% of the steps, boundary at 50%):
  bitnet        ternary BitLinear, the BitNet LR (peak 1.5e-3)
  none@bitnet   plain linears (bf16 autocast), the same LR
  none@llama    plain linears, a LLaMA-style LR (peak 2.5e-4, every LR of the schedule scaled by 1/6)
"""

import argparse
import json
import sys
import time
from pathlib import Path

VARIANTS = {
    "bitnet": {"quantization": "bitnet", "lr_scale": 1.0},
    "none@bitnet": {"quantization": "none", "lr_scale": 1.0},
    "none@llama": {"quantization": "none", "lr_scale": 1.0 / 6.0},
}


def rows(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def run(args) -> int:
    from bitnet.cli.train import train_main

    runs_dir = Path(args.runs_dir)
    results = {"steps": args.steps, "preset": args.preset, "data": args.data, "variants": {}}
    for name, v in VARIANTS.items():
        if args.only and name not in args.only.split(","):
            continue
        s = v["lr_scale"]
        run_id = name.replace("@", "_at_")
        flags = ["--preset", args.preset, "--data", args.data, "--run-id", run_id, "--runs-dir", str(runs_dir),
                 "--overwrite", "--quantization", v["quantization"], "--num-steps", str(args.steps),
                 "--warmup-steps", str(max(args.steps // 10, 1)), "--batch-size", str(args.batch_size),
                 "--lr-peak", str(1.5e-3 * s), "--lr-stage1-end", str(1.0e-3 * s),
                 "--lr-stage2-start", str(1.0e-3 * s), "--lr-end", str(1.5e-5 * s),
                 "--log-interval", "10", "--eval-interval", str(args.eval_interval),
                 "--eval-sequences", "256", "--checkpoint-interval", str(args.steps), "--quiet"]
        t0 = time.time()
        code = train_main(flags + args.extra)
        run_dir = runs_dir / run_id
        scalars = rows(run_dir / "metrics" / "scalars.jsonl")
        evals = rows(run_dir / "eval" / "eval_results.jsonl")
        quant = rows(run_dir / "metrics" / "quant.jsonl")
        anomalies = sorted(p.name for p in (run_dir / "anomalies").iterdir()) if (run_dir / "anomalies").is_dir() else []
        cfg = json.loads((run_dir / "meta" / "config.json").read_text()) if (run_dir / "meta" / "config.json").exists() else {}
        tok_s = sorted(r["tok_s"] for r in scalars[1:]) or [float("nan")]
        results["variants"][name] = {
            "exit_code": code, "wall_s": time.time() - t0, "lr_peak": 1.5e-3 * s,
            "final_train_loss": scalars[-1]["loss_avg"] if scalars else None,
            "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
            "tokens": scalars[-1]["tokens"] if scalars else 0,
            "epochs": scalars[-1].get("epoch") if scalars else None,
            "train_tokens_in_corpus": cfg.get("data", {}).get("train_tokens"),
            "median_tok_s": tok_s[len(tok_s) // 2],
            "ternary_final": quant[-1].get("groups") if quant else None,
            "anomalies": anomalies,
            "scalars": [{k: r.get(k) for k in ("step", "tokens", "loss", "loss_avg", "lr", "grad_norm", "tok_s")} for r in scalars],
            "evals": [{k: e.get(k) for k in ("step", "tokens", "eval_loss")} for e in evals],
        }
        print(f"{name}: exit {code}, train {results['variants'][name]['final_train_loss']}, "
              f"eval {results['variants'][name]['final_eval_loss']}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))  # after each variant: a cut-off run keeps its results
    print(table(results))
    return 0


def table(results: dict) -> str:
    v = results["variants"]
    ref = v.get("bitnet", {})
    lines = [f"{'variant':<13} {'lr_peak':>8} {'train':>7} {'eval':>7} {'eval gap vs bitnet':>19} {'tokens':>12} "
             f"{'epochs':>6} {'tok/s':>9}"]
    for name, r in v.items():
        gap = ""
        if ref.get("final_eval_loss") and r.get("final_eval_loss") and name != "bitnet":
            gap = f"{(ref['final_eval_loss'] - r['final_eval_loss']) / r['final_eval_loss'] * 100:+.1f}%"
        lines.append(f"{name:<13} {r['lr_peak']:>8.2e} {r['final_train_loss'] or float('nan'):>7.4f} "
                     f"{r['final_eval_loss'] or float('nan'):>7.4f} {gap:>19} {r['tokens']:>12,} "
                     f"{r['epochs'] or 0:>6.2f} {r['median_tok_s']:>9,.0f}")
    return "\n".join(lines)


def plot(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(Path(args.results).read_text())
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, r in results["variants"].items():
        s = r["scalars"]
        line, = ax1.plot([x["tokens"] / 1e6 for x in s], [x["loss_avg"] for x in s], label=f"{name} train", lw=1.2)
        e = r["evals"]
        ax1.plot([x["tokens"] / 1e6 for x in e], [x["eval_loss"] for x in e], "o--", color=line.get_color(),
                 label=f"{name} eval (held-out)", ms=4)
        ax2.plot([x["step"] for x in s], [x["lr"] for x in s], label=name, color=line.get_color())
    ax1.set_xlabel("tokens (M)")
    ax1.set_ylabel("loss")
    ax1.set_ylim(top=min(ax1.get_ylim()[1], 8))
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax1.set_title(f"{results.get('preset', '95m')} preset, {results['steps']} steps of 32 x 1024 tokens, data {results['data']}")
    ax2.set_xlabel("step")
    ax2.set_ylabel("learning rate")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(table(results))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--data", required=True)
    r.add_argument("--steps", type=int, default=600)
    r.add_argument("--preset", default="95m")
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--eval-interval", type=int, default=100)
    r.add_argument("--runs-dir", default="runs/quality")
    r.add_argument("--only", default="")
    r.add_argument("--out", default="benchmarks/quality.json")
    r.add_argument("extra", nargs="*", help="more bitnet-train flags (after --)")
    q = sub.add_parser("plot")
    q.add_argument("results")
    q.add_argument("png")
    args = p.parse_args(argv)
    return run(args) if args.cmd == "run" else plot(args)


if __name__ == "__main__":
    sys.exit(main())
