"""An adversarial campaign over issue 20's fault classes: 100+ cases, run in-process, with totals.

    PYTHONPATH=src python -m tests.faults.campaign            # ~3-6 min on a 2-core CPU
    PYTHONPATH=src python -m tests.faults.campaign --list     # the cases, not run

Not part of `pytest` (it takes minutes); tests/faults/test_fault_classes.py holds the fast tests.
Each case runs a command (`bitnet-train`, `-generate`, `-export`, `-status`) through its `main` in this
process, with stdout/stderr captured, and is judged:

  traceback   an exception escaped the command, or "Traceback" reached its output
  silent      the exit status is not the expected one, or a failure came without its one `error:` /
              `stopped:` line (or without the pieces that name its source), or more than one such line
  data lost   a checkpoint that verified before the case no longer does, or a checkpoint the error
              line names as intact (or saved) does not load as a resume point
  clean       none of these

Full-disk cases mount real tmpfs file systems (root only; otherwise they are skipped and counted so).
"""

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from bitnet.cli.export import main as export_main
from bitnet.cli.generate import main as generate_main
from bitnet.cli.status import main as status_main
from bitnet.model import checkpoint_fit
from bitnet.run import checkpoint, layout
from bitnet.run.directory import lock_run_dir
from tests.faults.harness import flags, one_thread
from tests.faults.scenarios import byte_tokenizer

STEPS = 8
BASE = dict(num_steps=STEPS, checkpoint_interval=2, keep_last=100)
"""harness.BASE with 8 steps (stage boundary at 4) and a checkpoint every 2."""


@dataclass
class Case:
    cls: str
    name: str
    tool: str
    argv: object
    """argv(work) -> the command's arguments (it may write the files they name)."""
    expect: tuple = (2,)
    """Exit statuses that count as right."""
    pieces: tuple = ()
    """Text the error (or stop) line must hold; "{work}" is the case's directory."""
    warn: tuple = ()
    """Text that must appear in `warning:` lines."""
    patch: object = None
    """A context manager factory, entered around the command (simulated faults at library boundaries)."""
    setup: object = None
    """setup(work) before the snapshot of intact checkpoints (runs the case must not damage)."""
    check: object = None
    """check(work, out, err) -> a problem (str) or None, after the standard judgement."""
    needs_root: bool = False


@dataclass
class Result:
    case: Case
    verdict: str
    detail: str = ""
    seconds: float = 0.0
    extra: list = field(default_factory=list)


# ---------------------------------------------------------------------------- shared material

class Material:
    """Built once: a finished reference run (checkpoints 2..8) and the small-vocabulary flags."""

    def __init__(self, root: Path):
        self.root = root
        self.tok = byte_tokenizer(root / "bytes.json")
        self.small = root / "small_vocab.toml"
        self.small.write_text("[model]\nvocab_size = 320\n")
        self.ref_runs = root / "ref_runs"
        rc = run_tool("train", flags(self.ref_runs, "ref", **BASE))[0]
        assert rc == 0, "the reference run failed"
        self.ref = self.ref_runs / "ref"

    def copy_run(self, work: Path, run_id: str = "S", drop=()) -> Path:
        dst = work / "runs" / run_id
        shutil.copytree(self.ref, dst)
        for step in drop:
            shutil.rmtree(dst / "checkpoints" / layout.step_dir_name(step))
        return dst


def run_tool(tool: str, argv: list[str]) -> tuple[int | None, str, str, str]:
    """(exit status or None, stdout, stderr, traceback text if an exception escaped)."""
    mains = {"train": __import__("bitnet.cli.train", fromlist=["train_main"]).train_main, "generate": generate_main,
             "export": export_main, "status": status_main}
    out, err = io.StringIO(), io.StringIO()
    tb = ""
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), one_thread(), warnings.catch_warnings():
        warnings.simplefilter("default")
        try:
            rc = mains[tool](argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            rc, tb = None, traceback.format_exc()
    return rc, out.getvalue(), err.getvalue(), tb


def intact(root: Path) -> dict[Path, str]:
    """Every checkpoint under root that verifies now: step dir -> sha256."""
    found = {}
    for meta in root.rglob("step_*/meta.json"):
        with contextlib.suppress(checkpoint.CheckpointError), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found[meta.parent] = checkpoint.verify(meta.parent)["sha256"]
    return found


def judge(case: Case, work: Path, mat: Material) -> Result:
    if case.setup:
        case.setup(work, mat)
    before = intact(work)
    argv = case.argv(work, mat)
    patch = case.patch(work) if case.patch else contextlib.nullcontext()
    t0 = time.perf_counter()
    with patch:
        rc, out, err, tb = run_tool(case.tool, argv)
    seconds = time.perf_counter() - t0
    if tb or "Traceback" in out + err:
        return Result(case, "traceback", (tb or err).strip().splitlines()[-1][:200], seconds)
    # data lost: checkpoints intact before must still be; checkpoints the message names must load
    for step_dir, sha in before.items():
        try:
            if checkpoint.verify(step_dir)["sha256"] != sha:
                return Result(case, "data lost", f"{step_dir} changed", seconds)
        except checkpoint.CheckpointError as e:
            return Result(case, "data lost", str(e), seconds)
    named = re.findall(r"(?:newest intact checkpoint: |resume with: bitnet-train --resume-from )(\S+)", err + out)
    for path in named:
        if path.rstrip(";") == "none":
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                checkpoint_fit.load(path.rstrip(";").strip("'"), need="resume")
        except checkpoint.CheckpointError as e:
            return Result(case, "data lost", f"named checkpoint does not load: {e}", seconds)
    # silent: the wrong status, or no (or more than one) line saying why
    lines = err.splitlines()
    said = [line for line in lines if line.startswith(("error: ", "stopped: "))]
    others = [line for line in lines if not line.startswith(("error: ", "stopped: ", "warning: "))]
    if rc not in case.expect:
        return Result(case, "silent", f"exit {rc}, expected {case.expect}: {err.strip()[-200:]}", seconds)
    if rc != 0 and (len(said) != 1 or others):
        return Result(case, "silent", f"exit {rc} with stderr {err.strip()[-300:]!r}", seconds)
    text = said[0] if said else ""
    for piece in case.pieces:
        if piece.format(work=work) not in text:
            return Result(case, "silent", f"{piece!r} not in {text!r}", seconds)
    warned = " ".join(line for line in lines if line.startswith("warning: "))
    for piece in case.warn:
        if piece.format(work=work) not in warned:
            return Result(case, "silent", f"no warning with {piece!r}: {err.strip()[-200:]!r}", seconds)
    if case.check:
        problem = case.check(work, out, err)
        if problem:
            return Result(case, "silent", problem, seconds)
    return Result(case, "clean", "", seconds)


# ---------------------------------------------------------------------------- case builders

def train_argv(run_id="c", **overrides):
    return lambda work, mat: flags(work / "runs", run_id, **{**BASE, **overrides})


def small_argv(run_id="c", **overrides):
    return lambda work, mat: flags(work / "runs", run_id, **{**BASE, "tokenizer": mat.tok, "config": mat.small,
                                                            **overrides})


def reseal(step_dir: Path) -> None:
    meta = json.loads((step_dir / "meta.json").read_text())
    meta["sha256"] = hashlib.sha256((step_dir / "checkpoint.pt").read_bytes()).hexdigest()
    (step_dir / "meta.json").write_text(json.dumps(meta))


def spoil_state(fn):
    """A mutation of the loaded checkpoint dict, saved back and resealed (it passes its checksum)."""
    def apply(step_dir: Path):
        state = torch.load(step_dir / "checkpoint.pt", weights_only=True)
        state = fn(state)
        torch.save(state, step_dir / "checkpoint.pt")
        reseal(step_dir)
    return apply


def _set(path, value):
    def fn(state):
        target = state
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value(target[path[-1]]) if callable(value) else value
        return state
    return fn


def _meta(text):
    return lambda step_dir: (step_dir / "meta.json").write_text(text)


# how to spoil step 8 of a copy of the reference run; the piece of the message; does inference still work?
SPOILERS = {
    "meta.json null": (_meta("null"), "not a checkpoint manifest", False),
    "meta.json a number": (_meta("42"), "not a checkpoint manifest", False),
    "meta.json without sha256": (_meta('{"step": 8}'), "not a checkpoint manifest", False),
    "meta.json sha256 a number": (_meta('{"step": 8, "sha256": 5}'), "not a checkpoint manifest", False),
    "meta.json empty": (_meta(""), "incomplete", False),
    "checkpoint a list": (spoil_state(lambda s: [s["step"]]), "holds a list", False),
    "checkpoint a tensor": (spoil_state(lambda s: torch.zeros(2)), "holds a Tensor", False),
    "model entry a list": (spoil_state(_set(["model"], [1])), "'model' entry is a list", False),
    "model entry empty": (spoil_state(_set(["model"], {})), "missing", False),
    "transposed weight": (spoil_state(_set(["model", "layers.0.self_attn.o_proj.weight"], lambda t: t.t().contiguous()[:, :-1])),
                          "has shape", False),
    "embedding of another vocab": (spoil_state(_set(["model", "embed_tokens.weight"], lambda t: t[:1000])),
                                   "embed_tokens.weight", False),
    "config a string": (spoil_state(_set(["config"], "tiny")), "'config' entry is a str", False),
    "model config unknown key": (spoil_state(_set(["config", "model", "width"], 3)), "model config is unusable", False),
    "model config of another size": (spoil_state(_set(["config", "model", "dim"], 128)), "has shape", False),
    "no step": (spoil_state(_set(["step"], KeyError)), "no step entry", False),
    "step a bool": (spoil_state(_set(["step"], True)), "'step' entry is a bool", False),
    "no tokens": (spoil_state(_set(["tokens"], KeyError)), None, True),
    "no train config": (spoil_state(_set(["config", "train"], KeyError)), None, True),
    "optimizer a list": (spoil_state(_set(["optimizer"], [])), None, True),
    "optimizer without groups": (spoil_state(_set(["optimizer", "param_groups"], KeyError)), None, True),
    "optimizer state of an unknown parameter": (spoil_state(_set(["optimizer", "state", 999], {})), None, True),
    "train_state a list": (spoil_state(_set(["train_state"], [])), None, True),
    "train_state tokens a string": (spoil_state(_set(["train_state", "tokens"], "many")), None, True),
    "rng without numpy": (spoil_state(_set(["rng", "numpy"], KeyError)), None, True),
}


def checkpoint_cases() -> list[Case]:
    cases = []
    for name, (spoil, piece, usable) in SPOILERS.items():
        def setup(work, mat, spoil=spoil):
            run = mat.copy_run(work, "S")
            spoil(run / "checkpoints" / "step_000008")
            (work / "runs" / "S" / "checkpoints" / "step_000008" / ".spoiled").write_text("")

        step8 = lambda work, mat: work / "runs" / "S" / "checkpoints" / "step_000008"  # noqa: E731
        cases.append(Case("2 unusable checkpoint", f"train --resume-from: {name}", "train",
                          lambda work, mat, step8=step8: flags(work / "runs", "T", resume_from=step8(work, mat)),
                          (2,), ("step_000008",) + ((piece,) if piece else ()), setup=setup))
        inference = (0,) if usable else (2,)
        cases.append(Case("2 unusable checkpoint", f"generate: {name}", "generate",
                          lambda work, mat, step8=step8: ["--checkpoint", str(step8(work, mat)), "--prompt", "The",
                                                          "--max-new-tokens", "2"],
                          inference, (piece,) if piece and not usable else (), setup=setup))
        cases.append(Case("2 unusable checkpoint", f"export: {name}", "export",
                          lambda work, mat, step8=step8: [str(step8(work, mat)), "--out", str(work / "exp"), "--quiet"],
                          inference, (piece,) if piece and not usable else (), setup=setup))
        if name in ("meta.json null", "checkpoint a list", "model entry empty", "no tokens", "optimizer a list",
                    "rng without numpy", "transposed weight"):
            # the run directory resumes from the newest checkpoint that loads (6), naming what it skipped
            cases.append(Case("2 unusable checkpoint", f"auto-resume falls back past: {name}", "train",
                              lambda work, mat: ["--resume-from", "auto", "--run-id", "S", "--runs-dir",
                                                 str(work / "runs"), "--quiet"],
                              (0,), warn=("skipping checkpoint", "step_000008"), setup=setup,
                              check=lambda work, out, err: None if (work / "runs" / "S_r6").is_dir()
                              else "did not resume from step 6"))
            cases.append(Case("2 unusable checkpoint", f"status of a run with: {name}", "status",
                              lambda work, mat: [str(work / "runs" / "S")], (0,), setup=setup))
    # every checkpoint unusable (the initial weights of step 0 dropped too): one line naming what was skipped
    def all_bad(work, mat):
        run = mat.copy_run(work, "S", drop=(0, 2, 3, 4))
        for step in (6, 8):
            _meta("[]")(run / "checkpoints" / layout.step_dir_name(step))
    cases.append(Case("2 unusable checkpoint", "auto-resume with no usable checkpoint", "train",
                      lambda work, mat: ["--resume-from", "auto", "--run-id", "S", "--runs-dir", str(work / "runs")],
                      (2,), ("step_000008", "no older checkpoint", "step_000006"), setup=all_bad))
    cases.append(Case("2 unusable checkpoint", "export of a run dir with no usable checkpoint", "export",
                      lambda work, mat: [str(work / "runs" / "S"), "--out", str(work / "exp")],
                      (2,), ("step_000008", "no older checkpoint"), setup=all_bad))
    def loose(work, mat):
        shutil.copytree(mat.ref / "checkpoints" / "step_000006", work / "loose")
        (work / "loose" / "meta.json").unlink()
    cases.append(Case("2 unusable checkpoint", "train from a step dir without meta.json", "train",
                      lambda work, mat: flags(work / "runs", "T", resume_from=work / "loose", **BASE), (0,),
                      warn=("unverified",), setup=loose))
    cases.append(Case("2 unusable checkpoint", "generate from a step dir without meta.json", "generate",
                      lambda work, mat: ["--checkpoint", str(work / "loose"), "--prompt", "A", "--max-new-tokens", "1"],
                      (0,), warn=("unverified",), setup=loose))
    return cases


def jsonl(rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


TEXT = "Four score and seven years ago our fathers brought forth on this continent a new nation. "
ROWS = [{"text": f"{i} " + TEXT * 2} for i in range(80)]


def write(name: str, content: bytes):
    def make(work, mat):
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return path
    return make


def file_cases() -> list[Case]:
    cases = []
    configs = {  # file name, content, pieces
        "yaml bool key": ("c.yaml", b"true: 3\n", ("c.yaml", "key True is a bool")),
        "yaml float key": ("c.yaml", b"1.5: x\n", ("c.yaml", "key 1.5")),
        "yaml null key": ("c.yaml", b"~: 3\n", ("c.yaml", "key None")),
        "yaml list key": ("c.yaml", b"? [a, b]\n: 3\n", ("c.yaml",)),
        "yaml list for an int": ("c.yaml", b"num_steps: [1, 2]\n", ("num_steps in config file must be int",)),
        "yaml table for a str": ("c.yaml", b"data: {a: 1}\n", ("data in config file must be str",)),
        "yaml date for a float": ("c.yaml", b"lr_peak: 2024-01-01\n", ("lr_peak in config file must be float",)),
        "toml datetime for an int": ("c.toml", b"seed = 1979-05-27T07:32:00Z\n", ("seed in config file must be int",)),
        "toml array of tables": ("c.toml", b"[[model]]\ndim = 3\n", ("'model' entry must be a table",)),
        "config latin-1": ("c.yaml", "data: caf\xe9\n".encode("latin-1"), ("c.yaml", "not UTF-8")),
        "config UTF-16": ("c.toml", "num_steps = 3\n".encode("utf-16"), ("c.toml", "not UTF-8")),
        "config binary": ("c.toml", bytes(range(256)), ("c.toml",)),
    }
    for name, (fname, content, pieces) in configs.items():
        cases.append(Case("3 wrong shape", f"config: {name}", "train",
                          lambda work, mat, f=fname, c=content: flags(work / "runs", "c", config=write(f, c)(work, mat)),
                          (2,), pieces))
    gz = gzip.compress(jsonl(ROWS), compresslevel=1)
    data = {
        "text a bool": ("d.jsonl", jsonl([{"text": True}] + ROWS), ("d.jsonl", "'text' is a bool", "byte 0")),
        "text a float": ("d.jsonl", jsonl(ROWS[:5] + [{"text": 1.5}] + ROWS), ("d.jsonl", "'text' is a float")),
        "text an object": ("d.jsonl", jsonl(ROWS[:1] + [{"text": {"a": 1}}]), ("d.jsonl", "'text' is a dict")),
        "row a list": ("d.jsonl", jsonl(ROWS[:2]) + b"[1, 2]\n", ("d.jsonl", "has no 'text' field")),
        "key not text": ("d.jsonl", jsonl([{"body": "x"}]), ("d.jsonl", "has no 'text' field")),
        "latin-1 row": ("d.jsonl", jsonl(ROWS[:4]) + '{"text": "caf\xe9"}\n'.encode("latin-1"), ("d.jsonl", "not UTF-8")),
        "UTF-16 file": ("d.jsonl", jsonl(ROWS[:4]).decode().encode("utf-16"), ("d.jsonl",)),
        "gz cut at 10%": ("d.jsonl.gz", gz[:len(gz) // 10], ("d.jsonl.gz", "truncated or corrupt compressed")),
        "gz cut at 50%": ("d.jsonl.gz", gz[:len(gz) // 2], ("d.jsonl.gz", "truncated or corrupt compressed")),
        "gz cut 8 bytes short": ("d.jsonl.gz", gz[:-8], ("d.jsonl.gz", "truncated or corrupt compressed")),
        "gz header only": ("d.jsonl.gz", gz[:10], ("d.jsonl.gz",)),
        "gz flipped bytes": ("d.jsonl.gz", gz[:40] + bytes(b ^ 0xFF for b in gz[40:80]) + gz[80:], ("d.jsonl.gz",)),
        "not gz at all": ("d.jsonl.gz", jsonl(ROWS), ("d.jsonl.gz",)),
        "bad file in a directory": ("dir/b.jsonl", jsonl([{"text": 3}]), ("b.jsonl", "'text' is a int")),
    }
    for name, (fname, content, pieces) in data.items():
        def argv(work, mat, f=fname, c=content):
            path = write(f, c)(work, mat)
            if f.startswith("dir/"):
                write("dir/a.jsonl", jsonl(ROWS))(work, mat)
                path = work / "dir"
            return flags(work / "runs", "c", data=path, eval_sequences=2, **BASE)
        cases.append(Case("3 wrong shape", f"data: {name}", "train", argv, (2,), pieces))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        def parquet(kind):
            def argv(work, mat):
                path = work / "d.parquet"
                if kind == "int column":
                    pq.write_table(pa.table({"text": pa.array([1, 2, 3])}), path)
                elif kind == "truncated":
                    pq.write_table(pa.table({"text": [TEXT * 3] * 200}), path)
                    os.truncate(path, path.stat().st_size // 2)
                return flags(work / "runs", "c", data=path, eval_sequences=2, **BASE)
            return argv
        cases.append(Case("3 wrong shape", "data: parquet of ints", "train", parquet("int column"), (2,),
                          ("d.parquet", "holds int64, not strings")))
        cases.append(Case("3 wrong shape", "data: truncated parquet", "train", parquet("truncated"), (2,),
                          ("d.parquet",)))
    except ImportError:
        pass
    # reached mid-run: block 0 (2,048 windows of 33 tokens) is good, the next holds the bad row
    good = jsonl([{"text": "abcdefghij klmnopqrst uvwxyz " * 4}] * 800)
    mid = {
        "text an int": ("m.jsonl", good + jsonl([{"text": 5}])),
        "text null then a list": ("m.jsonl", good + jsonl([{"text": None}, {"text": ["x"]}])),
        "invalid JSON": ("m.jsonl", good + b'{"text": "unterminated\n'),
        "latin-1 row": ("m.jsonl", good + '{"text": "na\xefve"}\n'.encode("latin-1")),
        "gz cut short": ("m.jsonl.gz", gzip.compress(good + jsonl(ROWS * 5))[:-200]),
    }
    for name, (fname, content) in mid.items():
        def check(work, out, err, fname=fname):
            found = re.search(r"checkpoint of step (\d+) saved", err)
            if not found or int(found[1]) < 20:
                return f"no checkpoint of the steps done: {err.strip()!r}"
            return None
        cases.append(Case("3 wrong shape", f"mid-run in the prefetch thread: {name}", "train",
                          lambda work, mat, f=fname, c=content: flags(
                              work / "runs", "m", data=write(f, c)(work, mat), batch_size=64, seq_len=32,
                              num_steps=200, warmup_steps=5, checkpoint_interval=1000, eval_sequences=4,
                              tokenizer=mat.tok, config=mat.small),
                          (1,), (fname, "bad training data at step", "resume with"), check=check))
    return cases


@contextlib.contextmanager
def oom_at(target, attr, call):
    real = getattr(target, attr)
    calls = {"n": 0}

    def fake(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.\nSee documentation.")
        return real(*args, **kwargs)

    setattr(target, attr, fake)
    try:
        yield
    finally:
        setattr(target, attr, real)


def size_cases() -> list[Case]:
    cases = []
    for batch in (2**16, 2**24, 2**31, 2**45):
        cases.append(Case("4 sizes", f"--batch-size {batch}", "train", train_argv(batch_size=batch), (2,),
                          ("GiB", "--micro-batch-size")))
    for micro in (2**18, 2**30):
        cases.append(Case("4 sizes", f"--micro-batch-size {micro}", "train",
                          train_argv(batch_size=micro * 2, micro_batch_size=micro), (2,), ("GiB",)))
    for seq in (257, 10**6, 2**40):
        cases.append(Case("4 sizes", f"--seq-len {seq}", "train", train_argv(seq_len=seq), (2,),
                          ("exceeds the model's context",)))
    for n in (2**36, 10**15):
        cases.append(Case("4 sizes", f"--eval-sequences {n}", "train", train_argv(eval_sequences=n, no_eval=False),
                          (2,), ("--eval-sequences", "GiB")))
    for n in (257, 10**9):
        cases.append(Case("4 sizes", f"--sample-max-tokens {n}", "train",
                          train_argv(sample_max_tokens=n, sample_interval=4), (2,), ("--sample-max-tokens",)))
    for where, (target, attr), call, step in [
            ("backward", (torch.Tensor, "backward"), 3, 3), ("backward", (torch.Tensor, "backward"), 7, 7),
            ("cross entropy", (F, "cross_entropy"), 5, 5), ("AdamW step", (torch.optim.AdamW, "step"), 6, 6)]:
        cases.append(Case("4 sizes", f"CUDA OOM in the {where} of step {step}", "train", train_argv(), (1,),
                          (f"out of memory at step {step}", "--micro-batch-size (now 2)", "--seq-len (now 16)",
                           "newest intact checkpoint"),
                          patch=lambda work, t=target, a=attr, c=call: oom_at(t, a, c)))
    return cases


def message_cases() -> list[Case]:
    cases = []
    for seed in (2**32, 2**63, 2**64, 10**30, -5):
        cases.append(Case("5 messages", f"--seed {seed}", "train", train_argv(seed=seed), (2,), ("--seed must be in",)))
    cases.append(Case("5 messages", "seed 2**40 in a TOML file", "train",
                      lambda work, mat: flags(work / "runs", "c", config=write("s.toml", b"seed = 1099511627776\n")(
                          work, mat), **BASE), (2,), ("--seed must be in",)))
    cases.append(Case("5 messages", "sample prompts in latin-1", "train",
                      lambda work, mat: flags(work / "runs", "c", sample_interval=4, sample_prompts=write(
                          "p.txt", "caf\xe9\n".encode("latin-1"))(work, mat), **BASE), (2,), ("p.txt", "not UTF-8")))
    cases.append(Case("5 messages", "tokenizer.json not UTF-8", "train",
                      lambda work, mat: flags(work / "runs", "c", tokenizer=write("t.json", b"\xff\xfe{}")(work, mat),
                                              **BASE), (2,), ("t.json",)))
    cases.append(Case("5 messages", "a warning during setup is one line", "train", train_argv(), (0,),
                      warn=("heads up: this warning spans several lines",),
                      patch=lambda work: warn_in_build_data(),
                      check=lambda work, out, err: "a two-line warning leaked" if "UserWarning" in err else None))
    return cases


@contextlib.contextmanager
def warn_in_build_data():
    import bitnet.train.loop as loop

    real = loop.build_data

    def noisy(*args, **kwargs):
        warnings.warn("heads up: this warning\nspans several lines", UserWarning)
        return real(*args, **kwargs)

    loop.build_data = noisy
    try:
        yield
    finally:
        loop.build_data = real


@contextlib.contextmanager
def nan_at(call):
    real = F.cross_entropy
    calls = {"n": 0}

    def fake(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == call else loss

    F.cross_entropy = fake
    try:
        yield
    finally:
        F.cross_entropy = real


def exit_and_resume_cases() -> list[Case]:
    cases = []
    for step in (1, 4, 7):
        cases.append(Case("6 exit codes", f"--anomaly-policy stop at step {step}", "train",
                          train_argv(anomaly_policy="stop"), (3,), ("stopped: anomaly policy stop", f"at step {step}"),
                          patch=lambda work, s=step: nan_at(s)))
    cases.append(Case("6 exit codes", "--anomaly-policy warn goes on", "train", train_argv(anomaly_policy="warn"),
                      (0,), patch=lambda work: nan_at(3)))

    def resume_printed(work, out, err):
        command = next((line.strip() for line in out.splitlines() if line.strip().startswith("bitnet-train ")), None)
        if command is None:
            return "no resume command printed"
        import shlex

        argv = shlex.split(command)[1:]
        rc, _, err2, tb = run_tool("train", argv + ["--quiet"])
        if rc != 0 or tb:
            return f"the printed command failed: {err2.strip()[-200:]}"
        if not any(p.name.startswith("c_r") for p in Path(argv[argv.index("--runs-dir") + 1]).iterdir()):
            return "the continuation is not in the same runs directory"
        return None

    for runs in ("my runs", "nested/dir/runs"):
        cases.append(Case("7 resume", f"the printed resume command, runs dir {runs!r}", "train",
                          lambda work, mat, r=runs: flags(work / r, "c", anomaly_policy="stop", **BASE), (3,),
                          patch=lambda work: nan_at(5), check=resume_printed))
    for form in ("checkpoints", "checkpoints/", "."):
        cases.append(Case("7 resume", f"--resume-from runs/<id>/{form}", "train",
                          lambda work, mat, f=form: ["--resume-from", str(work / "runs" / "S" / f) + (
                              "/" if f.endswith("/") else ""), "--runs-dir", str(work / "runs"), "--quiet"],
                          (0,), setup=lambda work, mat: mat.copy_run(work, "S", drop=(8,)),
                          check=lambda work, out, err: None if (work / "runs" / "ref_r6").is_dir() else "no ref_r6"))

    @contextlib.contextmanager
    def held(work):
        f = lock_run_dir(work / "runs" / "S")
        try:
            yield
        finally:
            f.close()

    cases.append(Case("7 resume", "auto-resume while the run is live", "train",
                      lambda work, mat: ["--resume-from", "auto", "--run-id", "S", "--runs-dir", str(work / "runs")],
                      (2,), ("another run of 'S' is in progress",),
                      setup=lambda work, mat: mat.copy_run(work, "S", drop=(8,)), patch=held))

    @contextlib.contextmanager
    def racer(work):
        import bitnet.train.loop as loop

        real = loop.build_data

        def first(*args, **kwargs):
            (work / "runs" / "S_r6" / "meta").mkdir(parents=True)
            return real(*args, **kwargs)

        loop.build_data = first
        try:
            yield
        finally:
            loop.build_data = real

    cases.append(Case("7 resume", "two auto-resumes race for one continuation", "train",
                      lambda work, mat: ["--resume-from", "auto", "--run-id", "S", "--runs-dir", str(work / "runs")],
                      (2,), ("another resume of run 'S' is in progress",),
                      setup=lambda work, mat: mat.copy_run(work, "S", drop=(8,)), patch=racer))
    return cases


def schedule_cases() -> list[Case]:
    cases = []
    for warmup, steps in ((4, 8), (8, 8), (100, 40), (21, 40)):
        cases.append(Case("8 schedules", f"--warmup-steps {warmup} of {steps} steps", "train",
                          train_argv(warmup_steps=warmup, num_steps=steps), (2,),
                          (f"--warmup-steps {warmup} does not end before the stage boundary",)))
    for boundary in (1.0, 0.0, 1.0000001, -1.0, 2.0):
        cases.append(Case("8 schedules", f"--stage-boundary {boundary}", "train", train_argv(stage_boundary=boundary),
                          (2,), ("--stage-boundary must be in (0, 1)",)))
    cases.append(Case("8 schedules", "--stage-boundary 0.01 after a warmup of 2", "train",
                      train_argv(stage_boundary=0.01), (2,), ("does not end before the stage boundary at step 1",)))
    for steps in (1, 3, 9):  # the preset's warmup (30), not asked for, fits itself before the boundary
        cases.append(Case("8 schedules", f"preset warmup on a {steps}-step run", "train",
                          lambda work, mat, s=steps: flags(work / "runs", "c", **{**BASE, "num_steps": s,
                                                                                   "warmup_steps": None}), (0,)))
    return cases


@contextlib.contextmanager
def ballast(mnt: Path, leave_bytes: int):
    """Fill the tmpfs but `leave_bytes`."""
    st = os.statvfs(mnt)
    size = max(st.f_bavail * st.f_frsize - leave_bytes, 0)
    with open(mnt / "ballast", "wb") as f:
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        while size > 0:
            f.write(chunk[:min(size, len(chunk))])
            size -= min(size, len(chunk))
    yield


def disk_cases() -> list[Case]:
    cases = []
    for size, policy, interval in (("2m", "stop", 2), ("2m", "continue", 2), ("3m", "stop", 3), ("3m", "continue", 3),
                                   ("5m", "stop", 2), ("5m", "continue", 2)):
        cases.append(Case("1 full disk", f"tmpfs of {size}, --on-checkpoint-error {policy}, every {interval}", "train",
                          lambda work, mat, p=policy, i=interval: flags(
                              work / "mnt" / "runs", "f", **{**BASE, "num_steps": 12, "checkpoint_interval": i,
                                                             "keep_last": 100, "on_checkpoint_error": p,
                                                             "tokenizer": mat.tok, "config": mat.small}),
                          (1,), ("No space left on device",), setup=mount(size), needs_root=True))
    for leave in (0, 4096, 64 << 10, 600 << 10):
        cases.append(Case("1 full disk", f"tmpfs with {leave} bytes free at the start", "train",
                          lambda work, mat: flags(work / "mnt" / "runs", "f", **{**BASE, "tokenizer": mat.tok,
                                                                                 "config": mat.small}),
                          (1, 2), ("No space left on device",), setup=mount("4m", leave), needs_root=True))
    return cases


MOUNTS: list[Path] = []


def mount(size: str, leave: int | None = None):
    def setup(work, mat):
        mnt = work / "mnt"
        mnt.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                              text=True)
        if done.returncode:
            raise PermissionError(done.stderr.strip() or "mount refused")
        MOUNTS.append(mnt)
        if leave is not None:
            with ballast(mnt, leave):
                pass
    return setup


def all_cases() -> list[Case]:
    return (disk_cases() + checkpoint_cases() + file_cases() + size_cases() + message_cases()
            + exit_and_resume_cases() + schedule_cases())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("-k", default="", help="run only cases whose class or name contains this")
    ap.add_argument("--verbose", action="store_true", help="one line per case")
    args = ap.parse_args(argv)
    cases = [c for c in all_cases() if args.k in f"{c.cls} {c.name}"]
    if args.list:
        for c in cases:
            print(f"{c.cls:24s} {c.name}")
        print(f"{len(cases)} cases")
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results: list[Result] = []
    skipped = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bitnet-campaign-") as tmp:
        root = Path(tmp)
        mat = Material(root)
        for i, case in enumerate(cases):
            work = root / f"case{i:03d}"
            work.mkdir()
            try:
                result = judge(case, work, mat)
            except PermissionError as e:
                skipped.append((case, str(e)))
                continue
            except Exception:  # the campaign's own setup failed: say so, never count it as a verdict
                print(f"SETUP FAILED {case.cls}: {case.name}\n{traceback.format_exc()}", flush=True)
                skipped.append((case, "setup failed"))
                continue
            finally:
                while MOUNTS:
                    subprocess.run(["umount", "-l", str(MOUNTS.pop())], capture_output=True)
            results.append(result)
            if args.verbose or result.verdict != "clean":
                print(f"{result.verdict:9s} {result.seconds:5.1f}s  {case.cls}: {case.name}"
                      + (f"  -- {result.detail}" if result.detail else ""), flush=True)
            shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - t0
    verdicts = ("clean", "traceback", "silent", "data lost")
    print("\n| class | tried | clean | traceback | silent | data lost |")
    print("|---|---|---|---|---|---|")
    for cls in sorted({r.case.cls for r in results}):
        mine = [r for r in results if r.case.cls == cls]
        print(f"| {cls} | {len(mine)} | " + " | ".join(str(sum(r.verdict == v for r in mine)) for v in verdicts) + " |")
    print(f"| **total** | **{len(results)}** | " + " | ".join(
        f"**{sum(r.verdict == v for r in results)}**" for v in verdicts) + " |")
    if skipped:
        print(f"\nskipped {len(skipped)} (not counted): {skipped[0][1]}")
    print(f"\n{len(results)} cases in {wall:.0f} s")
    bad = sum(r.verdict in ("traceback", "data lost") for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
