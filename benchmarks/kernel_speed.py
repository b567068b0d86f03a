"""GPU: the project's Triton kernels against inductor's code for the same function, at the 95m shapes.

    PYTHONPATH=src python benchmarks/kernel_speed.py --out kernels.json            # on a CUDA machine
    PYTHONPATH=src python benchmarks/kernel_speed.py --sweep                      # also other launch settings
    PYTHONPATH=src python benchmarks/kernel_speed.py --bwd-sweep                  # the backward kernel alone
    PYTHONPATH=src python benchmarks/kernel_speed.py --ce-sweep                   # the cross entropy instead

Times forward and forward + backward of `swiglu_norm_act_quant` (silu(gate) * up -> sub-norm -> int8
fake quantization, 32 x 1024 tokens x 3072) against torch.compile of its PyTorch fallback, in bf16 as
in training. Bandwidth = the bytes the function must move at least (read gate, up; write the output;
backward also read dy and write both gradients) / time; the H100's HBM3 moves about 3.35 TB/s at most.
--bwd-sweep times the backward kernel alone (preallocated outputs, no autograd, L2 flushed between
calls) over a grid of launch settings, each checked against the shipped settings' outputs.
--ce-sweep times the cross entropy kernel instead (bf16 logits 32 x 1024 x 32000: loss rows, then the
gradient written over the logits) over launch settings, against torch.compile of F.cross_entropy on
fp32 logits, forward + backward; at least a read and a write of the logits must move.
Prints a table last (ratios against inductor); writes JSON (--out).
"""

import argparse
import json
from dataclasses import asdict, replace

import torch
from triton.testing import do_bench

from bitnet.model.kernels import CrossEntropyLaunch, SwigluLaunch, cross_entropy, swiglu
from bitnet.model.kernels.common import available
from bitnet.model.kernels.references import EPS, swiglu_norm_act_quant_reference


def timed(fn, grads=None) -> float:
    """Median ms of fn(), gradients reset between calls."""
    def run():
        if grads:
            for t in grads:
                t.grad = None
        fn()
    return do_bench(run, warmup=25, rep=200)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32 * 1024)
    p.add_argument("--width", type=int, default=3072)
    p.add_argument("--sweep", action="store_true", help="also time other launch settings (SwigluLaunch)")
    p.add_argument("--bwd-sweep", action="store_true", help="time the backward kernel alone over launch settings")
    p.add_argument("--ce-sweep", action="store_true", help="time the cross entropy kernel instead")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--out", default="")
    a = p.parse_args()
    if not available():
        raise SystemExit("kernel_speed.py needs CUDA and triton")
    if a.ce_sweep:
        return cross_entropy_sweep(a.tokens, a.vocab, a.out)
    torch.manual_seed(0)
    shape = (a.tokens, a.width)
    # gate and up side by side, as the model's stacked gate/up GEMM returns them
    gate_up = torch.randn(a.tokens, 2 * a.width, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = (1 + 0.1 * torch.randn(a.width, device="cuda")).requires_grad_()
    dy = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    elem = dy.numel() * dy.element_size()
    fwd_bytes, bwd_bytes = 3 * elem, 3 * elem + 5 * elem  # forward + backward (dy, gate, up in; dg, du out)

    def triton_fn(launch):
        return lambda gu, ww: swiglu.swiglu_norm_act_quant(gu, ww, EPS, torch.bfloat16, launch)

    inductor_fn = torch.compile(lambda gu, ww: swiglu_norm_act_quant_reference(gu, ww, EPS, torch.bfloat16))
    rows = []

    def measure(name, fn, launch: dict):
        with torch.no_grad():
            f = timed(lambda: fn(gate_up, w))
        fb = timed(lambda: fn(gate_up, w).backward(dy), grads=(gate_up, w))
        rows.append({"impl": name, "launch": launch,
                     "fwd_ms": round(f, 4), "fwd_bwd_ms": round(fb, 4),
                     "fwd_TBps": round(fwd_bytes / f / 1e9, 2), "fwd_bwd_TBps": round(bwd_bytes / fb / 1e9, 2)})

    measure("inductor (torch.compile of the fallback)", inductor_fn, launch={})
    shipped = SwigluLaunch()
    measure("triton (shipped settings)", triton_fn(shipped), asdict(shipped))
    if a.sweep:
        for name, change in [  # alternatives tried on the H100 (benchmarks/NOTES.md, run 4)
            ("fwd 1 row 4 warps", {"fwd_warps": 4}),
            ("fwd 1 row 16 warps", {"fwd_warps": 16}),
            ("fwd 2 rows 8 warps", {"fwd_rows": 2}),
            ("bwd 1 row 8 warps, 2 programs/SM", {"bwd_rows": 1, "bwd_programs_per_sm": 2}),
            ("bwd 1 row 4 warps, 8 programs/SM", {"bwd_rows": 1, "bwd_warps": 4, "bwd_programs_per_sm": 8}),
            ("bwd 1 row 16 warps, 16 programs/SM", {"bwd_rows": 1, "bwd_warps": 16}),
            ("bwd 2 rows 16 warps, 16 programs/SM", {"bwd_warps": 16}),
            ("bwd 2 rows 8 warps, 4 programs/SM", {"bwd_programs_per_sm": 4}),
        ]:
            launch = replace(shipped, **change)
            measure(f"triton, {name}", triton_fn(launch), asdict(launch))
    result_bwd = backward_sweep(*gate_up.detach().chunk(2, dim=-1), w, dy) if a.bwd_sweep else []
    base = rows[0]
    for r in rows:
        r["fwd_speedup"] = round(base["fwd_ms"] / r["fwd_ms"], 3)
        r["fwd_bwd_speedup"] = round(base["fwd_bwd_ms"] / r["fwd_bwd_ms"], 3)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": list(shape), "rows": rows,
              "backward_sweep": result_bwd}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"\nswiglu_norm_act_quant, {shape[0]} x {shape[1]} bf16, {result['device']}, torch {torch.__version__}")
    print(f"{'impl':48s} {'fwd ms':>8s} {'TB/s':>6s} {'x':>6s} {'fwd+bwd ms':>11s} {'TB/s':>6s} {'x':>6s}")
    for r in rows:
        print(f"{r['impl']:48s} {r['fwd_ms']:8.3f} {r['fwd_TBps']:6.2f} {r['fwd_speedup']:6.2f} "
              f"{r['fwd_bwd_ms']:11.3f} {r['fwd_bwd_TBps']:6.2f} {r['fwd_bwd_speedup']:6.2f}")
    if result_bwd:
        print(f"\nbackward kernel alone, {shape[0]} x {shape[1]} bf16 (5 x {elem / 1e6:.0f} MB moved), fastest first")
        print(f"{'rows':>4s} {'warps':>5s} {'per SM':>6s} {'prefetch':>8s} {'stages':>6s} {'ms':>7s} {'TB/s':>6s} "
              f"{'x shipped':>9s} {'max|diff|':>9s}")
        for r in sorted(result_bwd, key=lambda r: r["ms"]):
            L = r["launch"]
            print(f"{L['bwd_rows']:4d} {L['bwd_warps']:5d} {L['bwd_programs_per_sm']:6d} {str(L['bwd_prefetch']):>8s} "
                  f"{L['bwd_stages']:6d} {r['ms']:7.3f} {r['TBps']:6.2f} {r['vs_shipped']:9.2f} {r['max_abs_diff']:9.2e}")


def backward_sweep(gate, up, w, dy) -> list[dict]:
    """The backward kernel alone over a grid of launch settings; outputs compared with the shipped ones.

    gate, up: the two halves of one (M, 2N) tensor, as the model passes them."""
    import itertools

    g2, u2, dy2 = gate.detach(), up.detach(), dy
    M, N = g2.shape
    y = torch.empty_like(g2)
    rstd = torch.empty(M, device=g2.device)
    swiglu.launch_swiglu_forward(g2, u2, w.detach(), y, rstd, EPS)
    shipped = SwigluLaunch()

    def run(launch):
        programs, per = swiglu.swiglu_backward_programs(M, g2.device, launch)
        dg, du = torch.empty_like(g2), torch.empty_like(u2)
        dw_partial = torch.empty(programs, N, device=g2.device)
        call = lambda: swiglu.launch_swiglu_backward(dy2, g2, u2, w.detach(), rstd, dg, du, dw_partial, per, launch)  # noqa: E731
        call()
        return do_bench(call, warmup=25, rep=200), (dg, du, dw_partial.sum(0))

    base_ms, base_out = run(shipped)
    rows = []
    for rows_, warps, per_sm, prefetch, stages in itertools.product((1, 2), (4, 8, 16), (2, 4, 16), (False, True), (1, 2)):
        if prefetch and stages > 1:
            continue
        launch = replace(shipped, bwd_rows=rows_, bwd_warps=warps, bwd_programs_per_sm=per_sm,
                         bwd_prefetch=prefetch, bwd_stages=stages)
        try:
            ms, out = run(launch)
        except Exception as e:  # e.g. out of shared memory or registers for this combination
            print(f"[bwd-sweep] {launch}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(out, base_out))
        rows.append({"launch": asdict(launch), "ms": round(ms, 4), "TBps": round(5 * g2.numel() * 2 / ms / 1e9, 2),
                     "vs_shipped": round(base_ms / ms, 3), "max_abs_diff": diff})
    return rows


def cross_entropy_sweep(tokens: int, vocab: int, out: str) -> None:
    """The cross entropy kernel over launch settings, beside inductor's forward + backward of F.cross_entropy."""
    import itertools

    import torch.nn.functional as F

    torch.manual_seed(0)
    logits0 = (torch.randn(tokens, vocab, device="cuda") * 3).to(torch.bfloat16)
    t = torch.randint(0, vocab, (tokens,), device="cuda")
    count = torch.tensor(float(tokens), device="cuda")
    moved = 2 * logits0.numel() * logits0.element_size()  # read once, write once
    ref_logits = logits0.clone().requires_grad_()
    compiled_ce = torch.compile(lambda x: F.cross_entropy(x.float(), t))
    base_ms = timed(lambda: compiled_ce(ref_logits).backward(), grads=(ref_logits,))
    compiled_ce(ref_logits).backward()
    want = ref_logits.grad
    shipped = CrossEntropyLaunch()
    rows = [{"impl": "inductor: compile(F.cross_entropy(fp32)) fwd+bwd", "launch": {}, "ms": round(base_ms, 4)}]
    loss_rows = torch.empty(tokens, device="cuda")
    logits = logits0.clone()
    for block, warps in itertools.product((1024, 2048, 4096, 8192), (4, 8, 16)):
        launch = CrossEntropyLaunch(block=block, warps=warps)
        try:
            ms = do_bench(lambda: cross_entropy.launch_cross_entropy(logits, t, count, loss_rows, launch),
                          warmup=10, rep=100)
            logits.copy_(logits0)
            cross_entropy.launch_cross_entropy(logits, t, count, loss_rows, launch)
        except Exception as e:  # e.g. too many registers for this combination
            print(f"[ce-sweep] {launch}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        diff = (logits.float() - want).abs().max().item()
        rows.append({"impl": "triton" + (" (shipped)" if launch == shipped else ""),
                     "launch": asdict(launch), "ms": round(ms, 4), "max_abs_diff_grad": diff})
    for r in rows:
        r["TBps"] = round(moved / r["ms"] / 1e9, 2)
        r["vs_inductor"] = round(base_ms / r["ms"], 3)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": [tokens, vocab],
              "cross_entropy_sweep": rows}
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"\ncross entropy, {tokens} x {vocab} bf16 logits ({moved / 1e9:.1f} GB at least), "
          f"{result['device']}, torch {torch.__version__}, fastest first")
    print(f"{'impl':52s} {'block':>5s} {'warps':>5s} {'ms':>7s} {'TB/s':>6s} {'x inductor':>10s} {'max|dgrad|':>10s}")
    for r in sorted(rows, key=lambda r: r["ms"]):
        L = r["launch"]
        print(f"{r['impl']:52s} {L.get('block', ''):>5} {L.get('warps', ''):>5} {r['ms']:7.3f} {r['TBps']:6.2f} "
              f"{r['vs_inductor']:10.2f} {r.get('max_abs_diff_grad', float('nan')):10.2e}")


if __name__ == "__main__":
    main()
