"""The whole training step (forward, backward, clip, AdamW) as one CUDA graph, replayed every step.

Why: the 95m step at 32 x 1024 launches about a thousand kernels. Launched one by one, they leave
gaps on the GPU (kernel time summed ~50.5 ms against ~52.3 ms wall on an H100, benchmarks/NOTES.md).
A replayed graph launches them all at once and the step runs no Python.

What capture needs, and how this meets it:
- fixed addresses: each micro-batch is copied into a static input buffer before the replay. The loss
  and grad norms are static outputs, cloned after the replay because the next one overwrites them.
- compiled before captured: the first `warmup_steps` steps run as plain `train_step` (torch.compile,
  cuDNN and the optimizer state initialize there); the step after them is captured, then replayed.
- gradients: set to None before the capture, so the captured backward allocates them in the graph's
  memory and writes them on every replay. They stay in `p.grad` between steps (never zeroed: each
  replay overwrites them, the first micro-batch's backward assigning, later ones adding).
- the LR changes every step: AdamW reads it from a device tensor (`capturable`), which `set_schedule`
  fills before the replay. The weight decay is a number baked into the captured AdamW kernel; it changes
  once, at the stage boundary, and a change triggers a new capture.
- no host syncs inside the step: `--anomaly-policy skip` (one sync a step) and several processes (DDP's
  hooks, FSDP2) keep the uncaptured `train_step` (`use_cuda_graphs` decides).

The capture itself goes through `CudaGraph`; tests swap in a stand-in that runs the captured function
at every replay with the baked numbers restored, so the buffer handling is checked on CPU.
"""

from collections.abc import Callable

import torch
import torch.nn as nn

from bitnet.model.bitlinear import weights_updated
from bitnet.train.step import StepOutput, clip_gradients, forward_backward, pinned, train_step


def use_cuda_graphs(setting: str, device: torch.device, world_size: int, anomaly_policy: str) -> bool:
    """Whether the loop captures its step: `setting` is --cuda-graphs (auto, on, off).

    auto: on for one CUDA process whose step has no host sync. on: the same, but an error where it
    cannot be honoured (the user asked for it explicitly).
    """
    if setting == "off":
        return False
    reasons = []
    if device.type != "cuda":
        reasons.append(f"the device is {device.type}")
    if world_size > 1:
        reasons.append(f"{world_size} processes (DDP/FSDP2 communicate inside the step)")
    if anomaly_policy == "skip":
        reasons.append("--anomaly-policy skip reads the grad norm on the host every step")
    if reasons and setting == "on":
        raise ValueError("--cuda-graphs on cannot be honoured: " + "; ".join(reasons))
    return not reasons


class CudaGraph:
    """torch.cuda.CUDAGraph behind the two calls GraphedTrainStep makes."""

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], None], optimizer: torch.optim.Optimizer) -> None:
        # torch.cuda.graph captures on a side stream; the work queued before (input copies) is waited for.
        with torch.cuda.graph(self.graph):
            fn()

    def replay(self) -> None:
        self.graph.replay()


class GraphedTrainStep:
    """Drop-in for `train_step(model, optimizer, micro_batches, ...)` that captures once and replays."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, autocast, grad_clip: float,
                 device: torch.device, warmup_steps: int = 2, graph_factory=CudaGraph):
        self.model, self.optimizer, self.autocast, self.grad_clip = model, optimizer, autocast, grad_clip
        self.device, self.warmup_steps, self.graph_factory = device, warmup_steps, graph_factory
        self.graph = None
        self.calls = 0
        self.captures = 0
        """How many times the step was captured (1, plus one per weight-decay change or new batch shape)."""
        self._key = None  # (batch shapes, weight decays) of the captured graph

    def __call__(self, micro_batches: list, lr: float, wd: float) -> StepOutput:
        self.calls += 1
        if self.calls <= self.warmup_steps:
            return train_step(self.model, self.optimizer, micro_batches, self.autocast, self.grad_clip, lr, wd,
                              self.device)
        key = ([tuple(x.shape) + tuple(y.shape) for x, y in micro_batches],
               [g["weight_decay"] for g in self.optimizer.param_groups])
        if self.graph is None or key != self._key:
            self._capture(micro_batches, key)
        for (x, y), (sx, sy) in zip(micro_batches, self.inputs):
            sx.copy_(pinned(x, self.device), non_blocking=True)
            sy.copy_(pinned(y, self.device), non_blocking=True)
        self.graph.replay()
        weights_updated()
        return StepOutput(loss=self.loss.clone(), grad_norm=self.grad_norm.clone(), lr=lr, wd=wd,
                          param_grad_norms=self.param_grad_norms.clone(), micro_batches=micro_batches)

    def _capture(self, micro_batches: list, key) -> None:
        """(Re)capture the step for these batch shapes and the optimizer's current weight decays."""
        self.graph = None  # the previous graph's memory goes back before the new one is recorded
        self.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates the gradients
        for group in self.optimizer.param_groups:
            group["capturable"] = self.device.type == "cuda"  # CPU (tests) has no capturable AdamW
            if not isinstance(group["lr"], torch.Tensor):  # set_schedule fills it from now on
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=self.device)
        self.inputs = [(torch.zeros(x.shape, dtype=x.dtype, device=self.device),
                        torch.zeros(y.shape, dtype=y.dtype, device=self.device)) for x, y in micro_batches]
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the uncaptured steps' cached blocks: the graph keeps its own pool
        graph = self.graph_factory()
        graph.capture(self._step_body, self.optimizer)
        self.graph, self._key = graph, key
        self.captures += 1

    def _step_body(self) -> None:
        """What the graph records: train_step's math on the static buffers, minus zero_grad."""
        n = len(self.inputs)
        total = torch.zeros((), device=self.device)
        for x, y in self.inputs:
            total += forward_backward(self.model, x, y, self.autocast, n)
        param_grad_norms, grad_norm = clip_gradients(self.model, self.grad_clip, self.optimizer)
        self.optimizer.step()
        self.loss, self.grad_norm, self.param_grad_norms = total, grad_norm, param_grad_norms
