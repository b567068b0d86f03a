"""TensorBoard mirror: tails the run files, waits for a torn last line, needs the package only when used."""

import json

import pytest

from bitnet.instrumentation.tensorboard import TensorBoardHook


def test_tails_files_and_waits_for_torn_lines(tmp_path):
    """The metrics row comes from on_log (scalars.jsonl is not re-read); the hooks' files are tailed."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    evals = tmp_path / "eval" / "eval_results.jsonl"
    evals.parent.mkdir()
    row = lambda step: {"step": step, "loss": 10.0 - step, "lr": 1e-3, "note": "x"}  # noqa: E731
    erow = lambda step: json.dumps({"step": step, "eval_loss": 20.0 - step})  # noqa: E731
    evals.write_text(erow(1) + "\n" + erow(2)[:10])  # step 2 still being written
    hook = TensorBoardHook(tmp_path)
    hook.on_log(None, row(1))
    with open(evals, "a") as f:
        f.write(erow(2)[10:] + "\n")
    hook.on_log(None, {**row(2), "grad_norm": float("nan")})
    hook.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 9.0), (2, 8.0)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/eval_loss")] == [(1, 19.0), (2, 18.0)]
    assert "train/note" not in acc.Tags()["scalars"] and "train/grad_norm" not in acc.Tags()["scalars"]
