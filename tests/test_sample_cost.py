"""benchmarks/sample_cost.py on the CPU: the events, their forwards and new shapes, the table and the JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "sample_cost.py"


def run(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


def test_sample_cost_times_the_variants_and_counts_new_shapes(tmp_path):
    from bitnet.data import load_tokenizer
    from bitnet.instrumentation.samples import load_prompts

    out = tmp_path / "cost.json"
    r = run("--device", "cpu", "--preset", "tiny", "--no-compile", "--train-steps", "1", "--batch-size", "2",
            "--seq-len", "32", "--max-new-tokens", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert result["kind"] == "bitnet" and list(result["variants"]) == ["batched", "after", "before"]
    assert result["variants"]["after"]["sdpa_backends"] == ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"]
    assert result["variants"]["before"]["sdpa_backends"] is None
    # the shapes a sample event meets: each prompt's prefill (P, P), then (1, P + 1) ... (1, P + 3)
    tok = load_tokenizer("llama2")
    lengths = [len(tok.encode(p, add_bos=True)) for p in load_prompts(str(ROOT / "benchmarks" / "long_run_prompts.txt"))]
    shapes = {(n, n) for n in lengths} | {(1, n + i) for n in lengths for i in (1, 2, 3)}
    longest = max(lengths)  # batched: every prompt padded to the longest, one prefill, then 3 decoded
    first, second = result["variants"].pop("batched")["events"]
    assert first["forwards"] == second["forwards"] == 4 and second["new_shapes"] == 0
    assert first["new_shapes"] == 4 and {(longest, longest), (1, longest + 3)} <= {
        (f["query_len"], f["key_len"]) for f in first["slowest_forwards"]}
    assert len(first["tokens"]) == 3 * len(lengths) and all(len(t) == 4 for t in first["tokens"])
    for variant in result["variants"].values():
        first, second = variant["events"]
        assert first["forwards"] == second["forwards"] == 4 * len(lengths)  # 5 prompts x (prefill + 3 decoded)
        assert first["new_shapes"] == len(shapes) and second["new_shapes"] == 0
        assert 0 < first["new_shape_forward_s"] <= first["forward_s"] <= first["s"]
        assert len(first["tokens"]) == 3 * len(lengths) and all(len(t) == 4 for t in first["tokens"])
        assert variant["picked_decode"] in ("flash_attention", "math")  # what the CPU offers
    last = r.stdout.strip().splitlines()
    assert last[-4].startswith("model") and last[-3].startswith("bitnet  batched")
    assert last[-2].startswith("bitnet  after") and last[-1].startswith("bitnet  before")


def test_sample_cost_refuses_unknown_kinds():
    r = run("--kinds", "fp8")
    assert r.returncode == 2 and r.stderr.strip() == "error: unknown kind/variant 'fp8'"
