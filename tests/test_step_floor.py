"""benchmarks/step_floor.py: the step's floor from arithmetic, and its reading of a measured profile."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bitnet.model import PRESETS, Transformer

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_floor.py"


def load_script():
    spec = importlib.util.spec_from_file_location("step_floor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_95m_bytes_and_flops_by_hand():
    floor = load_script()
    # per token per block, bf16 (2 bytes): forward 2x768 + 2x768 (norm), 2 x 2 x 1536 (RoPE), 2 x 2 x 768 (sub-norm),
    # 2 x 2 x 768 (norm), 3 x 2 x 3072 (SwiGLU): 33,792; backward 5 x 2 x 3072 (SwiGLU), 4 x 2 x 768 twice (norms
    # with the stream's gradient), 3 x 2 x 768 (sub-norm), 2 x 2 x 1536 (RoPE): 53,760
    assert sum(floor.layer_ops(PRESETS["95m"]).values()) == 33_792 + 53_760
    # an fp32 stream: each of the two forward norms reads 2 more bytes a channel, each backward norm 6 more
    assert sum(floor.layer_ops(PRESETS["95m"], residual_bytes=4).values()) == 87_552 + 2 * 768 * 2 + 2 * 768 * 6
    f = floor.step_floor("95m", 32, 1024, gemm_tflops=1000.0, hbm_tbs=2.0, attention_ms=5.0)
    model = Transformer(PRESETS["95m"])
    attention_per_token = 12 * 8 * 768 * 1024  # flops_per_token's attention term
    assert f["gemm_flops"] == (model.flops_per_token(1024) - attention_per_token) * 32 * 1024
    assert f["ms"]["GEMMs"] == pytest.approx(f["gemm_flops"] / 1e15 * 1000)
    assert f["bytes"]["fused elementwise ops (blocks)"] == 87_552 * 8 * 32 * 1024
    assert f["bytes"]["loss kernel (bf16 logits read and written)"] == 4 * 32 * 1024 * 32000
    assert f["ms"]["AdamW + clip (fp32)"] == pytest.approx(model.num_params() * 32 / 2e12 * 1000)
    assert f["ms"]["attention"] == 5.0 and f["step_ms"] == pytest.approx(sum(f["ms"].values()))


def test_checkpointed_blocks_run_their_forward_twice():
    floor = load_script()
    cfg, tokens = PRESETS["3b"], 32 * 1024
    plain, every = floor.step_floor("3b", 32, 1024), floor.step_floor("3b", 32, 1024, checkpointed_blocks=26)
    bitlinear = plain["matmul_params"] - cfg.vocab_size * cfg.dim
    assert every["gemm_flops"] == plain["gemm_flops"] + 2 * bitlinear * tokens  # the blocks' GEMMs, not the head's
    assert every["attention_flops"] == plain["attention_flops"] * 9 // 7  # forward: 2 of attention's 7
    forward = sum(v for k, v in floor.layer_ops(cfg).items() if k.endswith("(fwd)"))
    extra = every["bytes"]["fused elementwise ops (blocks)"] - plain["bytes"]["fused elementwise ops (blocks)"]
    assert extra == forward * 26 * tokens and forward == 3 * (2 * 3200 * 2) + 2 * 9600 * 2 + 3 * 8640 * 2  # norms, RoPE, SwiGLU
    half = floor.step_floor("3b", 32, 1024, checkpointed_blocks=13)
    assert half["gemm_flops"] == plain["gemm_flops"] + bitlinear * tokens


def test_profile_gives_the_gemm_rate_and_the_budget_at_a_target(tmp_path):
    measured = {"gemm": 25.0, "attention": 6.0, "inductor": 4.0, "project triton": 8.0, "optimizer": 1.0,
                "other": 2.0}
    path = tmp_path / "tt.json"
    path.write_text(json.dumps({"results": {"fast-defaults": {"profile": {"ms_per_step_by_category": measured}},
                                            "bitnet-train": {"tok_s": 1.0}}}))
    out = tmp_path / "floor.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--profile", str(path), "--target-tok-s", "800000",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    floor, summary = data["floor"], data["summary"]
    assert floor["ms"]["GEMMs"] == pytest.approx(25.0) and floor["ms"]["attention"] == 6.0  # the measured rate
    assert summary["measured_ms"] == 46.0 and summary["measured_other_ms"] == 15.0
    assert summary["other_budget_ms"] == pytest.approx(32768 / 800000 * 1000 - 31.0)  # 9.96 ms
    assert summary["other_floor_ms"] == pytest.approx(floor["step_ms"] - 31.0)
    assert "the rest may take 9.96 ms" in proc.stdout


def test_a_full_kernel_list_is_sorted_again_with_todays_categories(tmp_path):
    floor = load_script()
    top = [{"kernel": "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "calls": 24, "ms": 20.0},
           {"kernel": "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16", "calls": 8, "ms": 3.0},
           {"kernel": "void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*", "calls": 8, "ms": 0.5},
           {"kernel": "triton_per_fused__scaled_dot_product_cudnn_attention_backward__to_copy_add_div", "calls": 8,
            "ms": 0.25},
           {"kernel": "_swiglu_norm_bwd_kernel", "calls": 8, "ms": 3.0},
           {"kernel": "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedOptimizer", "calls": 6,
            "ms": 1.0},
           {"kernel": "void at::native::vectorized_gather_kernel<16, long>", "calls": 1, "ms": 0.125}]
    stored = {"gemm": 20.0, "attention": 3.25, "inductor": 0.0, "project triton": 3.0, "optimizer": 1.0, "other": 0.625}
    path = tmp_path / "tt.json"
    path.write_text(json.dumps({"results": {"fast-defaults": {"profile": {
        "ms_per_step_by_category": stored, "kernel_ms_per_step": 27.875, "top": top}}}}))
    assert floor.profile_of(str(path), "fast-defaults") == {
        "gemm": 20.0, "attention": 3.5, "inductor": 0.25, "project triton": 3.0, "optimizer": 1.0, "other": 0.125}
    path.write_text(json.dumps({"results": {"fast-defaults": {"profile": {  # a cut list: the stored categories
        "ms_per_step_by_category": stored, "kernel_ms_per_step": 40.0, "top": top}}}}))
    assert floor.profile_of(str(path), "fast-defaults") == stored


def test_a_profile_without_the_variant_is_one_line_error(tmp_path):
    path = tmp_path / "tt.json"
    path.write_text(json.dumps({"results": {"fast": {"profile": {"ms_per_step_by_category": {"gemm": 1.0}}}}}))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--profile", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {path} has no profile of 'fast-defaults' (profiled: fast)"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--preset", "9b"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: unknown preset '9b'")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--checkpointed-blocks", "9"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: --checkpointed-blocks 9 is not between 0 and the 95m's 8 blocks"
