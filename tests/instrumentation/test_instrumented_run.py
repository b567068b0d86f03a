"""End to end on the real loop: every instrumentation file with its documented fields, and
instrumentation that never changes training (bit-identical losses and weights on CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitnet.run.jsonl import read_jsonl

from .conftest import run_training

SAMPLE_FIELDS = {"step", "prompt", "mode", "seed", "text", "token_ids", "mean_entropy", "max_repetition",
                 "unique_tokens", "unique_ratio", "top5"}
LAYER_FIELDS = {"neg", "zero", "pos", "gamma", "near_boundary", "numel", "act_absmax_mean", "act_absmax_max",
                "act_outlier_ratio"}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """10 steps with eval, samples (default prompts), quant stats and TensorBoard at small intervals."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tb = {"tensorboard": True} if _has_tensorboard() else {}
        result = run_training(tmp_path_factory.mktemp("runs"), "full", num_steps=10, eval_interval=5,
                              sample_interval=5, quant_interval=5, log_interval=2, **tb)
    finally:
        torch.set_num_threads(threads)
    return result


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def test_run_writes_every_file(full_run):
    run = full_run.run_dir
    assert full_run.step == 10 and not full_run.stopped_early
    for rel in ("meta/config.json", "meta/provenance.json", "meta/dataset_fingerprint.json",
                "metrics/scalars.jsonl", "metrics/quant.jsonl", "eval/eval_results.jsonl", "samples/samples.jsonl",
                "checkpoints/step_000010/checkpoint.pt"):
        assert (run / rel).is_file(), rel
    assert list((run / "anomalies").iterdir()) == []  # a healthy run dumps nothing
    config = json.loads((run / "meta/config.json").read_text())["train"]
    assert config["quant_interval"] == 5 and config["anomaly_policy"] == "warn"


def test_provenance_fields(full_run):
    prov = json.loads((full_run.run_dir / "meta/provenance.json").read_text())
    for key in ("git_commit", "git_dirty", "git_diff_sha256", "command", "host", "python", "torch", "cuda", "gpu",
                "packages", "seed", "start_time", "resumed_from"):
        assert key in prov, key
    assert prov["seed"] == 42 and prov["resumed_from"] is None


def test_quant_rows(full_run):
    rows = read_jsonl(full_run.run_dir / "metrics/quant.jsonl")
    assert [r["step"] for r in rows] == [0, 5, 10]  # start, every 5 steps, the last step
    for row in rows:
        assert set(row["groups"]) == {"attn", "ffn"}
        assert len(row["layers"]) == 2 * 7  # tiny: 2 blocks x (q, k, v, o, gate, up, down)
        for name, layer in row["layers"].items():
            assert set(layer) == LAYER_FIELDS, name
            assert layer["neg"] + layer["zero"] + layer["pos"] == pytest.approx(1.0)
            assert layer["gamma"] > 0 and layer["act_absmax_max"] >= layer["act_absmax_mean"] > 0
        for group in row["groups"].values():
            assert group["neg"] + group["zero"] + group["pos"] == pytest.approx(1.0)
    attn = [n for n in rows[0]["layers"] if ".self_attn." in n]
    assert rows[0]["groups"]["attn"]["numel"] == sum(rows[0]["layers"][n]["numel"] for n in attn)


def test_sample_rows(full_run):
    rows = read_jsonl(full_run.run_dir / "samples/samples.jsonl")
    assert len(rows) == 2 * 5 * 3  # steps 5 and 10 x 5 default prompts x 3 modes
    assert {r["mode"] for r in rows} == {"greedy", "typical", "stress"}
    for r in rows:
        assert SAMPLE_FIELDS <= set(r)
        assert 1 <= len(r["token_ids"]) <= 12 and isinstance(r["text"], str)
        assert len(r["top5"]) == min(10, len(r["token_ids"]))
        assert all(len(t["token_ids"]) == len(t["tokens"]) == len(t["logits"]) == 5 for t in r["top5"])
        assert r["max_repetition"] >= 1 and 0 < r["unique_ratio"] <= 1 and r["mean_entropy"] > 0
        assert r["unique_tokens"] == len(set(r["token_ids"]))  # the seed's "unique tokens": a count
    seeds = [r["seed"] for r in rows]
    assert len(set(seeds)) == len(seeds)  # every (step, prompt, mode) has its own seed


def test_eval_and_scalars_rows(full_run):
    evals = read_jsonl(full_run.run_dir / "eval/eval_results.jsonl")
    assert [e["step"] for e in evals] == [5, 10]
    assert {"eval_loss", "eval_ppl", "train_loss", "gap"} <= set(evals[0])
    scalars = read_jsonl(full_run.run_dir / "metrics/scalars.jsonl")
    assert [r["step"] for r in scalars] == [2, 4, 6, 8, 10]
    assert {"step", "tokens", "loss", "lr", "wd", "grad_norm", "step_ms", "tok_s", "mem_gib", "time"} <= set(scalars[0])


def test_tensorboard_mirrors_the_files(full_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(full_run.run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/grad_norm", "eval/eval_loss", "quant/attn/zero", "quant/ffn/neg"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6, 8, 10]
    assert [e.step for e in acc.Scalars("quant/attn/zero")] == [0, 5, 10]
    assert any(t.startswith("samples/") for t in acc.Tags()["tensors"])


def test_status_reads_the_files(full_run):
    status = pytest.importorskip("bitnet.status")
    s = status.summarize(full_run.run_dir)
    assert s["quant"]["latest_step"] == 10 and set(s["quant"]["latest"]) == {"attn", "ffn"}
    assert s["samples"]["step"] == 10 and len(s["samples"]["modes"]) == 3
    assert s["anomalies"]["count"] == 0


def _losses_and_weights(result):
    rows = read_jsonl(result.run_dir / "metrics/scalars.jsonl")
    ckpt = torch.load(result.run_dir / "checkpoints/step_000006/checkpoint.pt", weights_only=True)
    return [(r["loss"], r["grad_norm"]) for r in rows], ckpt["model"]


def test_instrumentation_does_not_change_training(tmp_path, two_prompts):
    bare = run_training(tmp_path, "bare", num_steps=6, no_eval=True, sample_interval=0, quant_interval=0)
    busy = run_training(tmp_path, "busy", num_steps=6, eval_interval=2, sample_interval=3, quant_interval=2,
                        sample_prompts=two_prompts)
    assert read_jsonl(busy.run_dir / "samples/samples.jsonl") and read_jsonl(busy.run_dir / "eval/eval_results.jsonl")
    losses_a, weights_a = _losses_and_weights(bare)
    losses_b, weights_b = _losses_and_weights(busy)
    assert losses_a == losses_b  # bit-identical, every step
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


SAMPLE_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from bitnet.data import load_tokenizer
from bitnet.instrumentation.samples import load_prompts, sample_rows
from bitnet.model import PRESETS, Transformer
model = Transformer(PRESETS["tiny"])
model.init_weights(seed=7)
rows = sample_rows(model, load_tokenizer("llama2"), load_prompts(sys.argv[1]), step=300, seed=42, max_new_tokens=8)
print(json.dumps([(r["seed"], r["token_ids"], r["text"]) for r in rows]))
"""


def test_same_seed_same_samples_in_two_processes(two_prompts):
    src = str(Path(__file__).resolve().parents[2] / "src")
    procs = [subprocess.Popen([sys.executable, "-c", SAMPLE_SCRIPT, str(two_prompts)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={"PYTHONHASHSEED": hash_seed, "PYTHONPATH": src, "PATH": "/usr/bin:/bin"})
             for hash_seed in ("1", "2")]  # a different Python hash() salt in each process
    outputs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        outputs.append(json.loads(stdout))
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) == 2 * 3
    assert len({tuple(ids) for _, ids, _ in outputs[0]}) == 6  # and the samples really differ


def test_process_start_time_is_the_process_start_not_the_call():
    """provenance.process_start_time: what /proc says, so the seconds a trainer spends before writing its
    provenance (imports, CUDA, data) count in a run's wall time."""
    code = ("import time; time.sleep(1.0); from bitnet.instrumentation.provenance import process_start_time; "
            "t = process_start_time(); print(time.time() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")})
    assert out.returncode == 0, out.stderr
    assert 1.0 <= float(out.stdout) < 60.0
