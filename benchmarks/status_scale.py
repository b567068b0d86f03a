"""CPU: what one bitnet-status refresh costs on a run of the flagship's length.

    PYTHONPATH=src python benchmarks/status_scale.py --rows 400000 --out status_scale.json   # ~1 min

The seed's job is 400k steps. At the default log interval (100) that is 4,000 scalar rows and any
refresh is instant; with --log-interval 1 it is 400,000 rows (~100 MB), and bitnet-status --watch used
to parse all of them on every refresh (twice: once for the curves, once for the elapsed time). This
script writes such a run directory (rows shaped as the trainer writes them; an eval every 5,000 steps,
quant stats every 1,000) into a temporary folder and times, in one process:

  fresh    summarize() with a new JsonlReader: a one-shot `bitnet-status RUN`, and what every --watch
           refresh cost before the reader was kept;
  refresh  summarize() with the reader kept from the previous call, after 100 more rows were appended:
           every --watch refresh now;
  plot     plot() fresh and with a kept reader (--plot under --watch).

Each is the median of --repeats calls. The table is printed last; --out gets the JSON.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bitnet import status
from bitnet.run import layout
from bitnet.run.jsonl import JsonlReader

TOKENS_PER_STEP = 32 * 1024


def scalar_row(step: int, t0: float) -> str:
    return json.dumps({"step": step, "tokens": step * TOKENS_PER_STEP, "loss": 2.5 + 8.0 / (1 + step / 500),
                       "loss_avg": 2.5 + 8.0 / (1 + step / 500), "lr": 1.5e-3, "wd": 0.1, "grad_norm": 0.31,
                       "step_ms": 50.1, "tok_s": 654_000.0, "mfu": 0.41, "mem_gib": 11.75,
                       "epoch": step / 4000.0, "time": t0 + 0.05 * step}) + "\n"


def write_run(root: Path, rows: int) -> Path:
    run = root / "runs" / "long"
    (run / "meta").mkdir(parents=True)
    (run / "meta" / "config.json").write_text(json.dumps({
        "model": {"vocab_size": 32000, "dim": 768, "n_layers": 12}, "train": {
            "num_steps": rows + 1_000_000, "batch_size": 32, "seq_len": 1024, "grad_accum": 1}}))
    (run / "meta" / "provenance.json").write_text(json.dumps({"start_time": 1.7e9, "resumed_from": None}))
    groups = {g: {"neg": 0.3, "zero": 0.4, "pos": 0.3} for g in ("attn", "ffn")}
    layers = {f"layers.{i}.{m}": {"neg": 0.3, "zero": 0.4, "pos": 0.3, "gamma": 0.02}
              for i in range(12) for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                                           "ffn.gate", "ffn.up", "ffn.down")}
    for rel, lines in ((layout.SCALARS, (scalar_row(s, 1.7e9) for s in range(1, rows + 1))),
                       (layout.EVAL_RESULTS, (json.dumps({"step": s, "eval_loss": 3.0, "train_loss": 2.9, "gap": 0.1,
                                                         "time": 1.7e9 + 0.05 * s}) + "\n"
                                              for s in range(5000, rows + 1, 5000))),
                       (layout.QUANT, (json.dumps({"step": s, "groups": groups, "layers": layers}) + "\n"
                                       for s in range(0, rows + 1, 1000)))):
        path = run / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            f.writelines(lines)
    return run


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=400_000, help="scalar rows (400,000: the seed's job at log interval 1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="write the JSON here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run = write_run(Path(tmp), args.rows)
        size_mb = (run / layout.SCALARS).stat().st_size / 1e6
        step = [args.rows]

        def append_rows():
            with open(run / layout.SCALARS, "a") as f:
                f.writelines(scalar_row(s, 1.7e9) for s in range(step[0] + 1, step[0] + 101))
            step[0] += 100

        kept = JsonlReader()
        status.summarize(run, reader=kept)
        fresh = median_seconds(lambda: status.summarize(run), args.repeats)
        refresh = median_seconds(lambda: (append_rows(), status.summarize(run, reader=kept)), args.repeats)
        same = status.summarize(run, now=0, reader=kept) == status.summarize(run, now=0)
        png = Path(tmp) / "dash.png"
        plot_fresh = median_seconds(lambda: status.plot(run, png), args.repeats)
        status.plot(run, png, reader=kept)
        plot_refresh = median_seconds(lambda: (append_rows(), status.plot(run, png, reader=kept)), args.repeats)
    result = {"rows": args.rows, "scalars_mb": round(size_mb, 1), "repeats": args.repeats, "python": sys.version.split()[0],
              "fresh_s": fresh, "refresh_s": refresh, "plot_fresh_s": plot_fresh, "plot_refresh_s": plot_refresh,
              "refresh_equals_fresh": same}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"bitnet-status on {args.rows:,} scalar rows ({size_mb:.0f} MB), median of {args.repeats}:")
    print(f"{'':10} {'fresh (s)':>10} {'kept reader (s)':>16} {'ratio':>7}")
    for name, a, b in (("summary", fresh, refresh), ("plot", plot_fresh, plot_refresh)):
        print(f"{name:10} {a:10.2f} {b:16.2f} {a / b:6.1f}x")
    print(f"a kept reader's summary equals a fresh one: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
