"""Where FP8 pays in the 95m step: each FP8 switch's op against its exact twin, alone, at the trainer's shapes.

    PYTHONPATH=src python benchmarks/fp8_gemms.py --out fp8_gemms.json      # one GPU, ~20 s
    PYTHONPATH=src python benchmarks/fp8_gemms.py --smoke                   # CPU, small shapes: the plumbing

Rows (M = 32 x 1024 tokens, bf16 autocast operands as in training):
- head: the tied head + cross entropy, forward + backward: the exact path (bf16 GEMMs, the logits' gradient
  written over them by the Triton kernel) against `head_cross_entropy_fp8` (e4m3 forward, e5m2 gradient, the
  gradient GEMMs in the forward, 8192-token chunks); also the peak memory each adds.
- <layer> dx / dw / both: one BitLinear's forward + backward (`ternary_linear`) with the input gradient,
  the weight gradient or both in FP8, against the same op exact, for q/k/v (stacked), o, gate/up (stacked)
  and down. The FP8 version pays casts (a pass over dY, and for dW transposed copies of dY and X) that the
  exact GEMM does not; it wins only where the GEMM time saved is larger.
Times are CUDA-event medians over --iters after warm-up, eager (the trainer compiles the blocks, which can
fuse the casts into neighbouring kernels: the trainer rows in train_throughput.py are the verdict).
Prints a table last; writes JSON (--out).
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bitnet.model.bitlinear import ternary_parts  # noqa: E402
from bitnet.model.kernels import cross_entropy, fp8  # noqa: E402
from bitnet.model.kernels.references import head_cross_entropy_reference  # noqa: E402


def timed(fn, iters: int, device) -> tuple[float, float]:
    """(median ms of fn(), peak GiB above the memory in use before it)."""
    for _ in range(3):
        fn()
    if device.type != "cuda":
        import time
        ts = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        return statistics.median(ts), float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts), (torch.cuda.max_memory_allocated() - base) / 2**30


def head_rows(m: int, d: int, v: int, device, iters: int) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, d, device=device, generator=g).requires_grad_()
    w = (torch.randn(v, d, device=device, generator=g) * 0.02).requires_grad_()
    t = torch.randint(0, v, (m,), device=device, generator=g)

    def exact():
        x.grad = w.grad = None
        if device.type == "cuda":
            loss = cross_entropy.linear_cross_entropy(x, w, t, torch.bfloat16)
        else:
            loss = head_cross_entropy_reference(x, w, t, torch.bfloat16)
        loss.backward()

    def fp8_head():
        x.grad = w.grad = None
        fp8.head_cross_entropy_fp8(x, w, t).backward()

    res = {}
    for name, fn in (("head exact", exact), ("head fp8", fp8_head)):
        ms, gib = timed(fn, iters, device)
        res[name] = {"ms": ms, "peak_gib": gib, "tflops": 6 * m * d * v / ms / 1e9}
    return res


def layer_rows(m: int, shapes: dict, device, iters: int) -> dict:
    res = {}
    for name, (n_out, k) in shapes.items():
        g = torch.Generator(device=device).manual_seed(1)
        x = (torch.randint(-128, 128, (m, k), device=device, generator=g).float() / 40).to(torch.bfloat16)
        w_t, s = ternary_parts(torch.randn(n_out, k, device=device, generator=g))
        w_q = (w_t / s).to(torch.bfloat16)
        inv_s = (1 / s).expand(n_out)
        dy = torch.randn(m, n_out, device=device, generator=g).to(torch.bfloat16)
        xr, wr = x.clone().requires_grad_(), w_q.clone().requires_grad_()
        for mode, (gi, gw) in (("exact", (False, False)), ("dx", (True, False)), ("dw", (False, True)),
                               ("both", (True, True))):
            def step(gi=gi, gw=gw):
                xr.grad = wr.grad = None
                fp8.ternary_linear(xr, wr, w_t, inv_s, gi, gw).backward(dy)
            ms, _ = timed(step, iters, device)
            res[f"{name} {mode}"] = {"ms": ms, "tflops": 6 * m * n_out * k / ms / 1e9}
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default="fp8_gemms.json")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    if a.smoke:
        m, d, v, ffn, iters = 256, 64, 512, 256, 2
    else:
        m, d, v, ffn, iters = 32 * 1024, 768, 32000, 3072, a.iters
    shapes = {"qkv": (2 * d, d), "o": (d, d), "gate_up": (2 * ffn, d), "down": (d, ffn)}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        res = {**head_rows(m, d, v, device, iters), **layer_rows(m, shapes, device, iters)}
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "m": m, "rows": res}
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"{'op':<16} {'ms':>8} {'TFLOP/s':>8} {'x exact':>8} {'peak GiB':>9}")
    for name, r in res.items():
        base = res.get(name.rsplit(" ", 1)[0] + " exact", r)
        gib = f"{r['peak_gib']:9.2f}" if "peak_gib" in r else f"{'':>9}"
        print(f"{name:<16} {r['ms']:8.3f} {r['tflops']:8.0f} {base['ms'] / r['ms']:8.3f} {gib}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
