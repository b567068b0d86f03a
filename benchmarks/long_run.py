"""The main job for real (issue 24): the 95m recipe on one GPU, corpus build included, killed and resumed.

One command per model, each in one 10-minute GPU job (corpus build, compile, a SIGKILL mid-run and
`--resume-from auto` included); it prints its plan first, the table last, and leaves one archive of the
run's files:

    PYTHONPATH=src python benchmarks/long_run.py run --kind bitnet --warmup-also bf16 --out $OUT
    PYTHONPATH=src python benchmarks/long_run.py run --kind bf16 --out $OUT   # same machine: corpus, caches reused
    # only if the wall-clock guard stopped a run (it says so): same machine, within the next call
    PYTHONPATH=src python benchmarks/long_run.py finish --kind bitnet --out $OUT
    # here, from the two archives: benchmarks/results/long_run.json, the plot and the table
    python benchmarks/long_run.py report A/long_run_bitnet.tar.gz B/long_run_bf16.tar.gz

What `run` does:
0. The plan: the seconds each part is expected to take (`plan_budget`: the step rates and per-event costs
   measured in issue 24's calls, by GPU and kind), against --budget-s; it names the --steps that would
   end on schedule when the default 9,160 (300.2M tokens) would not.
1. Corpus: every *.py, *.pyi, *.rst, *.md, *.txt and *.h under the interpreter's site-packages,
   /usr/lib/python3* and /usr/share/doc (symlinks resolved, exact duplicates and non-UTF-8 files
   dropped), shuffled with a fixed seed and packed one file a line into corpus.jsonl by worker
   processes, then tokenized by `bitnet-prepare-data` on every core. The first documents (about 2M
   characters) are the held-out eval set. It is mostly Python code and documentation, not FineWeb-Edu.
   A complete corpus left by an earlier call on the same machine is reused.
   Meanwhile on the GPU, a warm-up: a four-step run of the same model and shapes on the embedded corpus
   (--warmup; also of --warmup-also's kind) fills the compile and Triton caches, so the trainer starts
   in about 6 s instead of 15-18 s, and its first eval, quant-stats and sample events skip their compiles.
2. Training: `bitnet-train --preset 95m --data shards:...`, 32 x 1024, the seed's two-stage schedule
   compressed to --steps (warmup 375 steps as the seed's, boundary at 50%; both milestone checkpoints
   are written), eval ~20 times, samples 5 times, quant stats ~20 times. The bf16 twin runs with a
   config file holding `[model] quantization = "none"`.
3. Kill and resume: --kill-after steps past the stage boundary (whose checkpoint is then the newest)
   the trainer gets SIGKILL, and `bitnet-train --resume-from auto --run-id <id>` continues it in
   <id>_r<step>. The steps between the checkpoint and the kill run twice: their losses are compared.
4. A wall-clock guard: --reserve-s (20 s) before --budget-s the trainer gets SIGTERM (it saves a
   checkpoint and exits), 12 s later SIGKILL, so that the report and the archive are always written;
   the last lines say how many tokens the run reached of those planned, and how to `finish` a run it stopped
   (`--resume-from auto` once more, a third timed leg; `--sigterm-at` injects that stop for tests).

The trainer runs in a child process (`_train`) that times every hook at its event steps and every
checkpoint write into timings.jsonl, line by line, so a SIGKILL loses none of it.
"""

import argparse
import glob
import hashlib
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import site
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

SUFFIXES = (".py", ".pyi", ".rst", ".md", ".txt", ".h")
MAX_FILE_BYTES = 8 << 20  # larger files (data tables) are skipped
EVAL_CHARS = 2_000_000  # held-out documents: the first ones reaching this many characters
SEED_WARMUP = 375  # the seed's warmup, in steps: about the start's stability, not the run's length
SEED_STEPS = 400_000  # the seed's run: 400k steps x 32 x 1024 = 13.1B tokens
SEED_TOKENS = SEED_STEPS * 32 * 1024
SEED_HOURS = 28.0
PROMPTS = Path(__file__).with_name("long_run_prompts.txt")
DEFAULT_STEPS = 9160  # 9,160 x 32 x 1024 = 300.2M tokens per model, 1.77 passes over the 169M-token corpus
TERM_GRACE_S = 12.0  # after the guard's SIGTERM: the step, a hook in progress, the stop checkpoint, the exit
RESERVE_S = 20.0  # the guard fires this long before --budget-s: TERM_GRACE_S, then the status, report, archive

# What the plan (`plan_budget`) expects, from issue 24's calls (benchmarks/RESULTS.md, results/2026-12-06/):
STEP_TOK_S = {  # trainer step rate at 32 x 1024 by GPU and kind (tok/s, step time only)
    "H200": {"bitnet": 697_800, "bf16": 641_800},  # the 177M-token runs (H200)
    "H100": {"bitnet": 653_100, "bf16": 606_400},  # the 300M-token runs
}
COST_S = {
    "corpus": 40.0,  # pack + tokenize, 16 cores: 47 s (H200 box) and 31 s (H100 box) with the one-process pack
    "setup": 9.0,  # a trainer process from its start to its run directory (H100 box, 300M-token calls: 7.3-9.2 s,
    # a resume loading 1.1 GB included; the H200 box of the 177M-token calls: 11-15 s)
    "compile": 17.0,  # compile and capture, cold caches (15-18 s)
    "compile_warm": 6.0,  # ... with the caches of an earlier process (5-6.6 s)
    "eval": 0.19,  # one eval of 256 sequences (steady)
    "eval_first": 3.1,  # the first eval of a process recompiles the blocks without autograd (cold caches)
    "sample": 1.2,  # one sample event, 5 prompts x 3 modes x 64 tokens in one batch: 0.79-0.98 s steady, the
    # first of a process 1.0-3.1 s (H100, 300M-token calls); a prompt at a time it was 3.4-4.8 s
    "quant": 0.06,  # one quant-stats event (BitNet)
    "quant_first": 4.0,  # the first one of a process (Triton compiling the eager norm kernel, cold caches)
    "checkpoint": 2.8,  # 1.14 GB (2.6-3.0 s)
    "exits": 4.0,  # process exits, the kill gap, log rows
    "report": 4.0,  # status, analysis, archive
}


# ------------------------------------------------------------------ corpus

def default_roots() -> list[str]:
    roots = list(site.getsitepackages()) + [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    roots += sorted(glob.glob("/usr/lib/python3*")) + ["/usr/share/doc"]
    return list(dict.fromkeys(roots))  # files are deduplicated by real path anyway


def _read_document(path: str) -> tuple:
    """One file as (outcome, sha1, bytes, characters, its jsonl line): outcome "ok", "too_large", "empty",
    "not_utf8" or "unreadable"; the line is only made for "ok". Runs in the pack's worker processes."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return "unreadable", None, 0, 0, None
    if len(data) > MAX_FILE_BYTES:
        return "too_large", None, 0, 0, None
    if not data.strip():
        return "empty", None, 0, 0, None
    digest = hashlib.sha1(data).digest()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "not_utf8", digest, len(data), 0, None
    return "ok", digest, len(data), len(text), json.dumps({"text": text}, ensure_ascii=False) + "\n"


def pack_corpus(roots: list[str], path: Path, eval_chars: int = EVAL_CHARS, seed: int = 0, workers: int = 1) -> dict:
    """Write corpus.jsonl (one file a line, shuffled); returns counts and the held-out document count.

    workers > 1: files are read, hashed and JSON-encoded by that many forked processes (on the GPU machine
    the single-process pack took 19 s of the 47 s corpus build); the result is byte-identical."""
    t0 = time.time()
    seen_paths, files = set(), []
    for root in roots:
        if not os.path.isdir(root):
            continue
        for dirpath, _dirs, names in os.walk(root):
            for name in names:
                if name.endswith(SUFFIXES):
                    real = os.path.realpath(os.path.join(dirpath, name))
                    if real not in seen_paths and os.path.isfile(real):
                        seen_paths.add(real)
                        files.append(real)
    files.sort()
    walk_s = time.time() - t0
    skipped = {"too_large": 0, "not_utf8": 0, "empty": 0, "duplicate": 0}
    seen_hashes, docs, total_bytes = set(), [], 0  # docs: (characters, jsonl line)
    pool = None
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        pool = multiprocessing.get_context("fork").Pool(workers)
        results = pool.imap(_read_document, files, chunksize=64)
    else:
        results = map(_read_document, files)
    finished = False
    try:
        for outcome, digest, size, chars, line in results:
            if outcome == "unreadable":
                continue
            if outcome in ("too_large", "empty"):
                skipped[outcome] += 1
                continue
            if digest in seen_hashes:  # an exact duplicate of a kept file
                skipped["duplicate"] += 1
                continue
            if outcome == "not_utf8":
                skipped["not_utf8"] += 1
                continue
            seen_hashes.add(digest)
            docs.append((chars, line))
            total_bytes += size
        finished = True
    finally:
        if pool is not None:  # on an error (or Ctrl-C) the files still queued are not read
            pool.close() if finished else pool.terminate()
            pool.join()
    random.Random(seed).shuffle(docs)
    chars, eval_docs = 0, 0
    while eval_docs < len(docs) and chars < eval_chars:
        chars += docs[eval_docs][0]
        eval_docs += 1
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(line for _, line in docs)
    os.replace(tmp, path)
    by_suffix = {}
    for f in files:
        s = os.path.splitext(f)[1]
        by_suffix[s] = by_suffix.get(s, 0) + 1
    return {"roots": [r for r in roots if os.path.isdir(r)], "files_found": len(files), "files_by_suffix": by_suffix,
            "documents": len(docs), "bytes": total_bytes, "skipped": skipped, "eval_docs": eval_docs,
            "eval_chars": chars, "shuffle_seed": seed, "pack_s": time.time() - t0, "walk_s": walk_s,
            "pack_workers": workers if pool is not None else 1, "jsonl_bytes": path.stat().st_size}


def corpus_ready(work: Path) -> bool:
    """Whether work/ holds a complete corpus of an earlier call (build_corpus reuses it)."""
    from bitnet.data.shards import read_manifest

    shards = work / "shards"
    manifest = read_manifest(shards) if shards.is_dir() else None
    return bool((work / "corpus_info.json").exists() and (work / "corpus.jsonl").exists() and manifest
                and manifest.get("complete"))


def build_corpus(work: Path, roots: list[str], workers: int, eval_chars: int = EVAL_CHARS) -> dict:
    """corpus.jsonl + token shards under work/ (reused when complete); returns what the report records.
    workers: processes of the pack and of the tokenizer (0: every core)."""
    from bitnet.cli.prepare import main as prepare_main
    from bitnet.data.shards import read_manifest
    from bitnet.run.files import sha256_file

    work.mkdir(parents=True, exist_ok=True)
    info_path, jsonl, shards = work / "corpus_info.json", work / "corpus.jsonl", work / "shards"
    manifest = read_manifest(shards) if shards.is_dir() else None
    if info_path.exists() and jsonl.exists() and manifest and manifest.get("complete"):
        info = json.loads(info_path.read_text())
        info["reused"] = True
        return info
    info = pack_corpus(roots, jsonl, eval_chars, workers=workers or os.cpu_count() or 1)
    t0 = time.time()
    code = prepare_main(["--data", str(jsonl), "--out", str(shards), "--eval-docs", str(info["eval_docs"]),
                         "--workers", str(workers), "--no-progress"])
    if code:
        raise SystemExit(f"error: bitnet-prepare-data exited {code}")
    info["prepare_s"] = time.time() - t0
    info["workers"] = workers or os.cpu_count()
    manifest = read_manifest(shards)
    info.update(train_tokens=manifest["train_tokens"], train_docs=manifest["train_docs"],
                eval_tokens=manifest["eval"]["tokens"], shards=len(manifest["shards"]),
                manifest_sha256=hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest(),
                jsonl_sha256=sha256_file(jsonl), reused=False)
    info_path.write_text(json.dumps(info, indent=1))
    return info


# ------------------------------------------------------------------ the trainer, timed (child process)

def train_timed(argv: list[str]) -> int:
    """bitnet-train with every hook event and checkpoint write timed into the file argv[0]."""
    path, flags = argv[0], argv[1:]
    log = open(path, "a", buffering=1)

    def emit(**row):
        log.write(json.dumps({"t": time.time(), "pid": os.getpid(), **row}) + "\n")
        log.flush()

    emit(ev="proc_start")
    import bitnet.train.loop  # noqa: F401  (imports every hook class)
    from bitnet.instrumentation.base import Hook
    from bitnet.run import checkpoint

    first = {"done": False}

    def timed(cls, name, fn):
        def wrapper(self, state, *args):
            t0 = time.perf_counter()
            try:
                return fn(self, state, *args)
            finally:
                dt = time.perf_counter() - t0
                step = getattr(state, "step", -1)
                if name == "on_step_end" and not first["done"]:
                    first["done"] = True
                    emit(ev="first_step", step=step)
                works = name != "on_step_end" or cls.works_at is not Hook.works_at and self.works_at(step)
                if (name not in ("on_step_end", "on_log") or works or dt > 0.05) and dt > 1e-4:
                    emit(ev="hook", hook=cls.__name__, fn=name, step=step, s=dt)
        return wrapper

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    for cls in set(subclasses(Hook)):
        for name in ("on_train_start", "on_step_end", "on_log", "on_checkpoint", "on_train_end"):
            if name in vars(cls):
                setattr(cls, name, timed(cls, name, vars(cls)[name]))
    save = checkpoint.save

    def timed_save(run_dir, step, state, milestone=False):
        t0 = time.perf_counter()
        out = save(run_dir, step, state, milestone=milestone)
        emit(ev="checkpoint", step=step, s=time.perf_counter() - t0, milestone=milestone,
             bytes=(Path(out) / "checkpoint.pt").stat().st_size)
        return out

    checkpoint.save = timed_save
    from bitnet.cli.train import train_main
    code = train_main(flags)
    emit(ev="exit", rc=code)
    return code


# ------------------------------------------------------------------ the driver

def read_rows(path: Path) -> list[dict]:
    rows = []
    try:
        text = path.read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return rows


def newest(paths) -> Path:
    paths = sorted(paths, key=lambda p: p.stat().st_mtime)
    return paths[-1] if paths else Path("/nonexistent")


def watch(proc, scalars, label: str, kill_step: int | None, guard_at: float, t_start: float,
          term_grace_s: float = TERM_GRACE_S, term_step: int | None = None) -> dict:
    """Wait for the trainer; SIGKILL it at kill_step, SIGTERM it past guard_at or at term_step (what the guard
    does, on schedule: --sigterm-at), then SIGKILL term_grace_s later if it is still there."""
    last_print, killed_at, termed_at = 0.0, None, None
    while proc.poll() is None:
        time.sleep(0.25)
        rows = read_rows(scalars())
        step = rows[-1]["step"] if rows else 0
        now = time.time()
        if kill_step is not None and killed_at is None and step >= kill_step:
            proc.send_signal(signal.SIGKILL)
            killed_at = {"step": step, "t": now}
            print(f"[{now - t_start:6.1f}s] {label}: SIGKILL at step {step}", flush=True)
        if termed_at is None and (now > guard_at or term_step is not None and step >= term_step):
            proc.send_signal(signal.SIGTERM)
            termed_at = {"step": step, "t": now}
            why = "wall-clock guard" if now > guard_at else "--sigterm-at"
            print(f"[{now - t_start:6.1f}s] {label}: {why}, SIGTERM at step {step}", flush=True)
        if termed_at is not None and now > termed_at["t"] + term_grace_s and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        if now - last_print > 30 and rows:
            r = rows[-1]
            print(f"[{now - t_start:6.1f}s] {label}: step {r['step']} loss {r['loss']:.4f} lr {r['lr']:.2e} "
                  f"tok/s {r['tok_s']:,.0f} mem {r['mem_gib']:.2f} GiB", flush=True)
            last_print = now
    return {"rc": proc.returncode, "killed": killed_at, "guard_sigterm": termed_at, "end": time.time()}


def gpu_key(name: str) -> str:
    """The STEP_TOK_S row of a device name; other GPUs are planned at H100's rates."""
    return "H200" if "H200" in name else "H100"


def plan_budget(steps: int, kind: str, gpu: str, corpus_reused: bool, warmup: bool, kill_after: int,
                tokens_per_step: int, tok_s: float = 0.0, caches_warm: bool = False) -> dict:
    """The seconds each part of one call is expected to take (COST_S, STEP_TOK_S): a plan, not a measurement.
    warmup: a warm-up run compiles during the corpus build; caches_warm: an earlier call of this kind ran on
    this machine. Either way the first trainer process starts with warm compile caches."""
    rate = tok_s or STEP_TOK_S[gpu_key(gpu)][kind]
    step_s = tokens_per_step / rate
    c = COST_S
    evals, samples, quants = 21, 5, 21  # every steps // 20 (and the last step), every steps // 5
    first_warm = warmup or caches_warm
    warm_s = c["setup"] + c["compile"] + c["eval_first"] + (0 if kind == "bf16" else c["quant_first"]) + 3.0
    parts = {
        "corpus build" + (" (warm-up alongside)" if warmup and not corpus_reused else ""):
        0.0 if corpus_reused else max(c["corpus"], warm_s if warmup else 0.0),
        "trainer starts (2 processes)": 2 * c["setup"] + (c["compile_warm"] if first_warm else c["compile"])
        + c["compile_warm"],
        f"steps ({steps:,} at {rate / 1e3:,.0f}k tok/s)": steps * step_s,
        f"steps redone after the kill ({kill_after})": kill_after * step_s,
        "eval (21)": evals * c["eval"] + c["eval_first"] * (0.3 if first_warm else 1) + c["eval_first"] * 0.3,
        "samples (5)": samples * c["sample"],
        "quant stats (21)": 0.0 if kind == "bf16" else quants * c["quant"] + c["quant_first"] * (
            0.15 if first_warm else 1.15),
        "checkpoints (4)": 4 * c["checkpoint"],
        "exits and gaps": c["exits"],
        "status, report, archive": c["report"],
    }
    total = sum(parts.values())
    return {"gpu": gpu_key(gpu), "tok_s": rate, "step_s": step_s, "parts_s": parts, "total_s": total}


def print_plan(plan: dict, budget_s: float, reserve_s: float, steps: int, tokens_per_step: int) -> None:
    guard = budget_s - reserve_s
    print(f"plan ({plan['gpu']} rates; seconds expected, from issue 24's measurements):", flush=True)
    for name, sec in plan["parts_s"].items():
        print(f"  {name:<34} {sec:7.1f}")
    total = plan["total_s"]
    print(f"  {'total':<34} {total:7.1f}   budget {budget_s:.0f} s, guard at {guard:.0f} s", flush=True)
    if total > guard:
        fits = steps - int((total - guard) / plan["step_s"]) - 1
        print(f"  over by {total - guard:.0f} s: the guard will stop the run near step {fits:,} "
              f"({fits * tokens_per_step / 1e6:.0f}M tokens); --steps {fits} would end it on schedule", flush=True)
    else:
        print(f"  {guard - total:.0f} s to spare: {steps:,} steps = {steps * tokens_per_step / 1e6:.1f}M tokens", flush=True)


def model_flags(work: Path, kind: str, seq_len: int) -> list[str]:
    """The bitnet-train flags that make the model: the bf16 twin through a config file."""
    flags = ["--seq-len", str(seq_len)] if seq_len else []
    if kind == "bf16":
        toml = work / "bf16.toml"
        toml.write_text('[model]\nquantization = "none"\n')
        flags += ["--config", str(toml)]
    return flags


def warm_marker(work: Path, kind: str) -> Path:
    """Written when a warm-up of `kind` finished on this machine: a later call finds its caches warm."""
    return work / f"warm_{kind}.ok"


def start_warmup(args, work: Path, kind: str):
    """A four-step run of the same model and shapes on the embedded corpus (two steps put the stage boundary
    at step 1, where the trainer refuses a warmup of 1 step), while the corpus is built: its compile
    (training and eval), the eager Triton kernels of quant stats and sampling, and CUDA's lazy
    loading fill the on-disk caches that the real trainer then reads (a cold start measured 15-18 s of
    compile, a warm one 5-6.6 s). Its checkpoints go to /dev/shm when there is one; it is deleted after."""
    shm = Path("/dev/shm")  # its 3 checkpoints (3.4 GB) need not wait for the disk the corpus is written to
    use_shm = shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 8 << 30
    runs = (shm if use_shm else work) / f"long_run_warmup_{kind}_{os.getpid()}"
    flags = ["--preset", args.preset, "--data", "embedded", "--run-id", "warm", "--runs-dir", str(runs),
             "--overwrite", "--device", args.device, "--batch-size", str(args.batch_size), "--num-steps", "4",
             "--warmup-steps", "1", "--log-interval", "1", "--eval-interval", "2", "--eval-sequences", "64",
             "--quant-interval", "2", "--sample-interval", "2", "--sample-max-tokens", "2",
             "--sample-prompts", str(PROMPTS), "--checkpoint-interval", "1000", "--quiet",
             *model_flags(work, kind, args.seq_len)]
    log = open(work / f"warmup_{kind}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "bitnet.cli", *flags], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return {"kind": kind, "proc": proc, "runs": runs, "log": log, "start": time.time(), "flags": flags}


def finish_warmup(warm, wait_s: float, work: Path) -> dict:
    """Wait up to wait_s for the warm-up (killed past it: what it compiled so far is cached), then clean up."""
    proc = warm["proc"]
    try:
        proc.wait(timeout=max(wait_s, 0.0))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    warm["log"].close()
    shutil.rmtree(warm["runs"], ignore_errors=True)
    if proc.returncode == 0:
        warm_marker(work, warm["kind"]).write_text(time.strftime("%Y-%m-%d %H:%M:%S\n", time.gmtime()))
    lines = Path(warm["log"].name).read_text(errors="replace").strip().splitlines()
    return {"kind": warm["kind"], "rc": proc.returncode, "s": time.time() - warm["start"], "flags": warm["flags"],
            "last_line": lines[-1] if lines else ""}


def run(args) -> int:
    t_start = time.time()
    deadline = t_start + args.budget_s
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 2
    if args.steps < 40 or args.kill_after >= args.steps // 2:
        print("error: --steps must be >= 40 and --kill-after < --steps / 2", file=sys.stderr)
        return 2
    from bitnet.train.config import stage_boundary_step

    boundary = stage_boundary_step(args.steps, 0.5)  # the resumed leg starts at the boundary checkpoint
    # the watcher sees logged steps only: a step past the last log row before the end would fire at the end
    last = args.steps - args.log_interval
    if args.sigterm_at is not None and not boundary < args.sigterm_at <= last:
        print(f"error: --sigterm-at {args.sigterm_at} must fall in the resumed leg before its last log row: "
              f"steps {boundary + 1}..{last} (it resumes at the stage boundary's checkpoint, step {boundary}; "
              f"rows every --log-interval {args.log_interval})", file=sys.stderr)
        return 2
    info = {"kind": args.kind, "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t_start)),
            "host": platform.node(), "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "budget_s": args.budget_s, "reserve_s": args.reserve_s, "argv": sys.argv}
    n = args.steps
    reused = corpus_ready(work / "corpus")
    warmup = args.warmup == "on" or (args.warmup == "auto" and not reused and args.device.startswith("cuda"))
    warm_kinds = list(dict.fromkeys([args.kind] + [k for k in args.warmup_also.split(",") if k])) if warmup else []
    from bitnet.model import PRESETS

    tokens_per_step = args.batch_size * (args.seq_len or PRESETS[args.preset].max_seq_len)
    # an earlier call of this kind, or a warm-up of it, on this machine
    caches_warm = (work / f"timings_{args.kind}.jsonl").exists() or warm_marker(work, args.kind).exists()
    plan = plan_budget(n, args.kind, info["gpu"], reused, warmup, args.kill_after, tokens_per_step, args.tok_s,
                       caches_warm)
    info["plan"] = plan
    print_plan(plan, args.budget_s, args.reserve_s, n, tokens_per_step)

    # the corpus, with the warm-up compiling on the GPU meanwhile (two cores left to each)
    warms = [start_warmup(args, work, kind) for kind in warm_kinds]
    workers = args.workers or max((os.cpu_count() or 1) - 2 * len(warms), 1)
    roots = args.roots.split(",") if args.roots else default_roots()
    t0 = time.time()
    corpus = build_corpus(work / "corpus", roots, workers, args.eval_chars)
    corpus["build_s"] = time.time() - t0
    print(f"[{time.time() - t_start:6.1f}s] corpus: {corpus['documents']:,} documents, {corpus['bytes'] / 1e6:.0f} MB, "
          f"{corpus['train_tokens']:,} train tokens, {corpus['eval_tokens']:,} eval tokens "
          f"({corpus['eval_docs']} docs), manifest {corpus['manifest_sha256'][:16]}, "
          f"{'reused' if corpus['reused'] else 'built'} in {corpus['build_s']:.1f} s", flush=True)
    corpus_end = time.time()
    info["warmups"] = [finish_warmup(w, corpus_end + args.warmup_wait_s - time.time(), work) for w in warms]
    for w in info["warmups"]:
        print(f"[{time.time() - t_start:6.1f}s] warm-up {w['kind']}: exit {w['rc']} after {w['s']:.1f} s"
              + ("" if w["rc"] == 0 else f" (caches stay cold; its last line: {w['last_line']})"), flush=True)
    info["caches_warm_at_start"] = caches_warm

    runs = work / "runs"
    run_id = f"long_{args.kind}"
    flags = ["--preset", args.preset, "--data", f"shards:{work / 'corpus' / 'shards'}", "--run-id", run_id,
             "--runs-dir", str(runs), "--overwrite", "--device", args.device, "--batch-size", str(args.batch_size),
             "--num-steps", str(n), "--warmup-steps", str(min(SEED_WARMUP, max(n // 10, 1))),
             "--lr-peak", str(args.lr_peak), "--lr-stage1-end", str(args.lr_peak * 2 / 3),
             "--lr-stage2-start", str(args.lr_peak * 2 / 3), "--lr-end", str(args.lr_peak / 100),
             "--log-interval", str(args.log_interval), "--eval-interval", str(max(n // 20, 1)),
             "--eval-sequences", str(args.eval_sequences), "--sample-interval", str(max(n // 5, 1)),
             "--quant-interval", str(max(n // 20, 1)), "--checkpoint-interval", str(boundary),
             "--keep-every", "0", "--sample-prompts", str(PROMPTS), "--quiet",
             *model_flags(work, args.kind, args.seq_len)]
    flags += args.extra
    timings = work / f"timings_{args.kind}.jsonl"
    timings.unlink(missing_ok=True)
    for stale in runs.glob(f"{run_id}_r*"):  # an earlier run's continuations: --resume-from auto would pick them
        shutil.rmtree(stale)
    guard_at = deadline - args.reserve_s
    child = [sys.executable, os.path.abspath(__file__), "_train", str(timings)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    print(f"[{time.time() - t_start:6.1f}s] train {run_id}: {' '.join(flags)}", flush=True)
    proc = subprocess.Popen(child + flags, env=env)
    first = watch(proc, lambda: runs / run_id / "metrics" / "scalars.jsonl", run_id, boundary + args.kill_after, guard_at,
                  t_start)
    legs = [{"run_id": run_id, "start": t_start, "pid": proc.pid, **first}]
    if first["killed"] and time.time() < guard_at:
        print(f"[{time.time() - t_start:6.1f}s] resume: --resume-from auto --run-id {run_id}", flush=True)
        t_resume = time.time()
        proc = subprocess.Popen(child + ["--resume-from", "auto", "--run-id", run_id, "--runs-dir", str(runs),
                                         "--quiet"], env=env)
        second = watch(proc, lambda: newest(runs.glob(f"{run_id}_r*")) / "metrics" / "scalars.jsonl", "resumed",
                       None, guard_at, t_start, term_step=args.sigterm_at)  # its directory appears once set up
        cont = newest(runs.glob(f"{run_id}_r*"))
        legs.append({"run_id": cont.name if cont.exists() else None, "start": t_resume, "pid": proc.pid, **second})
    info["legs"] = legs
    info["corpus"] = corpus
    info["flags"] = flags
    info["steps_planned"] = n
    info["tokens_per_step"] = tokens_per_step
    info["wall_s"] = time.time() - t_start
    return conclude(work, out, args.kind, info, t_start, f"; plan {plan['total_s']:.0f} s")


def conclude(work: Path, out: Path, kind: str, info: dict, t_start: float, plan_note: str = "") -> int:
    """After the last leg: the status of the run's newest leg, the driver and summary JSON, the archive, the
    tokens reached and the table (printed last)."""
    legs, n = info["legs"], info["steps_planned"]
    final_dir = work / "runs" / (next((leg["run_id"] for leg in reversed(legs) if leg.get("run_id")), None)
                                 or f"long_{kind}")
    status = subprocess.run([sys.executable, "-m", "bitnet.cli.status", str(final_dir)], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "120"})
    (work / f"status_{kind}.txt").write_text(status.stdout + status.stderr)
    (work / f"driver_{kind}.json").write_text(json.dumps(info, indent=1))
    summary = analyze(work, kind)
    (work / f"summary_{kind}.json").write_text(json.dumps(summary, indent=1))
    archive = out / f"long_run_{kind}.tar.gz"
    pack(work, kind, archive)
    print(status.stdout + status.stderr)
    stopped = [leg["guard_sigterm"] for leg in legs if leg.get("guard_sigterm")]
    tokens_per_step = info.get("tokens_per_step") or (summary["tokens"] // summary["steps"] if summary.get("steps") else 0)
    print(f"tokens reached: {summary.get('tokens') or 0:,} of {n * tokens_per_step:,} planned "
          f"(step {summary.get('steps') or 0:,} of {n:,})"
          + "".join(f"; SIGTERM sent at step {t['step']:,}" for t in stopped)
          + f"{plan_note}, wall {time.time() - t_start:.0f} s")
    if (summary.get("steps") or 0) < n and legs[-1].get("guard_sigterm"):
        print(f"not finished: on the same machine, `PYTHONPATH=src python benchmarks/{Path(__file__).name} finish "
              f"--kind {kind} --work {work} --out {out}` resumes it from its newest checkpoint")
    elif (summary.get("steps") or 0) < n:
        print(f"not finished: its last trainer exited {legs[-1].get('rc')}")
    print(f"archive {archive} ({archive.stat().st_size / 1e6:.1f} MB)")
    print(table({kind: summary}))
    return 0 if summary.get("tokens") else 1


def finish(args) -> int:
    """Finish a run that a SIGTERM stopped (the wall-clock guard: BitNet's 300M-token call stopped 54 steps
    short): `--resume-from auto` in the same work directory, timed like the other legs and appended to
    the driver's, then the status, summary, archive and table again. The checkpoints are not archived, so
    this runs where `run` ran."""
    t_start = time.time()
    work, out = Path(args.work), Path(args.out)
    info = read_json(work / f"driver_{args.kind}.json")
    if not info.get("legs"):
        print(f"error: no {args.kind} run in {work} (driver_{args.kind}.json missing): `run --kind {args.kind}` "
              f"makes one", file=sys.stderr)
        return 2
    summary = analyze(work, args.kind)
    if (summary.get("steps") or 0) >= info["steps_planned"]:
        print(f"nothing to finish: the {args.kind} run reached step {summary['steps']:,} of "
              f"{info['steps_planned']:,}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    runs, run_id = work / "runs", f"long_{args.kind}"
    before = {d.name for d in runs.glob(f"{run_id}_r*")}
    child = [sys.executable, os.path.abspath(__file__), "_train", str(work / f"timings_{args.kind}.jsonl")]
    print(f"[{time.time() - t_start:6.1f}s] finish: --resume-from auto --run-id {run_id} (the run reached step "
          f"{summary.get('steps') or 0:,} of {info['steps_planned']:,}; it resumes from its newest checkpoint)",
          flush=True)
    proc = subprocess.Popen(child + ["--resume-from", "auto", "--run-id", run_id, "--runs-dir", str(runs), "--quiet"],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def new_dir() -> Path:
        return newest(d for d in runs.glob(f"{run_id}_r*") if d.name not in before)

    leg = watch(proc, lambda: new_dir() / "metrics" / "scalars.jsonl", "finish", None,
                t_start + args.budget_s - args.reserve_s, t_start)
    cont = new_dir()
    info["legs"].append({"run_id": cont.name if cont.exists() else None, "start": t_start, "pid": proc.pid, **leg})
    info.setdefault("finish_wall_s", []).append(time.time() - t_start)
    code = conclude(work, out, args.kind, info, t_start)
    if leg["rc"] != 0 and not leg["guard_sigterm"]:
        print(f"error: the resumed trainer exited {leg['rc']} (its message is above)", file=sys.stderr)
        return 1
    return code


def pack(work: Path, kind: str, archive: Path) -> None:
    """The run's small files (no checkpoints, no corpus) into one archive."""
    names = [f"driver_{kind}.json", f"summary_{kind}.json", f"status_{kind}.txt", f"timings_{kind}.jsonl",
             "corpus/corpus_info.json", "corpus/shards/manifest.json"]
    with tarfile.open(archive, "w:gz") as tar:
        for name in names:
            if (work / name).exists():
                tar.add(work / name, arcname=name)
        for run_dir in sorted((work / "runs").glob(f"long_{kind}*")):
            for p in sorted(run_dir.rglob("*")):
                if p.is_file() and not p.name.endswith((".pt", ".tmp")):
                    tar.add(p, arcname=str(p.relative_to(work)))


# ------------------------------------------------------------------ analysis

def with_finishing_legs(work: Path, kind: str, legs: list[dict]) -> list[dict]:
    """The driver's legs with the legs it did not start put in, each after the leg it resumed from: a run its
    wall-clock guard stopped, finished by hand in the same work directory with the command the trainer printed
    (`bitnet-train --resume-from <its checkpoint>`), also when `finish` resumed from that hand leg later. Found
    through each provenance's resumed_from. Their processes were not timed: each counts from its process start
    (provenance's process_start_time; start_time where that is missing, which leaves out the imports before it)
    to its last file (not its exit), unless `report --leg-wall` gives it."""
    known = {leg.get("run_id") for leg in legs}
    ordered = []
    for leg in legs:
        ordered.append(leg)
        last = leg.get("run_id")
        while last:  # the legs resumed by hand from `last`, one after another
            found = next((d for d in sorted((work / "runs").glob(f"long_{kind}_r*")) if d.name not in known
                          and Path(read_json(d / "meta" / "provenance.json").get("resumed_from") or "")
                          .parent.parent.name == last), None)
            if found is None:
                break
            ordered.append(untimed_leg(found))
            known.add(found.name)
            last = found.name
    return ordered


def untimed_leg(d: Path) -> dict:
    """A leg the driver did not start: from its process start to its last file (see with_finishing_legs)."""
    prov = read_json(d / "meta" / "provenance.json")
    times = [r["time"] for f in ("metrics/scalars.jsonl", "eval/eval_results.jsonl", "samples/samples.jsonl")
             for r in read_rows(d / f) if "time" in r]
    times += [m.stat().st_mtime for m in d.glob("checkpoints/step_*/meta.json")]
    start = prov.get("process_start_time") or prov["start_time"]
    return {"run_id": d.name, "start": start, "end": max(times, default=start), "pid": None, "rc": None,
            "killed": None, "guard_sigterm": None, "untimed": True}


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def analyze(work: Path, kind: str, leg_walls: dict | None = None) -> dict:
    """Numbers of one model's run from its files (driver, timings, run directories). leg_walls: run id ->
    seconds, the process wall of a finishing leg measured outside (its files only bound it from below)."""
    work = Path(work)
    info = json.loads((work / f"driver_{kind}.json").read_text())
    tim = read_rows(work / f"timings_{kind}.jsonl")
    pids = [row["pid"] for row in tim if row["ev"] == "proc_start"]
    # each leg the driver started is one process (one that died before making its run directory has no
    # run_id but its wall time): its pid as recorded, or for older drivers the proc_start rows in order;
    # legs finished by hand have no pid
    procs = [{**leg, "pid": leg.get("pid", pids[i] if i < len(pids) else None)} for i, leg in enumerate(info["legs"])]
    procs = with_finishing_legs(work, kind, procs)
    legs = [leg for leg in procs if leg.get("run_id")]  # the legs with a run directory
    dirs = [work / "runs" / leg["run_id"] for leg in legs]
    scal = [read_rows(d / "metrics" / "scalars.jsonl") for d in dirs]
    evals = [read_rows(d / "eval" / "eval_results.jsonl") for d in dirs]
    quant = [read_rows(d / "metrics" / "quant.jsonl") for d in dirs]
    samples = [read_rows(d / "samples" / "samples.jsonl") for d in dirs]
    # where each leg after the first took over: the step of the checkpoint it resumed from
    starts = [0] + [int(Path(read_json(d / "meta" / "provenance.json").get("resumed_from") or "step_0").name
                        .split("_")[-1] or 0) for d in dirs[1:]]
    resume_step = starts[1] if len(dirs) > 1 else None

    def merge(per_leg):
        """One curve: each leg's rows up to the step the next leg resumed from."""
        ends = starts[1:] + [None]
        return [r for rows, end in zip(per_leg, ends) for r in rows if end is None or r["step"] <= end]

    merged, merged_eval, merged_quant = merge(scal), merge(evals), merge(quant)
    last = merged[-1] if merged else {}
    tail = [r for r in merged if r["step"] > last.get("step", 0) - 100]  # the rows of the last 100 steps
    out = {"kind": kind, "gpu": info["gpu"], "started_utc": info["started_utc"], "torch": info["torch"],
           "steps_planned": info["steps_planned"], "steps": last.get("step", 0), "tokens": last.get("tokens", 0),
           "epochs": last.get("epoch"), "corpus": info["corpus"],
           "lr_peak": float(info["flags"][info["flags"].index("--lr-peak") + 1]),
           "final_train_loss": statistics.fmean(r["loss_avg"] for r in tail) if tail else None,
           "final_train_loss_last_row": last.get("loss_avg"),
           "final_eval_loss": merged_eval[-1]["eval_loss"] if merged_eval else None,
           "final_eval_step": merged_eval[-1]["step"] if merged_eval else None,
           "peak_gib": max((r.get("mem_gib", 0) for s in scal for r in s), default=None),
           "run_dirs": [d.name for d in dirs], "resumed_after_kill": len(dirs) > 1 and bool(legs[0].get("killed")),
           "killed_at_step": (legs[0].get("killed") or {}).get("step"), "resume_step": resume_step,
           "guard_sigterm": [leg.get("guard_sigterm") for leg in procs], "exit_codes": [leg["rc"] for leg in procs],
           "untimed_legs": [leg["run_id"] for leg in procs if leg.get("untimed")]}
    # wall time of the trainer processes (process start to exit) and its parts
    proc_start = {r["pid"]: r["t"] for r in tim if r["ev"] == "proc_start"}
    walls = leg_walls or {}
    legs_wall = [walls[leg["run_id"]] if leg.get("run_id") in walls
                 else leg["end"] - proc_start.get(leg["pid"], leg["start"]) for leg in procs]
    trainer_wall = sum(legs_wall)
    driver_s = (info.get("wall_s") or 0.0) + sum(info.get("finish_wall_s", []))  # the driver's calls, finish included
    hook_s = {}
    for r in tim:
        if r["ev"] == "hook":
            hook_s.setdefault(r["hook"], []).append(r)
    ckpts = [r for r in tim if r["ev"] == "checkpoint"]

    def total(name, pid=None):
        return sum(r["s"] for r in hook_s.get(name, []) if pid is None or r["pid"] == pid)

    step_ms = statistics.median(r["step_ms"] for s in scal for r in s[1:]) if any(len(s) > 1 for s in scal) else 0.0
    setup, compile_s, steps_s = [], [], 0.0
    redone_s, redone_steps = 0.0, 0
    for i, (d, leg, rows) in enumerate(zip(dirs, legs, scal)):
        if not rows:
            continue
        pid, start_step = leg["pid"], starts[i]
        cfg_t = (d / "meta" / "config.json").stat().st_mtime  # written once data, model and resume are set up
        setup.append(max(0.0, cfg_t - proc_start.get(pid, leg["start"])))  # archives keep whole-second mtimes
        train_start = sum(r["s"] for r in tim if r["ev"] == "hook" and r["pid"] == pid and r["fn"] == "on_train_start")
        n_first = rows[0]["step"] - start_step
        # the first row holds the on_train_start hooks, the compile and graph capture, and its steps
        compile_s.append(max(0.0, rows[0]["time"] - cfg_t - train_start - n_first * step_ms / 1000))
        prev = rows[0]["step"]
        steps_s += n_first * step_ms / 1000
        for r in rows[1:]:
            n = r["step"] - prev
            steps_s += n * r["step_ms"] / 1000
            if i + 1 < len(starts) and r["step"] > starts[i + 1]:  # the next leg ran these steps again
                redone_s += n * r["step_ms"] / 1000
                redone_steps += n
            prev = r["step"]
    parts = {"setup": sum(setup), "compile": sum(compile_s), "steps": steps_s - redone_s,
             "steps_redone_after_kill": redone_s, "eval": total("EvalHook"), "samples": total("SampleHook"),
             "quant_stats": total("QuantStatsHook"), "anomaly_dumps": total("AnomalyHook"),
             "checkpoints": sum(r["s"] for r in ckpts)}
    parts["other"] = trainer_wall - sum(parts.values())
    out["wall"] = {"trainer_s": trainer_wall, "legs_s": legs_wall, "corpus_build_s": info["corpus"].get("build_s"),
                   "driver_s": driver_s, "parts_s": parts,
                   "shares": {k: v / trainer_wall for k, v in parts.items()} if trainer_wall else {},
                   "setup_per_process_s": setup, "compile_per_process_s": compile_s, "redone_steps": redone_steps}
    out["tok_s_sustained"] = out["tokens"] / trainer_wall if trainer_wall else None
    out["tok_s_sustained_incl_corpus_build"] = out["tokens"] / driver_s if driver_s else None
    second_start = (setup[1] + compile_s[1]) if len(setup) > 1 and len(compile_s) > 1 else 0.0
    uninterrupted = trainer_wall - redone_s - second_start
    out["tok_s_sustained_without_kill"] = out["tokens"] / uninterrupted if uninterrupted > 0 else None
    tok_rows = [r["tok_s"] for s in scal for r in s[1:]]
    out["tok_s_steps_median"] = statistics.median(tok_rows) if tok_rows else None
    out["step_ms_median"] = step_ms
    out["events"] = {name: {"count": len(v), "total_s": total(name), "first_s": v[0]["s"],
                            "steady_median_s": statistics.median(r["s"] for r in v[1:]) if len(v) > 1 else None}
                     for name, v in hook_s.items()}
    out["checkpoints"] = [{k: r[k] for k in ("step", "s", "bytes", "milestone")} for r in ckpts]
    if len(scal) > 1:
        first_rows = {r["step"]: r for r in scal[0]}
        both = [(first_rows[r["step"]], r) for r in scal[1] if r["step"] in first_rows]
        out["resume_compare"] = {
            "steps": [a["step"] for a, _ in both],
            "loss_first": [a["loss"] for a, _ in both], "loss_resumed": [b["loss"] for _, b in both],
            "max_abs_loss_diff": max((abs(a["loss"] - b["loss"]) for a, b in both), default=None),
            "max_abs_loss_avg_diff": max((abs(a["loss_avg"] - b["loss_avg"]) for a, b in both), default=None),
            "mean_loss_avg_diff": statistics.fmean(b["loss_avg"] - a["loss_avg"] for a, b in both) if both else None,
            "tok_s_median_before_kill": statistics.median(r["tok_s"] for r in scal[0][1:]) if len(scal[0]) > 1 else None,
            "tok_s_median_after_resume": statistics.median(r["tok_s"] for r in scal[1][1:]) if len(scal[1]) > 1 else None,
            "tok_s_first_row_after_resume": scal[1][0]["tok_s"] if scal[1] else None,
            "setup_and_compile_after_resume_s": second_start}
    anomalies = []
    for d in dirs:
        if (d / "anomalies").is_dir():
            for a in sorted((d / "anomalies").iterdir()):
                anomalies.append(f"{d.name}/{a.name}")
    out["anomalies"] = anomalies
    final_samples = samples[-1] if samples and samples[-1] else (samples[0] if samples else [])
    if final_samples:
        s_last = max(r["step"] for r in final_samples)
        out["samples_final"] = [{"prompt": r["prompt"], "mode": r["mode"], "text": r["text"], "step": r["step"]}
                                for r in final_samples if r["step"] == s_last and r["mode"] == "greedy"]
    out["curve"] = [{k: r.get(k) for k in ("step", "tokens", "loss", "loss_avg", "lr", "grad_norm", "tok_s")}
                    for r in merged]
    out["evals"] = [{k: e.get(k) for k in ("step", "tokens", "eval_loss")} for e in merged_eval]
    out["quant"] = [{"step": q["step"], "groups": q.get("groups")} for q in merged_quant]
    out["stage_boundary_step"] = round(info["steps_planned"] * 0.5)
    out["seed_run_hours_at_sustained"] = SEED_TOKENS / out["tok_s_sustained"] / 3600 if out["tok_s_sustained"] else None
    out["seed_run_projection"] = seed_projection(out, parts)
    return out


def seed_projection(out: dict, parts: dict) -> dict | None:
    """The seed's 400k steps at this run's step time and steady per-event costs, at the seed's default
    intervals (samples and eval every 5000 steps, quant stats every 1000, checkpoints every 10000),
    plus one setup and compile: a projection, not a measurement."""
    ev = out.get("events", {})
    if not out.get("step_ms_median") or "EvalHook" not in ev or "SampleHook" not in ev:
        return None
    steps = SEED_STEPS
    ckpt = statistics.fmean(c["s"] for c in out["checkpoints"]) if out["checkpoints"] else 0.0
    quant = (ev.get("QuantStatsHook") or {}).get("steady_median_s") or 0.0
    cost = {"steps": steps * out["step_ms_median"] / 1000, "samples": steps / 5000 * ev["SampleHook"]["steady_median_s"],
            "eval": steps / 5000 * ev["EvalHook"]["steady_median_s"], "quant_stats": steps / 1000 * quant,
            "checkpoints": steps / 10000 * ckpt,
            "setup_and_compile": (parts["setup"] + parts["compile"]) / max(len(out["wall"]["setup_per_process_s"]), 1)}
    total_s = sum(cost.values())
    return {"steps": steps, "hours": total_s / 3600, "tok_s": SEED_TOKENS / total_s, "parts_s": cost,
            "instrumentation_share": (cost["samples"] + cost["eval"] + cost["quant_stats"]) / total_s}


def table(summaries: dict) -> str:
    lines = [f"{'model':<7} {'tokens':>12} {'passes':>6} {'train':>7} {'eval':>7} {'tok/s sust.':>11} "
             f"{'tok/s steps':>11} {'peak GiB':>8} {'resumed':>7} {'seed run h':>10}"]
    for kind, s in summaries.items():
        lines.append(f"{kind:<7} {s['tokens']:>12,} {s['epochs'] or 0:>6.2f} {s['final_train_loss'] or float('nan'):>7.4f} "
                     f"{s['final_eval_loss'] or float('nan'):>7.4f} {s['tok_s_sustained'] or 0:>11,.0f} "
                     f"{s['tok_s_steps_median'] or 0:>11,.0f} {s['peak_gib'] or 0:>8.2f} "
                     f"{str(s['resumed_after_kill']):>7} {s['seed_run_hours_at_sustained'] or 0:>10.1f}")
    if "bitnet" in summaries and "bf16" in summaries:
        a, b = summaries["bitnet"]["final_eval_loss"], summaries["bf16"]["final_eval_loss"]
        if a and b:
            lines.append(f"eval gap bitnet vs bf16: {(a - b) / b * 100:+.2f}% (goal: within 5%)")
    return "\n".join(lines)


# ------------------------------------------------------------------ report (here, from the archives)

def report(args) -> int:
    summaries = {}
    leg_walls = {}
    for item in args.leg_wall:
        run_id, _, sec = item.partition("=")
        try:
            leg_walls[run_id] = float(sec)
        except ValueError:
            leg_walls[run_id] = -1.0
        if not run_id or leg_walls[run_id] < 0:
            print(f"error: --leg-wall {item!r}: expected RUN_ID=SECONDS", file=sys.stderr)
            return 2
    for archive in args.archives:
        dest = Path(args.extract_dir) / Path(archive).name.replace(".tar.gz", "")
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
        for kind in ("bitnet", "bf16"):
            if (dest / f"driver_{kind}.json").exists():
                summaries[kind] = analyze(dest, kind, leg_walls)
    unmatched = sorted(set(leg_walls) - {run_id for s in summaries.values() for run_id in s["untimed_legs"]})
    if unmatched:
        print(f"error: --leg-wall {unmatched[0]}: no leg of that run id was finished by hand in these archives",
              file=sys.stderr)
        return 2
    result = {"issue": 24, "runs": summaries, "definitions": {
        "tokens": "training tokens at the last step (all processes of the run)",
        "final_eval_loss": "held-out loss at the last step (eval set: the first 256 windows of eval.bin)",
        "final_train_loss": "mean of the scalars rows' loss_avg over the last 100 steps",
        "tok_s_sustained": "tokens / wall time of the trainer processes (start to exit, all of them): setup, "
                           "compile, eval, samples, quant stats, checkpoints, kill, resume and redone steps "
                           "included; the corpus build excluded (tok_s_sustained_incl_corpus_build has it)",
        "tok_s_steps_median": "median tok_s of the scalars rows after each process's first (step time only)",
        "peak_gib": "max of torch.cuda.max_memory_allocated over the rows",
        "resumed_after_kill": "the first trainer process got SIGKILL and --resume-from auto finished the run",
        "untimed_legs": "legs run by hand after the driver's guard stopped the run (bitnet-train --resume-from the "
                        "guard's checkpoint): no hook or checkpoint timings, so beyond their steps their wall time "
                        "(report --leg-wall, else process start to last file) counts as 'other'",
        "seed_run_projection": "400k steps at this step time and these steady per-event costs at the seed's "
                               "default intervals: a projection"}}
    if "bitnet" in summaries and "bf16" in summaries:
        a, b = summaries["bitnet"]["final_eval_loss"], summaries["bf16"]["final_eval_loss"]
        result["eval_gap_bitnet_vs_bf16"] = (a - b) / b if a and b else None
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    if args.png:
        plot(summaries, args.png)
    print(table(summaries))
    return 0


def plot(summaries: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    colors = {"bitnet": "tab:blue", "bf16": "tab:orange"}
    for kind, s in summaries.items():
        c = colors.get(kind)
        curve = s["curve"]
        ax1.plot([r["tokens"] / 1e6 for r in curve], [r["loss_avg"] for r in curve], color=c, lw=0.8, alpha=0.8,
                 label=f"{kind} train (mean of {curve[1]['step'] - curve[0]['step'] if len(curve) > 1 else 1} steps)")
        ax1.plot([e["tokens"] / 1e6 for e in s["evals"]], [e["eval_loss"] for e in s["evals"]], "o--", color=c, ms=4,
                 label=f"{kind} eval (held-out)")
        if s.get("resume_step"):
            tpk = curve[-1]["tokens"] / curve[-1]["step"]
            ax1.axvline(s["killed_at_step"] * tpk / 1e6, color=c, ls=":", lw=1.2,
                        label=f"{kind}: SIGKILL at step {s['killed_at_step']}, resumed from {s['resume_step']}")
    any_s = next(iter(summaries.values()))
    tpk = any_s["curve"][-1]["tokens"] / any_s["curve"][-1]["step"]
    ax1.axvline(any_s["stage_boundary_step"] * tpk / 1e6, color="gray", ls="--", lw=1, label="stage boundary")
    ax1.set_xlabel("tokens (M)")
    ax1.set_ylabel("loss")
    late = [r["loss_avg"] for s in summaries.values() for r in s["curve"][len(s["curve"]) // 20:]]
    if late:  # the first 5% of the run (loss from 10.4 down) would flatten the rest
        ax1.set_ylim(min(late) - 0.1, max(late) + 0.2)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    ax1.set_title(f"95m, 32 x 1024, {any_s['tokens'] / 1e6:.0f}M tokens of local code + docs ({any_s['gpu']})", fontsize=9)
    q = summaries.get("bitnet", {}).get("quant") or []
    styles = {"attn": "-", "ffn": "--"}
    for group in ("attn", "ffn"):
        rows = [(r["step"], r["groups"][group]) for r in q if r.get("groups") and group in r["groups"]]
        if not rows:
            continue
        for key, label, c in (("neg", "-1", "tab:red"), ("zero", "0", "tab:gray"), ("pos", "+1", "tab:green")):
            vals = [g.get(key) for _, g in rows]
            if vals and vals[0] is not None:
                ax2.plot([s * tpk / 1e6 for s, _ in rows], vals, styles[group], color=c, label=f"{group} {label}")
    ax2.axvline(any_s["stage_boundary_step"] * tpk / 1e6, color="gray", ls="--", lw=1)
    ax2.set_xlabel("tokens (M)")
    ax2.set_ylabel("share of ternary weights (BitNet)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_train":
        return train_timed(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="corpus + one model's run, killed and resumed; writes OUT/long_run_<kind>.tar.gz")
    r.add_argument("--kind", choices=["bitnet", "bf16"], required=True)
    r.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"optimizer steps, the same for both models (default {DEFAULT_STEPS:,}: 300.2M tokens)")
    r.add_argument("--budget-s", type=float, default=590.0, help="wall-clock budget from the script's start")
    r.add_argument("--reserve-s", type=float, default=RESERVE_S,
                   help="the wall-clock guard stops the trainer (SIGTERM: checkpoint, exit) this long before the budget")
    r.add_argument("--kill-after", type=int, default=40,
                   help="SIGKILL this many steps past the stage boundary's checkpoint (they are redone)")
    r.add_argument("--warmup", choices=["auto", "on", "off"], default="auto",
                   help="compile a four-step run during the corpus build (auto: when the corpus is built on CUDA)")
    r.add_argument("--warmup-also", default="", metavar="KIND",
                   help="warm the caches of this kind too (bf16 in the bitnet call: the bf16 call on the same "
                        "machine then starts warm)")
    r.add_argument("--warmup-wait-s", type=float, default=15.0,
                   help="after the corpus build, wait at most this long for the warm-up to finish")
    r.add_argument("--tok-s", type=float, default=0.0, help="step rate the plan assumes (0: by GPU and kind)")
    r.add_argument("--lr-peak", type=float, default=1.5e-3, help="peak LR; the schedule keeps the seed's ratios")
    r.add_argument("--preset", default="95m")
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--seq-len", type=int, default=0, help="0: the preset's")
    r.add_argument("--log-interval", type=int, default=10)
    r.add_argument("--eval-sequences", type=int, default=256)
    r.add_argument("--device", default="cuda")
    r.add_argument("--roots", default="", help="comma-separated corpus roots (default: site-packages, "
                                                "/usr/lib/python3*, /usr/share/doc)")
    r.add_argument("--workers", type=int, default=0,
                   help="pack and tokenizer processes (0: all cores, two fewer while the warm-up runs)")
    r.add_argument("--eval-chars", type=int, default=EVAL_CHARS, help="held-out documents: the first reaching this")
    r.add_argument("--work", default="runs/long_run", help="corpus, run directories, timings")
    r.add_argument("--out", default="runs/long_run/out", help="where the archive goes")
    r.add_argument("--sigterm-at", type=int, default=None, metavar="STEP",
                   help="fault injection: SIGTERM the resumed trainer at this step, as the guard would")
    r.add_argument("extra", nargs="*", help="more bitnet-train flags (after --)")
    f = sub.add_parser("finish", help="resume a run a SIGTERM stopped (the guard), in the same work directory")
    f.add_argument("--kind", choices=["bitnet", "bf16"], required=True)
    f.add_argument("--budget-s", type=float, default=590.0, help="wall-clock budget from the script's start")
    f.add_argument("--reserve-s", type=float, default=RESERVE_S, help="the guard fires this long before the budget")
    f.add_argument("--work", default="runs/long_run", help="the work directory of `run`")
    f.add_argument("--out", default="runs/long_run/out", help="where the archive goes")
    q = sub.add_parser("report", help="long_run.json, the plot and the table from the archives")
    q.add_argument("archives", nargs="+")
    q.add_argument("--json", default="benchmarks/results/long_run.json")
    q.add_argument("--png", default="benchmarks/long_run.png")
    q.add_argument("--extract-dir", default="runs/long_run_report")
    q.add_argument("--leg-wall", action="append", default=[], metavar="RUN_ID=SECONDS",
                   help="process wall of a leg run by hand (see with_finishing_legs), timed outside; repeatable")
    args = p.parse_args(argv)
    return {"run": run, "finish": finish, "report": report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
