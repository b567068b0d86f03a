"""train/metrics.py: the scalars row, and the GPU's clock and power in it where NVML answers."""

import pytest
import torch

from bitnet.train import metrics
from bitnet.train.metrics import MetricsRow, gpu_telemetry_medians


def row(m: MetricsRow) -> dict:
    return m.build(step=10, tokens=10 * 4096, loss=2.0, loss_avg=2.5, lr=1e-3, wd=0.1, grad_norm=1.5, step_ms=50.0,
                   tok_s=81920.0, epoch=0.1)


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's readers as a CUDA machine with nvidia-ml-py answers them; `answers` holds what NVML says."""
    answers = {"clock": 1755, "power_mw": 690_123}

    def clock_rate(device=None):
        if isinstance(answers["clock"], Exception):
            raise answers["clock"]
        return answers["clock"]
    monkeypatch.setattr(torch.cuda, "clock_rate", clock_rate)
    monkeypatch.setattr(torch.cuda, "power_draw", lambda device=None: answers["power_mw"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 9.5 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    return answers


def test_cuda_rows_carry_the_sm_clock_and_the_power(fake_cuda):
    m = MetricsRow(torch.device("cuda"), world_size=1, tokens_per_step=4096, flops_per_token=1e9)
    r = row(m)
    assert r["gpu_sm_mhz"] == 1755 and r["gpu_power_w"] == pytest.approx(690.123) and r["mem_gib"] == 9.5
    assert r["mfu"] == pytest.approx(1e9 * 4096 / 0.05 / 989e12)
    fake_cuda["clock"] = 1530
    assert row(m)["gpu_sm_mhz"] == 1530  # read again at every log step


def test_nvml_failing_turns_the_fields_off_not_the_run(fake_cuda):
    fake_cuda["clock"] = ModuleNotFoundError("pynvml does not seem to be installed")
    m = MetricsRow(torch.device("cuda"), world_size=1, tokens_per_step=4096, flops_per_token=1e9)
    assert not m.nvml and "gpu_sm_mhz" not in row(m)
    fake_cuda["clock"] = 1800  # answers at the start, then fails mid-run: that row and later ones go without
    m = MetricsRow(torch.device("cuda"), world_size=1, tokens_per_step=4096, flops_per_token=1e9)
    assert m.nvml and row(m)["gpu_sm_mhz"] == 1800
    fake_cuda["clock"] = RuntimeError("NVML_ERROR_GPU_IS_LOST")
    r = row(m)
    assert "gpu_sm_mhz" not in r and "gpu_power_w" not in r and r["loss"] == 2.0 and not m.nvml
    fake_cuda["clock"] = 1800
    assert "gpu_sm_mhz" not in row(m)  # not asked again


def test_cpu_rows_have_no_gpu_fields(monkeypatch):
    monkeypatch.setattr(metrics, "gpu_clock_and_power", lambda device: pytest.fail("NVML asked on the CPU"))
    r = row(MetricsRow(torch.device("cpu"), world_size=1, tokens_per_step=4096, flops_per_token=1e9))
    assert "gpu_sm_mhz" not in r and r["step"] == 10 and r["tok_s"] == 81920.0


def test_benchmark_rows_take_the_median_clock_and_power_of_the_rows_that_carry_them():
    rows = [{"step": 100}, {"step": 200, "gpu_sm_mhz": 1755, "gpu_power_w": 690.0},
            {"step": 300, "gpu_sm_mhz": 1530, "gpu_power_w": 700.0},
            {"step": 400, "gpu_sm_mhz": 1800, "gpu_power_w": 650.0}]
    assert gpu_telemetry_medians(rows) == {"gpu_sm_mhz": 1755, "gpu_power_w": 690.0}
    assert gpu_telemetry_medians([{"step": 1}, {"step": 2}]) == {}  # CPU rows: no fields, no error
