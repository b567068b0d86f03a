"""The metrics row: built once per log step, then handed to every sink (scalars.jsonl, the console,
TensorBoard, the anomaly detector) through Hook.on_log (docs/design.md, "training loop")."""

import math
import statistics
import time
from dataclasses import dataclass, field

import torch


def peak_flops(device: torch.device) -> float:
    """Dense bf16 peak used for MFU: H100 SXM 989 TFLOP/s (datasheet); CPU: a nominal 1 TFLOP/s."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12), ("4090", 165e12)):
            if key in name:
                return flops
        return 312e12
    return 1e12


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    except ImportError:
        return math.nan


def gpu_clock_and_power(device: torch.device) -> dict:
    """The SM clock (MHz) and the board's power draw (W) as NVML reports them for about the last second
    (torch.cuda's readers over nvidia-ml-py). Why: a 700 W H100 runs the 95m step at its power cap with the SM
    clock near 1,760 of its 1,980 MHz (benchmarks/RESULTS.md, "Issue 25, eighth session"), so a run's tok/s
    can move with the card, not the code."""
    return {"gpu_sm_mhz": torch.cuda.clock_rate(device), "gpu_power_w": torch.cuda.power_draw(device) / 1000}


def gpu_telemetry_medians(rows: list[dict]) -> dict:
    """The median SM clock and board power over the scalars rows that carry them, for benchmarks: a row's tok/s
    moves with the card's clock, so each benchmark row says what clock it ran at. Empty where no row has them."""
    return {k: statistics.median(r[k] for r in rows if k in r) for k in ("gpu_sm_mhz", "gpu_power_w")
            if any(k in r for r in rows)}


@dataclass
class MetricsRow:
    """What stays fixed over a run (device, world size, FLOPs per token); `build` makes one step's row."""

    device: torch.device
    world_size: int
    tokens_per_step: int
    flops_per_token: float
    nvml: bool = field(init=False)
    """Whether rows carry the GPU's clock and power: on CUDA where NVML answers."""

    def __post_init__(self):
        self.nvml = self.device.type == "cuda" and bool(self._gpu_telemetry())

    def _gpu_telemetry(self) -> dict:
        try:
            return gpu_clock_and_power(self.device)
        except Exception:  # telemetry only: no nvidia-ml-py, or NVML refusing, turns it off, never the run
            self.nvml = False
            return {}

    def build(self, step: int, tokens: int, loss: float, loss_avg: float, lr: float, wd: float, grad_norm: float,
              step_ms: float, tok_s: float, epoch: float) -> dict:
        """The scalars row; host values only (the loop synced once for them). step_ms is per step."""
        mfu = (self.flops_per_token * self.tokens_per_step / (step_ms / 1000) / peak_flops(self.device)
               / self.world_size)
        row = {"step": step, "tokens": tokens, "loss": loss, "loss_avg": loss_avg, "lr": lr, "wd": wd,
               "grad_norm": grad_norm, "step_ms": step_ms, "tok_s": tok_s, "mfu": mfu,
               "mem_gib": memory_gib(self.device), "epoch": epoch, "time": time.time()}
        if self.nvml:
            row.update(self._gpu_telemetry())
        return row
