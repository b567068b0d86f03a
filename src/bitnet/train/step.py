"""One optimizer step: forward, loss, backward over the micro-batches, clip, AdamW.

Returns detached device tensors: nothing here reads a value back to the host, so the GPU is
never stalled by the step itself (the loop syncs once per log interval).
"""

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from bitnet.model import Transformer
from bitnet.model.bitlinear import weights_updated


@dataclass
class StepOutput:
    loss: torch.Tensor
    """Mean loss over the step's micro-batches (0-dim, on device)."""
    grad_norm: torch.Tensor
    """Global grad norm before clipping (0-dim, on device)."""
    lr: float
    wd: float
    param_grad_norms: torch.Tensor | None = None
    """Grad norm of each parameter before clipping, in model.parameters() order (1-dim, on device)."""
    skipped: bool = False
    """True when skip_nonfinite found a non-finite loss or gradient and the update was not applied."""
    micro_batches: list | None = None
    """The step's input batches [(x, y), ...] (CPU tensors), kept for anomaly dumps."""


def compile_step(model: nn.Module, regional: bool = True) -> nn.Module:
    """torch.compile for training: returns the model to call.

    regional: compile each transformer block and the final norm. Dynamo treats module
    parameters as inputs, so one block's compiled code serves every block and the first step comes
    after one block's compile, not the whole model's (issue #5: time to first step <= 60 s).
    Under DDP the loop wraps the returned module, so DDP runs the same compiled blocks.
    Otherwise the whole model is one graph. Either way the head and the loss stay outside: on CUDA
    they are one Triton-backed function (model/llama.py's head_cross_entropy).
    """
    if not regional or type(model) is not Transformer:  # FSDP2-sharded (or wrapped) models: compile them whole
        return torch.compile(model)
    # A shallow copy that shares every parameter, buffer and submodule with `model` but calls
    # compiled blocks: the plain model stays uncompiled for the hooks that run other shapes. Plain
    # attributes (residual_in_matmul_dtype) are copied now: set them before compiling, as the trainer does.
    compiled = copy.copy(model)
    compiled._modules = dict(model._modules)
    compiled.layers = nn.ModuleList(torch.compile(block) for block in model.layers)
    compiled.norm = torch.compile(model.norm)
    return compiled


def start_compile_workers() -> None:
    """Start inductor's pool of compile worker processes now, so that it is up when the first step compiles.

    Torch starts the pool when inductor is first called, after dynamo has traced the first graph, and compiles
    a graph's kernels in this process, one after another, until the pool is ready. Started at setup, the pool
    comes up while the data, the model and the hooks are set up (issue #25: time to first step <= 30 s).
    Does nothing where inductor would not use the pool (no Triton, one compile thread) or the API is gone."""
    try:
        from torch._inductor.async_compile import maybe_warm_pool
    except ImportError:  # a torch without this private API: the pool starts at the first compile, as before
        return
    maybe_warm_pool()


def pinned(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The CPU batch page-locked when it goes to a GPU, so its copy does not wait for the GPU's queue."""
    return batch.pin_memory() if device.type == "cuda" else batch


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast, n: int) -> torch.Tensor:
    """One micro-batch: its loss / n, backpropagated into p.grad; returns the loss detached."""
    with autocast():
        loss = model(x, targets=y) / n
    loss.backward()
    return loss.detach()


def clip_gradients(model: nn.Module, grad_clip: float,
                   optimizer: torch.optim.Optimizer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-parameter grad norms, global grad norm) before clipping; clips the update to grad_clip.

    Computed as clip_grad_norm_ does, without a host sync; the per-parameter norms go into anomaly
    dumps for free. A fused AdamW over plain tensors is handed the clip as its `grad_scale` (the
    divisor it applies to each gradient as it loads it, AMP's hook) instead of the grads being scaled
    first: one read and one write of every gradient fewer. Otherwise the grads are scaled in place.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    param_grad_norms = torch.stack(torch._foreach_norm(grads))
    grad_norm = torch.linalg.vector_norm(param_grad_norms)
    clip = torch.clamp(grad_clip / (grad_norm + 1e-6), max=1.0) if grad_clip > 0 else None
    if optimizer is not None and optimizer.defaults.get("fused") and all(type(g) is torch.Tensor for g in grads):
        optimizer.grad_scale = None if clip is None else 1.0 / clip  # read by AdamW.step
    elif clip is not None:
        torch._foreach_mul_(grads, clip)
    return param_grad_norms, grad_norm


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list, autocast,
               grad_clip: float, lr: float, wd: float, device: torch.device,
               skip_nonfinite: bool = False) -> StepOutput:
    """micro_batches: [(x, y), ...] CPU tensors; the loss is averaged so the step sees the global batch.

    skip_nonfinite (--anomaly-policy skip): when the loss or a gradient is NaN/Inf, leave the weights
    and the optimizer state as they were. Deciding that costs one host sync per step.
    """
    n = len(micro_batches)
    total = torch.zeros((), device=device)
    for i, (x, y) in enumerate(micro_batches):
        x = pinned(x, device).to(device, non_blocking=True)
        y = pinned(y, device).to(device, non_blocking=True)
        # Under DDP, all-reduce gradients only on the last micro-batch.
        sync = contextlib.nullcontext() if i == n - 1 or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            total += forward_backward(model, x, y, autocast, n)
    param_grad_norms, grad_norm = clip_gradients(model, grad_clip, optimizer)
    # Host sync, only under --anomaly-policy skip. A NaN/Inf loss always makes NaN/Inf gradients, and
    # the grad norm (unlike the loss) is the same on every rank, so all ranks skip the same steps.
    skipped = skip_nonfinite and not bool(torch.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
        weights_updated()  # invalidates BitLinear's no-grad weight caches (fused AdamW bumps no version)
    optimizer.zero_grad(set_to_none=True)
    return StepOutput(loss=total, grad_norm=grad_norm.detach(), lr=lr, wd=wd, param_grad_norms=param_grad_norms,
                      skipped=skipped, micro_batches=micro_batches)
