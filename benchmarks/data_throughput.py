"""Data pipeline throughput on this machine's CPU cores: can the loader keep an H100 fed?

    PYTHONPATH=src python benchmarks/data_throughput.py                  # ~1-2 min on 2 cores
    PYTHONPATH=src python benchmarks/data_throughput.py --docs 60 --seconds 2   # quicker

Rows (LLaMA-2 tokenizer, the embedded corpus written as local jsonl, seq_len 1024):
  stream        tokenize on the fly: StreamLoader (build_data on the jsonl), next_batch(32) for one epoch
  prepare/1     bitnet-prepare-data with 1 worker process
  prepare/all   bitnet-prepare-data with one worker per core (os.cpu_count())
  shards        memory-mapped shards: WindowLoader.next_batch(32) -> int64 tensors (32 x 1024 per batch)
A single H100 trains the 95m model at about 650k tok/s; the shard loader should give >= 3x that.
"cores busy" is CPU seconds (this process's threads and its worker processes) per wall second; on a
shared machine it shows how much CPU the row got, and tok/s/core what it did with it.
Prints one JSON line, then a table last; writes benchmarks/data_throughput.json (--out).
"""

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from bitnet.data import build_data, load_tokenizer
from bitnet.data.embedded import embedded_documents
from bitnet.data.prepare import prepare

H100_TOK_S = 650_000
SEQ_LEN, BATCH = 1024, 32


def write_corpus(path: Path, n_docs: int) -> int:
    docs = embedded_documents()[:n_docs]
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "text": d}) + "\n")
    return len(docs)


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished child processes."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def timed(fn):
    """Run fn(); return its result with wall seconds and the cores it kept busy on average."""
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    result = fn()
    wall = time.perf_counter() - t0
    return {**result, "seconds": wall, "tok_s": result["tokens"] / wall, "cores_busy": (cpu_seconds() - cpu0) / wall}


def bench_stream(tok, spec: str) -> dict:
    t0 = time.perf_counter()
    data = build_data(spec, tok, SEQ_LEN, 0, 4, 4)
    setup_s = time.perf_counter() - t0

    def one_epoch():
        tokens = 0
        while data.train.epoch == 0:  # one pass over the corpus
            x, _ = data.train.next_batch(BATCH)
            tokens += x.numel()
        return {"tokens": tokens, "setup_s": setup_s}

    row = timed(one_epoch)
    data.train.close()
    return row


def bench_prepare(spec: str, out: Path, workers: int) -> dict:
    def run():
        manifest = prepare(spec, str(out), shard_tokens=1_000_000, eval_docs=4, workers=workers, progress=False)
        return {"tokens": manifest["train_tokens"] + manifest["eval"]["tokens"], "workers": workers,
                "shards": len(manifest["shards"])}

    return timed(run)


def bench_shards(tok, out: Path, seconds: float) -> dict:
    data = build_data(f"shards:{out}", tok, SEQ_LEN, 0, 4, 4)
    for _ in range(20):  # warm the page cache and the permutation
        data.train.next_batch(BATCH)

    def run():
        batches, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(50):
                x, y = data.train.next_batch(BATCH)
            batches += 50
        return {"tokens": batches * BATCH * SEQ_LEN, "batches": batches, "windows_per_epoch": data.train.num_windows}

    row = timed(run)
    row["ms_per_batch"] = row["seconds"] * 1000 / row["batches"]
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=249, help="documents of the embedded corpus to use (max 249)")
    p.add_argument("--seconds", type=float, default=5.0, help="how long to time the shard loader")
    p.add_argument("--out", default=str(Path(__file__).with_suffix(".json")), help="JSON report path")
    a = p.parse_args()
    tok = load_tokenizer()
    cores = os.cpu_count() or 1
    meta = {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cores": cores,
            "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU benchmark)",
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "seq_len": SEQ_LEN, "batch": BATCH,
            "load_avg_start": os.getloadavg()[0]}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        meta["docs"] = write_corpus(corpus, a.docs)
        rows["stream"] = bench_stream(tok, str(corpus))
        rows["prepare/1"] = bench_prepare(str(corpus), Path(tmp) / "shards1", 1)
        rows["prepare/all"] = bench_prepare(str(corpus), Path(tmp) / "shards", cores)
        rows["shards"] = bench_shards(tok, Path(tmp) / "shards", a.seconds)
    meta["load_avg_end"] = os.getloadavg()[0]
    for row in rows.values():
        row["x_h100"] = row["tok_s"] / H100_TOK_S
    report = {**meta, "h100_tok_s": H100_TOK_S, "rows": rows,
              "shards_ratio_to_h100": rows["shards"]["tok_s"] / H100_TOK_S,
              "prepare_speedup_all_cores": rows["prepare/all"]["tok_s"] / rows["prepare/1"]["tok_s"]}
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report), flush=True)
    print(f"\n{meta['cores']} cores | load avg {meta['load_avg_start']:.1f} -> {meta['load_avg_end']:.1f} | "
          f"torch {meta['torch']} | {meta['docs']} documents | {meta['date']}")
    print(f"{'row':<12} {'tokens':>11} {'seconds':>8} {'cores busy':>10} {'tok/s':>12} {'tok/s/core':>12} "
          f"{'x 650k (H100)':>14}")
    for name, row in rows.items():
        print(f"{name:<12} {row['tokens']:>11,} {row['seconds']:>8.2f} {row['cores_busy']:>10.2f} "
              f"{row['tok_s']:>12,.0f} {row['tok_s'] / max(row['cores_busy'], 1e-9):>12,.0f} {row['x_h100']:>14.2f}")
    print(f"shard loader: {report['shards_ratio_to_h100']:.1f}x a single H100's 650k tok/s (target >= 3x), "
          f"{rows['shards']['ms_per_batch']:.3f} ms per 32 x 1024 batch; prepare on {cores} cores: "
          f"{report['prepare_speedup_all_cores']:.2f}x one worker")
    return 0


if __name__ == "__main__":
    sys.exit(main())
