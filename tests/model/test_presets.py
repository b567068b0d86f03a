"""The BitNet b1.58 paper's sizes: shapes as the FAQ note's Table 1, exact parameter counts, train defaults,
and the memory check that guards them."""

import pytest
import torch

from bitnet.cli.train import build_parser, resolve_config
from bitnet.model import PRESETS, Transformer
from bitnet.train import memory
from bitnet.train.config import TrainConfig, resolve_derived

# "The Era of 1-bit LLMs: Training Tips, Code and FAQ", Table 1: hidden size, GLU size, heads, layers.
FAQ_TABLE_1 = {"700m": (1536, 4096, 24, 24), "1.3b": (2048, 5460, 32, 24), "3b": (3200, 8640, 32, 26)}


def expected_params(dim: int, ffn: int, layers: int, vocab: int = 32000) -> int:
    """Multi-head attention (k and v as wide as q), SwiGLU, SubLN norms, tied embedding."""
    per_layer = 4 * dim * dim + 3 * dim * ffn + 3 * dim + ffn  # q,k,v,o + gate,up,down + 3 norms of dim + ffn_sub_norm
    return vocab * dim + layers * per_layer + dim  # + final norm


@pytest.mark.parametrize("name", sorted(FAQ_TABLE_1))
def test_paper_presets_have_the_faq_shapes_and_exact_parameter_counts(name):
    cfg = PRESETS[name]
    dim, ffn, heads, layers = FAQ_TABLE_1[name]
    assert (cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.n_layers) == (dim, ffn, heads, layers)
    assert cfg.n_kv_heads == cfg.n_heads and cfg.vocab_size == 32000 and cfg.max_seq_len == 1024
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_params() == expected_params(dim, ffn, layers)
    norms = layers * (3 * dim + ffn) + dim  # the 1-dim gains (not matmuls): 3 of dim and one of ffn a layer, final
    assert model.flops_per_token(1024) == 6 * (model.num_params() - norms) + 12 * layers * dim * 1024


def test_paper_preset_sizes_match_their_names():
    counts = {}
    for name in FAQ_TABLE_1:
        with torch.device("meta"):
            counts[name] = Transformer(PRESETS[name]).num_params()
    assert counts == {"700m": 728_839_680, "1.3b": 1_273_579_488, "3b": 3_324_381_440}


def test_paper_presets_resolve_with_the_faq_learning_rates_and_a_micro_batch(tmp_path):
    runs = ["--runs-dir", str(tmp_path)]
    cfg, model_cfg, _, _ = resolve_config(["--preset", "3b", *runs])
    assert model_cfg == PRESETS["3b"]
    assert (cfg.lr_peak, cfg.lr_stage1_end, cfg.lr_stage2_start, cfg.lr_end) == (1.2e-3, 8e-4, 8e-4, 1.2e-5)
    derived = resolve_derived(cfg, world_size=1, max_seq_len=1024, n_layers=model_cfg.n_layers)
    assert (derived["grad_accum"], derived["checkpointed_blocks"]) == (1, 26)  # the whole batch, every block recomputed
    cfg, model_cfg, _, _ = resolve_config(["--preset", "1.3b", *runs])
    derived = resolve_derived(cfg, world_size=1, max_seq_len=1024, n_layers=model_cfg.n_layers)
    assert (derived["grad_accum"], derived["checkpointed_blocks"]) == (1, 24)  # as the 3b: measured faster, lighter
    cfg, _, _, _ = resolve_config(["--preset", "1.3b", "--micro-batch-size", "8", *runs])
    assert cfg.micro_batch_size == 8 and cfg.lr_peak == 1.2e-3  # a flag beats the preset's default
    cfg, _, _, _ = resolve_config(["--preset", "700m", *runs])
    assert (cfg.lr_peak, cfg.lr_stage1_end, cfg.micro_batch_size) == (1.5e-3, 1e-3, 0)  # the seed's, as Table 2
    help_text = build_parser().format_help()
    assert "{95m,tiny,700m,1.3b,3b}" in help_text and "(default: 0; 1.3b: 32; 3b: 32)" in help_text
    assert "(default: none; 1.3b: all; 3b: all)" in " ".join(help_text.split())


GiB = 2**30


@pytest.mark.parametrize("name,micro,gpu_gib,fits", [
    # the lower bounds at the default bf16 stream and 4096-row head chunks (57.8 and 115.8 GiB with the fp32
    # stream and the whole head)
    ("3b", 4, 79.2, True),      # micro-batches of 4 on an 80 GB H100: 56.9 GiB lower bound
    ("3b", 32, 79.2, False),    # the whole batch at once, no block checkpointed: 107.0 GiB
    ("1.3b", 16, 79.2, True),
    ("700m", 32, 79.2, True),
])
def test_memory_check_on_an_80gb_gpu(monkeypatch, name, micro, gpu_gib, fits):
    monkeypatch.setattr(memory, "device_bytes", lambda device: int(gpu_gib * GiB))
    cfg = TrainConfig(preset=name, micro_batch_size=micro)
    if fits:
        memory.check_fits(cfg, PRESETS[name], micro, torch.device("cpu"))
    else:
        with pytest.raises(ValueError, match=r"micro-batch 32 x --seq-len 1024 needs at least 107.0 GiB"):
            memory.check_fits(cfg, PRESETS[name], micro, torch.device("cpu"))


def test_memory_check_lets_the_3b_take_the_whole_batch_with_every_block_checkpointed(monkeypatch):
    monkeypatch.setattr(memory, "device_bytes", lambda device: int(79.2 * GiB))
    with pytest.raises(ValueError, match=r"lower .*, or checkpoint more blocks \(--activation-checkpointing, now none\)$"):
        memory.check_fits(TrainConfig(preset="3b", micro_batch_size=32), PRESETS["3b"], 32, torch.device("cpu"))
    memory.check_fits(TrainConfig(preset="3b", micro_batch_size=32, activation_checkpointing="all"), PRESETS["3b"], 32,
                      torch.device("cpu"))
    # the 1.3b's default: the whole batch, every block checkpointed (22.2 GiB measured on an H100)
    cfg = TrainConfig(preset="1.3b", micro_batch_size=32, activation_checkpointing="all")
    memory.check_fits(cfg, PRESETS["1.3b"], 32, torch.device("cpu"))
    need = memory.step_bytes(PRESETS["1.3b"], 32, 1024, checkpointed_blocks=24, residual_bytes=2, head_chunk_rows=4096)
    assert 0.7 * 22.2 < sum(need.values()) / GiB <= 22.2  # a lower bound, not far under


def test_memory_check_sends_weights_that_never_fit_to_fsdp2(monkeypatch):
    monkeypatch.setattr(memory, "device_bytes", lambda device: 40 * GiB)
    with pytest.raises(ValueError, match=r"AdamW state \(fp32, 16 bytes a parameter\) alone need 49.5 GiB, more "
                                         r"than the machine's 40.0 GiB; .*--parallel fsdp2"):
        memory.check_fits(TrainConfig(preset="3b"), PRESETS["3b"], 1, torch.device("cpu"))
    # under FSDP2 each of 4 ranks holds a quarter of them: 12.4 GiB + micro-batch 1's activations
    memory.check_fits(TrainConfig(preset="3b", parallel="fsdp2"), PRESETS["3b"], 1, torch.device("cpu"), world_size=4)
    with pytest.raises(ValueError, match=r"alone need 49.5 GiB, more than"):  # FSDP2 on one rank shards nothing
        memory.check_fits(TrainConfig(preset="3b", parallel="fsdp2"), PRESETS["3b"], 1, torch.device("cpu"))
    monkeypatch.setattr(memory, "device_bytes", lambda device: 20 * GiB)
    with pytest.raises(ValueError, match=r"alone need 24.8 GiB per rank \(2 FSDP2 ranks\), more than the machine's "
                                         r"20.0 GiB"):
        memory.check_fits(TrainConfig(preset="3b", parallel="fsdp2"), PRESETS["3b"], 1, torch.device("cpu"),
                          world_size=2)
