"""One compiled 95m-shaped training step on the GPU, measured: shared by the model's GPU tests."""

import dataclasses
from collections.abc import Callable

import torch

from bitnet.model import PRESETS, Transformer
from bitnet.train.step import compile_step

GPU_CFG = dataclasses.replace(PRESETS["95m"], n_layers=4)
"""The 95m's shapes with 4 layers: the trainer's kernels at their real widths, in seconds."""


def compiled_step_on_gpu(setup: Callable[[Transformer], None]) -> tuple[float, list[torch.Tensor], int]:
    """(loss, fp32 gradients, peak bytes above the weights) of the trainer's path (compiled blocks, Triton kernels,
    bf16 autocast) on 8 x 1024 tokens, for a model initialized with seed 0 and then changed by `setup`. The first
    call compiles; the second is the one measured."""
    idx = torch.randint(0, GPU_CFG.vocab_size, (8, 1024), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    model = Transformer(GPU_CFG).cuda()
    model.init_weights(seed=0)
    setup(model)
    compiled = compile_step(model)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(idx, targets=idx.roll(-1, dims=1))
        loss.backward()
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return loss.item(), [p.grad.float() for p in model.parameters()], peak
