"""Exact resume: N steps straight == N/2 steps + resume for N/2, bit for bit on CPU."""

import json

import torch

from bitnet.cli.train import train_main
from bitnet.model import checkpoint_fit
from bitnet.run import checkpoint
from tests.conftest import fast_args, read_rows


def test_resume_is_bit_identical(runs):
    assert train_main(fast_args(runs, "straight", steps=8, checkpoint_interval=4)) == 0
    # resume the straight run's step-4 checkpoint into a new run directory
    ckpt4 = runs / "straight" / "checkpoints" / "step_000004"
    assert train_main(fast_args(runs, "resumed", steps=8, checkpoint_interval=4) + ["--resume-from", str(ckpt4)]) == 0
    straight = read_rows(runs / "straight" / "metrics" / "scalars.jsonl")
    resumed = read_rows(runs / "resumed" / "metrics" / "scalars.jsonl")
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    for a, b in zip(straight[4:], resumed):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"] and a["lr"] == b["lr"], (a, b)
        assert a["tokens"] == b["tokens"]
    final_a = checkpoint_fit.load(runs / "straight" / "checkpoints" / "step_000008")
    final_b = checkpoint_fit.load(runs / "resumed" / "checkpoints" / "step_000008")
    for k, v in final_a["model"].items():
        assert torch.equal(v, final_b["model"][k]), k
    assert final_a["train_state"]["data"] == final_b["train_state"]["data"]
    # the new run records where it came from; the old run's files are untouched
    prov = json.loads((runs / "resumed" / "meta" / "provenance.json").read_text())
    assert prov["resumed_from"] == str(ckpt4)
    assert len(straight) == 8


def test_resume_takes_the_config_from_the_checkpoint(runs):
    assert train_main(fast_args(runs, "a", steps=4, checkpoint_interval=2, seq_len=48)) == 0
    ckpt = runs / "a" / "checkpoints" / "step_000002" / "checkpoint.pt"
    # only the run id and the resume path: seq_len 48 and the rest come from the checkpoint
    assert train_main(["--resume-from", str(ckpt), "--run-id", "b", "--runs-dir", str(runs), "--quiet"]) == 0
    cfg = json.loads((runs / "b" / "meta" / "config.json").read_text())
    assert cfg["train"]["seq_len"] == 48 and cfg["train"]["num_steps"] == 4
    a = read_rows(runs / "a" / "metrics" / "scalars.jsonl")
    b = read_rows(runs / "b" / "metrics" / "scalars.jsonl")
    assert [r["loss"] for r in a[2:]] == [r["loss"] for r in b]
