"""Anomalies: an injected NaN through the real loop under each policy, spikes and ternary collapse."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bitnet.cli.train import train_main
from bitnet.instrumentation.anomalies import AnomalyHook
from bitnet.run.jsonl import read_jsonl
from bitnet.instrumentation.quant_stats import QuantStatsHook
from bitnet.model import PRESETS, Transformer
from bitnet.train.step import StepOutput


def inject_nan_loss(monkeypatch, bad_steps: set[int]) -> None:
    """Make the training loss NaN on the given steps. Patches torch's cross entropy itself, so it
    works whatever route the loop takes to the loss; these runs have one micro-batch a step and
    no eval, so the n-th call is step n."""
    real = F.cross_entropy
    calls = {"n": 0}

    def cross_entropy(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in bad_steps else loss

    monkeypatch.setattr(F, "cross_entropy", cross_entropy)


def checkpoint(run_dir, step: int) -> dict:
    return torch.load(run_dir / f"checkpoints/step_{step:06d}/checkpoint.pt", weights_only=True)


def _dumps(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "anomalies").iterdir())


def test_nan_warn_dumps_exact_step_and_continues(tmp_path, train_run, monkeypatch):
    inject_nan_loss(monkeypatch, {2})
    # 12 steps: the milestone checkpoints (5, 6, 12), which check pending steps too, come after step 3
    result = train_run(tmp_path, "warn", num_steps=12, log_interval=3, no_eval=True, sample_interval=0,
                       quant_interval=0, anomaly_policy="warn")
    assert result.step == 12 and not result.stopped_early
    assert _dumps(result.run_dir) == ["step_000002_nonfinite_loss"]  # only the first of the NaN steps
    dump = result.run_dir / "anomalies" / "step_000002_nonfinite_loss"
    info = json.loads((dump / "info.json").read_text())
    assert info["step"] == 2 and info["event"] == "nonfinite_loss" and info["policy"] == "warn"
    assert info["detected_at_step"] == 3  # found at the next log step, without a per-step sync
    assert info["loss"] == "nan" and info["update_skipped"] is False and info["lr"] > 0
    assert set(info["files"]) == {"batch.pt", "grad_norms.json", "recent_scalars.json", "info.json"}
    batch = torch.load(dump / "batch.pt", weights_only=True)
    assert batch["step"] == 2 and batch["micro_batches"][0][0].shape == (4, 32)
    norms = json.loads((dump / "grad_norms.json").read_text())
    assert "embed_tokens.weight" in norms and len(norms) == len(list(Transformer(PRESETS["tiny"]).parameters()))
    recent = json.loads((dump / "recent_scalars.json").read_text())
    assert [r["step"] for r in recent["per_step"]] == [1, 2, 3] and recent["per_step"][1]["loss"] == "nan"
    # warn lets the NaN update through: the weights are gone, as the later losses show
    assert all(not math.isfinite(float(r["loss"])) for r in read_jsonl(result.run_dir / "metrics/scalars.jsonl"))


def test_nan_skip_leaves_weights_and_optimizer_unchanged(tmp_path, train_run, monkeypatch):
    inject_nan_loss(monkeypatch, {3})
    result = train_run(tmp_path, "skip", num_steps=5, checkpoint_interval=1, keep_last=10, no_eval=True,
                       sample_interval=0, quant_interval=0, anomaly_policy="skip")
    assert result.step == 5 and not result.stopped_early
    before, at, after = checkpoint(result.run_dir, 2), checkpoint(result.run_dir, 3), checkpoint(result.run_dir, 4)
    assert all(torch.equal(before["model"][k], at["model"][k]) for k in at["model"])
    opt_before, opt_at = before["optimizer"]["state"], at["optimizer"]["state"]
    assert all(torch.equal(opt_before[i][k], opt_at[i][k]) for i in opt_at for k in opt_at[i])
    assert not all(torch.equal(at["model"][k], after["model"][k]) for k in at["model"])  # step 4 trained
    losses = {r["step"]: r["loss"] for r in read_jsonl(result.run_dir / "metrics/scalars.jsonl")}
    assert losses[3] == "nan" and all(math.isfinite(losses[s]) for s in (1, 2, 4, 5))
    info = json.loads((result.run_dir / "anomalies/step_000003_nonfinite_loss/info.json").read_text())
    assert info["update_skipped"] is True and info["policy"] == "skip"


def test_nan_stop_saves_checkpoint_and_exits(tmp_path, train_run, monkeypatch):
    inject_nan_loss(monkeypatch, {3})
    result = train_run(tmp_path, "stop", num_steps=8, no_eval=True, sample_interval=0, quant_interval=0,
                       anomaly_policy="stop")
    assert result.stopped_early and result.step == 3
    assert (result.run_dir / "checkpoints/step_000003/meta.json").is_file()
    assert checkpoint(result.run_dir, 3)["step"] == 3
    assert _dumps(result.run_dir) == ["step_000003_nonfinite_loss"]
    assert [r["step"] for r in read_jsonl(result.run_dir / "metrics/scalars.jsonl")] == [1, 2, 3]


def test_bad_policy_is_a_usage_error(tmp_path, capsys):
    rc = train_main(["--preset", "tiny", "--runs-dir", str(tmp_path), "--run-id", "x", "--anomaly-policy", "panic"])
    assert rc == 2 and "--anomaly-policy" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _fake_step(step, loss, grad_norm):
    x = torch.full((2, 3), step)
    return StepOutput(loss=torch.tensor(loss), grad_norm=torch.tensor(grad_norm), lr=1e-3, wd=0.1,
                      param_grad_norms=torch.tensor([grad_norm, 0.5]), micro_batches=[(x, x + 1)])


@pytest.mark.parametrize("policy", ["warn", "stop"])
def test_loss_and_grad_spikes(tmp_path, policy):
    messages = []
    hook = AnomalyHook(tmp_path, nn.Linear(2, 2), policy, window=50, zscore_threshold=6.0, log=messages.append)
    state = SimpleNamespace(step=0, tokens=0)
    for step in range(1, 41):
        loss = 5.0 if step == 30 else 2.0 + 0.01 * math.sin(step)
        grad_norm = 400.0 if step == 35 else 1.0 + 0.01 * math.cos(step)  # a grad spike is >= 100x the median
        state.step = step
        if step % 5 == 0:
            hook.on_log(state, {"step": step, "loss": loss})
        hook.on_step_end(state, _fake_step(step, loss, grad_norm))
    assert hook.events == [(30, "loss_spike"), (35, "grad_spike")]
    assert sorted(p.name for p in (tmp_path / "anomalies").iterdir()) == ["step_000030_loss_spike",
                                                                          "step_000035_grad_spike"]
    info = json.loads((tmp_path / "anomalies/step_000030_loss_spike/info.json").read_text())
    assert info["zscore"] > 6 and info["loss"] == 5.0 and info["window_median"] == pytest.approx(2.0, abs=0.01)
    norms = json.loads((tmp_path / "anomalies/step_000035_grad_spike/grad_norms.json").read_text())
    assert norms == {"weight": 400.0, "bias": 0.5}
    assert torch.load(tmp_path / "anomalies/step_000030_loss_spike/batch.pt")["micro_batches"][0][0][0, 0] == 30
    assert len(messages) == 2 and "loss_spike" in messages[0]
    assert hook.stop_requested == (policy == "stop")


def test_ternary_collapse_through_quant_stats(tmp_path):
    model = Transformer(PRESETS["tiny"])
    model.init_weights(seed=0)
    with torch.no_grad():  # 98% tiny weights, 2% large: nearly everything rounds to 0
        w = model.layers[1].mlp.up_proj.weight
        w.fill_(1e-4)
        w.view(-1)[::50] = 1.0
    hook = AnomalyHook(tmp_path, model, "warn", log=lambda msg: None)
    quant = QuantStatsHook(tmp_path, model, torch.zeros(1, 8, dtype=torch.long), interval=10, num_steps=100,
                           anomalies=hook)
    state = SimpleNamespace(step=0, tokens=0)
    quant.on_train_start(state)
    state.step = 10
    quant.on_step_end(state, None)  # the same layer still collapsed: no second dump
    quant.close()
    assert hook.events == [(0, "ternary_collapse")]
    info = json.loads((tmp_path / "anomalies/step_000000_ternary_collapse/info.json").read_text())
    assert list(info["layers"]) == ["layers.1.mlp.up_proj"] and info["layers"]["layers.1.mlp.up_proj"]["zero"] > 0.9
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics/quant.jsonl")] == [0, 10]


def _feed(hook, state, steps, spike_at=None):
    for step in steps:
        state.step = step
        loss = 5.0 if step == spike_at else 2.0 + 0.01 * math.sin(step)
        if step % 5 == 0:
            hook.on_log(state, {"step": step, "loss": loss})
        hook.on_step_end(state, _fake_step(step, loss, 1.0 + 0.01 * math.cos(step)))


def test_detector_memory_survives_a_restart(tmp_path):
    """A spike right after a resume is caught only if the window came back from the checkpoint."""
    state = SimpleNamespace(step=0, tokens=0)
    before = AnomalyHook(tmp_path / "a", nn.Linear(2, 2), "warn", window=50, log=lambda m: None)
    _feed(before, state, range(1, 33))  # steps 31, 32 are pending at the "checkpoint" (no log step yet)
    saved = torch.load(_roundtrip(tmp_path, before.state_dict(state)), weights_only=True)
    assert len(saved["losses"]) == 32 and not before.pending  # pending steps were checked first

    resumed = AnomalyHook(tmp_path / "b", nn.Linear(2, 2), "warn", window=50, log=lambda m: None)
    resumed.load_state_dict(saved)
    fresh = AnomalyHook(tmp_path / "c", nn.Linear(2, 2), "warn", window=50, log=lambda m: None)
    for hook in (resumed, fresh):
        _feed(hook, state, range(33, 41), spike_at=35)
        hook.on_train_end(state)
    assert resumed.events == [(35, "loss_spike")]
    assert fresh.events == []  # 2 steps of history: below MIN_HISTORY, nothing is judged
    assert len(resumed.losses) == 40


def _roundtrip(tmp_path, obj):
    path = tmp_path / "state.pt"
    torch.save(obj, path)
    return path


def test_resumed_run_carries_the_detector_windows(tmp_path, train_run):
    """Through the trainer: the step-8 windows of 4 + 4 resumed steps equal those of 8 straight ones.

    Log steps 3, 6, 8: the step-4 checkpoint falls between them, so its pending step is checked first.
    """
    args = dict(num_steps=8, checkpoint_interval=4, log_interval=3, no_eval=True, sample_interval=0)
    straight = train_run(tmp_path, "straight", **args).run_dir
    at4 = checkpoint(straight, 4)["hooks"]["anomaly"]
    assert len(at4["losses"]) == 4 - 2 and len(at4["per_step"]) == 4  # warmup steps 1, 2: not in the spike windows
    resumed = train_run(tmp_path, "resumed", resume_from=straight / "checkpoints/step_000004", **args).run_dir
    want = checkpoint(straight, 8)["hooks"]["anomaly"]
    got = checkpoint(resumed, 8)["hooks"]["anomaly"]
    assert len(want["losses"]) == 8 - 2
    assert got["losses"] == want["losses"] and got["grad_norms"] == want["grad_norms"]
    assert [r[0] for r in got["per_step"]] == list(range(1, 9))

    # a checkpoint from before the "hooks" table (the memory in train_state["anomaly"]) resumes the same way
    from bitnet.run import checkpoint as ckpt_format
    old = checkpoint(straight, 4)
    old["train_state"]["anomaly"] = old.pop("hooks")["anomaly"]
    ckpt_format.save(tmp_path / "old", 4, old)
    legacy = train_run(tmp_path, "legacy", resume_from=tmp_path / "old/checkpoints/step_000004", **args).run_dir
    assert checkpoint(legacy, 8)["hooks"]["anomaly"]["losses"] == want["losses"]


def _drive(hook, values, log_every=5):
    """Feed (loss, grad_norm) per step 1..N through the hook as the loop would; returns its events."""
    state = SimpleNamespace(step=0, tokens=0)
    for step, (loss, grad_norm) in enumerate(values, start=1):
        state.step = step
        if step % log_every == 0:
            hook.on_log(state, {"step": step, "loss": loss})
        hook.on_step_end(state, _fake_step(step, loss, grad_norm))
    hook.on_train_end(state)
    return hook.events


def test_warmup_steps_are_neither_judged_nor_kept(tmp_path):
    # a warmup that looks spiky (grad norm x1000 at step 25) raises nothing; judging starts after it
    values = [(2.0, 1000.0 if step == 25 else 1.0) for step in range(1, 61)]
    hook = AnomalyHook(tmp_path, nn.Linear(2, 2), "warn", log=lambda m: None, warmup_steps=30)
    assert _drive(hook, values) == [] and len(hook.grad_norms) == 30
    # the same spike after warmup, once 20 post-warmup steps are in the window, is caught
    values[54] = (2.0, 1000.0)
    hook = AnomalyHook(tmp_path / "b", nn.Linear(2, 2), "warn", log=lambda m: None, warmup_steps=30)
    assert _drive(hook, values) == [(55, "grad_spike")]


def test_heavy_tailed_healthy_noise_and_a_falling_loss_raise_nothing(tmp_path):
    # lognormal grad norms (sigma 0.8: steps of 5-10x the median occur) and a loss falling 3 nats
    g = torch.Generator().manual_seed(0)
    grads = torch.exp(0.8 * torch.randn(400, generator=g)).tolist()
    noise = (0.1 * torch.randn(400, generator=g)).tolist()
    values = [(9.0 - 3.0 * step / 400 + noise[step - 1], grads[step - 1]) for step in range(1, 401)]
    assert max(grads) / sorted(grads)[200] > 5
    hook = AnomalyHook(tmp_path, nn.Linear(2, 2), "warn", log=lambda m: None, warmup_steps=20)
    assert _drive(hook, values) == []
    # ... while a corrupted batch (+2 nats for one step) in the same run is caught at its step
    values[300] = (values[300][0] + 2.0, values[300][1])
    hook = AnomalyHook(tmp_path / "b", nn.Linear(2, 2), "warn", log=lambda m: None, warmup_steps=20)
    assert _drive(hook, values) == [(301, "loss_spike")]


def test_a_weight_written_outside_the_optimizer_is_a_weight_jump(tmp_path):
    model = nn.Linear(8, 8)
    hook = AnomalyHook(tmp_path, model, "warn", log=lambda m: None)
    state = SimpleNamespace(step=0, tokens=0)
    hook.on_train_start(state)
    for step in range(1, 11):
        state.step = step
        with torch.no_grad():
            model.weight.add_(1e-3)  # an optimizer-sized move: <= lr per element per step
            if step == 7:
                model.bias.mul_(100)  # the fault
        if step % 5 == 0:
            hook.on_log(state, {"step": step, "loss": 2.0})
        hook.on_step_end(state, _fake_step(step, 2.0, 1.0))  # lr 1e-3 a step
    assert hook.events == [(10, "weight_jump")]  # found at the next check (log step 10)
    info = json.loads((tmp_path / "anomalies/step_000010_weight_jump/info.json").read_text())
    assert list(info["layers"]) == ["bias"] and info["limit"] == pytest.approx(3 * 5 * 1e-3)
    assert info["layers"]["bias"]["rms_after"] > 50 * info["layers"]["bias"]["rms_before"]
