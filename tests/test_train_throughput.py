"""benchmarks/train_throughput.py: the trainer's profile window and the rows its medians keep (CPU, with the
profiler and the CUDA sync replaced by fakes at torch's boundary)."""

import importlib.util
import json
import types
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"
spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
tt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tt)


def test_the_medians_leave_out_the_rows_the_profiler_ran_in():
    rows = [{"step": s} for s in (100, 200, 300, 400)]
    window = {"first_step": 211, "count": 40, "steps": "211-250"}
    assert [r["step"] for r in tt.unprofiled_rows(rows, window)] == [100, 200, 400]
    across = {"first_step": 191, "count": 40, "steps": "191-230"}  # steps 191-200 and 201-230: two rows
    assert [r["step"] for r in tt.unprofiled_rows(rows, across)] == [100, 400]
    assert tt.unprofiled_rows(rows, {"first_step": 211, "count": 40}) == rows  # the window never ran
    assert tt.unprofiled_rows(rows, {}) == rows
    short = [{"step": 100}, {"step": 150}]  # every row holds profiled steps: all are kept, not none
    assert tt.unprofiled_rows(short, {"first_step": 86, "count": 40, "steps": "86-125"}) == short


class FakeProfile:
    """torch.profiler.profile as the window uses it: started, stopped, then asked for its kernels."""
    opened = []

    def __init__(self, activities):
        self.started = self.closed = False

    def start(self):
        self.started = True
        FakeProfile.opened.append(self)

    def stop(self):
        self.closed = True

    def key_averages(self):
        kernel = types.SimpleNamespace(key="nvjet_sm90_tst_256x128", count=3 * 24, self_device_time_total=3 * 20_000)
        norm = types.SimpleNamespace(key="triton_per_fused_add_mean", count=3 * 8, self_device_time_total=3 * 5_000)
        return [kernel, norm]


def test_the_window_profiles_the_captured_steps_it_names(monkeypatch):
    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    FakeProfile.opened.clear()

    class Step:  # GraphedTrainStep's counting: one call a step, warmup calls included
        def __init__(self):
            self.calls = 0

        def __call__(self, batches, lr, wd):
            self.calls += 1
            return self.calls
    graphed = types.SimpleNamespace(GraphedTrainStep=Step)
    window = tt.profile_trainer_window(graphed, start=5, count=3)
    assert window == {"first_step": 5, "count": 3}
    step = graphed.GraphedTrainStep()
    for n in range(1, 5):
        assert step([], 1e-3, 0.1) == n
    assert FakeProfile.opened == [] and "steps" not in window
    step([], 1e-3, 0.1)  # step 5 opens it
    assert len(FakeProfile.opened) == 1 and not FakeProfile.opened[0].closed
    for _ in range(4):
        step([], 1e-3, 0.1)
    assert FakeProfile.opened[0].closed and len(FakeProfile.opened) == 1  # closed after step 7, never again
    assert window["steps"] == "5-7" and window["kernel_ms_per_step"] == 25.0
    assert window["ms_per_step_by_category"]["gemm"] == 20.0 and window["ms_per_step_by_category"]["inductor"] == 5.0
    assert window["idle_ms_per_step"] == pytest.approx(window["wall_ms_per_step"] - 25.0, abs=1e-3)


def test_the_startup_breakdown_adds_the_compiles_to_the_trainers_row(tmp_path):
    row = {"step": 1, "started_at": 100.0, "time_to_first_step_s": 30.5,
           "phases_s": {"imports": 4.0, "first_step": 18.5}}
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "startup.jsonl").write_text(json.dumps(row) + "\n")
    first = {"t": 130.5, "triton": [("_rope_qkv_fwd_kernel", 1.25), ("_swiglu_norm_bwd_kernel", 0.75)],
             "triton_in_step": [("_swiglu_norm_bwd_kernel", 0.75)],
             "compile_metrics": {"_compile.compile_inner": 9.0, "compile_fx.<locals>.bw_compiler": 4.5,
                                 "GraphLowering.compile_to_module": 6.0}}
    b = tt.startup_breakdown(tmp_path, first)
    assert {k: b[k] for k in row} == row
    assert b["dynamo_inductor_s"] == 13.5  # the forward's compile (dynamo with inductor inside) and the backward's
    assert b["triton_compile_s"] == 2.0 and len(b["triton_compiles"]) == 2 and b["triton_in_step_s"] == 0.75
    assert tt.startup_breakdown(tmp_path, {}) == {}  # no first step: nothing to split
    assert tt.startup_breakdown(tmp_path / "none", first) == {}  # no row written


def test_dynamo_time_metrics_sum_each_phase(monkeypatch):
    from torch._dynamo import utils
    monkeypatch.setattr(utils, "compilation_time_metrics", {"a": [1.0, 2.5], "b": [4.0], "tiny": [0.001]})
    assert list(tt.dynamo_time_metrics().items()) == [("b", 4.0), ("a", 3.5)]  # largest first, noise left out


def test_the_latepool_row_leaves_the_compile_workers_to_torch(monkeypatch):
    from bitnet.model.kernels import current_kernels, set_kernels
    from bitnet.train import loop
    monkeypatch.setattr(loop, "start_compile_workers", loop.start_compile_workers)  # restored after the test
    before = current_kernels()
    try:
        tt.apply_tweaks(tt.TRAINER_VARIANTS["bitnet-train-latepool"])
    finally:
        set_kernels(before)
    calls = []
    monkeypatch.setattr("torch._inductor.async_compile.maybe_warm_pool", lambda: calls.append("warm"))
    loop.start_compile_workers()
    assert calls == []
