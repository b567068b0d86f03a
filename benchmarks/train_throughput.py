"""Training-step speed of the 95m BitNet on one GPU: the project's fast path beside reference variants.

    PYTHONPATH=src python benchmarks/train_throughput.py --out bench.json        # all rows, ~7 min on an H100
    PYTHONPATH=src python benchmarks/train_throughput.py --variants fast,bf16-compiled --trainer-steps 0
    PYTHONPATH=src python benchmarks/train_throughput.py --smoke                  # CPU, tiny model: the plumbing

Rows (global batch 32 x 1024, bf16 autocast, fused AdamW, grad clip 1.0, random tokens):
  eager-ref      the straightforward BitLinear (RMSNorm, then every BitLinear quantizes its input and
                 weight, Training-Tips style, fp32 quantization math), no compile, F.cross_entropy on
                 fp32 logits
  compile-ref    the same under torch.compile(model), the loss compiled with it
  fast           the project's path, as the trainer runs it with --residual-stream fp32 --head-chunk-rows 0
                 (the model's and the kernels' own defaults): bitnet.train.step.compile_step (compiled
                 blocks with the RMSNorm + int8 quantization fused, the FFN's SwiGLU + sub-norm + int8
                 quantization as one Triton kernel, the head + cross entropy with the logits' gradient
                 made in the forward), the clip handed to fused AdamW, the whole step captured as one
                 CUDA graph and replayed (bitnet.train.graphed; its first two steps run uncaptured)
  bf16-compiled  ModelConfig(quantization='none') on the same path: the same shapes without BitNet
  fast-defaults  `fast` with the trainer's defaults since issue 25's sixth session (bf16 residual stream, the
                 head in chunks of 4,096 rows); fast-defaults-normkernel: that with the norms' Triton kernel
  fast-*         exploration rows, one change each against `fast` or `fast-defaults` (see VARIANTS)
  bitnet-train   the real trainer (bitnet-train --preset 95m, default intervals) for --trainer-steps steps
                 on --data token data: the median tok_s of its scalars.jsonl
  bitnet-train-* the same with trainer flags or process-wide switches changed (see TRAINER_VARIANTS)
A row's "kernels" tweak is a `bitnet.model.kernels.KernelChoice` (as a dict of its fields): each fused op's
Triton kernel or its PyTorch reference ("torch"; `norm_quant` also takes "kernel", its kernel inside the
compiled blocks), and the kernels' launch settings.
MFU = model.flops_per_token(seq_len) * tok/s / peak, where flops_per_token = 6 * (matmul params incl.
the tied head) + 12 * n_layers * dim * seq_len = 648 MFLOP/token for 95m; peaks: 989 TFLOP/s (H100 dense
bf16 datasheet) and the bf16 GEMM rate measured in this run (8192^3, random data).
Every row runs in its own process with empty compile caches, so its time to first step (from the
process start to the end of the first optimizer step) is a cold start. Also checked here: the Triton
kernels against their fallbacks (outputs poisoned with NaN first), the fast path against the reference
(logits, grads, 50 training steps on real tokens), and with --sdpa the attention backends.
Prints a table last; writes JSON (--out).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from functools import partial
from pathlib import Path

# the trainer's defaults since issue 25's sixth session: bf16 residual stream, the head in chunks of 4096 rows
DEFAULTS_TWEAKS = {"residual_stream": "bf16", "kernels": {"cross_entropy_launch": {"chunk_rows": 4096}}}
VARIANTS = {
    # name: (quantization, formulation, compile, tweaks)
    "eager-ref": ("bitnet", "ref", "none", {"kernels": {"loss": "torch", "embedding": "torch"}}),
    "compile-ref": ("bitnet", "ref", "model", {"kernels": {"loss": "torch", "embedding": "torch"}}),
    "fast": ("bitnet", "project", "project", {}),
    "fast-defaults": ("bitnet", "project", "project", DEFAULTS_TWEAKS),
    # ... with the RMSNorm + quantize kernel inside the compiled blocks instead of inductor's fused reference
    "fast-defaults-normkernel": ("bitnet", "project", "project", {
        **DEFAULTS_TWEAKS, "kernels": {**DEFAULTS_TWEAKS["kernels"], "norm_quant": "kernel"}}),
    # ... with switch 4 of issue 25: BitLinear's forward GEMMs in FP8 from e4m3 activations
    "fast-defaults-fp8fwd": ("bitnet", "project", "project", {
        **DEFAULTS_TWEAKS, "kernels": {**DEFAULTS_TWEAKS["kernels"], "fp8_forward": True}}),
    "bf16-compiled": ("none", "project", "project", {}),
    # exploration: one change each against `fast` (benchmarks/NOTES.md)
    "fast-torchce": ("bitnet", "project", "project", {"kernels": {"loss": "torch"}}),  # F.cross_entropy, fp32 logits
    "fast-nofuse": ("bitnet", "project", "project", {"fused_mlp": False}),  # gate and up: a GEMM each
    "fast-nofuse-qkv": ("bitnet", "project", "project", {"kernels": {"rope_qkv": "torch"}}),  # q, k, v: a GEMM each
    # FlashAttention-4 for attention (needs FA4 on sys.path: benchmarks/fa4_install.py; else the row runs SDPA)
    "fast-fa4": ("bitnet", "project", "project", {"kernels": {"attention": "fa4"}}),
    "fast-combo": ("bitnet", "project", "project", {"inductor": {"combo_kernels": True}}),  # small kernels merged
    "fast-torchembed": ("bitnet", "project", "project", {"kernels": {"embedding": "torch"}}),  # aten's sorted bwd
    "fast-whole": ("bitnet", "project", "whole", {}),            # one graph for the model instead of per block
    "fast-unfused": ("bitnet", "ref", "project", {}),            # the reference formulation on the fast path
    # the bf16 twin under compile(model)
    "bf16-compile-ref": ("none", "ref", "model", {"kernels": {"loss": "torch", "embedding": "torch"}}),
    "fast-cdt": ("bitnet", "project", "project", {"coordinate_descent_tuning": True}),  # inductor tunes its kernels
    "fast-nograph": ("bitnet", "project", "project", {"cuda_graphs": False}),  # the step launched op by op
    "fast-torchswiglu": ("bitnet", "project", "project", {"kernels": {"swiglu_norm_quant": "torch"}}),  # inductor's
    "fast-swiglu-run4": ("bitnet", "project", "project",  # the SwiGLU backward as in run 4: 2 rows, no prefetch
                         {"kernels": {"swiglu_launch": {"bwd_rows": 2, "bwd_warps": 8, "bwd_programs_per_sm": 16,
                                                        "bwd_prefetch": False}}}),
}
# the real trainer, as shipped and with one library switch changed (apply_tweaks)
TRAINER_VARIANTS = {"bitnet-train": {}, "bitnet-train-repeat": {},  # the same row again: drift within a call
                    "bitnet-train-combo": {"inductor": {"combo_kernels": True}},
                    "bitnet-train-torchembed": {"kernels": {"embedding": "torch"}},
                    # the FP8 switches (issue 25), as a user turns them on: trainer flags ("argv")
                    "bitnet-train-fp8-head": {"argv": ["--fp8", "head"]},
                    "bitnet-train-fp8-dx": {"argv": ["--fp8", "grad_input"]},
                    "bitnet-train-fp8-dw": {"argv": ["--fp8", "grad_weight"]},
                    "bitnet-train-fp8-all": {"argv": ["--fp8", "all"]},
                    "bitnet-train-fp8-fwd": {"argv": ["--fp8", "forward"]},  # switch 4: e4m3 activations
                    "bitnet-train-fa4": {"kernels": {"attention": "fa4"}},
                    "bitnet-train-normkernel": {"kernels": {"norm_quant": "kernel"}},  # the norms' kernel, compiled
                    # inductor's compile workers started when it first compiles (torch's own timing), not at setup
                    "bitnet-train-latepool": {"late_compile_pool": True},
                    # eval every 100 steps (256 sequences): the peak with eval's forwards, which the default
                    # intervals (eval every 5,000 steps) leave out of a short row
                    "bitnet-train-eval": {"argv": ["--eval-interval", "100"]},
                    # the defaults since issue 25's sixth session (bf16 residual stream, the head in chunks of 4096
                    # rows) against the seed's (fp32 stream, the whole head) and each change alone; the headchunk
                    # rows keep the fp32 stream, as measured before the defaults changed
                    "bitnet-train-seed": {"argv": ["--residual-stream", "fp32", "--head-chunk-rows", "0"]},
                    "bitnet-train-fp32resid": {"argv": ["--residual-stream", "fp32"]},
                    "bitnet-train-wholehead": {"argv": ["--head-chunk-rows", "0"]},
                    "bitnet-train-headchunk": {"argv": ["--residual-stream", "fp32", "--head-chunk-rows", "8192"]},
                    "bitnet-train-headchunk4k": {"argv": ["--residual-stream", "fp32", "--head-chunk-rows", "4096"]},
                    "bitnet-train-headchunk2k": {"argv": ["--residual-stream", "fp32", "--head-chunk-rows", "2048"]},
                    "bitnet-train-bf16resid": {"argv": ["--residual-stream", "bf16", "--head-chunk-rows", "0"]},
                    "bitnet-train-bf16resid-headchunk4k": {"argv": ["--residual-stream", "bf16",
                                                                    "--head-chunk-rows", "4096"]}}
DEFAULT = "check,fast,bitnet-train,bf16-compiled,compile-ref,eager-ref,fast-torchce"
DATASHEET_TFLOPS = 989.0


# ---------------------------------------------------------------------------- child processes

def reference_bitlinear_forward(self, x):
    """The straightforward BitLinear: quantize input and weight (fp32 math), STE, matmul."""
    import torch.nn.functional as F

    from bitnet.model.bitlinear import activation_quant, matmul_dtype, weight_quant

    dtype = matmul_dtype(x)
    x_q = x + (activation_quant(x) - x).detach()
    w = self.weight
    w_q = w + (weight_quant(w) - w).detach()
    return F.linear(x_q.to(dtype), w_q.to(dtype))


def use_reference_formulation(model) -> None:
    """Norms return plain RMSNorm outputs; every projection is its own GEMM (q/k/v and gate/up not stacked)
    and every BitLinear quantizes its own input (per instance)."""
    from bitnet.model.bitlinear import BitLinear
    from bitnet.model.llama import MLP, Attention, RMSNorm

    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.quantize_output = False
        elif isinstance(m, (Attention, MLP)):
            m.fused_projections = False
        elif isinstance(m, BitLinear):
            m.quantized_input = False  # its input is a plain norm output now, whatever path reads it
            m.forward = types.MethodType(reference_bitlinear_forward, m)


def build(quantization, formulation, preset, device):
    from bitnet.model import PRESETS, ModelConfig, Transformer

    cfg = ModelConfig(**{**PRESETS[preset].to_dict(), "quantization": quantization})
    model = Transformer(cfg).to(device)
    model.init_weights(seed=0)
    if formulation == "ref":
        use_reference_formulation(model)
    return model


def compiled(model, how):
    import torch

    from bitnet.train.step import compile_step

    if how == "none":
        return model
    if how == "model":
        return torch.compile(model)
    return compile_step(model, regional=how != "whole")


class TorchLoss:
    """A model whose loss is F.cross_entropy over its fp32 logits and whose embedding backward is aten's:
    the reference in `correctness` (which runs in the fast path's process, where the fast switches are set)."""

    def __init__(self, model):
        self.model = model

    def parameters(self):
        return self.model.parameters()

    def __call__(self, idx, targets=None):
        from dataclasses import replace

        import torch.nn.functional as F

        from bitnet.model.kernels import current_kernels, use_kernels

        with use_kernels(replace(current_kernels(), embedding="torch")):
            logits = self.model(idx)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def apply_tweaks(tweaks: dict) -> None:
    """Process-wide switches of one exploration row (each row runs in its own process)."""
    import torch._inductor.config

    from bitnet.model.kernels import KernelChoice, set_kernels

    torch._inductor.config.coordinate_descent_tuning = tweaks.get("coordinate_descent_tuning", False)
    for key, value in tweaks.get("inductor", {}).items():
        setattr(torch._inductor.config, key, value)
    set_kernels(KernelChoice.from_dict(tweaks.get("kernels", {})))
    if tweaks.get("late_compile_pool"):
        import bitnet.train.loop
        bitnet.train.loop.start_compile_workers = lambda: None
    if tweaks.get("kernels", {}).get("attention") == "fa4":  # say whether FA4 runs or the row falls back to SDPA
        from bitnet.model.kernels import attention
        print(f"[fa4] available: {attention.fa4_available()} {attention.fa4_import_error() or ''}", flush=True)


def uses_graphs(how: str, tweaks: dict, device) -> bool:
    """The trainer's path (compiled blocks) replays its step as a CUDA graph, as bitnet-train does."""
    return how == "project" and tweaks.get("cuda_graphs", True) and device.type == "cuda"


def make_step(model, how, device, graphs=False, lr=1e-3, wd=0.1):
    """(step_model, step(batch) -> StepOutput) on the project's optimizer and train_step.

    graphs: the step through GraphedTrainStep (captured at its third call, replayed after), as the trainer.
    """
    import torch

    from bitnet.train.config import TrainConfig
    from bitnet.train.graphed import GraphedTrainStep
    from bitnet.train.optim import build_optimizer, set_schedule
    from bitnet.train.step import train_step

    cfg = TrainConfig()
    opt = build_optimizer(model, cfg, fused=device.type == "cuda")
    set_schedule(opt, lr, wd)
    step_model = compiled(model, how)
    autocast = partial(torch.autocast, "cuda", dtype=torch.bfloat16) if device.type == "cuda" else \
        partial(torch.autocast, "cpu", enabled=False)

    if graphs:
        stepper = GraphedTrainStep(step_model, opt, autocast, cfg.grad_clip, device)
        return step_model, lambda batch: stepper([batch], lr=lr, wd=wd)

    def step(batch):
        return train_step(step_model, opt, [batch], autocast, cfg.grad_clip, lr, wd, device)
    return step_model, step


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


CATEGORIES = ("gemm", "attention", "inductor", "project triton", "optimizer", "other")


def kernel_category(name: str) -> str:
    """A profiled CUDA kernel's category. Inductor's kernels first: one that fuses a norm with attention's
    backward is named after it. Attention: SDPA's cuDNN kernels and cuDNN's helpers around them (the GQA head
    reduction, dO.O, dQ's conversion), FlashAttention's."""
    low = name.lower()
    if low.startswith(("_rmsnorm", "_cross_entropy", "_swiglu", "_rope")):
        return "project triton"
    if low.startswith("triton"):
        return "inductor"
    if any(k in low for k in ("sdpa", "flash", "fmha", "cudnn", "attention")):
        return "attention"
    if any(k in low for k in ("gemm", "cutlass", "xmma", "nvjet", "cublas")):
        return "gemm"
    if any(k in low for k in ("multi_tensor", "adam", "foreach")):
        return "optimizer"
    return "other"


def profile_steps(step, batches, device, n=2) -> dict:
    """CUDA kernel time per step, by category and the top kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            step(batches[i % len(batches)])
        sync(device)
    return kernel_summary(prof, n)


def kernel_summary(prof, n: int) -> dict:
    """A finished profiler's CUDA kernels over n steps: ms per step by category, the total, the top kernels."""
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            rows.append((e.key, e.count // n, t / n / 1000))
    rows.sort(key=lambda r: -r[2])
    cats = dict.fromkeys(CATEGORIES, 0.0)
    for name, _, ms in rows:
        cats[kernel_category(name)] += ms
    return {"ms_per_step_by_category": {k: round(v, 3) for k, v in cats.items()},
            "kernel_ms_per_step": round(sum(r[2] for r in rows), 3),
            "top": [{"kernel": k[:110], "calls": c, "ms": round(ms, 3)} for k, c, ms in rows[:80]]}


def run_variant(name, a, t0) -> dict:
    import torch

    quantization, formulation, how, tweaks = VARIANTS[name]
    device = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    apply_tweaks(tweaks)
    model = build(quantization, formulation, a.preset, device)
    model.residual_in_matmul_dtype = tweaks.get("residual_stream", "fp32") == "bf16"  # before compiling
    from bitnet.model.llama import MLP

    for m in model.modules():  # per instance: gate and up as one GEMM (fused_linear) or apart
        if isinstance(m, MLP) and "fused_mlp" in tweaks:
            m.fused_projections = tweaks["fused_mlp"]
    graphs = uses_graphs(how, tweaks, device)
    step_model, step = make_step(model, how, device, graphs)
    g = torch.Generator().manual_seed(1)
    batches = [tuple(torch.randint(0, model.cfg.vocab_size, (2, a.batch, a.seq_len), generator=g)) for _ in range(4)]
    out = step(batches[0])
    sync(device)
    ttfs = time.time() - t0
    for i in range(1, a.warmup):
        step(batches[i % 4])
    sync(device)
    per_step = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        for i in range(a.steps):
            out = step(batches[i % 4])
        sync(device)
        per_step.append((time.perf_counter() - t) / a.steps)
    ms = statistics.median(per_step) * 1000
    res = {"ms_per_step": ms, "ms_per_step_repeats": [x * 1000 for x in per_step],
           "tok_s": a.batch * a.seq_len / (ms / 1000), "ttfs_s": ttfs, "last_loss": out.loss.item(),
           "flops_per_token": model.flops_per_token(a.seq_len), "quantization": quantization,
           "formulation": formulation, "compile": how, "cuda_graphs": graphs, "tweaks": tweaks}
    if device.type == "cuda":
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    try:
        from torch._dynamo.utils import counters
        res["dynamo_graphs"] = counters["stats"]["unique_graphs"]
    except Exception:
        pass
    print(f"[{name}] {ms:.2f} ms/step {res['tok_s']:,.0f} tok/s ttfs {ttfs:.1f}s", flush=True)
    if name in a.profile.split(",") and device.type == "cuda":
        res["profile"] = profile_steps(step, batches, device)
        print(f"[{name}] kernel ms/step by category: {res['profile']['ms_per_step_by_category']}")
        for r in res["profile"]["top"][:12]:
            print(f"    {r['ms']:7.3f} ms  x{r['calls']:<4d} {r['kernel'][:90]}")
    if name == "fast" and a.correctness:
        res["correctness"] = correctness(model, step_model, a, device, graphs)
    return res


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def correctness(fast_model, fast_step_model, a, device, graphs) -> dict:
    """The fast path against the eager reference formulation: logits, grads, 50 steps on real tokens.

    graphs: the fast path's 50 steps replay a CUDA graph, as the trainer's do.
    """
    import torch

    from bitnet.data import build_data, load_tokenizer
    from bitnet.train.graphed import GraphedTrainStep
    from bitnet.train.config import TrainConfig
    from bitnet.train.optim import build_optimizer, set_schedule
    from bitnet.train.schedule import lr_at, wd_at
    from bitnet.train.step import train_step

    tok = load_tokenizer("llama2")
    data = build_data(a.data, tok, a.seq_len, 0, 32, a.batch)
    batches = [data.train.next_batch(a.batch) for _ in range(a.corr_steps)]
    ref = build("bitnet", "ref", a.preset, device)
    ref_call = TorchLoss(ref)
    fast_model.init_weights(seed=0)
    fast_model.zero_grad(set_to_none=True)  # a captured step leaves its gradients in p.grad
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    x, y = (t.to(device) for t in batches[0])
    logits, losses, grads = {}, {}, {}
    for name, params_of, call in (("ref", ref, ref_call), ("fast", fast_model, fast_step_model)):
        # the fast path's logits with autograd on: its training forward (stacked projections), not eval's
        with torch.set_grad_enabled(name == "fast"), autocast():
            logits[name] = call(x).float().detach()
        with autocast():
            loss = call(x, targets=y)
        loss.backward()
        losses[name] = loss.item()
        grads[name] = [p.grad.detach().float().clone() for p in params_of.parameters()]
        params_of.zero_grad(set_to_none=True)
        del loss
    num = sum((g1.double() - g0.double()).pow(2).sum() for g0, g1 in zip(grads["ref"], grads["fast"]))
    den = sum(g0.double().pow(2).sum() for g0 in grads["ref"])
    res = {"logits_rel_err": rel(logits["fast"], logits["ref"]), "loss_ref": losses["ref"], "loss_fast": losses["fast"],
           "grads_rel_err_global": (num / den).sqrt().item(),
           "grads_rel_err_max_param": max(rel(g1, g0) for g0, g1 in zip(grads["ref"], grads["fast"]))}
    del logits, grads
    # bf16 noise for scale: the reference itself in fp32 vs under bf16 autocast, on a quarter batch
    with torch.no_grad():
        xs = x[: max(1, a.batch // 4)]
        with autocast():
            l16 = ref(xs).float()
        res["ref_bf16_vs_fp32_logits_rel_err"] = rel(l16, ref(xs).float())
        del l16
    # the same init, the same real batches, LR warmed up over 10 steps to 1.5e-3
    cfg = TrainConfig(warmup_steps=10, num_steps=10_000)
    curves = {}
    for name, m, call in (("ref", ref, ref_call), ("fast", fast_model, fast_step_model)):
        m.init_weights(seed=0)
        opt = build_optimizer(m, cfg, fused=device.type == "cuda")
        stepper = partial(train_step, call, opt, autocast=autocast, grad_clip=cfg.grad_clip, device=device)
        if name == "fast" and graphs:
            stepper = GraphedTrainStep(call, opt, autocast, cfg.grad_clip, device)
        step_losses = []
        for i, b in enumerate(batches, start=1):
            lr, wd = lr_at(i, cfg, 5000), wd_at(i, cfg, 5000)
            set_schedule(opt, lr, wd)
            step_losses.append(stepper([b], lr=lr, wd=wd).loss)
        curves[name] = torch.stack(step_losses).tolist()
        del opt
    d = [abs(p - q) for p, q in zip(curves["ref"], curves["fast"])]
    res.update({"steps": len(d), "loss_ref_curve": curves["ref"], "loss_fast_curve": curves["fast"],
                "loss_max_abs_diff": max(d), "loss_mean_abs_diff_last10": statistics.fmean(d[-10:]),
                "loss_ref_final": curves["ref"][-1], "loss_fast_final": curves["fast"][-1]})
    print(f"[correctness] logits rel {res['logits_rel_err']:.2e} grads rel {res['grads_rel_err_global']:.2e} "
          f"(max param {res['grads_rel_err_max_param']:.2e}; ref bf16 vs fp32 logits "
          f"{res['ref_bf16_vs_fp32_logits_rel_err']:.2e}); {len(d)} steps: final loss ref "
          f"{curves['ref'][-1]:.4f} fast {curves['fast'][-1]:.4f}, max |diff| {max(d):.4f}", flush=True)
    return res


def run_check(a) -> dict:
    """GEMM peak, Triton kernels vs fallback on poisoned outputs, SDPA backends at the model's shapes."""
    import torch

    res = {}
    dev = torch.device(a.device)
    if dev.type == "cuda":
        n = 8192
        x, w = torch.randn(n, n, device=dev, dtype=torch.bfloat16), torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        for _ in range(3):
            x @ w
        rates = []
        for _ in range(3):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(10):
                x @ w
            e.record()
            torch.cuda.synchronize()
            rates.append(2 * n**3 * 10 / (s.elapsed_time(e) / 1000) / 1e12)
        res["gemm_bf16_tflops"] = statistics.median(rates)
        print(f"[check] bf16 GEMM 8192^3: {res['gemm_bf16_tflops']:.0f} TFLOP/s", flush=True)
        del x, w
    res["kernels"] = check_kernels(dev)
    res["cross_entropy"] = check_cross_entropy(dev)
    if dev.type == "cuda" and a.sdpa:
        res["sdpa"] = bench_sdpa(dev, a)
    return res


def check_cross_entropy(dev) -> dict:
    """Triton cross entropy vs F.cross_entropy: loss rows (fp64 reference, poisoned first) and the
    gradient it writes over the logits (fp32 reference)."""
    import torch
    import torch.nn.functional as F

    from bitnet.model.kernels.common import INTERPRET, triton
    from bitnet.model.kernels.cross_entropy import launch_cross_entropy
    from bitnet.model.kernels.references import IGNORE_INDEX

    if not (triton is not None and (dev.type == "cuda" or INTERPRET)):
        return {"skipped": True}
    rows, ok = [], True
    g = torch.Generator(device=dev).manual_seed(0)
    for m, v in ((1, 32000), (7, 32000), (4096, 32000), (333, 1000), (64, 100)):
        for dt in (torch.bfloat16, torch.float32):
            logits = (torch.randn(m, v, device=dev, generator=g) * 3).to(dt)
            t = torch.randint(0, v, (m,), device=dev, generator=g)
            t[::5] = IGNORE_INDEX
            ref_rows = F.cross_entropy(logits.double(), t, reduction="none")
            ref = logits.float().requires_grad_()
            F.cross_entropy(ref, t).backward()
            loss_rows = torch.full((m,), float("nan"), device=dev)
            count = (t != IGNORE_INDEX).sum().clamp(min=1).float()
            launch_cross_entropy(logits, t, count, loss_rows)  # logits -> their gradient
            r = {"m": m, "v": v, "dtype": str(dt)[6:], "loss_rel": rel(loss_rows, ref_rows),
                 "grad_rel": rel(logits, ref.grad), "nan": int(loss_rows.isnan().sum() + logits.isnan().sum())}
            r["ok"] = r["nan"] == 0 and r["loss_rel"] < 1e-5 and r["grad_rel"] < (1e-2 if dt == torch.bfloat16 else 1e-5)
            ok &= r["ok"]
            rows.append(r)
    worst = {k: max(r[k] for r in rows) for k in ("loss_rel", "grad_rel", "nan")}
    print(f"[check] Triton cross_entropy vs F.cross_entropy, {len(rows)} cases: {'PASS' if ok else 'FAIL'}; "
          f"worst {json.dumps({k: float(f'{v:.3g}') for k, v in worst.items()})}", flush=True)
    return {"ok": ok, "worst": worst, "cases": rows}


def check_kernels(dev) -> dict:
    import torch

    from bitnet.model.kernels import rmsnorm
    from bitnet.model.kernels.common import INTERPRET, triton
    from bitnet.model.kernels.references import norm_act_quant_reference

    if not (triton is not None and (dev.type == "cuda" or INTERPRET)):
        print("[check] Triton kernels not runnable here: skipped")
        return {"skipped": True}
    shapes = [(1, 768), (37, 768), (4096, 768), (2, 1024, 768), (2, 513, 3072), (8192, 3072), (5, 64), (3, 1000)]
    rows, ok = [], True
    g = torch.Generator(device=dev).manual_seed(0)
    for shape in shapes:
        for xdt, odt in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)):
            n = shape[-1]
            scale = torch.rand(shape[:-1] + (1,), device=dev, generator=g) * 4 + 0.01
            x = (torch.randn(shape, device=dev, generator=g) * scale).to(xdt)
            w = (1 + 0.2 * torch.randn(n, device=dev, generator=g))
            x2 = x.reshape(-1, n)
            y = torch.full(x2.shape, float("nan"), device=dev, dtype=odt)
            rstd = torch.full((x2.shape[0],), float("nan"), device=dev)
            rmsnorm.launch_forward(x2, w, y, rstd, 1e-5)
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            y_ref = norm_act_quant_reference(xr, wr, 1e-5, odt)
            dy = torch.randn(shape, device=dev, generator=g).to(odt)
            y_ref.backward(dy)
            programs, per = rmsnorm.backward_programs(x2.shape[0], rmsnorm.rows_and_warps(n)[1], dev)
            dx = torch.full(x2.shape, float("nan"), device=dev, dtype=xdt)
            dwp = torch.full((programs, n), float("nan"), device=dev)
            rmsnorm.launch_backward(dy.reshape(-1, n), x2, w, rstd, dx, dwp, per)
            r = {"shape": list(shape), "x": str(xdt)[6:], "out": str(odt)[6:],
                 "y_rel": rel(y, y_ref.detach().reshape(x2.shape)),
                 "y_mismatch_frac": (y != y_ref.detach().reshape(x2.shape)).float().mean().item(),
                 "dx_rel": rel(dx, xr.grad.reshape(x2.shape)), "dw_rel": rel(dwp.sum(0), wr.grad),
                 "nan": int(y.isnan().sum() + dx.isnan().sum() + rstd.isnan().sum() + dwp.isnan().sum())}
            tol_y = 2e-2 if odt == torch.bfloat16 else 1e-3
            tol_dx = 1e-2 if xdt == torch.bfloat16 else 1e-4
            r["ok"] = r["nan"] == 0 and r["y_rel"] < tol_y and r["dx_rel"] < tol_dx and r["dw_rel"] < 1e-4
            ok &= r["ok"]
            rows.append(r)
    worst = {k: max(r[k] for r in rows) for k in ("y_rel", "dx_rel", "dw_rel", "y_mismatch_frac", "nan")}
    print(f"[check] Triton rmsnorm_act_quant vs fallback, {len(rows)} cases (NaN-poisoned outputs): "
          f"{'PASS' if ok else 'FAIL'}; worst {json.dumps({k: float(f'{v:.3g}') for k, v in worst.items()})}", flush=True)
    return {"ok": ok, "worst": worst, "cases": rows}


def bench_sdpa(dev, a) -> dict:
    """Forward + backward of one layer's attention (B, 12 q heads, 6 kv heads, T, 64) per backend."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, T = a.batch, a.seq_len
    q = torch.randn(B, 12, T, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, 6, T, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, 6, T, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    go = torch.randn(B, 12, T, 64, device=dev, dtype=torch.bfloat16)
    res = {}
    for name, backend, gqa in (("flash_gqa", SDPBackend.FLASH_ATTENTION, True),
                               ("flash_expand", SDPBackend.FLASH_ATTENTION, False),
                               ("cudnn_gqa", SDPBackend.CUDNN_ATTENTION, True),
                               ("cudnn_expand", SDPBackend.CUDNN_ATTENTION, False),
                               ("efficient_expand", SDPBackend.EFFICIENT_ATTENTION, False)):
        def run():
            kk, vv = (k, v) if gqa else (k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
            with sdpa_kernel([backend]):
                o = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
            o.backward(go)
        try:
            for _ in range(3):
                run()
            ts = []
            for _ in range(5):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                run()
                e.record()
                torch.cuda.synchronize()
                ts.append(s.elapsed_time(e))
            res[name] = statistics.median(ts)
        except Exception as e:  # a backend that does not take these inputs
            res[name] = f"unsupported: {str(e).splitlines()[0][:80]}"
    print(f"[check] SDPA fwd+bwd ms per layer: {res}", flush=True)
    return res


def run_trainer(a, t0) -> dict:
    """The real trainer on token data; its first step is timed through a wrapper of train_step."""
    import torch

    import bitnet.train.components as loop  # builds the step function
    import bitnet.train.graphed as graphed
    from bitnet.cli.train import train_main
    from bitnet.run.startup import startup_line
    from bitnet.train.metrics import gpu_telemetry_medians

    first = {}
    inner = loop.train_step
    triton_compiles = watch_triton_compiles()

    def timed_train_step(*args, **kw):
        before = len(triton_compiles)
        out = inner(*args, **kw)
        if not first:
            sync(torch.device(a.device))
            first["t"] = time.time()
            first["compile_metrics"] = dynamo_time_metrics()
            first["triton"] = list(triton_compiles)  # from the start: the hooks' first forward compiles some
            first["triton_in_step"] = triton_compiles[before:]
        return out
    loop.train_step = graphed.train_step = timed_train_step  # the graphed step's first steps run uncaptured
    window = {}
    start, count = a.trainer_steps // 2 + 11, 40  # mid-run, after the capture, inside one log interval of 100
    if a.child in a.profile.split(",") and a.device.startswith("cuda"):
        if start + count - 1 > a.trainer_steps:
            raise SystemExit(f"--profile {a.child} needs --trainer-steps of at least {2 * (count + 10) - 1}")
        window = profile_trainer_window(graphed, start, count)
    runs = Path(a.workdir) / "runs"
    argv = ["--preset", a.preset, "--data", a.data, "--num-steps", str(a.trainer_steps), "--runs-dir", str(runs),
            "--run-id", "bench", "--overwrite", "--quiet", "--device", a.device]
    if a.smoke:
        argv += ["--batch-size", str(a.batch), "--seq-len", str(a.seq_len)]
    argv += TRAINER_VARIANTS[a.child].get("argv", [])
    t_start = time.time()
    rc = train_main(argv)
    wall = time.time() - t_start
    rows = []
    for line in (runs / "bench" / "metrics" / "scalars.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line
            pass
    tok = [r["tok_s"] for r in rows]
    timed = unprofiled_rows(rows, window)
    res = {"rc": rc, "rows": len(rows), "tok_s_rows": tok,
           "tok_s_median": statistics.median(r["tok_s"] for r in timed),
           "tok_s_median_after_first": statistics.median(r["tok_s"] for r in timed[1:]) if len(timed) > 1 else None,
           "profiled_rows": len(rows) - len(timed),
           "step_ms_median": statistics.median(r["step_ms"] for r in timed),
           "tok_s_from_step_ms": a.batch * a.seq_len / (statistics.median(r["step_ms"] for r in timed) / 1000),
           "mem_gib_max": max(r.get("mem_gib", 0) for r in rows), "final_loss": rows[-1]["loss"],
           "ttfs_s": first.get("t", float("nan")) - t0, "startup": startup_breakdown(runs / "bench", first),
           "wall_s": time.time() - t0, "train_main_s": wall,
           "data": a.data, "steps": a.trainer_steps,
           **gpu_telemetry_medians(timed[1:] or timed)}  # the first row's reading can fall on an idle GPU
    if "steps" in window:
        res["profile"] = window
        print(f"[bitnet-train] steps {window['steps']}: wall {window['wall_ms_per_step']:.2f} ms/step, kernels "
              f"{window['kernel_ms_per_step']:.2f}, GPU idle {window['idle_ms_per_step']:.2f}; by category: "
              f"{window['ms_per_step_by_category']}", flush=True)
    if res["startup"]:
        b = res["startup"]
        print(f"[bitnet-train] {startup_line(b)} (in the first step: dynamo + inductor {b['dynamo_inductor_s']:.1f} s, "
              f"the project's Triton kernels {b['triton_in_step_s']:.1f} s; {b['triton_compile_s']:.1f} s over "
              f"{len(b['triton_compiles'])} compiles before the first step ended)", flush=True)
    print(f"[bitnet-train] rc {rc}: median tok/s {res['tok_s_median']:,.0f} over {len(timed)} unprofiled rows of "
          f"{len(rows)} {tok}; "
          f"ttfs {res['ttfs_s']:.1f}s; wall {res['wall_s']:.0f}s", flush=True)
    return res


def watch_triton_compiles() -> list[tuple[str, float]]:
    """A list that fills with (kernel, seconds) for each Triton JIT compile in this process from now on (the
    project's kernels; inductor compiles its own kernels apart, in its worker pool). Empty without Triton."""
    compiles, started = [], {}
    try:
        from triton import knobs
    except ImportError:
        return compiles

    def before(*, key, fn, **_):
        started[key] = time.time()
        return None  # compile as usual

    def after(*, key, fn, **_):
        if (t := started.pop(key, None)) is not None:  # inductor may call this hook alone (its own kernels)
            compiles.append((getattr(fn, "name", str(fn)), time.time() - t))
    knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = before, after
    return compiles


def dynamo_time_metrics() -> dict[str, float]:
    """Seconds spent so far in each of torch.compile's timed phases (dynamo's own table), largest first."""
    from torch._dynamo.utils import compilation_time_metrics
    sums = {k: sum(v) for k, v in compilation_time_metrics.items()}
    return dict(sorted(((k, round(v, 3)) for k, v in sums.items() if v >= 0.01), key=lambda kv: -kv[1]))


def startup_breakdown(run_dir: Path, first: dict) -> dict:
    """Where the time to the first step went: the trainer's own row (metrics/startup.jsonl: its phases from the
    process's start), with torch.compile's dynamo + inductor and the project's Triton kernel compiles inside the
    first step measured apart. Empty if the run wrote no row or took no step."""
    from bitnet.run import layout
    from bitnet.run.jsonl import read_jsonl
    rows = read_jsonl(run_dir / layout.STARTUP)
    if not rows or "t" not in first:
        return {}
    metrics = first["compile_metrics"]
    return {**rows[0], "dynamo_inductor_s": metrics.get("_compile.compile_inner", 0.0)
            + sum(v for k, v in metrics.items() if "bw_compiler" in k),
            "triton_compile_s": sum(s for _, s in first["triton"]),
            "triton_in_step_s": sum(s for _, s in first["triton_in_step"]),
            "triton_compiles": first["triton"], "compile_metrics": metrics}


def unprofiled_rows(rows: list[dict], window: dict) -> list[dict]:
    """The scalars rows none of whose steps ran under the profiler (its tracing slows them), all of them if
    no window ran, or if every row holds profiled steps (a short run: then the medians say so by their rows)."""
    if "steps" not in window:
        return rows
    last = window["first_step"] + window["count"] - 1
    firsts = [1] + [r["step"] + 1 for r in rows[:-1]]  # a row's steps: after the previous row's, up to its own
    clean = [r for r, first in zip(rows, firsts) if r["step"] < window["first_step"] or first > last]
    return clean or rows


def profile_trainer_window(graphed, start: int, count: int) -> dict:
    """Profile the trainer's captured steps start .. start+count-1 as the loop runs them (data, hooks, the
    LR schedule included): kernel time per step against wall time per step. The difference is time the GPU
    waited for the host; kernels that take longer than in the bare step's profile point at clocks instead.
    Returns a dict that is filled when the window ends (only first_step and count if the run is shorter)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    res = {"first_step": start, "count": count}  # "steps" etc. once the window has run
    prof, t0 = profile(activities=[ProfilerActivity.CUDA]), []
    inner = graphed.GraphedTrainStep.__call__

    def call(self, *args, **kw):
        n = self.calls + 1  # the step this call runs
        if n == start:
            torch.cuda.synchronize()
            prof.start()
            t0.append(time.perf_counter())
        out = inner(self, *args, **kw)
        if n == start + count - 1:
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - t0[0]) * 1000 / count
            prof.stop()
            res.update(kernel_summary(prof, count), steps=f"{start}-{start + count - 1}",
                       wall_ms_per_step=round(wall_ms, 3))
            res["idle_ms_per_step"] = round(wall_ms - res["kernel_ms_per_step"], 3)
        return out
    graphed.GraphedTrainStep.__call__ = call
    return res


def child(a) -> None:
    t0 = a.t0
    if a.child == "check":
        res = run_check(a)
    elif a.child in TRAINER_VARIANTS:
        apply_tweaks(TRAINER_VARIANTS[a.child])
        res = run_trainer(a, t0)
    else:
        res = run_variant(a.child, a, t0)
    Path(a.json).write_text(json.dumps(res, indent=1))


# ---------------------------------------------------------------------------- the orchestrator

def fmt_table(results: dict, peak_meas: float | None) -> str:
    head = f"{'variant':<18} {'ms/step':>8} {'tok/s':>10} {'MFU@989':>8} {'MFU@meas':>9} {'peak GiB':>9} {'TTFS s':>7}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        if name == "check":
            continue
        if "error" in r:
            lines.append(f"{name:<18} {'failed: ' + r['error'][:60]}")
            continue
        if name in TRAINER_VARIANTS:
            tok_s, ms, mem = r["tok_s_median"], r["step_ms_median"], r["mem_gib_max"]
        else:
            tok_s, ms, mem = r["tok_s"], r["ms_per_step"], r.get("peak_gib", float("nan"))
        fpt = r.get("flops_per_token") or results.get("fast", {}).get("flops_per_token", 647_626_752)
        mfu = fpt * tok_s / 1e12
        meas = f"{100 * mfu / peak_meas:8.1f}%" if peak_meas else f"{'-':>9}"
        lines.append(f"{name:<18} {ms:8.2f} {tok_s:10,.0f} {100 * mfu / DATASHEET_TFLOPS:7.1f}% {meas} "
                     f"{mem:9.2f} {r['ttfs_s']:7.1f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=DEFAULT, help=f"comma list of check, bitnet-train and {', '.join(VARIANTS)}")
    p.add_argument("--data", default="embedded", help="--data of the correctness run and the trainer row")
    p.add_argument("--trainer-steps", type=int, default=500, help="steps of the bitnet-train row (0: skip it)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--preset", default="95m")
    p.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=5, help="steps before timing, the first included")
    p.add_argument("--corr-steps", type=int, default=50)
    p.add_argument("--no-correctness", dest="correctness", action="store_false")
    p.add_argument("--profile", default="fast,bf16-compiled", help="variants to profile (kernel time by category)")
    p.add_argument("--sdpa", action="store_true", help="also time the SDPA backends at the model's shapes")
    p.add_argument("--budget-s", type=float, default=570, help="skip rows that would start after this")
    p.add_argument("--out", default="", help="JSON file for every number")
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny preset, small batch: checks the plumbing")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--json", default="", help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.smoke and not a.child:
        a.device, a.preset, a.batch, a.seq_len, a.steps, a.repeats, a.warmup = "cpu", "tiny", 4, 64, 2, 1, 2
        a.trainer_steps, a.corr_steps = min(a.trainer_steps, 20), min(a.corr_steps, 3)
    if a.child:
        return child(a)

    import torch

    start = time.time()
    work = Path(tempfile.mkdtemp(prefix="bench_"))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
            "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "batch": a.batch, "seq_len": a.seq_len, "preset": a.preset, "data": a.data}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    print(f"[bench] {json.dumps(meta)}", flush=True)
    results = {}
    names = [n for n in a.variants.split(",") if n and not (n in TRAINER_VARIANTS and a.trainer_steps == 0)]
    for name in names:
        left = a.budget_s - (time.time() - start)
        if left < 30:
            results[name] = {"error": "skipped: out of time budget"}
            continue
        out = work / f"{name}.json"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_CACHE_DIR": str(work / name / "inductor"),
               "TRITON_CACHE_DIR": str(work / name / "triton"), "BITNET_CACHE": str(work / "bitnet_cache")}
        cmd = [sys.executable, __file__, "--child", name, "--json", str(out), "--t0", str(time.time()),
               "--workdir", str(work)] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                                          if k in ("data", "trainer_steps", "batch", "seq_len", "preset", "steps",
                                                   "repeats", "warmup", "corr_steps", "profile", "device")]
        cmd += [] if a.correctness else ["--no-correctness"]
        cmd += ["--sdpa"] if a.sdpa else []
        cmd += ["--smoke"] if a.smoke else []
        try:
            proc = subprocess.run(cmd, env=env, timeout=left, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
            if proc.returncode:
                err = proc.stderr.strip().splitlines()
                print(f"[{name}] FAILED rc {proc.returncode}:\n" + "\n".join(err[-15:]), flush=True)
                results[name] = {"error": (err[-1] if err else f"rc {proc.returncode}")}
            else:
                results[name] = json.loads(out.read_text())
        except subprocess.TimeoutExpired:
            results[name] = {"error": "timed out"}
    peak_meas = results.get("check", {}).get("gemm_bf16_tflops")
    report = {**meta, "datasheet_tflops": DATASHEET_TFLOPS, "measured_gemm_tflops": peak_meas,
              "mfu_formula": "flops_per_token(seq_len) * tok/s / peak; flops_per_token = 6 * matmul params (incl. "
                             "tied head) + 12 * n_layers * dim * seq_len", "results": results,
              "total_s": time.time() - start}
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))
    corr = results.get("fast", {}).get("correctness")
    if corr:
        print(f"correctness (fast vs eager reference, real tokens): logits rel {corr['logits_rel_err']:.2e}, "
              f"grads rel {corr['grads_rel_err_global']:.2e}; {corr['steps']} steps: final loss ref "
              f"{corr['loss_ref_final']:.4f} fast {corr['loss_fast_final']:.4f}, max |diff| {corr['loss_max_abs_diff']:.4f}")
    for key in ("kernels", "cross_entropy"):
        kern = results.get("check", {}).get(key, {})
        if "ok" in kern:
            print(f"{key} kernel check: {'PASS' if kern['ok'] else 'FAIL'} {kern['worst']}")
    print(f"\n{meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | {meta['date']} | "
          f"batch {a.batch} x {a.seq_len} | measured bf16 GEMM {peak_meas or float('nan'):.0f} TFLOP/s")
    print(fmt_table(results, peak_meas))


if __name__ == "__main__":
    main()
