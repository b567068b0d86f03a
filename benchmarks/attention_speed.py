"""GPU: causal GQA attention at the 95m trainer's shapes, forward and forward + backward, per implementation.

    python3 benchmarks/attention_speed.py --carry .carry --site /tmp/fa4site --out attention.json   # GPU
    python benchmarks/attention_speed.py --smoke --out smoke.json                                # CPU plumbing

Rows: torch's SDPA as the model calls it (its own backend pick; cuDNN on Hopper today), then SDPA forced to
each backend (cuDNN, flash = FlashAttention-2, efficient = xformers' cutlass kernel), then FlashAttention-4
(`flash-attn-4`, CuTe DSL; Hopper forward and backward, native GQA) through the model's custom ops
(`bitnet.model.kernels.attention`), then SDPA's flash backend with torch's own FA4 registration
(`torch.nn.attention.activate_flash_attention_impl("FA4")`) where this torch has it. FA4 comes from the
carried set (benchmarks/fa4_pack.sh, two parts; benchmarks/fa4_install.py unpacks them, timed here).

On the device machine (no network) FA4 travels as two carried folders, each under the 64 MiB limit, in two
calls on the same warm machine (it goes back 30 s after a call): the first carries .carry/fa4a and runs
`python3 benchmarks/fa4_install.py --carry .carry --site /tmp/fa4site` (beside any other work), the second
carries .carry/fa4b and runs this script with --carry .carry --site /tmp/fa4site. A cold machine in between
only loses the FA4 rows (the install reports fa4a missing); the SDPA rows run either way.

Inputs are laid out as training has them: q (B, T, H, D), k and v (B, T, Hkv, D) in storage, seen as
(B, heads, T, D) views (the rope kernel's output), bf16, dy random. Times are CUDA events around `--iters`
calls after `--warmup` calls, median of 5 groups. Each row is checked against fp32 math on the first
`--check-batch` sequences (max abs error of out, dq, dk, dv) and against the first row that runs (SDPA-cuDNN
on a GPU: "base") on the whole batch; the speedup column is against that row's forward + backward.
FLOP/s count causal attention as 2 B H T^2 D forward (half of 4 B H T^2 D), 2.5x that backward.
FA4 rows also check that the ops run under torch.compile(fullgraph=True) and in a captured CUDA graph, as the
trainer runs them. --smoke runs the same plumbing on CPU with tiny fp32 shapes (SDPA's math backend).
Prints a table last; writes JSON (--out).
"""

import argparse
import importlib.util
import json
import os
import platform
import site
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing
from bitnet.model.kernels import attention  # noqa: E402

HERE = Path(__file__).resolve().parent


def load_installer():
    spec = importlib.util.spec_from_file_location("fa4_install", HERE / "fa4_install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_inputs(B, T, H, Hkv, D, dtype, device, seed=0):
    """q, k, v as (B, heads, T, D) views of (B, T, heads, D) storage, requiring grad, and dy (B, T, H*D)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(device, dtype)
    k = torch.randn(B, T, Hkv, D, generator=g).to(device, dtype)
    v = torch.randn(B, T, Hkv, D, generator=g).to(device, dtype)
    dy = torch.randn(B, T, H * D, generator=g).to(device, dtype)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    return leaves, dy


def views(leaves):
    return tuple(t.transpose(1, 2) for t in leaves)


def sdpa_with(backend, repeat_kv=False):
    """SDPA as the model calls it, under one backend (None: torch's pick); repeat_kv: k and v expanded to the
    query heads first, for a backend that refuses enable_gqa."""
    def fn(q, k, v):
        if repeat_kv:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if backend is None:
            return attention.sdpa_causal(q, k, v)
        with sdpa_kernel(backend):
            return attention.sdpa_causal(q, k, v)
    return fn


def reference(leaves, dy, n):
    """fp32 math SDPA on the first n sequences: out (n, T, H*D) and grads of q, k, v in storage layout."""
    sub = [t.detach()[:n].float().requires_grad_() for t in leaves]
    with sdpa_kernel(SDPBackend.MATH):
        out = attention.sdpa_causal(*views(sub))
    out.backward(dy[:n].float())
    return [out.detach()] + [t.grad for t in sub]


def run_once(fn, leaves, dy):
    for t in leaves:
        t.grad = None
    out = fn(*views(leaves))
    out.backward(dy)
    return [out.detach()] + [t.grad.detach() for t in leaves]


def max_abs(a, b):
    return (a.float() - b.float()).abs().max().item()


class Timer:
    """Milliseconds per call of fn(): CUDA events on a GPU, perf_counter on CPU; median of groups."""

    def __init__(self, device, warmup, iters, groups=5):
        self.device, self.warmup, self.iters, self.groups = device, warmup, iters, groups

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        per = max(1, self.iters // self.groups)
        times = []
        for _ in range(self.groups):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(per):
                    fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / per)
            else:
                t0 = time.perf_counter()
                for _ in range(per):
                    fn()
                times.append((time.perf_counter() - t0) * 1e3 / per)
        return statistics.median(times)


def measure(name, fn, leaves, dy, timer, ref, base, n_check, flops_fwd):
    """One row: times and errors of fn, or the error that stopped it."""
    row = {"impl": name}
    t0 = time.perf_counter()
    try:
        got = run_once(fn, leaves, dy)  # the first call: JIT compiles happen here
        row["first_call_s"] = round(time.perf_counter() - t0, 2)
        row["err_vs_fp32"] = {k: max_abs(g[:n_check], r) for k, g, r in zip(("out", "dq", "dk", "dv"), got, ref)}
        if base is not None:
            row["diff_vs_base"] = {k: max_abs(g, b) for k, g, b in zip(("out", "dq", "dk", "dv"), got, base)}
        del got

        def fwd():
            fn(*views(leaves))

        def fwd_bwd():
            for t in leaves:
                t.grad = None
            fn(*views(leaves)).backward(dy)

        row["fwd_ms"] = round(timer(fwd), 4)
        row["fwd_bwd_ms"] = round(timer(fwd_bwd), 4)
        row["fwd_TFLOPs"] = round(flops_fwd / row["fwd_ms"] / 1e9, 1)
        row["fwd_bwd_TFLOPs"] = round(3.5 * flops_fwd / row["fwd_bwd_ms"] / 1e9, 1)
    except Exception as e:  # noqa: BLE001 - a row that fails is reported, the others still run
        row["error"] = f"{type(e).__name__}: {e}"[:600]
        row["traceback_tail"] = traceback.format_exc()[-1500:]
    return row


def fa4_compile_and_graph_check(leaves, dy, want):
    """Whether the FA4 ops give the same out and grads under torch.compile(fullgraph) and CUDA graph replay."""
    result = {}
    try:
        compiled = torch.compile(attention.fa4_causal, fullgraph=True)
        got = run_once(compiled, leaves, dy)
        result["compile_fullgraph_max_diff"] = max(max_abs(g, w) for g, w in zip(got, want))
    except Exception as e:  # noqa: BLE001
        result["compile_error"] = f"{type(e).__name__}: {e}"[:600]
    try:
        static = [t.detach().clone().requires_grad_() for t in leaves]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                run_once(attention.fa4_causal, static, dy)
        torch.cuda.current_stream().wait_stream(s)
        for t in static:
            t.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = attention.fa4_causal(*views(static))
            out.backward(dy)
        graph.replay()
        torch.cuda.synchronize()
        got = [out.detach()] + [t.grad for t in static]
        result["cuda_graph_max_diff"] = max(max_abs(g, w) for g, w in zip(got, want))
    except Exception as e:  # noqa: BLE001
        result["cuda_graph_error"] = f"{type(e).__name__}: {e}"[:600]
    return result


def table(rows, base_ms) -> str:
    lines = [f"{'impl':<24} {'fwd ms':>8} {'fwd+bwd ms':>11} {'TFLOP/s f/fb':>13} {'vs base':>9}  "
             f"{'max err vs fp32 (out dq dk dv)':<34}"]
    for r in rows:
        if "error" in r or "skipped" in r:
            lines.append(f"{r['impl']:<24} {r.get('skipped') or r['error'][:100]}")
            continue
        e = r["err_vs_fp32"]
        speed = f"{base_ms / r['fwd_bwd_ms']:.2f}x" if base_ms else "-"
        lines.append(f"{r['impl']:<24} {r['fwd_ms']:>8.3f} {r['fwd_bwd_ms']:>11.3f} "
                     f"{r['fwd_TFLOPs']:>6.0f}/{r['fwd_bwd_TFLOPs']:<6.0f} {speed:>9}  "
                     + " ".join(f"{e[k]:.1e}" for k in ("out", "dq", "dk", "dv")))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--check-batch", type=int, default=2, help="sequences checked against fp32 math")
    p.add_argument("--carry", default="", help="folder with the packed FA4 parts (fa4a/, fa4b/) to install")
    p.add_argument("--site", default="/tmp/fa4site", help="where the FA4 set is (or gets) unpacked")
    p.add_argument("--no-torch-fa4", action="store_true", help="skip SDPA with torch's FA4 registration")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny fp32 shapes, SDPA math: the plumbing only")
    p.add_argument("--out", default="")
    a = p.parse_args()
    started = time.perf_counter()
    if a.smoke:
        a.batch, a.seq, a.heads, a.kv_heads, a.head_dim = 2, 16, 4, 2, 8
        a.warmup, a.iters, a.check_batch = 1, 5, 1
        device, dtype = torch.device("cpu"), torch.float32
    elif not torch.cuda.is_available():
        raise SystemExit("error: attention_speed.py needs CUDA (or --smoke for the CPU plumbing)")
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    result = {"shape": {"B": a.batch, "T": a.seq, "H": a.heads, "Hkv": a.kv_heads, "D": a.head_dim,
                        "dtype": str(dtype).removeprefix("torch.")},
              "torch": torch.__version__, "python": platform.python_version(),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    if a.carry or Path(a.site).is_dir():
        installer = load_installer()
        report = installer.install(Path(a.carry), Path(a.site)) if a.carry else {
            "seconds": 0.0, "unpacked": [], "missing": installer.missing(Path(a.site)),
            "site_paths": installer.site_paths(Path(a.site))}
        report["complete"] = not report["missing"]
        if report["complete"]:
            site.addsitedir(a.site)  # runs the set's .pth (nvidia_cutlass_dsl/dsl_packages onto sys.path)
        result["fa4_install"] = report
        print(f"FA4 install: {report['seconds']} s, complete={report['complete']}, missing={report['missing']}",
              flush=True)
    if not any(hasattr(torch.Tensor, n) for n in ("__dlpack_c_exchange_api__", "__c_dlpack_exchange_api__")):
        os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")  # else tvm-ffi JIT-builds a torch addon
    t0 = time.perf_counter()
    fa4_ok = attention.fa4_available()
    result["fa4_import_s"] = round(time.perf_counter() - t0, 2)
    result["fa4_import_error"] = attention.fa4_import_error()
    if fa4_ok:
        import flash_attn.cute as fa4_pkg
        result["fa4_version"] = getattr(fa4_pkg, "__version__", "?")
    print(f"FA4 importable: {fa4_ok} ({result['fa4_import_s']} s){'' if fa4_ok else ': ' + str(result['fa4_import_error'])}",
          flush=True)

    B, T, H, Hkv, D = a.batch, a.seq, a.heads, a.kv_heads, a.head_dim
    flops_fwd = 2 * B * H * T * T * D
    leaves, dy = make_inputs(B, T, H, Hkv, D, dtype, device)
    ref = reference(leaves, dy, a.check_batch)
    timer = Timer(device, a.warmup, a.iters)

    if device.type == "cuda":
        candidates = [("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa (model default)", None),
                      ("sdpa-flash (FA2)", SDPBackend.FLASH_ATTENTION),
                      ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION)]
    else:
        candidates = [("sdpa-math", SDPBackend.MATH), ("sdpa (model default)", None)]
    rows, base = [], None
    for name, backend in candidates:
        fn = sdpa_with(backend)
        rows.append(measure(name, fn, leaves, dy, timer, ref, base, a.check_batch, flops_fwd))
        if "error" in rows[-1] and backend is not None:  # e.g. no GQA in this backend: time it on repeated kv
            print(json.dumps(rows[-1]), flush=True)
            fn = sdpa_with(backend, repeat_kv=True)
            rows.append(measure(name + " kv-repeated", fn, leaves, dy, timer, ref, base, a.check_batch, flops_fwd))
        if base is None and "error" not in rows[-1]:
            base = run_once(fn, leaves, dy)  # the first row that runs (cuDNN on a GPU): the others' diff_vs_base
            result["base"] = name
        print(json.dumps(rows[-1]), flush=True)

    applies = attention.fa4_applies(*views(leaves)[:2])
    if applies:
        row = measure("fa4 (bitnet custom op)", attention.fa4_causal, leaves, dy, timer, ref, base, a.check_batch,
                      flops_fwd)
        if "error" not in row:
            row.update(fa4_compile_and_graph_check(leaves, dy, run_once(attention.fa4_causal, leaves, dy)))
    else:
        why = "not importable" if not fa4_ok else f"does not apply to {device.type} {dtype} D={D}"
        row = {"impl": "fa4 (bitnet custom op)", "skipped": f"FA4 {why}"}
    rows.append(row)
    print(json.dumps(row), flush=True)

    if applies and not a.no_torch_fa4:
        for row in torch_fa4_rows(leaves, dy, timer, ref, base, a.check_batch, flops_fwd):
            rows.append(row)
            print(json.dumps(row), flush=True)

    base_ms = next((r["fwd_bwd_ms"] for r in rows if r["impl"] == result.get("base")), None)
    for r in rows:
        if "fwd_bwd_ms" in r and base_ms:
            r["speedup_fwd_bwd_vs_base"] = round(base_ms / r["fwd_bwd_ms"], 3)
    result["rows"] = rows
    result["total_s"] = round(time.perf_counter() - started, 1)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{result['device']}, torch {result['torch']}, B={B} T={T} H={H} Hkv={Hkv} D={D} {dtype}, "
          f"{a.iters} iters; total {result['total_s']} s")
    print(table(rows, base_ms))


def torch_fa4_rows(leaves, dy, timer, ref, base, n_check, flops_fwd):
    """SDPA's flash backend after torch.nn.attention.activate_flash_attention_impl("FA4") (torch >= 2.10); again
    on repeated kv if it refuses GQA. Last, since the activation swaps SDPA's flash kernels for the process."""
    name = "sdpa-flash + torch FA4"
    try:
        from torch.nn.attention import activate_flash_attention_impl
    except ImportError:
        return [{"impl": name, "skipped": f"torch {torch.__version__} has no activate_flash_attention_impl"}]
    try:
        activate_flash_attention_impl("FA4")
    except Exception as e:  # noqa: BLE001
        return [{"impl": name, "error": f"activate: {type(e).__name__}: {e}"[:600]}]
    rows = [measure(name, sdpa_with(SDPBackend.FLASH_ATTENTION), leaves, dy, timer, ref, base, n_check, flops_fwd)]
    if "error" in rows[0]:
        rows.append(measure(name + " kv-repeated", sdpa_with(SDPBackend.FLASH_ATTENTION, repeat_kv=True), leaves,
                            dy, timer, ref, base, n_check, flops_fwd))
    return rows


if __name__ == "__main__":
    main()
