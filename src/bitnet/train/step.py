"""One optimizer step: forward, loss, backward over the micro-batches, clip, AdamW.

Returns detached device tensors: nothing here reads a value back to the host, so the GPU is
never stalled by the step itself (the loop syncs once per log interval).
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class StepOutput:
    loss: torch.Tensor
    """Mean loss over the step's micro-batches (0-dim, on device)."""
    grad_norm: torch.Tensor
    """Global grad norm before clipping (0-dim, on device)."""
    lr: float
    wd: float


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy in fp32, mean over tokens."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list, autocast,
               grad_clip: float, lr: float, wd: float, device: torch.device) -> StepOutput:
    """micro_batches: [(x, y), ...] CPU tensors; the loss is averaged so the step sees the global batch."""
    n = len(micro_batches)
    total = torch.zeros((), device=device)
    for i, (x, y) in enumerate(micro_batches):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        # Under DDP, all-reduce gradients only on the last micro-batch.
        sync = contextlib.nullcontext() if i == n - 1 or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast():
                loss = loss_fn(model(x), y) / n
            loss.backward()
        total += loss.detach()
    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutput(loss=total, grad_norm=grad_norm.detach(), lr=lr, wd=wd)
