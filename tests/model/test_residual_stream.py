"""--residual-stream bf16: the stream between blocks in the matmul dtype under autocast, nothing changed without."""

import dataclasses

import pytest
import torch

from bitnet.model import PRESETS, Transformer
from bitnet.train import memory
from bitnet.train.config import TrainConfig
from tests.model.gpu_step import compiled_step_on_gpu

CFG = dataclasses.replace(PRESETS["tiny"], vocab_size=256, n_layers=3)


def step(residual_in_matmul_dtype: bool, autocast: bool) -> tuple[torch.Tensor, dict, list]:
    """(loss, gradients, the dtypes each block's input came in) of one forward and backward on the CPU."""
    torch.manual_seed(0)
    idx, targets = torch.randint(0, CFG.vocab_size, (2, 32)), torch.randint(0, CFG.vocab_size, (2, 32))
    model = Transformer(CFG)
    model.init_weights(seed=0)
    model.residual_in_matmul_dtype = residual_in_matmul_dtype
    seen = []
    for block in model.layers:
        block.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(idx, targets=targets)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}, seen


def test_without_autocast_the_switch_changes_nothing():
    loss, grads, seen = step(False, autocast=False)
    on_loss, on_grads, on_seen = step(True, autocast=False)
    assert seen == on_seen == [torch.float32] * CFG.n_layers
    assert torch.equal(on_loss, loss) and all(torch.equal(on_grads[n], g) for n, g in grads.items())


def test_under_autocast_the_blocks_take_bf16_and_the_result_stays_close():
    loss, grads, seen = step(False, autocast=True)
    on_loss, on_grads, on_seen = step(True, autocast=True)
    assert seen == [torch.float32] * CFG.n_layers and on_seen == [torch.bfloat16] * CFG.n_layers
    assert not torch.equal(on_loss, loss)  # the stream is rounded: the switch did something
    assert on_loss.item() == pytest.approx(loss.item(), rel=1e-2)
    for name, g in grads.items():  # the weights keep fp32 gradients, within bf16 rounding of the fp32 stream's
        assert on_grads[name].dtype == torch.float32
        assert (on_grads[name] - g).norm() <= 0.1 * g.norm() + 1e-8, name


def test_the_memory_estimate_counts_the_checkpointed_inputs_at_the_streams_size():
    # every block checkpointed: the forward's end keeps one residual per block, half the bytes in bf16
    cfg = PRESETS["95m"]
    fp32 = memory.step_bytes(cfg, 32, 1024, checkpointed_blocks=cfg.n_layers)
    bf16 = memory.step_bytes(cfg, 32, 1024, checkpointed_blocks=cfg.n_layers, residual_bytes=2)
    assert fp32["block inputs"] == int(0.7 * cfg.n_layers * 32 * 1024 * cfg.dim * 4)
    assert bf16["block inputs"] == int(0.7 * cfg.n_layers * 32 * 1024 * cfg.dim * 2)


def test_the_trainer_sets_the_switch_from_the_flag():
    from bitnet.train import components
    from bitnet.train.parallel import World
    world = World()
    for flag, expected in (("fp32", False), ("bf16", True)):
        cfg = TrainConfig(preset="tiny", residual_stream=flag)
        model, _ = components.build_model(cfg, dataclasses.replace(CFG, n_layers=1), world, None)
        assert model.residual_in_matmul_dtype is expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_bf16_stream_on_gpu_stays_close_and_holds_less():
    """The trainer's path on the GPU (compiled blocks, Triton kernels, bf16 autocast), 95m-shaped with 4 layers:
    the bf16 stream gives nearly the fp32 stream's loss and gradients, and its step peaks lower."""
    results = [compiled_step_on_gpu(lambda model, bf16=bf16: setattr(model, "residual_in_matmul_dtype", bf16))
               for bf16 in (False, True)]
    (loss0, grads0, peak0), (loss1, grads1, peak1) = results
    assert loss1 == pytest.approx(loss0, rel=1e-3)
    for g0, g1 in zip(grads0, grads1):
        assert (g1 - g0).norm() <= 0.05 * g0.norm() + 1e-6
    # two fp32 norm inputs a block become bf16: 4 blocks x 2 x 8192 tokens x 768 x 2 bytes saved, at least half
    assert peak0 - peak1 > 0.5 * 4 * 2 * 8192 * 768 * 2, (peak0, peak1)
