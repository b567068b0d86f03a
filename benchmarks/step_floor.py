"""How fast could the training step be? A floor for the step's time from arithmetic, beside a measured profile
(issue 25).

    PYTHONPATH=src python benchmarks/step_floor.py                                    # 95m, H100 figures
    PYTHONPATH=src python benchmarks/step_floor.py --profile tt.json --variant fast-defaults --target-tok-s 770000
    PYTHONPATH=src python benchmarks/step_floor.py --hbm-tbs 4.8                      # an H200's bandwidth
    PYTHONPATH=src python benchmarks/step_floor.py --preset 1.3b --micro-batches 2    # grad accumulation

The floor keeps the step's design (its GEMMs, its attention and its fused kernels) and asks each part to run at
the hardware's limit:
- GEMMs: 6 x (matmul parameters, the tied head included) x tokens FLOPs at --gemm-tflops (default: the rate the
  profile's GEMM kernels reached, else 789 TFLOP/s, an H100's bf16 GEMM at 8192^3 measured in issue 5);
- attention: the profile's attention kernels as measured (cuDNN and its helpers), else 7 x B x T^2 x heads x
  head_dim FLOPs (causal forward 2 B T^2 H d, backward 2.5 times that) at --attention-tflops;
- every other kernel moves only the bytes it must, at --hbm-tbs (H100 SXM: 3.35 TB/s; H200: 4.8): each fused op
  of a block reads its inputs once and writes its outputs once (`layer_ops`: bf16 activations, the residual
  stream at --residual-bytes; each residual add is counted in the norm after it, which reads the stream and the
  branch's output and writes their sum and its quantized norm); the loss kernel reads and writes the bf16
  logits; the embedding, the final norm and the tied weight's two gradients added (`edge_ops`); each BitLinear
  weight read twice (absmean, then quantized) and written once in bf16, per micro-batch; fused AdamW reads
  parameter, gradient and both moments and writes three of them, and the clip reads the gradients, once a step.
--checkpointed-blocks adds the recomputed forward of those blocks (GEMMs, attention, ops, weight quantization).
Not counted, so the floor is a lower bound: zero fills of gradient buffers, the weight gradients' casts to fp32,
and gradient accumulation across micro-batches.
With a profile (`benchmarks/train_throughput.py --profile VARIANT --out tt.json`: a bare step of the whole
batch, nothing checkpointed, or `--variant bitnet-train`: a window of the trainer's own steps, at the clocks a
long run holds, which on a 700 W H100 measured a little lower than a bare step's short burst; its preset, batch
and sequence length are taken from the file), the measured kernel time per category sits beside the floor, and
--target-tok-s says how much time the kernels other than GEMMs and attention may take at that rate, against
their floor. Prints the table; writes JSON (--out).
"""

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_throughput's kernel categories

GEMM_TFLOPS_H100 = 789.0
"""bf16 GEMM at 8192^3 on an H100 80GB HBM3, measured in benchmarks/train_throughput.py runs (issue 5)."""
HBM_TBS_H100 = 3.35
"""H100 SXM HBM3 bandwidth, datasheet (the H200's: 4.8 TB/s)."""


def layer_ops(cfg, act_bytes: int = 2, residual_bytes: int = 2) -> dict[str, int]:
    """Bytes per token per block that each fused elementwise op must read plus write (not GEMMs, not attention)."""
    d, q, kv, f = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim
    a, r = act_bytes, residual_bytes
    qkv = q + 2 * kv
    # the block input's add is the previous block's (the first block has none; the final norm takes the last one)
    add_norm = d * r + d * a + d * r + d * a  # read the stream and the branch, write their sum and its quantized norm
    norm_backward = d * a + d * r + d * r + d * r  # read dy, the saved input, the stream's gradient; write the sum
    return {
        "residual add + norm + quantize, attention input (fwd)": add_norm,
        "q/k/v split + RoPE (fwd)": 2 * qkv * a,
        "attention sub-norm + quantize (fwd)": 2 * q * a,
        "residual add + norm + quantize, FFN input (fwd)": add_norm,
        "SwiGLU + sub-norm + quantize (fwd)": 2 * f * a + f * a,
        "SwiGLU backward": 2 * f * a + f * a + 2 * f * a,
        "norm backward + stream gradient, FFN input": norm_backward,
        "attention sub-norm backward": 3 * q * a,
        "q/k/v RoPE backward": 2 * qkv * a,
        "norm backward + stream gradient, attention input": norm_backward,
    }


def edge_ops(cfg, tokens: int, act_bytes: int = 2, residual_bytes: int = 2) -> int:
    """Bytes a step outside the blocks, besides the loss kernel: the embedding's gather (fp32 rows read, the
    stream written) and its backward (the stream's gradient read, fp32 rows added to), the final norm forward and
    backward, and the tied weight's two fp32 gradients (head, embedding) added into one."""
    d, a, r = cfg.dim, act_bytes, residual_bytes
    embedding = tokens * (4 * d + d * r) + tokens * (d * r + 8 * d)
    final_norm = tokens * (d * r + d * a) + tokens * (d * a + d * r + d * r)
    tied_gradients = 3 * cfg.vocab_size * d * 4
    return embedding + final_norm + tied_gradients


def step_floor(preset: str, batch: int, seq_len: int, residual_bytes: int = 2, hbm_tbs: float = HBM_TBS_H100,
               gemm_tflops: float = GEMM_TFLOPS_H100, attention_ms: float | None = None,
               attention_tflops: float = 300.0, checkpointed_blocks: int = 0, micro_batches: int = 1) -> dict:
    """The floor of one training step of batch x seq_len tokens, part by part (ms, and bytes or FLOPs).

    checkpointed_blocks: blocks whose forward runs again in the backward (--activation-checkpointing): their
    GEMMs' forward (2 of the 6 FLOPs a parameter and token), attention's forward (2 of its 7), their forward
    ops' bytes and their weights' quantization once more. micro_batches: gradient accumulation; the weights are
    quantized once per micro-batch, AdamW runs once a step."""
    import torch

    from bitnet.model import PRESETS, Transformer

    cfg = PRESETS[preset]
    with torch.device("meta"):
        model = Transformer(cfg)
    matmul = model.num_params() - sum(p.numel() for p in model.parameters() if p.dim() == 1)
    bitlinear = matmul - cfg.vocab_size * cfg.dim  # the blocks' weights (the tied head is the embedding)
    params = model.num_params()
    tokens = batch * seq_len
    per_layer = layer_ops(cfg, residual_bytes=residual_bytes)
    gemm_flops = 6 * matmul * tokens + 2 * bitlinear * tokens * checkpointed_blocks // cfg.n_layers
    attn_flops = batch * seq_len**2 * cfg.n_heads * cfg.head_dim * (7 * cfg.n_layers + 2 * checkpointed_blocks)
    forward_bytes = sum(v for k, v in per_layer.items() if k.endswith("(fwd)"))
    quantizations = micro_batches * (1 + checkpointed_blocks / cfg.n_layers)
    bytes_ = {
        "fused elementwise ops (blocks)": (sum(per_layer.values()) * cfg.n_layers
                                           + forward_bytes * checkpointed_blocks) * tokens,
        "loss kernel (bf16 logits read and written)": 2 * tokens * cfg.vocab_size * 2,
        "embedding, final norm, tied gradients": edge_ops(cfg, tokens, residual_bytes=residual_bytes),
        "weight quantization (read twice, written in bf16)": int(bitlinear * (4 + 4 + 2) * quantizations),
        "AdamW + clip (fp32)": params * (4 * 4 + 3 * 4 + 4),
    }
    parts = {"GEMMs": gemm_flops / (gemm_tflops * 1e12) * 1000,
             "attention": attention_ms if attention_ms is not None else attn_flops / (attention_tflops * 1e12) * 1000}
    parts.update({k: v / (hbm_tbs * 1e12) * 1000 for k, v in bytes_.items()})
    return {"preset": preset, "tokens": tokens, "matmul_params": matmul, "gemm_flops": gemm_flops,
            "attention_flops": attn_flops, "bytes": bytes_, "layer_bytes_per_token": per_layer, "ms": parts,
            "step_ms": sum(parts.values()), "gemm_tflops": gemm_tflops, "hbm_tbs": hbm_tbs,
            "checkpointed_blocks": checkpointed_blocks, "micro_batches": micro_batches}


def read_profile(path: str, variant: str) -> tuple[dict, dict]:
    """(kernel ms per step by category, the run's preset/batch/seq_len) of a train_throughput.py --out file."""
    try:
        data = json.loads(Path(path).read_text())
        results = data["results"]
        prof = results.get(variant, {}).get("profile") if isinstance(results.get(variant), dict) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f"error: cannot read a train_throughput.py result from {path}: {e!r}") from None
    if not prof:
        have = [k for k, v in results.items() if isinstance(v, dict) and v.get("profile")]
        raise SystemExit(f"error: {path} has no profile of {variant!r} (profiled: {', '.join(have) or 'none'})")
    run = {k: data.get(k) for k in ("preset", "batch", "seq_len")}
    try:
        if not (isinstance(run["preset"], str) and all(isinstance(run[k], int) for k in ("batch", "seq_len"))):
            raise ValueError(f"no preset, batch and seq_len of its run: {run}")
        top, total = prof.get("top", []), prof.get("kernel_ms_per_step", 0.0)
        if top and abs(sum(r["ms"] for r in top) - total) < 0.01 * total:
            # every kernel is listed: sort them again with today's categories (older files put cuDNN's helper
            # kernels under "other" and an inductor norm kernel named after attention's backward under "attention")
            from train_throughput import CATEGORIES, kernel_category

            cats = dict.fromkeys(CATEGORIES, 0.0)
            for r in top:
                cats[kernel_category(r["kernel"])] += r["ms"]
            cats = {k: round(v, 3) for k, v in cats.items()}
        else:
            cats = dict(prof["ms_per_step_by_category"])
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in cats.values()):
            raise ValueError(f"a category's time is not a number of ms: {cats}")
        for needed in ("gemm", "attention"):
            if not cats.get(needed, 0) > 0:
                raise ValueError(f"no {needed} time in the profile")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SystemExit(f"error: the profile of {variant!r} in {path} is not usable: {e!r}") from None
    return cats, run


def report(floor: dict, measured: dict | None, target_tok_s: float) -> tuple[str, dict]:
    ms = floor["ms"]
    other_floor = sum(v for k, v in ms.items() if k not in ("GEMMs", "attention"))
    lines = [f"{floor['preset']}, {floor['tokens']:,} tokens a step: GEMMs at {floor['gemm_tflops']:.0f} TFLOP/s, "
             f"HBM at {floor['hbm_tbs']:.2f} TB/s",
             f"{'part':52s} {'GB':>7s} {'floor ms':>9s}"]
    for k, v in ms.items():
        gb = floor["bytes"].get(k)
        lines.append(f"{k:52s} {'' if gb is None else f'{gb / 1e9:7.2f}':>7s} {v:9.2f}")
    summary = {"floor_ms": floor["step_ms"], "floor_tok_s": floor["tokens"] / floor["step_ms"] * 1000,
               "other_floor_ms": other_floor}
    lines.append(f"{'step floor':52s} {'':7s} {floor['step_ms']:9.2f}   = {summary['floor_tok_s']:,.0f} tok/s")
    if measured:
        total = sum(measured.values())
        other = total - measured["gemm"] - measured["attention"]
        summary.update(measured_ms=total, measured_tok_s=floor["tokens"] / total * 1000, measured_other_ms=other)
        lines.append(f"measured kernels: {total:.2f} ms ({summary['measured_tok_s']:,.0f} tok/s): GEMMs "
                     f"{measured['gemm']:.2f}, attention {measured['attention']:.2f}, the rest "
                     f"{other:.2f} ms against its floor of {other_floor:.2f} ({other / other_floor:.2f}x)")
        if target_tok_s:
            budget = floor["tokens"] / target_tok_s * 1000 - measured["gemm"] - measured["attention"]
            summary.update(target_tok_s=target_tok_s, other_budget_ms=budget)
            if budget <= 0:
                lines.append(f"at {target_tok_s:,.0f} tok/s (kernel time only) these GEMMs and attention alone take "
                             f"{-budget:.2f} ms too long: unreachable")
            else:
                lines.append(f"at {target_tok_s:,.0f} tok/s (kernel time only) with these GEMMs and attention, the "
                             f"rest may take {budget:.2f} ms: {budget / other_floor:.2f}x its floor")
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="default: the profile's, else 95m")
    p.add_argument("--batch", type=int, default=None, help="sequences a step (default: the profile's, else 32)")
    p.add_argument("--seq-len", type=int, default=None, help="default: the profile's, else 1024")
    p.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--checkpointed-blocks", type=int, default=0, help="blocks recomputed in the backward")
    p.add_argument("--residual-bytes", type=int, default=2, choices=(2, 4),
                   help="the residual stream's element size (2: --residual-stream bf16, the default)")
    p.add_argument("--hbm-tbs", type=float, default=HBM_TBS_H100)
    p.add_argument("--gemm-tflops", type=float, default=0.0,
                   help="GEMM rate (0: the profile's measured rate, else 789, an H100's bf16 8192^3)")
    p.add_argument("--attention-tflops", type=float, default=300.0, help="attention's rate without a profile")
    p.add_argument("--profile", default="", help="a train_throughput.py --out JSON holding a profile")
    p.add_argument("--variant", default="fast-defaults", help="whose profile (with --profile)")
    p.add_argument("--target-tok-s", type=float, default=0.0)
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    from bitnet.model import PRESETS

    measured, run = read_profile(a.profile, a.variant) if a.profile else (None, {})
    for name, default in (("preset", "95m"), ("batch", 32), ("seq_len", 1024)):
        given, profiled = getattr(a, name), run.get(name)
        if given is not None and profiled is not None and given != profiled:
            raise SystemExit(f"error: --{name.replace('_', '-')} {given} differs from the profile's {profiled} "
                             f"({a.profile})")
        setattr(a, name, given if given is not None else profiled if profiled is not None else default)
    if a.preset not in PRESETS:
        raise SystemExit(f"error: unknown preset {a.preset!r} (known: {', '.join(PRESETS)})")
    if a.profile and (a.checkpointed_blocks or a.micro_batches != 1):
        raise SystemExit("error: a profile is a bare step of the whole batch with nothing checkpointed; "
                         "--checkpointed-blocks and --micro-batches apply without --profile")
    if a.target_tok_s and not a.profile:
        raise SystemExit("error: --target-tok-s needs --profile (the measured GEMMs and attention it budgets around)")
    if not 0 <= a.checkpointed_blocks <= PRESETS[a.preset].n_layers:
        raise SystemExit(f"error: --checkpointed-blocks {a.checkpointed_blocks} is not between 0 and the "
                         f"{a.preset}'s {PRESETS[a.preset].n_layers} blocks")
    for name in ("batch", "seq_len", "micro_batches", "hbm_tbs", "attention_tflops"):
        if not (getattr(a, name) > 0 and math.isfinite(getattr(a, name))):
            raise SystemExit(f"error: --{name.replace('_', '-')} must be a positive number, got {getattr(a, name)}")
    for name in ("gemm_tflops", "target_tok_s"):
        if not (getattr(a, name) >= 0 and math.isfinite(getattr(a, name))):
            raise SystemExit(f"error: --{name.replace('_', '-')} must be a positive number (0: not given), "
                             f"got {getattr(a, name)}")
    if a.seq_len > PRESETS[a.preset].max_seq_len:
        raise SystemExit(f"error: --seq-len {a.seq_len} exceeds the {a.preset}'s max_seq_len "
                         f"{PRESETS[a.preset].max_seq_len}")
    if a.batch % a.micro_batches:
        raise SystemExit(f"error: --micro-batches {a.micro_batches} does not divide --batch {a.batch}")
    gemm_tflops = a.gemm_tflops or GEMM_TFLOPS_H100
    if measured and not a.gemm_tflops:  # the rate the step's own GEMMs reached
        gemm_tflops = step_floor(a.preset, a.batch, a.seq_len)["gemm_flops"] / (measured["gemm"] / 1000) / 1e12
    floor = step_floor(a.preset, a.batch, a.seq_len, a.residual_bytes, a.hbm_tbs, gemm_tflops,
                       measured["attention"] if measured else None, a.attention_tflops, a.checkpointed_blocks,
                       a.micro_batches)
    text, summary = report(floor, measured, a.target_tok_s)
    if a.out:
        try:
            Path(a.out).write_text(json.dumps({"floor": floor, "measured": measured, "summary": summary}, indent=1))
        except OSError as e:
            raise SystemExit(f"error: cannot write {a.out}: {e.strerror or e}") from None
    print(text)


if __name__ == "__main__":
    main()
