"""--residual-stream bf16: the stream between blocks in the matmul dtype under autocast, nothing changed without."""

import dataclasses

import pytest
import torch

from bitnet.cli.train import resolve_config, train_main
from bitnet.model import PRESETS, Transformer, llama
from bitnet.model.kernels import current_kernels, use_kernels
from bitnet.train import components, memory
from bitnet.train.config import TrainConfig
from bitnet.train.parallel import World
from tests.conftest import fast_args
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


# 95m step peaks measured on one H100 (benchmarks/RESULTS.md, "Issue 25, sixth session"; train_throughput.py rows):
# (residual stream bytes, head chunk rows) -> GiB; the estimate is a lower bound and must stay under each, and
# it counts the chunk's logits and the stream's two norm inputs a block at their size
MEASURED_95M_PEAKS = {(2, 4096): 9.53, (2, 0): 11.28, (4, 4096): 10.04, (4, 0): 11.75}


@pytest.mark.parametrize("residual_bytes,chunk", MEASURED_95M_PEAKS)
def test_the_memory_estimate_stays_under_the_measured_peaks(residual_bytes, chunk):
    cfg = PRESETS["95m"]
    need = memory.step_bytes(cfg, 32, 1024, residual_bytes=residual_bytes, head_chunk_rows=chunk)
    assert need["logits"] == min(chunk or 32 * 1024, 32 * 1024) * 32000 * 2
    fp32 = memory.step_bytes(cfg, 32, 1024, residual_bytes=4, head_chunk_rows=chunk)["activations"]
    assert fp32 - need["activations"] == pytest.approx(
        0.7 * cfg.n_layers * 32 * 1024 * 2 * cfg.dim * (4 - residual_bytes), abs=cfg.n_layers)
    assert 0.7 * MEASURED_95M_PEAKS[residual_bytes, chunk] < sum(need.values()) / 2**30 <= MEASURED_95M_PEAKS[
        residual_bytes, chunk]


def test_the_trainer_sets_the_switch_from_the_flag():
    assert TrainConfig().residual_stream == "bf16" and TrainConfig().head_chunk_rows == 4096  # the defaults
    for flag, expected in (("fp32", False), ("bf16", True)):
        cfg = TrainConfig(preset="tiny", residual_stream=flag)
        model, _ = components.build_model(cfg, dataclasses.replace(CFG, n_layers=1), World(), None)
        assert model.residual_in_matmul_dtype is expected


def test_a_checkpoint_from_before_the_switch_resumes_with_the_fp32_stream(tmp_path):
    """Runs saved before --residual-stream and --head-chunk-rows existed trained with an fp32 stream and the whole
    head: resuming one keeps both, where a checkpoint that names its stream keeps that."""
    assert train_main(fast_args(tmp_path / "runs", "new", steps=2, checkpoint_interval=2)) == 0
    pt = next((tmp_path / "runs" / "new" / "checkpoints").glob("*/checkpoint.pt"))
    saved = torch.load(pt, weights_only=False)
    assert saved["config"]["train"]["residual_stream"] == "bf16"
    cfg, _, _, _ = resolve_config(["--resume-from", str(pt), "--runs-dir", str(tmp_path / "runs"), "--num-steps", "4"])
    assert cfg.residual_stream == "bf16"
    del saved["config"]["train"]["residual_stream"]
    torch.save(saved, tmp_path / "old.pt")
    cfg, _, _, _ = resolve_config(["--resume-from", str(tmp_path / "old.pt"), "--runs-dir", str(tmp_path / "runs"),
                                   "--num-steps", "4"])
    assert cfg.residual_stream == "fp32" and cfg.head_chunk_rows == 0  # the step it trained with
    cfg, _, _, _ = resolve_config(["--resume-from", str(tmp_path / "old.pt"), "--runs-dir", str(tmp_path / "runs"),
                                   "--num-steps", "4", "--residual-stream", "bf16"])
    assert cfg.residual_stream == "bf16" and cfg.head_chunk_rows == 0  # a flag on the resume wins


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_bf16_stream_on_gpu_stays_close_and_holds_less():
    """The trainer's path on the GPU (compiled blocks, Triton kernels, bf16 autocast), 95m-shaped with 4 layers:
    the bf16 stream gives nearly the fp32 stream's loss and gradients, and its step peaks lower."""
    results = [compiled_step_on_gpu(lambda model, bf16=bf16: setattr(model, "residual_in_matmul_dtype", bf16))
               for bf16 in (False, True)]
    (loss0, grads0, peak0), (loss1, grads1, peak1) = results
    assert loss1 == pytest.approx(loss0, rel=1e-3)
    # every gradient within 15% of the fp32 stream's (two runs on an H100: worst 5.1% and 7.6%, the embedding's
    # backward adding with atomics, so runs differ)
    worst = max(((g1 - g0).norm() / g0.norm()).item() for g0, g1 in zip(grads0, grads1))
    print(f"loss {loss0:.6f} / {loss1:.6f}, worst gradient {worst:.4f}, "
          f"peak {peak0 / 2**30:.3f} / {peak1 / 2**30:.3f} GiB")
    assert worst < 0.15, worst
    # two fp32 norm inputs a block become bf16: 4 blocks x 2 x 8192 tokens x 768 x 2 bytes saved, at least half
    assert peak0 - peak1 > 0.5 * 4 * 2 * 8192 * 768 * 2, (peak0, peak1)


def test_head_chunk_rows_sets_the_heads_launch_for_the_run_only(tmp_path, monkeypatch):
    before = current_kernels()
    for rows in (0, 4096, 512):
        with use_kernels(before):  # settings() changes the process-wide choice; `train` restores it, as here
            components.settings(TrainConfig(preset="tiny", seq_len=128, head_chunk_rows=rows), CFG, World())
            assert current_kernels().cross_entropy_launch.chunk_rows == rows
        assert current_kernels() == before
    # a whole run: every training loss is computed under the flag's launch, and the choice before is back after
    seen = []
    real = llama.head_cross_entropy
    monkeypatch.setattr(llama, "head_cross_entropy",
                        lambda *a: seen.append(current_kernels().cross_entropy_launch.chunk_rows) or real(*a))
    assert train_main(fast_args(tmp_path / "runs", "chunked", steps=2, head_chunk_rows=512)) == 0
    assert len(seen) >= 2 and set(seen) == {512} and current_kernels() == before
