"""Issue 20: one test (or a table of them) per fault class. Every fault ends in one `error:` line (or
one `warning:` line and a run that goes on), the exit status README.md documents, no traceback, and
the newest checkpoint intact.

Classes: 1 a real full file system (tmpfs), 2 checkpoints that pass their checksum but cannot be
used, 3 files of the wrong shape (also reached mid-run, in the prefetch thread), 4 sizes that cannot
fit and CUDA out-of-memory, 5 messages that name their source, 6 exit codes, 7 resume ergonomics,
8 schedules that contradict themselves.
"""

import gzip
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import warnings

import pytest
import torch
import torch.nn.functional as F

from bitnet import exits
from bitnet.cli.export import main as export_main
from bitnet.cli.generate import main as generate_main
from bitnet.cli.status import main as status_main
from bitnet.model import checkpoint_fit
from bitnet.run import checkpoint
from bitnet.run.directory import lock_run_dir
from tests.faults.harness import BASE, checkpoint_steps, flags, logged_steps, train, tree
from tests.faults.scenarios import byte_tokenizer


def one_error_line(err: str, *pieces: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for piece in pieces:
        assert piece in lines[0], (piece, err)
    return lines[0]


def small_vocab(tmp_path) -> dict:
    """Flags for a model with a 320-token byte vocabulary: checkpoints of ~1.6 MB, steps of milliseconds."""
    config = tmp_path / "small_vocab.toml"
    config.write_text("[model]\nvocab_size = 320\n")
    tok = tmp_path / "bytes.json"
    if not tok.exists():
        byte_tokenizer(tok)
    return {"tokenizer": tok, "config": config}


# ---- 1. a real full file system -------------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """A 3 MiB tmpfs (one checkpoint of the small-vocab model fits, two do not); skipped where mounting is refused."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_a_real_full_tmpfs_at_checkpoint_time(policy, tmpfs, tmp_path, capsys):
    runs = tmpfs / "runs"
    argv = flags(runs, "full", on_checkpoint_error=policy, keep_last=5, **small_vocab(tmp_path))
    assert train(argv) == exits.FAILED
    captured = capsys.readouterr()
    kept = runs / "full" / "checkpoints" / "step_000004"
    one_error_line(captured.err, "No space left on device", f"newest intact checkpoint: {kept}")
    assert sorted(os.listdir(runs / "full" / "checkpoints")) == ["step_000000", "step_000004"]  # no half one, no .tmp
    assert checkpoint_fit.load(kept, need="resume")["step"] == 4
    if policy == "stop":  # it stopped at the first failed checkpoint
        assert logged_steps(runs / "full") == list(range(1, 9))
    else:  # it went on to the end, warning at each failed checkpoint; only the final one must succeed
        assert logged_steps(runs / "full") == list(range(1, BASE["num_steps"] + 1))
        warned = [line for line in captured.out.splitlines() if line.startswith("warning: checkpoint of step")]
        assert len(warned) >= 3 and all("No space left on device" in w and "training goes on" in w for w in warned)


def test_a_full_tmpfs_before_the_run_starts_is_a_failure_not_bad_input(tmpfs, tmp_path, capsys):
    """The disk is full before the run directory gets its first file: exit 1 (the machine), one line."""
    with open(tmpfs / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    assert train(flags(tmpfs / "runs", "setup", **small_vocab(tmp_path))) == exits.FAILED
    one_error_line(capsys.readouterr().err, "No space left on device")


# ---- 2. checkpoints that pass their checksum but cannot be used -----------------------------------

def reseal(step_dir):
    """Rewrite meta.json's sha256 so the (edited) checkpoint.pt passes its checksum."""
    meta = json.loads((step_dir / "meta.json").read_text())
    meta["sha256"] = hashlib.sha256((step_dir / "checkpoint.pt").read_bytes()).hexdigest()
    (step_dir / "meta.json").write_text(json.dumps(meta))


def edit(key_path, value=None, drop=False):
    def apply(step_dir):
        state = torch.load(step_dir / "checkpoint.pt", weights_only=True)
        target = state
        for key in key_path[:-1]:
            target = target[key]
        if drop:
            del target[key_path[-1]]
        else:
            target[key_path[-1]] = value(target[key_path[-1]]) if callable(value) else value
        torch.save(state, step_dir / "checkpoint.pt")
        reseal(step_dir)
    return apply


UNUSABLE = {  # name: (how to spoil a copy of step 20, a piece of the error; None: only a resume needs it)
    "meta.json a list": (lambda d: (d / "meta.json").write_text("[1, 2]"), "not a checkpoint manifest"),
    "meta.json a string": (lambda d: (d / "meta.json").write_text('"x"'), "not a checkpoint manifest"),
    "no model entry": (edit(["model"], drop=True), "no model entry"),
    "no config entry": (edit(["config"], drop=True), "no config entry"),
    "config not a table": (edit(["config"], [1, 2]), "'config' entry is a list"),
    "no model config": (edit(["config", "model"], drop=True), "config has no model"),
    "bad model config": (edit(["config", "model", "dim"], -3), "model config is unusable"),
    "weight of the wrong shape": (edit(["model", "norm.weight"], torch.zeros(3)), "has shape (3,)"),
    "missing weight": (edit(["model", "norm.weight"], drop=True), "'norm.weight' missing"),
    "extra weight": (edit(["model", "ghost.weight"], torch.zeros(1)), "unexpected weight 'ghost.weight'"),
    "weight not a tensor": (edit(["model", "norm.weight"], "text"), "is a str, not a tensor"),
    "step not an int": (edit(["step"], "twenty"), "'step' entry is a str"),
    "no optimizer": (edit(["optimizer"], drop=True), None),
    "no train state": (edit(["train_state"], drop=True), None),
    "no rng": (edit(["rng"], drop=True), None),
    "optimizer of another model": (edit(["optimizer", "param_groups"], lambda g: g[:1]), None),
    "optimizer moment of the wrong shape": (edit(["optimizer", "state", 0, "exp_avg"], torch.zeros(2)), None),
    "train state without a step": (edit(["train_state", "step"], drop=True), None),
}


@pytest.fixture
def spoiled(reference, tmp_path):
    def make(name):
        run = tmp_path / "runs" / "S"
        shutil.copytree(reference, run)
        UNUSABLE[name][0](run / "checkpoints" / "step_000020")
        return run
    return make


@pytest.mark.parametrize("name", list(UNUSABLE))
def test_every_tool_says_one_line_about_an_unusable_checkpoint(name, spoiled, tmp_path, capsys):
    run = spoiled(name)
    step_dir = run / "checkpoints" / "step_000020"
    piece = UNUSABLE[name][1]
    # train: refused as a resume point, one line, nothing written
    before = tree(tmp_path)
    assert train(flags(tmp_path / "runs", "resumed", resume_from=step_dir)) == exits.BAD_INPUT
    one_error_line(capsys.readouterr().err, str(step_dir), piece or "cannot be used")
    assert tree(tmp_path) == before
    # generate and export need only the weights and the config
    rc_gen = generate_main(["--checkpoint", str(step_dir), "--prompt", "The", "--max-new-tokens", "2"])
    gen = capsys.readouterr()
    rc_exp = export_main([str(step_dir), "--out", str(tmp_path / "export"), "--quiet"])
    exp = capsys.readouterr()
    if piece is None:  # usable for inference: both work
        assert rc_gen == 0 and rc_exp == 0, (gen.err, exp.err)
    else:
        assert rc_gen == rc_exp == exits.BAD_INPUT
        one_error_line(gen.err, piece)
        one_error_line(exp.err, piece)
    # status never loads a checkpoint: it reads the run without a traceback
    assert status_main([str(run)]) == 0
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("how", ["auto", "run dir", "checkpoints dir"])
def test_resume_falls_back_to_the_newest_checkpoint_that_loads(how, spoiled, reference, tmp_path, capsys):
    from tests.faults.harness import assert_matches_reference

    run = spoiled("no optimizer")
    runs = tmp_path / "runs"
    edit(["model", "norm.weight"], drop=True)(run / "checkpoints" / "step_000024")
    tail = {"auto": ["--resume-from", "auto", "--run-id", "S"], "run dir": ["--resume-from", str(run)],
            "checkpoints dir": ["--resume-from", str(run / "checkpoints")]}[how]
    assert train(tail + ["--runs-dir", str(runs), "--quiet"]) == exits.DONE
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("warning: skipping checkpoint: ") for line in err), err
    assert "step_000024" in err[0] and "'norm.weight' missing" in err[0]
    assert "step_000020" in err[1] and "no optimizer entry" in err[1]
    new_run = runs / ("S_r16" if how == "auto" else "ref_r16")
    assert_matches_reference(new_run, reference, 17)


def test_a_checkpoint_without_meta_json_loads_with_an_unverified_warning(reference, tmp_path, capsys):
    step_dir = tmp_path / "loose"
    shutil.copytree(reference / "checkpoints" / "step_000020", step_dir)
    (step_dir / "meta.json").unlink()
    assert train(flags(tmp_path / "runs", "loose", resume_from=step_dir)) == exits.DONE
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "unverified" in err[0] and "meta.json" in err[0], err
    assert logged_steps(tmp_path / "runs" / "loose") == [21, 22, 23, 24]


# ---- 3. files of the wrong shape ------------------------------------------------------------------

def jsonl(rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


GOOD_ROWS = [{"text": f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 3} for i in range(60)]
BAD_FILES = {  # name: (file name, bytes, pieces of the error)
    "yaml key not a string": ("c.yaml", b"1: 2\nnum_steps: 3\n", ["c.yaml", "key 1 is a int"]),
    "yaml [model] key not a string": ("m.yaml", b"model:\n  3: 4\n", ["m.yaml", "key 3"]),
    "config not UTF-8": ("c.toml", b"num_steps = 3 # \xff\xfe\n", ["c.toml", "not UTF-8"]),
    "text a number": ("d.jsonl", jsonl(GOOD_ROWS[:2] + [{"text": 7}]), ["d.jsonl", "'text' is a int", "byte"]),
    "text a list": ("d.jsonl", jsonl([{"text": ["a"]}] + GOOD_ROWS), ["d.jsonl", "'text' is a list"]),
    "row not UTF-8": ("d.jsonl", jsonl(GOOD_ROWS[:3]) + b'{"text": "\xff\xfe"}\n', ["d.jsonl", "not UTF-8"]),
    "truncated .jsonl.gz": ("d.jsonl.gz", gzip.compress(jsonl(GOOD_ROWS))[:-40],
                            ["d.jsonl.gz", "truncated or corrupt compressed file"]),
    "garbled .jsonl.gz": ("d.jsonl.gz", b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4, ["d.jsonl.gz"]),
    "prompts not UTF-8": ("p.txt", b"The\n\xff\xfe\n", ["p.txt", "--sample-prompts", "not UTF-8"]),
    "text file not UTF-8": ("d.txt", b"The quick brown fox.\n" * 50 + b"caf\xe9\n",  # latin-1, not replaced
                            ["d.txt", "not UTF-8 text at byte 1053"]),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_a_file_of_the_wrong_shape_is_one_line_naming_it(name, tmp_path, capsys):
    fname, content, pieces = BAD_FILES[name]
    path = tmp_path / fname
    path.write_bytes(content)
    kind = {"c": "config", "m": "config", "d": "data", "p": "sample_prompts"}[fname[0]]
    extra = {"sample_interval": 5} if kind == "sample_prompts" else {}
    before = tree(tmp_path)
    assert train(flags(tmp_path / "runs", "w", **{kind: path}, **extra)) == exits.BAD_INPUT
    one_error_line(capsys.readouterr().err, *pieces)
    assert tree(tmp_path) == before


def test_bad_data_reached_mid_run_in_the_prefetch_thread(tmp_path, capsys):
    """Block 0 of the stream (2,048 windows) is good, block 1 holds a row whose text is a number: the
    prefetch thread hits it while steps run; the run checkpoints its last step and names the row."""
    rows = [{"text": "abcdefghij klmnopqrst uvwxyz " * 4} for _ in range(800)]  # ~96k byte tokens
    data = tmp_path / "mid.jsonl"
    data.write_bytes(jsonl(rows) + jsonl([{"text": 12345}]))
    bad_byte = len(jsonl(rows))
    runs = tmp_path / "runs"
    argv = flags(runs, "mid", data=data, batch_size=64, seq_len=32, num_steps=200, warmup_steps=5,
                 checkpoint_interval=1000, eval_sequences=4, **small_vocab(tmp_path))
    assert train(argv) == exits.FAILED
    line = one_error_line(capsys.readouterr().err, str(data), f"row at byte {bad_byte}", "'text' is a int",
                          "resume with: bitnet-train --resume-from")
    last = logged_steps(runs / "mid")[-1]
    assert 20 < last < 200 and f"checkpoint of step {last} saved" in line
    saved = checkpoint_fit.load(runs / "mid", need="resume")
    assert saved["step"] == last
    # the saved position is where step last + 1 begins: the rows it would read are the good ones before the bad
    assert saved["train_state"]["data"]["taken"] <= 2048


# ---- 4. sizes that cannot fit ---------------------------------------------------------------------

@pytest.mark.parametrize("overrides,pieces", [
    (dict(batch_size=2**22), ["GiB", "lower --micro-batch-size, --batch-size or --seq-len"]),
    (dict(batch_size=2**40, micro_batch_size=2**20), ["GiB", "micro-batch 1048576"]),
    (dict(eval_sequences=2**40, no_eval=False), ["--eval-sequences", "GiB"]),
    (dict(sample_max_tokens=10**12, sample_interval=5), ["--sample-max-tokens", "context of 256"]),
    (dict(seq_len=10**9), ["--seq-len 1000000000 exceeds the model's context"]),
])
def test_sizes_that_cannot_fit_are_refused_before_anything_is_allocated(overrides, pieces, tmp_path, capsys):
    before = tree(tmp_path)
    assert train(flags(tmp_path / "runs", "huge", **overrides)) == exits.BAD_INPUT
    one_error_line(capsys.readouterr().err, *pieces)
    assert tree(tmp_path) == before


def test_out_of_memory_mid_run_names_the_step_the_memory_and_the_flags(monkeypatch, tmp_path, capsys):
    """torch.OutOfMemoryError simulated at the library boundary (the backward of step 6) on CPU."""
    real_backward = torch.Tensor.backward
    calls = {"n": 0}

    def backward(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore lines")
        return real_backward(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", backward)
    runs = tmp_path / "runs"
    assert train(flags(runs, "oom")) == exits.FAILED
    kept = runs / "oom" / "checkpoints" / "step_000004"
    one_error_line(capsys.readouterr().err, "out of memory at step 6", "machine memory", "--micro-batch-size (now 2)",
                   "--batch-size (now 2)", "--seq-len (now 16)", f"newest intact checkpoint: {kept}")
    assert checkpoint_steps(runs / "oom") == [0, 4] and checkpoint_fit.load(kept, need="resume")["step"] == 4


# ---- 5. messages that name their source -----------------------------------------------------------

@pytest.mark.parametrize("seed", [2**70, 2**32, -1])
def test_a_seed_out_of_range_names_seed(seed, tmp_path, capsys):
    assert train(flags(tmp_path / "runs", "s", seed=seed)) == exits.BAD_INPUT
    one_error_line(capsys.readouterr().err, "--seed must be in [0, 4294967295]")


def test_warnings_are_one_line_and_torch_pickle_warnings_stay_silent(monkeypatch, reference, tmp_path, capsys):
    real_load = torch.load

    def noisy_load(*args, **kwargs):  # what torch's unpickler says about some files, on several lines
        warnings.warn("You are using `torch.load` with `weights_only=False`...\n\nline two\nline three",
                      FutureWarning)
        return real_load(*args, **kwargs)

    def noisy_build(*args, **kwargs):  # any other warning raised during a run
        warnings.warn("something odd\nabout the data", UserWarning)
        return real_build(*args, **kwargs)

    import bitnet.train.loop as loop

    real_build = loop.build_data
    monkeypatch.setattr(torch, "load", noisy_load)
    monkeypatch.setattr(loop, "build_data", noisy_build)
    step_dir = reference / "checkpoints" / "step_000020"
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        assert train(flags(tmp_path / "runs", "w", resume_from=step_dir)) == exits.DONE
    err = capsys.readouterr().err
    assert err == "warning: something odd about the data\n", err


# ---- 6. exit codes --------------------------------------------------------------------------------

def test_every_documented_exit_code(monkeypatch, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert train(flags(runs, "done", num_steps=6)) == exits.DONE == 0
    assert train(flags(runs, "bad", batch_size=0)) == exits.BAD_INPUT == 2
    # stopped by policy: a NaN loss at step 3 under --anomaly-policy stop
    real_ce, calls = F.cross_entropy, {"n": 0}

    def nan_at_3(*args, **kwargs):
        calls["n"] += 1
        loss = real_ce(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    with monkeypatch.context() as m:
        m.setattr(F, "cross_entropy", nan_at_3)
        capsys.readouterr()
        assert train(flags(runs, "policy", anomaly_policy="stop")) == exits.STOPPED_BY_POLICY == 3
    err = capsys.readouterr().err
    assert err.startswith("stopped: anomaly policy stop: nonfinite_loss at step 3") and err.count("\n") == 1, err
    assert checkpoint_fit.load(runs / "policy", need="resume")["step"] == 3
    # runtime failure: the disk fills while writing the scalars
    from bitnet.instrumentation.jsonl import JsonlWriter

    def full(self, row):
        raise OSError(28, os.strerror(28), str(self.path))

    with monkeypatch.context() as m:
        m.setattr(JsonlWriter, "write", full)
        assert train(flags(runs, "failed")) == exits.FAILED == 1
    # interrupted before training started (Ctrl-C while the data loads)
    import bitnet.train.loop as loop

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(loop, "build_data", interrupt)
        capsys.readouterr()
        assert train(flags(runs, "int")) == exits.INTERRUPTED == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_the_readme_documents_every_exit_code():
    readme = (shutil.os.path.dirname(__file__) + "/../../README.md")
    text = open(readme, encoding="utf-8").read()
    table = text[text.index("## Exit codes"):]
    for code in (exits.DONE, exits.FAILED, exits.BAD_INPUT, exits.STOPPED_BY_POLICY, exits.INTERRUPTED):
        assert f"| {code} " in table, code


# ---- 7. resume ergonomics -------------------------------------------------------------------------

def test_the_printed_resume_command_continues_in_the_same_runs_dir(monkeypatch, tmp_path, capsys):
    real_ce, calls = F.cross_entropy, {"n": 0}

    def nan_at_5(*args, **kwargs):
        calls["n"] += 1
        loss = real_ce(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    runs = tmp_path / "elsewhere"
    with monkeypatch.context() as m:
        m.setattr(F, "cross_entropy", nan_at_5)
        assert train(flags(runs, "R", anomaly_policy="stop")) == exits.STOPPED_BY_POLICY
    out = capsys.readouterr().out
    command = next(line.strip() for line in out.splitlines() if line.strip().startswith("bitnet-train "))
    argv = shlex.split(command)[1:]
    assert argv[argv.index("--runs-dir") + 1] == str(runs)
    assert train(argv + ["--quiet"]) == exits.DONE
    assert logged_steps(runs / "R_r5") == list(range(6, BASE["num_steps"] + 1))


def test_an_auto_resume_while_the_run_is_live_says_so(reference, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(reference, runs / "L")
    shutil.copytree(reference, runs / "L_r12")
    held = lock_run_dir(runs / "L_r12")  # what a trainer of L_r12 holds while it runs
    try:
        before = tree(runs)
        assert train(["--resume-from", "auto", "--run-id", "L", "--runs-dir", str(runs), "--quiet"]) == 2
        one_error_line(capsys.readouterr().err, "another run of 'L' is in progress", "L_r12", f"pid {os.getpid()}")
        assert tree(runs) == before
    finally:
        held.close()
    assert train(["--resume-from", "auto", "--run-id", "L", "--runs-dir", str(runs), "--quiet"]) == 2  # at 24
    assert "nothing to do" in capsys.readouterr().err


def test_the_loser_of_two_racing_auto_resumes_says_another_resume_is_in_progress(monkeypatch, reference, tmp_path,
                                                                                  capsys):
    import bitnet.train.loop as loop

    runs = tmp_path / "runs"
    shutil.copytree(reference, runs / "Q")
    shutil.rmtree(runs / "Q" / "checkpoints" / "step_000024")
    real_build = loop.build_data

    def winner_first(*args, **kwargs):  # the other resume creates Q_r20 while this one loads its data
        (runs / "Q_r20" / "meta").mkdir(parents=True)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(loop, "build_data", winner_first)
    assert train(["--resume-from", "auto", "--run-id", "Q", "--runs-dir", str(runs), "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, "another resume of run 'Q' is in progress", "Q_r20")
    assert os.listdir(runs / "Q_r20") == ["meta"]  # the winner's directory is untouched


# ---- 8. schedules that contradict themselves ------------------------------------------------------

@pytest.mark.parametrize("overrides,piece", [
    (dict(warmup_steps=30, num_steps=40), "--warmup-steps 30 does not end before the stage boundary at step 20"),
    (dict(warmup_steps=12), "--warmup-steps 12 does not end before the stage boundary at step 12"),
    (dict(stage_boundary=1.0), "--stage-boundary must be in (0, 1), got 1.0"),
    (dict(stage_boundary=1.5), "--stage-boundary must be in (0, 1), got 1.5"),
    (dict(stage_boundary=-0.1), "--stage-boundary must be in (0, 1)"),
])
def test_a_schedule_that_contradicts_itself_is_refused(overrides, piece, tmp_path, capsys):
    assert train(flags(tmp_path / "runs", "sched", **overrides)) == exits.BAD_INPUT
    one_error_line(capsys.readouterr().err, piece)
    assert not (tmp_path / "runs").exists()


def test_the_presets_warmup_is_shortened_for_a_short_run_and_the_lr_never_climbs_in_stage_2(tmp_path):
    runs = tmp_path / "runs"
    argv = flags(runs, "short", num_steps=10, warmup_steps=None)  # the tiny preset's warmup of 30 applies
    assert train(argv) == exits.DONE
    config = json.loads((runs / "short" / "meta" / "config.json").read_text())["train"]
    assert config["warmup_steps"] == 4 and config["stage_boundary_step"] == 5
    rows = [json.loads(line) for line in (runs / "short" / "metrics" / "scalars.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows]
    assert lrs[:4] == sorted(lrs[:4]) and lrs[3] == max(lrs)  # warmup climbs to the peak by step 4
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))  # stage 2 only decays
