#!/usr/bin/env python3
"""Check a finished run directory against what the seed's 10-step test promises (used by
test_training_10steps.sh): config, provenance and dataset fingerprint; checkpoints that load
(sha256 checked, weights into the model); scalars; eval; samples in all three modes with their
metrics; ternary metrics. Prints one line per check; exit 1 if any fails.

    python scripts/check_run_tree.py runs/test_10steps --steps 10 --checkpoints 0,5,10 --samples 5,10
"""

import argparse
import json
import math
import sys
from pathlib import Path

SCALAR_KEYS = {"step", "tokens", "loss", "lr", "wd", "grad_norm", "step_ms", "tok_s", "mem_gib", "time"}
SAMPLE_METRICS = ("mean_entropy", "max_repetition", "unique_tokens", "unique_ratio")
MODES = {"greedy", "typical", "stress"}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_meta(run: Path, steps: int) -> str:
    cfg = json.loads((run / "meta/config.json").read_text())
    assert {"model", "train", "data"} <= set(cfg), f"config.json keys {sorted(cfg)}"
    assert cfg["train"]["num_steps"] == steps, f"config num_steps {cfg['train']['num_steps']}"
    prov = json.loads((run / "meta/provenance.json").read_text())
    missing = {"git_commit", "git_dirty", "command", "host", "python", "torch", "seed", "start_time",
               "resumed_from"} - set(prov)
    assert not missing, f"provenance.json lacks {sorted(missing)}"
    fp = json.loads((run / "meta/dataset_fingerprint.json").read_text())
    digest = fp.get("first_1000_train_tokens_sha256", "")
    assert len(digest) == 64, f"dataset fingerprint hash {digest!r}"
    return f"config, provenance (commit {str(prov['git_commit'])[:10]}), fingerprint {digest[:12]}..."


def check_checkpoints(run: Path, expected: list[int]) -> str:
    import torch

    from bitnet.model import ModelConfig, Transformer
    from bitnet.run import checkpoint

    found = [s for s, _ in checkpoint.list_checkpoints(run)]
    assert found == expected, f"checkpoints at steps {found}, expected {expected}"
    model_cfg = ModelConfig.from_dict(json.loads((run / "meta/config.json").read_text())["model"])
    weights = []
    for step in expected:
        state = checkpoint.load(run / "checkpoints" / checkpoint.step_dir_name(step))  # verifies sha256
        assert state["step"] == step, f"step_{step:06d} holds step {state['step']}"
        model = Transformer(model_cfg)
        model.load_state_dict(state["model"])  # strict: every weight present, right shapes
        assert {"optimizer", "train_state", "rng", "config"} <= set(state), f"step {step}: keys {sorted(state)}"
        weights.append(model.embed_tokens.weight.detach().clone())
    assert not torch.equal(weights[0], weights[-1]), "the last checkpoint's weights equal the first's"
    return f"checkpoints {', '.join(f'step_{s:06d}' for s in expected)} load (sha256 ok, weights differ)"


def check_scalars(run: Path, steps: int) -> str:
    scalars = rows(run / "metrics/scalars.jsonl")
    assert [r["step"] for r in scalars] == list(range(1, steps + 1)), "scalar rows are not steps 1..N"
    missing = SCALAR_KEYS - set(scalars[-1])
    assert not missing, f"scalars lack {sorted(missing)}"
    assert all(math.isfinite(r["loss"]) for r in scalars), "a non-finite loss"
    return f"{len(scalars)} scalar rows, loss {scalars[0]['loss']:.3f} -> {scalars[-1]['loss']:.3f}"


def check_eval(run: Path, at: list[int]) -> str:
    evals = rows(run / "eval/eval_results.jsonl")
    assert [e["step"] for e in evals] == at, f"eval at steps {[e['step'] for e in evals]}, expected {at}"
    assert all(math.isfinite(e["eval_loss"]) for e in evals), "a non-finite eval loss"
    return f"eval at steps {at}, eval loss {evals[-1]['eval_loss']:.3f}"


def check_samples(run: Path, at: list[int]) -> str:
    samples = rows(run / "samples/samples.jsonl")
    assert sorted({r["step"] for r in samples}) == at, f"samples at steps {sorted({r['step'] for r in samples})}"
    for step in at:
        for prompt in {r["prompt"] for r in samples}:
            modes = {r["mode"] for r in samples if r["step"] == step and r["prompt"] == prompt}
            assert modes == MODES, f"step {step}, prompt {prompt!r}: modes {sorted(modes)}"
    for r in samples:
        missing = [k for k in SAMPLE_METRICS if not isinstance(r.get(k), (int, float))]
        assert not missing, f"sample ({r['step']}, {r['mode']}) lacks {missing}"
        assert r["unique_tokens"] == len(set(r["token_ids"])), "unique_tokens is not the count of distinct ids"
        assert r["top5"] and len(r["top5"][0]["token_ids"]) == 5, "no top-5 logits"
    return f"{len(samples)} samples (greedy, typical, stress) with entropy, repetition, unique tokens, top-5"


def check_quant(run: Path) -> str:
    quant = rows(run / "metrics/quant.jsonl")
    assert quant, "metrics/quant.jsonl is empty"
    groups = quant[-1]["groups"]
    assert {"attn", "ffn"} <= set(groups), f"quant groups {sorted(groups)}"
    for name in ("attn", "ffn"):
        g = groups[name]
        assert abs(g["neg"] + g["zero"] + g["pos"] - 1) < 1e-6, f"{name} -1/0/+1 shares do not sum to 1"
    attn = groups["attn"]
    return (f"ternary metrics at steps {[q['step'] for q in quant]}, attn -1/0/+1 "
            f"{attn['neg']:.3f}/{attn['zero']:.3f}/{attn['pos']:.3f}")


def check_anomalies(run: Path) -> str:
    assert (run / "anomalies").is_dir(), "no anomalies/ directory"
    dumps = sorted(p.name for p in (run / "anomalies").iterdir())
    return f"anomalies/ present, {len(dumps)} dumps" + (f": {', '.join(dumps)}" if dumps else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--checkpoints", required=True, help="comma-separated steps")
    ap.add_argument("--samples", required=True, help="comma-separated steps of samples and eval")
    args = ap.parse_args(argv)
    run = Path(args.run_dir)
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    checks = [("meta", lambda: check_meta(run, args.steps)),
              ("checkpoints", lambda: check_checkpoints(run, ints(args.checkpoints))),
              ("scalars", lambda: check_scalars(run, args.steps)),
              ("eval", lambda: check_eval(run, ints(args.samples))),
              ("samples", lambda: check_samples(run, ints(args.samples))),
              ("quant", lambda: check_quant(run)),
              ("anomalies", lambda: check_anomalies(run))]
    failed = 0
    for name, check in checks:
        try:
            print(f"ok    {name:<12}{check()}")
        except Exception as e:  # report every failing check, not only the first
            print(f"FAIL  {name:<12}{type(e).__name__}: {e}")
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
