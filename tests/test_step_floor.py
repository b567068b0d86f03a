"""benchmarks/step_floor.py: the step's floor from arithmetic, and its reading of a measured profile."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from bitnet.model import PRESETS, Transformer

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_floor.py"
MATMUL_95M = 95_354_880  # 95,398,656 parameters less the 33 norm gains' 43,776 (4 a block and the final one)


def load_script():
    spec = importlib.util.spec_from_file_location("step_floor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


floor = load_script()


def run(capsys, *argv):
    """main() in this process: (exit message or None, stdout)."""
    try:
        floor.main(list(argv))
        message = None
    except SystemExit as e:
        message = str(e)
    return message, capsys.readouterr().out


def test_95m_bytes_and_flops_by_hand():
    # per token per block, bf16 (2 bytes), d 768, q 768, k and v 384 each (GQA), f 3072. Forward: two residual adds
    # with the norms after them (read stream and branch, write sum and quantized norm: 4 x 2 x 768 each), RoPE
    # (2 x 2 x 1536), the attention sub-norm (2 x 2 x 768), SwiGLU (3 x 2 x 3072): 39,936. Backward: SwiGLU
    # (5 x 2 x 3072), two norms with the stream's gradient (4 x 2 x 768 each), the sub-norm (3 x 2 x 768), RoPE
    # (2 x 2 x 1536): 53,760
    ops = floor.layer_ops(PRESETS["95m"])
    assert sum(ops.values()) == 39_936 + 53_760
    assert ops["q/k/v split + RoPE (fwd)"] == 2 * 2 * (768 + 384 + 384)
    # an fp32 stream: each forward add + norm reads and writes the stream (4 more bytes a channel), each backward
    # norm reads it twice and writes it once (6 more)
    assert sum(floor.layer_ops(PRESETS["95m"], residual_bytes=4).values()) == 93_696 + 2 * 768 * 4 + 2 * 768 * 6
    f = floor.step_floor("95m", 32, 1024, gemm_tflops=1000.0, hbm_tbs=2.0, attention_ms=5.0)
    tokens = 32 * 1024
    assert f["matmul_params"] == MATMUL_95M and f["gemm_flops"] == 6 * MATMUL_95M * tokens
    with torch.device("meta"):
        model = Transformer(PRESETS["95m"])
    assert f["gemm_flops"] == (model.flops_per_token(1024) - 12 * 8 * 768 * 1024) * tokens  # without attention
    assert f["ms"]["GEMMs"] == pytest.approx(6 * MATMUL_95M * tokens / 1e15 * 1000)
    assert f["bytes"]["fused elementwise ops (blocks)"] == 93_696 * 8 * tokens
    assert f["bytes"]["loss kernel (bf16 logits read and written)"] == 4 * tokens * 32000
    # gather: fp32 rows read, bf16 stream written; backward: bf16 read, fp32 rows read and written; the final norm
    # 2 + 2 bytes forward, 2 + 2 + 2 backward (bf16 everywhere); the head's and the embedding's fp32 gradients summed
    assert f["bytes"]["embedding, final norm, tied gradients"] == (
        tokens * 768 * (4 + 2 + 2 + 8) + tokens * 768 * (4 + 6) + 3 * 32000 * 768 * 4)
    assert f["bytes"]["weight quantization (read twice, written in bf16)"] == (MATMUL_95M - 32000 * 768) * 10
    assert f["ms"]["AdamW + clip (fp32)"] == pytest.approx(model.num_params() * 32 / 2e12 * 1000)
    assert f["ms"]["attention"] == 5.0
    assert f["step_ms"] == pytest.approx(f["gemm_flops"] / 1e15 * 1000 + 5.0 + sum(f["bytes"].values()) / 2e12 * 1000)


def test_checkpointed_blocks_and_micro_batches():
    cfg, tokens = PRESETS["95m"], 32 * 1024
    plain = floor.step_floor("95m", 32, 1024)
    every = floor.step_floor("95m", 32, 1024, checkpointed_blocks=8)
    bitlinear = MATMUL_95M - 32000 * 768
    assert every["gemm_flops"] == plain["gemm_flops"] + 2 * bitlinear * tokens  # the blocks' GEMMs, not the head's
    assert every["attention_flops"] == 32 * 1024**2 * 12 * 64 * (7 * 8 + 2 * 8)  # forward: 2 of attention's 7
    forward = sum(v for k, v in floor.layer_ops(cfg).items() if k.endswith("(fwd)"))
    extra = every["bytes"]["fused elementwise ops (blocks)"] - plain["bytes"]["fused elementwise ops (blocks)"]
    assert forward == 39_936 and extra == forward * 8 * tokens
    weights = "weight quantization (read twice, written in bf16)"
    assert every["bytes"][weights] == 2 * plain["bytes"][weights]  # quantized again in the recompute
    half = floor.step_floor("95m", 32, 1024, checkpointed_blocks=4)
    assert half["gemm_flops"] == plain["gemm_flops"] + bitlinear * tokens
    two = floor.step_floor("95m", 32, 1024, micro_batches=2)  # the same tokens, the weights quantized twice
    assert two["gemm_flops"] == plain["gemm_flops"] and two["bytes"][weights] == 2 * plain["bytes"][weights]
    assert two["ms"]["AdamW + clip (fp32)"] == plain["ms"]["AdamW + clip (fp32)"]


def write_profile(path, measured, top=None, total=None, preset="95m"):
    prof = {"ms_per_step_by_category": measured}
    if top is not None:
        prof.update(top=top, kernel_ms_per_step=total)
    path.write_text(json.dumps({"preset": preset, "batch": 32, "seq_len": 1024,
                                "results": {"fast-defaults": {"profile": prof}, "bitnet-train": {"tok_s": 1.0}}}))


def test_profile_gives_the_gemm_rate_and_the_budget_at_a_target(tmp_path, capsys):
    measured = {"gemm": 25.0, "attention": 6.0, "inductor": 4.0, "project triton": 8.0, "optimizer": 1.0,
                "other": 2.0}
    path, out = tmp_path / "tt.json", tmp_path / "floor.json"
    write_profile(path, measured)
    message, stdout = run(capsys, "--profile", str(path), "--target-tok-s", "800000", "--out", str(out))
    assert message is None
    data = json.loads(out.read_text())
    f, summary = data["floor"], data["summary"]
    assert f["gemm_tflops"] == pytest.approx(6 * MATMUL_95M * 32768 / 0.025 / 1e12)  # 750 TFLOP/s measured
    assert f["ms"]["attention"] == 6.0 and summary["measured_ms"] == 46.0 and summary["measured_other_ms"] == 15.0
    assert summary["other_budget_ms"] == pytest.approx(32768 / 800000 * 1000 - 31.0)  # 9.96 ms
    assert "the rest may take 9.96 ms" in stdout
    message, stdout = run(capsys, "--profile", str(path), "--target-tok-s", "1100000")  # 29.8 ms a step: GEMMs 25
    assert message is None and "these GEMMs and attention alone take 1.21 ms too long: unreachable" in stdout
    # the profile's run sets the shape; another one given on the command line is refused
    message, _ = run(capsys, "--profile", str(path), "--preset", "700m")
    assert message == f"error: --preset 700m differs from the profile's 95m ({path})"
    message, _ = run(capsys, "--profile", str(path), "--batch", "32", "--seq-len", "2048")
    assert message == f"error: --seq-len 2048 differs from the profile's 1024 ({path})"


def test_a_full_kernel_list_is_sorted_again_with_todays_categories(tmp_path):
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
    write_profile(path, stored, top, 27.875)
    assert floor.read_profile(str(path), "fast-defaults") == (
        {"gemm": 20.0, "attention": 3.5, "inductor": 0.25, "project triton": 3.0, "optimizer": 1.0, "other": 0.125},
        {"preset": "95m", "batch": 32, "seq_len": 1024})
    write_profile(path, stored, top, 40.0)  # a cut list: the stored categories
    assert floor.read_profile(str(path), "fast-defaults")[0] == stored


def test_a_trainer_window_profile_is_read_by_its_variant(tmp_path, capsys):
    # train_throughput.py --profile bitnet-train: the trainer row holds a window's profile beside its own numbers
    window = {"ms_per_step_by_category": {"gemm": 26.0, "attention": 6.5, "inductor": 4.5, "project triton": 8.0,
                                          "optimizer": 1.3, "other": 1.4},
              "first_step": 211, "count": 40, "steps": "211-250", "wall_ms_per_step": 48.5, "idle_ms_per_step": 0.8}
    path, out = tmp_path / "tt.json", tmp_path / "floor.json"
    path.write_text(json.dumps({"preset": "95m", "batch": 32, "seq_len": 1024,
                                "results": {"bitnet-train": {"tok_s_median": 680000.0, "profile": window}}}))
    message, _ = run(capsys, "--profile", str(path), "--variant", "bitnet-train", "--out", str(out))
    assert message is None
    summary = json.loads(out.read_text())["summary"]
    assert summary["measured_ms"] == pytest.approx(47.7) and summary["measured_other_ms"] == pytest.approx(15.2)


def test_bad_input_is_one_line_error(tmp_path, capsys):
    path = tmp_path / "tt.json"
    path.write_text(json.dumps({"results": {"fast": {"profile": {"ms_per_step_by_category": {"gemm": 1.0}}}}}))
    assert run(capsys, "--profile", str(path))[0] == (
        f"error: {path} has no profile of 'fast-defaults' (profiled: fast)")
    path.write_text(json.dumps([1, 2]))
    assert run(capsys, "--profile", str(path))[0].startswith(f"error: cannot read a train_throughput.py result from "
                                                             f"{path}: TypeError")
    write_profile(path, {"gemm": 0.0, "attention": 1.0})
    assert run(capsys, "--profile", str(path))[0] == (
        f"error: the profile of 'fast-defaults' in {path} is not usable: ValueError('no gemm time in the profile')")
    write_profile(path, {"gemm": 20.0, "other": 1.0})
    assert run(capsys, "--profile", str(path))[0].endswith("ValueError('no attention time in the profile')")
    write_profile(path, {"gemm": 20.0, "attention": None})
    assert "is not usable: ValueError(\"a category's time is not a number of ms" in run(capsys, "--profile", str(path))[0]
    path.write_text(json.dumps({"batch": "32", "results": {"fast-defaults": {"profile": {
        "ms_per_step_by_category": {"gemm": 1.0, "attention": 1.0}}}}}))
    message = run(capsys, "--profile", str(path))[0]
    assert message.startswith("error: the profile of") and "no preset, batch and seq_len of its run" in message
    write_profile(path, {"gemm": 20.0, "attention": 5.0})
    assert run(capsys, "--profile", str(path), "--checkpointed-blocks", "2")[0] == (
        "error: a profile is a bare step of the whole batch with nothing checkpointed; --checkpointed-blocks and "
        "--micro-batches apply without --profile")
    assert run(capsys, "--target-tok-s", "770000")[0] == (
        "error: --target-tok-s needs --profile (the measured GEMMs and attention it budgets around)")
    assert run(capsys, "--preset", "9b")[0].startswith("error: unknown preset '9b'")
    assert run(capsys, "--checkpointed-blocks", "9")[0] == (
        "error: --checkpointed-blocks 9 is not between 0 and the 95m's 8 blocks")
    assert run(capsys, "--hbm-tbs", "0")[0] == "error: --hbm-tbs must be a positive number, got 0.0"
    assert run(capsys, "--hbm-tbs", "inf")[0] == "error: --hbm-tbs must be a positive number, got inf"
    assert run(capsys, "--batch", "-1")[0] == "error: --batch must be a positive number, got -1"
    assert run(capsys, "--gemm-tflops", "-5")[0] == (
        "error: --gemm-tflops must be a positive number (0: not given), got -5.0")
    assert run(capsys, "--gemm-tflops", "nan")[0] == (
        "error: --gemm-tflops must be a positive number (0: not given), got nan")
    assert run(capsys, "--preset", "tiny")[0] == "error: --seq-len 1024 exceeds the tiny's max_seq_len 256"
    assert run(capsys, "--micro-batches", "3")[0] == "error: --micro-batches 3 does not divide --batch 32"
    message, stdout = run(capsys, "--out", str(tmp_path / "missing" / "floor.json"))
    assert message.startswith(f"error: cannot write {tmp_path / 'missing' / 'floor.json'}: ") and stdout == ""
