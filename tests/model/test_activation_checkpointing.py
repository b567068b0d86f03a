"""Activation checkpointing (--activation-checkpointing): the same numbers, fewer saved activations."""

import dataclasses

import pytest
import torch

from bitnet.cli.train import train_main
from bitnet.model import PRESETS, Transformer
from bitnet.train import memory
from bitnet.train.config import TrainConfig, checkpointed_blocks, resolve_derived
from bitnet.train.step import compile_step
from tests.conftest import fast_args, read_rows
from tests.model.gpu_step import GPU_CFG, compiled_step_on_gpu

# small vocabulary, so that the blocks' activations (not the head's logits) dominate what the backward keeps
CFG = dataclasses.replace(PRESETS["tiny"], vocab_size=256, n_layers=4)


def step(blocks: int, compiled: bool = False) -> tuple[torch.Tensor, dict, int]:
    """(loss, gradients, bytes the forward saved for the backward) of one step with `blocks` checkpointed."""
    torch.manual_seed(0)
    idx, targets = torch.randint(0, CFG.vocab_size, (2, 32)), torch.randint(0, CFG.vocab_size, (2, 32))
    model = Transformer(CFG)
    model.init_weights(seed=0)
    model.checkpoint_blocks(blocks)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = (compile_step(model) if compiled else model)(idx, targets=targets)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}, sum(saved)


def test_checkpointed_blocks_give_the_same_loss_and_gradients_and_keep_only_their_inputs():
    loss, grads, kept = step(0)
    one_loss, one_grads, one_kept = step(1)
    all_loss, all_grads, all_kept = step(CFG.n_layers)
    for other_loss, other_grads in ((one_loss, one_grads), (all_loss, all_grads)):
        assert torch.equal(other_loss, loss)  # the recompute runs the same ops on the same inputs: bit for bit
        assert all(torch.equal(other_grads[name], g) for name, g in grads.items())
    # each checkpointed block keeps its input (2 x 32 tokens x dim, fp32) instead of its activations
    per_block = (kept - all_kept) / CFG.n_layers
    assert per_block > 20 * 2 * 32 * CFG.dim * 4
    assert kept - one_kept == pytest.approx(per_block, rel=0.05)
    assert all_kept < 0.1 * kept


def test_compiled_blocks_recompute_inside_the_compiled_backward():
    """The trainer compiles each block: the checkpoint is traced into it, so the compiled backward recomputes
    (fewer saved bytes) and the gradients equal the compiled ones without it."""
    loss, grads, kept = step(0, compiled=True)
    all_loss, all_grads, all_kept = step(CFG.n_layers, compiled=True)
    assert torch.equal(all_loss, loss)
    assert all(torch.allclose(all_grads[name], g, rtol=1e-5, atol=1e-7) for name, g in grads.items())
    weights = sum(p.numel() * 4 for p in Transformer(CFG).layers.parameters())  # compiled graphs save their weights
    assert all_kept < kept and all_kept - weights < 0.5 * (kept - weights)


def test_the_flag_names_none_all_or_a_count_of_blocks():
    assert [checkpointed_blocks(v, 8) for v in ("none", "all", "0", "3", "8", 5)] == [0, 8, 0, 3, 8, 5]
    for bad, message in (("half", "takes none, all or a number of blocks; got 'half'"), ("-1", "got '-1'"),
                         ("9", "--activation-checkpointing 9 exceeds the model's 8 blocks")):
        with pytest.raises(ValueError, match=message):
            checkpointed_blocks(bad, 8)
    derived = resolve_derived(TrainConfig(activation_checkpointing="all"), 1, 1024, n_layers=8)
    assert derived["checkpointed_blocks"] == 8
    with pytest.raises(ValueError, match="cannot checkpoint 9 blocks of a model with 8"):
        Transformer(PRESETS["95m"]).to("meta").checkpoint_blocks(9)


def test_a_run_with_checkpointed_blocks_trains_exactly_as_without(runs, capsys):
    assert train_main(fast_args(runs, "plain")) == 0
    assert train_main(fast_args(runs, "ac", activation_checkpointing="all")) == 0
    losses = [[r["loss"] for r in read_rows(runs / name / "metrics" / "scalars.jsonl")] for name in ("plain", "ac")]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    config = __import__("json").loads((runs / "ac" / "meta" / "config.json").read_text())["train"]
    assert (config["activation_checkpointing"], config["checkpointed_blocks"]) == ("all", PRESETS["tiny"].n_layers)
    capsys.readouterr()
    assert train_main(fast_args(runs, "bad", activation_checkpointing="3")) == 2  # tiny has 2 blocks
    err = capsys.readouterr().err.strip()
    assert err == "error: --activation-checkpointing 3 exceeds the model's 2 blocks (all: every one)"
    assert not (runs / "bad").exists()


# Peaks measured on one H100 (benchmarks/RESULTS.md, "Issue 25, continued": model_sizes.py, 32 x 1024, no eval):
# (preset, micro-batch, checkpointed blocks) -> GiB. The estimate is a lower bound: it must stay under each.
MEASURED_PEAKS = {("95m", 32, 0): 11.61, ("95m", 32, 1): 10.70, ("95m", 32, 2): 9.79, ("700m", 32, 0): 52.92,
                  ("1.3b", 16, 0): 50.25, ("3b", 4, 0): 68.82, ("3b", 32, 26): 55.22}


@pytest.mark.parametrize("preset,micro,blocks", MEASURED_PEAKS)
def test_the_memory_estimate_stays_under_every_measured_peak(preset, micro, blocks):
    need = sum(memory.step_bytes(PRESETS[preset], micro, 1024, checkpointed_blocks=blocks).values()) / 2**30
    assert 0.75 * MEASURED_PEAKS[preset, micro, blocks] < need <= MEASURED_PEAKS[preset, micro, blocks]


def test_the_memory_estimate_of_checkpointed_blocks():
    cfg, tokens = PRESETS["3b"], 32 * 1024
    block = tokens * (10 * cfg.dim + 3 * cfg.ffn_dim) * 2
    plain = memory.step_bytes(cfg, 32, 1024)
    half = memory.step_bytes(cfg, 32, 1024, checkpointed_blocks=13)
    assert plain["activations"] == int(0.7 * 26 * block) and half["activations"] == int(0.7 * 13 * block)
    every = memory.step_bytes(cfg, 32, 1024, checkpointed_blocks=26)  # the recompute of one block is the peak
    assert every == {memory.STATE: memory.state_bytes(memory.parameter_count(cfg)),
                     "one block's activations": int(0.7 * block)}
    small = memory.step_bytes(PRESETS["95m"], 32, 1024, checkpointed_blocks=8)  # here the forward's end is
    assert set(small) == {memory.MOMENTS, "block inputs", "logits"}
    assert small["block inputs"] == int(0.7 * 8 * tokens * 768 * 4)


def test_out_of_memory_messages_offer_checkpointing_only_while_blocks_are_left():
    cfg = TrainConfig(activation_checkpointing="2")
    message = memory.out_of_memory_message(7, torch.device("cpu"), cfg, 32, n_layers=8)
    assert message.endswith("--seq-len (now 1024), or checkpoint more blocks (--activation-checkpointing, now 2)")
    message = memory.out_of_memory_message(7, torch.device("cpu"), TrainConfig(activation_checkpointing="all"), 32, 8)
    assert message.endswith("--seq-len (now 1024)")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_checkpointed_blocks_on_gpu_match_and_hold_less():
    """The trainer's path on the GPU (compiled blocks, Triton kernels, bf16 autocast), 95m-shaped with 4 layers:
    with every block checkpointed the loss is the same, the gradients agree and the peak is lower."""
    cfg = GPU_CFG
    results = [compiled_step_on_gpu(lambda model, blocks=blocks: model.checkpoint_blocks(blocks))
               for blocks in (0, cfg.n_layers)]
    (loss0, grads0, peak0), (loss1, grads1, peak1) = results
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    worst = max(((a - b).norm() / a.norm()).item() for a, b in zip(grads0, grads1))
    assert worst < 1e-2, worst
    # 4 blocks x 8 x 1024 tokens x ~(10 dim + 3 ffn) bf16 values kept without it; with it, inputs and one block
    assert peak1 < peak0 - 2 * 8 * 1024 * (10 * cfg.dim + 3 * cfg.ffn_dim) * 2, (peak0, peak1)
