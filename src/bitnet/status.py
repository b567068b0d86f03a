"""Read-only monitor for one training run (docs/design.md, "run directory"; bitnet.run.layout).

A run killed and resumed lives in several directories, its legs: X, then X_r<step> (each continuation's
meta/provenance.json names the checkpoint it resumed from). Given any leg, the monitor reads the legs
before it too: curves, evals, samples and quant stats are joined at the resume steps (a killed leg's
steps past the checkpoint were redone by the next leg, whose rows replace them), elapsed time and the
sustained speed add every leg's time, and an anomaly that the killed leg dumped and the next leg
dumped again when it redid the step counts once.

Prints a text summary, one JSON object (--json) or a dashboard plot (--plot OUT.png|.html) of a
run, refreshing with --watch. Standard library only (matplotlib is imported lazily by plot()), it
never writes inside the run directory and it tolerates files a live trainer is appending to.

    python check_training_status.py runs/<id> [--watch [SECONDS]] [--json] [--plot OUT.png]
The command line (bitnet-status) is bitnet/cli/status.py.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from bitnet.run import layout
from bitnet.run.directory import base_run_id
from bitnet.run.jsonl import JsonlReader
from bitnet.run.startup import startup_line

MAX_SMOOTHING = 20  # default loss moving-average window in rows: a fifth of the rows, at most this
RECENT_ROWS = 20  # rows behind the medians (tok/s, step_ms, seconds per step): robust to one slow step
STALL_FACTOR = 5.0  # a last row older than this many typical row intervals is flagged "stalled?"
STALL_MIN_S = 60.0  # ... but never sooner than this, so eval or checkpoint pauses don't trip it
SAMPLE_CHARS = 80
_PROVENANCE_KEYS = ("git_commit", "git_dirty", "command", "host", "gpu", "torch", "cuda", "seed",
                    "start_time", "process_start_time", "resumed_from")


class StatusError(Exception):
    """A problem worth one `error: ...` line (bad path, bad flags), not a traceback."""


# ---------------------------------------------------------------------------- reading

def load_json(path) -> dict:
    """A JSON object file, {} if missing or unreadable (it may be mid-write)."""
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _num(x):
    """x as a finite float, else None: rows may hold null, NaN, strings or nothing at all."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def _int(x):
    """x as an int (counts: steps, tokens), else None."""
    x = _num(x)
    return None if x is None else int(x)


def _dict(x) -> dict:
    return x if isinstance(x, dict) else {}


def _median(xs):
    return statistics.median(xs) if xs else None


def _listdir(d: Path) -> list[Path]:
    return list(d.iterdir()) if d.is_dir() else []


def _by_step(rows: list[dict]) -> list[dict]:
    """Rows with an integer step, sorted; a step logged twice (after a resume) keeps its last row."""
    by_step = {}
    for row in rows:
        step = _num(row.get("step"))
        if step is not None:  # copy only when needed: a long run's scalars can be 100k+ rows
            by_step[int(step)] = row if type(row["step"]) is int else dict(row, step=int(step))
    return [by_step[s] for s in sorted(by_step)]


def _xy(rows: list[dict], key: str) -> tuple[list, list]:
    """Steps and finite values of one key, for medians and plots."""
    pairs = [(r["step"], _num(r.get(key))) for r in rows]
    pairs = [(s, v) for s, v in pairs if v is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


def rolling_mean(values: list[float], window: int) -> list[float]:
    """Trailing moving average; the first window-1 points average what exists so far."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _anomalies(run: Path) -> list[tuple[int, str, Path]]:
    """(step, event, dir) of one directory's anomaly dumps, oldest first."""
    found = []
    for p in _listdir(run / layout.ANOMALIES):
        m = layout.ANOMALY_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), m.group(2), p))
    return sorted(found)


MAX_LEGS = 1000  # a chain of resumed_from links longer than this is cut (a loop of hand-edited files)


def _is_run_dir(d: Path) -> bool:
    return d.is_dir() and ((d / layout.META).is_dir() or (d / layout.METRICS).is_dir())


def resumed_from_leg(run: Path, resumed_from) -> tuple[Path | None, int | None]:
    """(the run directory a continuation resumed from, the checkpoint's step), from its provenance's
    resumed_from: .../<run>/checkpoints/step_000500[/checkpoint.pt]. The path was recorded as given to
    the trainer (maybe relative to another working directory), so a sibling of `run` with that name is
    looked for first. (None, None): a fresh run; (None, step): a checkpoint from outside any run dir."""
    if not isinstance(resumed_from, str) or not resumed_from:
        return None, None
    ckpt = Path(resumed_from)
    if ckpt.name == layout.CHECKPOINT_FILE:
        ckpt = ckpt.parent
    m = layout.STEP_DIR.match(ckpt.name)
    if not m:
        return None, None
    step = int(m.group(1))
    if ckpt.parent.name != layout.CHECKPOINTS:
        return None, step
    for d in (run.parent / ckpt.parent.parent.name, ckpt.parent.parent):
        if _is_run_dir(d) and d.resolve() != run.resolve():
            return d, step
    return None, step


def run_legs(run_dir) -> list[dict]:
    """The legs of the run that `run_dir` continues, oldest first, `run_dir` last: {"dir", "resumed_step",
    "provenance"}; resumed_step is the checkpoint step a leg started from (None: a fresh start)."""
    legs, seen, d = [], set(), Path(run_dir)
    while d is not None and d.resolve() not in seen and len(legs) < MAX_LEGS:
        seen.add(d.resolve())
        prov = load_json(d / layout.PROVENANCE)
        prev, step = resumed_from_leg(d, prov.get("resumed_from"))
        legs.insert(0, {"dir": d, "resumed_step": step, "provenance": prov})
        d = prev
    return legs


def continued_in(run_dir) -> list[str]:
    """Ids of the runs that resumed from a checkpoint of `run_dir` (its family's directories beside it)."""
    run = Path(run_dir)
    if not run.parent.is_dir():
        return []
    out = []
    for d in sorted(run.parent.iterdir()):
        if d.name != run.name and base_run_id(d.name) == base_run_id(run.name) and _is_run_dir(d):
            prev, _ = resumed_from_leg(d, load_json(d / layout.PROVENANCE).get("resumed_from"))
            if prev is not None and prev.resolve() == run.resolve():
                out.append(d.name)
    return out


def _joined(legs: list[dict], rel: str, reader: JsonlReader) -> list[dict]:
    """One JSONL file of every leg, rows by step: each leg up to the step the next leg resumed from (the
    later steps it ran were redone by that leg), a step logged twice keeping its last row."""
    rows = []
    for i, leg in enumerate(legs):
        upto = legs[i + 1]["resumed_step"] if i + 1 < len(legs) else None
        part = reader.read(leg["dir"] / rel)
        rows += part if upto is None else [r for r in part if (_num(r.get("step")) or 0) <= upto]
    return rows


def _leg_anomalies(legs: list[dict]) -> tuple[list[tuple[int, str, Path]], int]:
    """(step, event, dir) of every leg's dumps, one per (step, event): a dump repeated by the leg that
    redid its step (the newer one kept); and how many repeats were dropped."""
    found = {}
    total = 0
    for leg in legs:
        for step, event, d in _anomalies(leg["dir"]):
            found[(step, event)] = d
            total += 1
    unique = sorted((step, event, d) for (step, event), d in found.items())
    return unique, total - len(unique)


def _leg_start(provenance: dict) -> float | None:
    """A leg's process start: the process's own start where provenance has it (imports, CUDA start-up and data
    setup came before provenance was written: 8-10 s a process on the GPU), else when provenance was written."""
    start, written = _num(provenance.get("process_start_time")), _num(provenance.get("start_time"))
    return start if start is not None and written is not None and start <= written else written


def _leg_spans(legs: list[dict], reader: JsonlReader) -> list[dict]:
    """Each leg's first and last scalar-row times, tokens and steps (all its rows: time spent redoing
    steps counts), and its process start time (provenance)."""
    spans = []
    for leg in legs:
        rows = _by_step(reader.read(leg["dir"] / layout.SCALARS))
        # the first and the last row that has a time (a search from each end: a leg can have 400k rows)
        first = next(((r, t) for r in rows if (t := _num(r.get("time"))) is not None), None)
        last = next(((r, t) for r in reversed(rows) if (t := _num(r.get("time"))) is not None), None)
        span = {"run_id": leg["dir"].name, "resumed_step": leg["resumed_step"], "rows": len(rows),
                "first_step": rows[0]["step"] if rows else None, "last_step": rows[-1]["step"] if rows else None,
                "start_time": _leg_start(leg["provenance"]), "first_time": None, "last_time": None}
        if first:
            span.update(first_time=first[1], last_time=last[1], first_tokens=_int(first[0].get("tokens")))
        spans.append(span)
    return spans


# ---------------------------------------------------------------------------- summary

def auto_smoothing(n_rows: int) -> int:
    """Moving-average window for a run of n_rows scalar rows: a fifth of them, 1..MAX_SMOOTHING.
    A fixed 20-row window would lag far behind the loss of a 30-row run."""
    return max(1, min(MAX_SMOOTHING, n_rows // 5))


def summarize(run_dir, smoothing: int | None = None, now: float | None = None,
              reader: JsonlReader | None = None) -> dict:
    """Everything the screen, --json and the plot show, as one JSON-able dict (None = not known), over
    every leg of the run that `run_dir` continues (the module's docstring).
    smoothing: the loss moving-average window in rows (None: auto_smoothing of the run's rows).
    reader: keeps the rows parsed so far across calls (--watch parses only what was appended)."""
    run = Path(run_dir)
    reader = reader or JsonlReader()
    if not run.is_dir():
        raise StatusError(f"no such run directory: {run}" if not run.exists() else f"not a directory: {run}")
    if not ((run / layout.META).is_dir() or (run / layout.METRICS).is_dir()):
        raise StatusError(f"not a run directory (no meta/ or metrics/): {run}")
    now = time.time() if now is None else now
    config, prov = load_json(run / layout.CONFIG), load_json(run / layout.PROVENANCE)
    train_cfg, model_cfg = _dict(config.get("train")), _dict(config.get("model"))
    s = {"run_id": run.resolve().name, "run_dir": str(run), "now": now,
         "provenance": {k: prov.get(k) for k in _PROVENANCE_KEYS},
         "model": {k: v for k, v in model_cfg.items() if isinstance(v, (int, float, str, bool))},
         "train_config": {k: train_cfg.get(k) for k in ("num_steps", "batch_size", "seq_len", "grad_accum")}}

    legs = run_legs(run)
    resumed_steps = [leg["resumed_step"] or 0 for leg in legs]

    def leg_of(step: int) -> int:  # the leg whose rows hold this step
        return max(i for i, r in enumerate(resumed_steps) if i == 0 or r < step)

    # Training scalars. Progress counts optimizer steps, so gradient accumulation cannot distort it.
    rows = _by_step(_joined(legs, layout.SCALARS, reader))
    smoothing = auto_smoothing(len(rows)) if smoothing is None else smoothing
    s["smoothing"] = smoothing
    recent = rows[-RECENT_ROWS:]
    last = rows[-1] if rows else {}
    step = last.get("step")
    num_steps = _num(train_cfg.get("num_steps"))
    num_steps = int(num_steps) if num_steps and num_steps > 0 else None
    losses = _xy(rows[-smoothing:], "loss")[1]  # finite losses among the last `smoothing` rows
    step_ms = _median(_xy(recent, "step_ms")[1])
    # Wall seconds per step between consecutive rows of one leg: includes eval/checkpoint time that step_ms
    # omits (a restart between legs does not count: it is no per-step cost).
    tail = list(zip(*_xy(rows[-RECENT_ROWS - 1:], "time")))
    pairs = [(s1 - s0, t1 - t0) for (s0, t0), (s1, t1) in zip(tail, tail[1:])
             if s1 > s0 and t1 >= t0 and leg_of(s0) == leg_of(s1)]
    wall_s_per_step = _median([dt / ds for ds, dt in pairs])
    row_interval_s = _median([dt for _, dt in pairs])
    remaining = max(num_steps - step, 0) if num_steps and step is not None else None
    age_s = now - tail[-1][1] if tail else None
    finished = bool(num_steps and step is not None and step >= num_steps)
    stalled = None if age_s is None or row_interval_s is None else (
        not finished and age_s > max(STALL_FACTOR * row_interval_s, STALL_MIN_S))
    mems = _xy(rows, "mem_gib")[1]
    # Elapsed: each leg from its process start (setup, compile and a restart's recompile count) to its
    # last row, redone steps included; the legs summed. The tokens gained cover the same span: from 0
    # at a fresh run's start. Where the first leg's start is unknown (or it is a continuation whose
    # predecessor is not found), both count from its first row. A leg without a timed row (one that died
    # in its setup) adds nothing: its time is not in the run directory.
    spans = _leg_spans(legs, reader)
    timed = [(i, sp) for i, sp in enumerate(spans) if sp["last_time"] is not None]
    elapsed, tokens_at_start = None, None
    for n, (i, sp) in enumerate(timed):
        from_start = sp["start_time"] is not None and sp["start_time"] <= sp["first_time"]
        if n == 0:
            from_start = from_start and legs[i]["resumed_step"] is None
            tokens_at_start = 0 if from_start else sp.get("first_tokens")
        elapsed = (elapsed or 0.0) + sp["last_time"] - (sp["start_time"] if from_start else sp["first_time"])
    tokens = _int(last.get("tokens"))
    gained = tokens - tokens_at_start if tokens is not None and tokens_at_start is not None else None
    s["legs"] = [{k: sp[k] for k in ("run_id", "resumed_step", "first_step", "last_step", "rows")} for sp in spans]
    s["continued_in"] = continued_in(run)
    if s["continued_in"]:  # a killed leg is no stalled run: it went on elsewhere
        stalled = False
    s.update({
        "step": step, "num_steps": num_steps, "rows": len(rows),
        "pct_done": 100.0 * step / num_steps if num_steps and step is not None else None,
        "tokens": tokens,
        "loss": _num(last.get("loss")), "loss_raw": repr(last.get("loss")) if "loss" in last else None,
        "loss_smoothed": statistics.fmean(losses[-smoothing:]) if losses else None,
        "lr": _num(last.get("lr")), "wd": _num(last.get("wd")), "grad_norm": _num(last.get("grad_norm")),
        "tok_s": _median(_xy(recent, "tok_s")[1]), "step_ms": step_ms, "wall_s_per_step": wall_s_per_step,
        "eta_s": remaining * step_ms / 1000.0 if remaining is not None and step_ms is not None else None,
        "eta_wall_s": remaining * wall_s_per_step if remaining is not None and wall_s_per_step is not None else None,
        "elapsed_s": elapsed,
        "tok_s_sustained": gained / elapsed if gained is not None and elapsed else None,
        "mem_gib": _num(last.get("mem_gib")), "mem_gib_max": max(mems) if mems else None,
        "gpu_sm_mhz": _num(last.get("gpu_sm_mhz")), "gpu_power_w": _num(last.get("gpu_power_w")),
        "last_row_age_s": age_s, "row_interval_s": row_interval_s, "stalled": stalled, "finished": finished,
    })

    evals = _by_step(_joined(legs, layout.EVAL_RESULTS, reader))
    s["eval"] = None
    if evals:
        e = evals[-1]
        eval_loss, train_loss, gap = _num(e.get("eval_loss")), _num(e.get("train_loss")), _num(e.get("gap"))
        if gap is None and eval_loss is not None and train_loss is not None:
            gap = eval_loss - train_loss
        ppl = _num(e.get("eval_ppl"))
        if ppl is None and eval_loss is not None and eval_loss < 700:
            ppl = math.exp(eval_loss)
        eval_steps, eval_losses = _xy(evals, "eval_loss")
        best = min(zip(eval_losses, eval_steps), default=(None, None))  # (lowest loss, its step)
        s["eval"] = {"step": e["step"], "eval_loss": eval_loss, "eval_ppl": ppl, "train_loss": train_loss,
                     "gap": gap, "best_eval_loss": best[0], "best_step": best[1], "count": len(evals)}

    # Samples: the newest step only, first row of each mode (one line per mode on screen).
    samples = [r for r in _joined(legs, layout.SAMPLES_FILE, reader) if _num(r.get("step")) is not None]
    s["samples"] = None
    if samples:
        newest = max(_num(r["step"]) for r in samples)
        by_mode = {}
        for r in samples:
            if _num(r["step"]) == newest:
                by_mode.setdefault(str(r.get("mode")), r)
        s["samples"] = {"step": int(newest), "modes": [
            {"mode": mode, "prompt": r.get("prompt"), "text": "" if r.get("text") is None else str(r["text"]),
             **{k: _num(r.get(k)) for k in ("mean_entropy", "max_repetition", "unique_ratio")},
             "unique_tokens": _int(r.get("unique_tokens"))}
            for mode, r in by_mode.items()]}

    quant = [(q["step"], _quant_groups(q)) for q in _by_step(_joined(legs, layout.QUANT, reader))]
    quant = [(step, g) for step, g in quant if g]
    s["quant"] = {"first_step": quant[0][0], "latest_step": quant[-1][0], "first": quant[0][1],
                  "latest": quant[-1][1]} if quant else None

    found, repeated = _leg_anomalies(legs)
    starts = reader.read(legs[-1]["dir"] / layout.STARTUP)  # this leg's process: not yet there before its step
    s["startup"] = starts[-1] if starts else None
    s["anomalies"] = {"count": len(found), "repeated_after_resume": repeated, "latest": [p.name for _, _, p in found[-3:]],
                      "latest_message": load_json(found[-1][2] / layout.ANOMALY_INFO).get("message") if found else None}

    ckpts, incomplete, deleting, broken = [], 0, [], []
    for i, leg in enumerate(legs):  # a killed leg's checkpoints past the step the next leg resumed from are dead ends
        upto = legs[i + 1]["resumed_step"] if i + 1 < len(legs) else None
        for p in _listdir(leg["dir"] / layout.CHECKPOINTS):
            m = layout.STEP_DIR.match(p.name)
            if m and upto is not None and int(m.group(1)) > upto:
                continue
            if m:  # a step directory is complete by construction (written as .tmp, renamed last)
                problem = checkpoint_problem(p)
                if problem:
                    broken.append({"name": p.name, "problem": problem})
                else:
                    ckpts.append(int(m.group(1)))
            elif p.name.endswith(layout.TMP_SUFFIX):  # being written: the rename is still to come
                incomplete += 1
            elif p.name.endswith(layout.DELETING_SUFFIX):  # pruned: being deleted, or left by a kill mid-prune
                deleting.append(str(p.relative_to(leg["dir"].parent)))
    s["checkpoints"] = {"latest_step": max(ckpts, default=None), "count": len(ckpts), "incomplete": incomplete,
                        "broken": sorted(broken, key=lambda b: b["name"]), "deleting": sorted(deleting)}
    return s


def checkpoint_problem(step_dir: Path) -> str | None:
    """Why a step directory is no usable checkpoint, from its manifest alone (the monitor never hashes or
    loads a checkpoint: a 95m one is a gigabyte): meta.json missing, unreadable or no manifest,
    checkpoint.pt missing, or of another size than meta.json records. None: it looks sound (the trainer
    still checks its sha256 before resuming from it)."""
    try:
        meta = json.loads((step_dir / layout.CHECKPOINT_META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no meta.json"
    except (OSError, ValueError):
        return "meta.json unreadable"
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
        return "meta.json is no checkpoint manifest"
    try:
        size = (step_dir / layout.CHECKPOINT_FILE).stat().st_size
    except OSError:
        return "no checkpoint.pt"
    recorded = meta.get("bytes")  # written since 2026-12-06; older manifests have no size
    if isinstance(recorded, int) and not isinstance(recorded, bool) and size != recorded:
        return f"checkpoint.pt has {size:,} bytes, meta.json records {recorded:,}"
    return None


def _quant_groups(row: dict) -> dict:
    """{"attn": {"neg", "zero", "pos"}, "ffn": {...}} with only groups whose three fractions are finite."""
    out = {}
    for name, g in _dict(row.get("groups")).items():
        fr = {k: _num(_dict(g).get(k)) for k in ("neg", "zero", "pos")}
        if None not in fr.values():
            out[str(name)] = fr
    return out


# ---------------------------------------------------------------------------- text

def _f(x, spec: str = ".4g") -> str:
    return "n/a" if x is None else format(x, spec)


def _count(x) -> str:
    """Human count: 163.8M, 13.1B."""
    if x is None:
        return "n/a"
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def _dur(sec) -> str:
    """Compact duration: 42s, 5m12s, 2h03m, 3d04h."""
    if sec is None:
        return "n/a"
    sec = int(round(sec))
    d, h, m, s_ = sec // 86400, sec % 86400 // 3600, sec % 3600 // 60, sec % 60
    return f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s_:02d}s" if m else f"{s_}s"


def _one_line(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def render_text(s: dict) -> str:
    """The screen: one topic a line, 'none yet' where the trainer has not written a file yet."""
    p, tc = s["provenance"], s["train_config"]
    commit = str(p.get("git_commit") or "n/a")[:10] + (" (dirty)" if p.get("git_dirty") else "")
    lines = [f"run        {s['run_id']}   commit {commit}   gpu {p.get('gpu') or 'n/a'}   host {p.get('host') or 'n/a'}"]
    model = " ".join(f"{k}={s['model'][k]}" for k in ("dim", "n_layers", "n_heads", "vocab_size") if k in s["model"])
    lines.append(f"config     {model or 'n/a'}   batch {tc.get('batch_size') or '?'} x {tc.get('seq_len') or '?'} tok"
                 f"   grad_accum {tc.get('grad_accum') or 1}")
    if s["step"] is None:
        lines.append("progress   no scalar rows yet (metrics/scalars.jsonl)")
    else:
        pct = f" ({s['pct_done']:.2f}%)" if s["pct_done"] is not None else ""
        lines += [
            f"progress   step {s['step']:,} / {_f(s['num_steps'], ',')}{pct}   tokens {_count(s['tokens'])}"
            + ("   FINISHED" if s["finished"] else ""),
            f"loss       {_f(s['loss'], '.4f') if s['loss'] is not None else s['loss_raw']} (last)   "
            f"{_f(s['loss_smoothed'], '.4f')} (mean of last {s['smoothing']} rows)",
            f"optim      lr {_f(s['lr'], '.3e')}   wd {_f(s['wd'], '.3g')}   grad_norm {_f(s['grad_norm'], '.4g')}",
            f"speed      {_count(s['tok_s'])} tok/s   {_f(s['step_ms'], '.1f')} ms/step   "
            f"sustained {_count(s['tok_s_sustained'])} tok/s   "
            f"mem {_f(s['mem_gib'], '.1f')} GiB (max {_f(s['mem_gib_max'], '.1f')})"
            + (f"   GPU {s['gpu_sm_mhz']:,.0f} MHz {s['gpu_power_w']:,.0f} W" if s["gpu_sm_mhz"] is not None
               and s["gpu_power_w"] is not None else ""),
            f"time       elapsed {_dur(s['elapsed_s'])}"
            + (f" ({len(s['legs'])} legs)" if len(s["legs"]) > 1 else "") + f"   ETA {_dur(s['eta_s'])} (step_ms) / "
            f"{_dur(s['eta_wall_s'])} (wall)   last row {_dur(s['last_row_age_s'])} ago"
            + ("   stalled?" if s["stalled"] else ""),
        ]
    e = s["eval"]
    lines.append("eval       none yet" if e is None else
                 f"eval       step {e['step']:,}: loss {_f(e['eval_loss'], '.4f')}  ppl {_f(e['eval_ppl'], '.2f')}  "
                 f"gap {_f(e['gap'], '+.4f')}   (best {_f(e['best_eval_loss'], '.4f')} @ {_f(e['best_step'], ',')})")
    sm = s["samples"]
    lines.append("samples    none yet" if sm is None else f"samples    step {sm['step']:,}")
    for r in (sm or {}).get("modes", []):
        uniq = f"{r['unique_tokens']} " if r["unique_tokens"] is not None else ""
        lines.append(f"  {r['mode']:<8} ent {_f(r['mean_entropy'], '.2f')} uniq {uniq}({_f(r['unique_ratio'], '.2f')})  "
                     f"{json.dumps(_one_line(r['text'], SAMPLE_CHARS), ensure_ascii=False)}")
    q = s["quant"]
    if q is None:  # a bf16 twin (quantization "none") has no ternary weights to measure
        plain = s["model"].get("quantization") == "none"
        lines.append("quant      n/a (quantization none: no ternary layers)" if plain else "quant      none yet")
    for i, name in enumerate(sorted(q["latest"]) if q else []):
        a, b = q["first"].get(name), q["latest"][name]
        fr = lambda g: "/".join(f"{g[k]:.3f}" for k in ("neg", "zero", "pos")) if g else "n/a"
        lines.append(f"{'quant' if i == 0 else '':<10} {name:<5} -1/0/+1 {fr(a)} (step {q['first_step']:,}) -> "
                     f"{fr(b)} (step {q['latest_step']:,})")
    an = s["anomalies"]
    repeats = an["repeated_after_resume"]
    lines.append("anomalies  none yet" if not an["count"] else
                 f"anomalies  {an['count']} (latest: {', '.join(an['latest'])})"
                 + (f" ({repeats} dumped again by a resumed leg, counted once)" if repeats else "")
                 + (f"  {_one_line(an['latest_message'], 60)!r}" if an["latest_message"] else ""))
    lines.append("startup    none yet" if s["startup"] is None else f"startup    {startup_line(s['startup'])}")
    ck = s["checkpoints"]
    lines.append(("checkpoint none yet" if ck["latest_step"] is None else
                  f"checkpoint step {ck['latest_step']:,} ({ck['count']} complete)")
                 + (f", {ck['incomplete']} in progress" if ck["incomplete"] else ""))
    if ck["deleting"]:  # a kill mid-prune leaves one in a run that its continuation no longer prunes
        lines.append(f"pruned     {len(ck['deleting'])} checkpoint dir(s) being deleted or left by a kill "
                     f"(safe to remove): {', '.join(ck['deleting'][-3:])}")
    if ck["broken"]:
        lines.append(f"BROKEN     {len(ck['broken'])} checkpoint(s), not usable to resume: "
                     + "; ".join(f"{b['name']} ({b['problem']})" for b in ck["broken"][-3:]))
    lines.append(f"resumed    {p.get('resumed_from') or 'no (fresh run)'}")
    if len(s["legs"]) > 1:  # the directories this summary joined, and where each leg's rows were cut
        legs = s["legs"]
        parts = []
        for i, leg in enumerate(legs):
            upto = legs[i + 1]["resumed_step"] if i + 1 < len(legs) else None
            ran = f"steps {_f(leg['first_step'], ',')}-{_f(leg['last_step'], ',')}" if leg["rows"] else "no rows"
            redone = (f", redone after {upto:,}" if upto is not None and leg["last_step"] is not None
                      and leg["last_step"] > upto else "")
            parts.append(f"{leg['run_id']} ({ran}{redone})")
        lines.append("legs       " + " -> ".join(parts))
    if s["continued_in"]:
        lines.append(f"continued  in {', '.join(s['continued_in'])} (this leg was resumed there)")
    return "\n".join(lines)


def _json_safe(x):
    """Strict JSON for scripts: NaN/inf become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x if x is None or isinstance(x, (str, int, float, bool)) else str(x)


def render_json(s: dict) -> str:
    """The summary as one line of strict JSON (bitnet-status --json)."""
    return json.dumps(_json_safe(s), allow_nan=False)


def plot_message(out, s: dict) -> str:
    """What --plot prints after drawing summary `s` into `out`."""
    return f"wrote {out} (step {_f(s['step'], ',')})"


# ---------------------------------------------------------------------------- plot

def refuse_inside_run(run: Path, out: Path) -> None:
    """StatusError if `out` lies inside the run directory: the monitor never writes there."""
    r, o = run.resolve(), out.resolve()
    if o == r or r in o.parents:
        raise StatusError(f"refusing to write {out} inside the run directory {run} (status is read-only)")


def plot(run_dir, out, smoothing: int | None = None, refresh_s: float | None = None,
         reader: JsonlReader | None = None) -> dict:
    """Write a 2x3 dashboard as PNG, or as HTML embedding the PNG when `out` ends in .html
    (refresh_s adds an auto-reload for --watch). Uses the Agg canvas directly, never pyplot, so no
    global backend state changes. Returns the summary it drew."""
    run, out = Path(run_dir), Path(out)
    refuse_inside_run(run, out)
    reader = reader or JsonlReader()
    s = summarize(run, smoothing, reader=reader)
    smoothing = s["smoothing"]
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise StatusError("--plot needs matplotlib (pip install matplotlib)") from None

    legs = run_legs(run)
    rows = _by_step(_joined(legs, layout.SCALARS, reader))
    fig = Figure(figsize=(16, 9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    (ax_loss, ax_lr, ax_gn), (ax_tok, ax_q, ax_gap) = fig.subplots(2, 3)
    pct = f" ({s['pct_done']:.1f}%)" if s["pct_done"] is not None else ""
    e = s["eval"] or {}
    fig.suptitle(f"{s['run_id']}   step {_f(s['step'], ',')} / {_f(s['num_steps'], ',')}{pct}   "
                 f"tokens {_count(s['tokens'])}   ETA {_dur(s['eta_wall_s'] or s['eta_s'])}\n"
                 f"loss {_f(s['loss'], '.4f')} (smoothed {_f(s['loss_smoothed'], '.4f')})   eval "
                 f"{_f(e.get('eval_loss'), '.4f')} (gap {_f(e.get('gap'), '+.3f')})   {_count(s['tok_s'])} tok/s   "
                 f"updated {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(s['now']))}", fontsize=13)

    def frame(ax, title, has_data):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not has_data:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="0.5")
        return has_data

    def panel(ax, title, key, color="C2", smooth=True):
        """One scalar over steps: raw (faint) plus its moving average; False if there is no data."""
        xs, ys = _xy(rows, key)
        if frame(ax, title, bool(xs)):
            ax.plot(xs, ys, color=color, lw=0.6 if smooth else 1.5, alpha=0.35 if smooth else 1, label=f"{key} (raw)",
                    marker="o" if len(xs) == 1 else None)  # a lone first row is invisible as a line
            if smooth:
                ax.plot(xs, rolling_mean(ys, smoothing), color=color, lw=1.5, label=f"mean of {smoothing} rows")
        return bool(xs)

    evals = _by_step(_joined(legs, layout.EVAL_RESULTS, reader))
    if panel(ax_loss, "loss (orange lines: anomalies)", "loss", "C0"):
        ex, ey = _xy(evals, "eval_loss")
        if ex:
            ax_loss.plot(ex, ey, "o-", color="C3", ms=4, lw=1, label="eval_loss")
        for step, _, _ in _leg_anomalies(legs)[0][-100:]:
            ax_loss.axvline(step, color="C1", lw=0.8, alpha=0.4)
        ax_loss.legend(fontsize=8)
    if panel(ax_lr, "learning rate (solid) and weight decay (dashed)", "lr", "C0", smooth=False):
        ax_lr.set_ylabel("lr", color="C0")
        ax_wd = ax_lr.twinx()
        ax_wd.plot(*_xy(rows, "wd"), color="C1", ls="--")
        ax_wd.set_ylabel("weight decay", color="C1")
    if panel(ax_gn, "grad norm (before clipping)", "grad_norm"):
        ys = _xy(rows, "grad_norm")[1]
        if min(ys) > 0 and max(ys) / min(ys) > 100:  # early spikes would flatten the rest
            ax_gn.set_yscale("log")
    panel(ax_tok, "tokens / s", "tok_s")
    gx, gy = _xy(evals, "gap")
    if frame(ax_gap, "eval loss - train loss (gap)", bool(gx)):
        ax_gap.plot(gx, gy, "o-", color="C3", ms=4)
        ax_gap.axhline(0, color="0.5", lw=0.8)

    quant = [(q["step"], _quant_groups(q)) for q in _by_step(_joined(legs, layout.QUANT, reader))]
    if frame(ax_q, "ternary weight fractions (attn solid, ffn dashed)", any(g for _, g in quant)):
        for name, ls in (("attn", "-"), ("ffn", "--")):
            for k, label, color, lw in (("neg", "-1", "C0", 2.5), ("zero", "0", "0.4", 1.5), ("pos", "+1", "C3", 1.2)):
                pts = [(step, g[name][k]) for step, g in quant if name in g]
                if pts:
                    ax_q.plot(*zip(*pts), ls=ls, lw=lw, color=color, label=f"{name} {label}")
        ax_q.set_ylim(0, 1)
        ax_q.legend(fontsize=8, ncol=2)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = buf.getvalue()
    if out.suffix.lower() in (".html", ".htm"):
        meta = f'<meta http-equiv="refresh" content="{max(1, round(refresh_s))}">' if refresh_s else ""
        data = (f"<!doctype html><html><head><meta charset='utf-8'>{meta}<title>{html.escape(s['run_id'])}</title>"
                f"</head><body><img style='max-width:100%' src='data:image/png;base64,"
                f"{base64.b64encode(data).decode('ascii')}'><pre>{html.escape(render_text(s))}</pre></body></html>"
                ).encode("utf-8")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # next to `out`, so outside the run dir
    try:
        tmp.write_bytes(data)
        os.replace(tmp, out)  # a browser reloading the file never sees half of it
    finally:
        tmp.unlink(missing_ok=True)
    return s


# ---------------------------------------------------------------------------- command line

def watch(render, interval_s: float, max_iterations: int | None = None, sleep=None, clear: bool = True,
          stream=None, finished=None) -> int:
    """Call render() and print it every interval_s until Ctrl-C (exit 0), or until finished() says the
    run is done (after showing it once more). Errors show on screen instead of ending the loop,
    since a run dir can briefly look odd while files are replaced."""
    stream, sleep = stream or sys.stdout, sleep or time.sleep
    done = 0
    try:
        while max_iterations is None or done < max_iterations:
            try:
                text = render()
            except (StatusError, OSError) as e:
                text = f"error: {e}"
            over = finished is not None and finished()
            stream.write(("\033[2J\033[H" if clear else "") + text + "\n")
            if clear:
                stream.write("\n(the run has finished; stopped watching)\n" if over else
                             f"\n(refresh every {interval_s:g}s, Ctrl-C to quit)\n")
            stream.flush()
            done += 1
            if over:
                break
            if max_iterations is None or done < max_iterations:
                sleep(interval_s)
    except KeyboardInterrupt:
        stream.write("\n")
    return 0
