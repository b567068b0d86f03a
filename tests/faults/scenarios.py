"""The suite's subprocess scenarios. Each runs in a background thread (conftest.py starts them all
at once, so their interpreter start-ups overlap) and returns what the tests then check in-process.

Kill points hinge on files, not on timing: BITNET_TEST_SLOW_CHECKPOINT_S holds every complete
checkpoint under its temp name for SLOW_CHECKPOINT_S seconds before the rename, so "the .tmp dir
has its meta.json" means "killed between the last write and the rename", and "step_X/meta.json
exists" means "killed after step X's checkpoint, before the next one can finish".
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.faults.harness import SLOW_CHECKPOINT_S, Trainer, checkpoint_steps, child_env, flags, last_logged_step, tree

SLOW = {"BITNET_TEST_SLOW_CHECKPOINT_S": SLOW_CHECKPOINT_S}


def _snapshot(trainer: Trainer, run: Path, reached: bool, rc: int) -> dict:
    ckpts = run / "checkpoints"
    return {"run": run, "runs": run.parent, "reached": reached, "returncode": rc,
            "stdout": trainer.stdout, "stderr": trainer.stderr, "last_logged": last_logged_step(run),
            "complete": checkpoint_steps(run),
            "tmp_dirs": sorted(p.name for p in ckpts.glob("*.tmp")) if ckpts.is_dir() else []}


def sigkill_when(work: Path, name: str, condition, env=SLOW, **overrides) -> dict:
    """Start a trainer, SIGKILL it once condition(run_dir) holds, and describe what it left behind."""
    runs = work / "runs"
    trainer = Trainer(flags(runs, name, **overrides), work / "logs" / name, **env)
    reached = trainer.wait_for(lambda: condition(runs / name))
    rc = trainer.kill()
    return _snapshot(trainer, runs / name, reached, rc)


def exists(*parts: str):
    return lambda run: run.joinpath(*parts).exists()


# ---- SIGKILL at several moments (test_kill.py)

def kill_mid_checkpoint_write(work):
    """step_000008.tmp holds a complete checkpoint.pt and meta.json; the rename has not happened."""
    return sigkill_when(work, "k_write", exists("checkpoints", "step_000008.tmp", "meta.json"))


def kill_right_after_rename(work):
    """step_000008 was just renamed into place; the trainer is in steps 9..11 or the next write."""
    return sigkill_when(work, "k_rename", exists("checkpoints", "step_000008", "meta.json"))


def kill_mid_step(work):
    """Between checkpoints: step 13 logged (checkpoint 12 complete), checkpoint 16 not yet complete."""
    return sigkill_when(work, "k_step", lambda run: last_logged_step(run) >= 13)


def kill_during_final_checkpoint(work):
    """The last step's checkpoint is being written (only milestones 11, 12 and 24 are saved)."""
    return sigkill_when(work, "k_final", exists("checkpoints", "step_000024.tmp", "meta.json"),
                        checkpoint_interval=1000)


# ---- graceful stop (test_graceful_stop.py)

def stop_with(work: Path, name: str, sig: int, after_step: int = 5) -> dict:
    runs = work / "runs"
    trainer = Trainer(flags(runs, name), work / "logs" / name, **SLOW)
    reached = trainer.wait_for(lambda: last_logged_step(runs / name) >= after_step)
    trainer.signal(sig)
    rc = trainer.wait()
    return _snapshot(trainer, runs / name, reached, rc)


def sigint(work):
    return stop_with(work, "g_int", signal.SIGINT)


def sigterm(work):
    return stop_with(work, "g_term", signal.SIGTERM)


def double_sigint_mid_write(work):
    """A second Ctrl-C aborts at once, even inside a checkpoint write: the half checkpoint is removed."""
    runs = work / "runs"
    trainer = Trainer(flags(runs, "g_twice"), work / "logs" / "g_twice", **SLOW)
    reached = trainer.wait_for(lambda: exists("checkpoints", "step_000008.tmp", "meta.json")(runs / "g_twice"))
    trainer.signal(signal.SIGINT)
    time.sleep(0.2)
    trainer.signal(signal.SIGINT)
    rc = trainer.wait()
    return _snapshot(trainer, runs / "g_twice", reached, rc)


# ---- a long tiny run, killed twice and resumed with --resume-from auto (test_load.py)

LOAD_STEPS = 2000
LOAD = dict(num_steps=LOAD_STEPS, batch_size=1, seq_len=16, checkpoint_interval=25, keep_last=2, keep_every=0,
            log_interval=1, warmup_steps=10)
"""Batch 1 x 16 tokens on a 320-token byte vocabulary: about 5 ms a step on one CPU thread."""


def byte_tokenizer(path: Path) -> Path:
    """A byte-level tokenizer.json of 259 tokens (<unk>, <s>, </s> + 256 bytes), so the model's embedding
    and head are tiny and thousands of steps take seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path))
    return path


def load_flags(work: Path, run_id: str | None, **extra) -> list[str]:
    config = work / "small_vocab.toml"
    if not config.exists():
        config.write_text("[model]\nvocab_size = 320\n")
    tok = work / "bytes.json"
    if not tok.exists():
        byte_tokenizer(tok)
    return flags(work / "runs", run_id, **{"tokenizer": tok, "config": config, **LOAD, **extra})


def load_chain(work):
    """Run L to a kill near step 600, `--resume-from auto --run-id L` to a kill near step 1300; the test
    finishes the chain in-process."""
    runs = work / "runs"
    first = Trainer(load_flags(work, "L"), work / "logs" / "L")
    first.wait_for(lambda: last_logged_step(runs / "L") >= 600)
    stages = [_snapshot(first, runs / "L", True, first.kill())]
    resume = ["--resume-from", "auto", "--run-id", "L", "--runs-dir", str(runs), "--quiet"]
    second = Trainer(resume, work / "logs" / "L2")
    second.wait_for(lambda: any(last_logged_step(d) >= 1300 for d in runs.glob("L_r*")))
    rc = second.kill()
    (cont,) = runs.glob("L_r*")
    stages.append(_snapshot(second, cont, True, rc))
    return {"runs": runs, "stages": stages, "resume_flags": resume}


# ---- bad input as a user meets it: a real process, nothing but one line on stderr (test_bad_input.py)

class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def bad_input_processes(work):
    runs = work / "runs"
    (runs / "taken" / "meta").mkdir(parents=True)
    (runs / "taken" / "meta" / "config.json").write_text("{}")
    (work / "empty.txt").write_text("")
    marker = work / "pwned"
    torch.save({"model": {}, "step": 1, "config": Payload(marker)}, work / "evil.pt")
    cases = {  # two that fail while parsing flags, two deep in the setup (data; a loaded checkpoint)
        "flag of the wrong type": flags(runs, "a", batch_size="two"),
        "existing run id without --overwrite": flags(runs, "taken"),
        "empty dataset": flags(runs, "b", data=work / "empty.txt"),
        "checkpoint carrying a pickled callable": flags(runs, "d", resume_from=work / "evil.pt"),
    }
    before = tree(runs)
    procs = {name: subprocess.Popen([sys.executable, "-m", "bitnet.cli", *argv], cwd=work, env=child_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, argv in cases.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        results[name] = {"returncode": proc.returncode, "stdout": out, "stderr": err}
    return {"results": results, "tree_before": before, "tree_after": tree(runs), "marker": marker}


SCENARIOS = {
    "test_kill.py": [kill_mid_checkpoint_write, kill_right_after_rename, kill_mid_step,
                     kill_during_final_checkpoint],
    "test_graceful_stop.py": [sigint, sigterm, double_sigint_mid_write],
    "test_load.py": [load_chain],
    "test_bad_input.py": [bad_input_processes],
}
