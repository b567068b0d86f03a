"""One optimizer step: forward, loss, backward over the micro-batches, clip, AdamW.

Returns detached device tensors: nothing here reads a value back to the host, so the GPU is
never stalled by the step itself (the loop syncs once per log interval).
"""

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

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


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy in fp32, mean over tokens."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def compile_step(model: nn.Module, regional: bool = True, fused_loss: bool = True) -> tuple[nn.Module, Callable]:
    """torch.compile for training: returns (model to call, loss function to call).

    regional: compile each transformer block and the final norm. Dynamo treats module
    parameters as inputs, so one block's compiled code serves every block and the first step comes
    after one block's compile, not the whole model's (issue #5: time to first step <= 60 s).
    Under DDP the loop wraps the returned module, so DDP runs the same compiled blocks.
    Otherwise the whole model is one graph.
    fused_loss: on CUDA, the Triton cross entropy (model/kernels.py): one read of the bf16 logits
    forward, and a backward that writes the gradient over them, so no second 2 GiB logits-sized
    buffer exists at 32 x 1024 x 32000 (the step's memory peak). Otherwise loss_fn compiled, which
    reads the logits as often but allocates the gradient. benchmarks/NOTES.md has the measurements.
    """
    from bitnet.model import kernels

    loss = kernels.cross_entropy if fused_loss and kernels.available() else torch.compile(loss_fn)
    if not regional or type(model) is not Transformer:  # FSDP2-sharded (or wrapped) models: compile them whole
        return torch.compile(model), loss
    # A shallow copy that shares every parameter, buffer and submodule with `model` but calls
    # compiled blocks: the plain model stays uncompiled for the hooks that run other shapes.
    compiled = copy.copy(model)
    compiled._modules = dict(model._modules)
    compiled.layers = nn.ModuleList(torch.compile(block) for block in model.layers)
    compiled.norm = torch.compile(model.norm)
    return compiled, loss


def pinned(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The CPU batch page-locked when it goes to a GPU, so its copy does not wait for the GPU's queue."""
    return batch.pin_memory() if device.type == "cuda" else batch


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast, loss_fn: Callable,
                     n: int) -> torch.Tensor:
    """One micro-batch: its loss / n, backpropagated into p.grad; returns the loss detached."""
    with autocast():
        loss = loss_fn(model(x), y) / n
    loss.backward()
    return loss.detach()


def clip_gradients(model: nn.Module, grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-parameter grad norms, global grad norm) before clipping; scales the grads to grad_clip.

    Computed as clip_grad_norm_ does (same kernels, same results), without a host sync; the
    per-parameter norms go into anomaly dumps for free.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    param_grad_norms = torch.stack(torch._foreach_norm(grads))
    grad_norm = torch.linalg.vector_norm(param_grad_norms)
    if grad_clip > 0:
        torch._foreach_mul_(grads, torch.clamp(grad_clip / (grad_norm + 1e-6), max=1.0))
    return param_grad_norms, grad_norm


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list, autocast,
               grad_clip: float, lr: float, wd: float, device: torch.device,
               skip_nonfinite: bool = False, loss_fn: Callable = loss_fn) -> StepOutput:
    """micro_batches: [(x, y), ...] CPU tensors; the loss is averaged so the step sees the global batch.

    skip_nonfinite (--anomaly-policy skip): when the loss or a gradient is NaN/Inf, leave the weights
    and the optimizer state as they were. Deciding that costs one host sync per step.
    loss_fn: `loss_fn` itself, or its compiled form from `compile_step`.
    """
    n = len(micro_batches)
    total = torch.zeros((), device=device)
    for i, (x, y) in enumerate(micro_batches):
        x = pinned(x, device).to(device, non_blocking=True)
        y = pinned(y, device).to(device, non_blocking=True)
        # Under DDP, all-reduce gradients only on the last micro-batch.
        sync = contextlib.nullcontext() if i == n - 1 or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            total += forward_backward(model, x, y, autocast, loss_fn, n)
    param_grad_norms, grad_norm = clip_gradients(model, grad_clip)
    # Host sync, only under --anomaly-policy skip. A NaN/Inf loss always makes NaN/Inf gradients, and
    # the grad norm (unlike the loss) is the same on every rank, so all ranks skip the same steps.
    skipped = skip_nonfinite and not bool(torch.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
        weights_updated()  # invalidates BitLinear's no-grad weight caches (fused AdamW bumps no version)
    optimizer.zero_grad(set_to_none=True)
    return StepOutput(loss=total, grad_norm=grad_norm.detach(), lr=lr, wd=wd, param_grad_norms=param_grad_norms,
                      skipped=skipped, micro_batches=micro_batches)
