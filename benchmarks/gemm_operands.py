"""GPU: sustained bf16 GEMM rate under the power cap, by what the operands hold, at the 95m FFN shapes.

    PYTHONPATH=src python benchmarks/gemm_operands.py --out gemm_operands.json     # on a CUDA machine

Why: in a long run an H100 at its 700 W cap lowers its SM clock (1980 -> ~1700 MHz in bitnet-train),
so a step's energy, not only its work, sets the speed, and a GEMM's energy depends on how many operand
bits toggle. Operands, same shapes and FLOPs:
  random      x ~ N(0, 1), W ~ N(0, 0.02): what a bf16 model multiplies
  fake-quant  x rounded to 8 bits per token and W to {-1, 0, +1} times their scales: what BitLinear
              multiplies today (the values of x_q / s, W_t / gamma)
  integers    the same numbers before the scales: x_q in -128..127, W_t in {-1, 0, +1} (exact in bf16)
Each kind runs for --seconds back to back, twice in rotation (thermal order evened out); the rate is
taken over the second half of each run, with the SM clock and board power nvidia-smi saw meanwhile.
Prints a table last (rates against `random`); writes JSON (--out).
"""

import argparse
import json
import statistics
import subprocess
import time

import torch

from bitnet.model.bitlinear import activation_scale, weight_scale


def operands(kind: str, m: int, k: int, n: int, g: torch.Generator):
    x = torch.randn(m, k, device="cuda", generator=g)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    if kind == "random":
        return x.bfloat16(), w.bfloat16()
    sx, sw = activation_scale(x), weight_scale(w)
    x_int, w_t = (x * sx).round().clamp(-128, 127), (w * sw).round().clamp(-1, 1)
    if kind == "integers":
        return x_int.bfloat16(), w_t.bfloat16()
    return (x_int / sx).bfloat16(), (w_t / sw).bfloat16()


def sustained(x, w, seconds: float) -> tuple[float, float, float]:
    """(TFLOP/s over the second half, its start and end time) of x @ w.T repeated for `seconds`."""
    flops = 2 * x.shape[0] * x.shape[1] * w.shape[0]
    marks, t0 = [], time.time()
    while time.time() - t0 < seconds:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            x @ w.t()
        end.record()
        end.synchronize()
        marks.append((time.time(), start.elapsed_time(end) / 1000))
    half = [(t, s) for t, s in marks if t - t0 >= seconds / 2]
    return 50 * flops * len(half) / sum(s for _, s in half) / 1e12, half[0][0], half[-1][0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--out", default="")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gemm_operands.py needs CUDA")
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw", "--format=csv,noheader,nounits",
                            "-lms", "250"], stdout=subprocess.PIPE, text=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = {"gate/up (32768x768 @ 768x3072)": (32768, 768, 3072), "down (32768x3072 @ 3072x768)": (32768, 3072, 768)}
    kinds = ("random", "fake-quant", "integers")
    runs = []
    for shape_name, (m, k, n) in shapes.items():
        data = {kind: operands(kind, m, k, n, g) for kind in kinds}
        sustained(*data["random"], 2.0)  # warm up clocks and cuBLAS
        for rnd in range(2):
            for kind in kinds:
                tflops, t_from, t_to = sustained(*data[kind], a.seconds)
                runs.append({"shape": shape_name, "kind": kind, "round": rnd, "tflops": tflops,
                             "from": t_from, "to": t_to})
                print(f"[gemm] {shape_name} {kind} round {rnd}: {tflops:.0f} TFLOP/s", flush=True)
    smi.terminate()
    samples = []
    for line in smi.communicate()[0].splitlines():
        try:
            stamp, clock, power = (f.strip() for f in line.split(","))
            samples.append((time.mktime(time.strptime(stamp.split(".")[0], "%Y/%m/%d %H:%M:%S")), float(clock),
                            float(power)))
        except ValueError:
            continue
    rows = []
    for shape_name in shapes:
        for kind in kinds:
            mine = [r for r in runs if r["shape"] == shape_name and r["kind"] == kind]
            seen = [s for r in mine for s in samples if r["from"] - 1 <= s[0] <= r["to"]]
            rows.append({"shape": shape_name, "kind": kind, "tflops": statistics.fmean(r["tflops"] for r in mine),
                         "tflops_rounds": [r["tflops"] for r in mine],
                         "sm_mhz": statistics.fmean(s[1] for s in seen) if seen else None,
                         "power_w": statistics.fmean(s[2] for s in seen) if seen else None})
    for r in rows:
        base = next(b for b in rows if b["shape"] == r["shape"] and b["kind"] == "random")
        r["vs_random"] = r["tflops"] / base["tflops"]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "seconds": a.seconds, "rows": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"\nsustained bf16 GEMM by operand values, {result['device']}, torch {torch.__version__}, "
          f"{a.seconds:.0f} s per run, 2 rounds")
    print(f"{'shape':32s} {'operands':11s} {'TFLOP/s':>8s} {'x random':>8s} {'SM MHz':>7s} {'power W':>8s}")
    for r in rows:
        mhz = f"{r['sm_mhz']:7.0f}" if r["sm_mhz"] else f"{'-':>7s}"
        watts = f"{r['power_w']:8.0f}" if r["power_w"] else f"{'-':>8s}"
        print(f"{r['shape']:32s} {r['kind']:11s} {r['tflops']:8.0f} {r['vs_random']:8.3f} {mhz} {watts}")


if __name__ == "__main__":
    main()
