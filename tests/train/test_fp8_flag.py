"""--fp8: which switches it names, what a CPU run does with them, and the FP8 benchmark's bookkeeping."""

import json
import sys
from pathlib import Path

import pytest
import torch

from bitnet.cli.train import train_main
from bitnet.model.kernels import KernelChoice, current_kernels, use_kernels
from bitnet.train.components import use_fp8
from bitnet.train.config import FP8_PARTS, fp8_parts
from tests.conftest import fast_args, read_rows

ROOT = Path(__file__).resolve().parents[2]


def test_fp8_parts_parse_lists_all_and_none():
    assert fp8_parts("none") == () and fp8_parts("") == ()
    assert fp8_parts("all") == FP8_PARTS
    assert fp8_parts("grad_weight, head") == ("head", "grad_weight")  # canonical order
    with pytest.raises(ValueError, match="--fp8 takes none, all or a comma list"):
        fp8_parts("head,all")
    # the FP8 forward changes what the model computes while it trains: 'all' leaves it out, naming it works
    assert "forward" not in fp8_parts("all")
    assert fp8_parts("forward") == ("forward",) and fp8_parts("forward,head") == ("head", "forward")
    with pytest.raises(ValueError, match="grad_weight, forward; got 'fwd'"):
        fp8_parts("fwd")


def test_use_fp8_sets_exactly_the_named_switches_and_warns_off_cuda():
    with use_kernels(KernelChoice(fp8_grad_input=True, loss="torch")):
        with pytest.warns(UserWarning, match="applies on CUDA only"):
            use_fp8(("head", "grad_weight"), torch.device("cpu"))
        c = current_kernels()
        assert (c.fp8_head, c.fp8_grad_input, c.fp8_grad_weight, c.loss) == (True, False, True, "torch")
        assert not c.fp8_forward
        with pytest.warns(UserWarning, match="--fp8 forward applies on CUDA only"):
            use_fp8(("forward",), torch.device("cpu"))
        c = current_kernels()
        assert (c.fp8_head, c.fp8_grad_input, c.fp8_grad_weight, c.fp8_forward) == (False, False, False, True)
        use_fp8((), torch.device("cpu"))
        assert not (current_kernels().fp8_head or current_kernels().fp8_grad_weight or current_kernels().fp8_forward)


def test_a_cpu_run_with_fp8_trains_exactly_as_without(runs, capsys):
    assert train_main(fast_args(runs, "exact")) == 0
    before = current_kernels()
    assert train_main(fast_args(runs, "fp8", fp8="all")) == 0
    assert current_kernels() == before  # the run's switches end with the run
    assert "applies on CUDA only" in capsys.readouterr().err
    losses = [[r["loss"] for r in read_rows(runs / name / "metrics" / "scalars.jsonl")] for name in ("exact", "fp8")]
    assert losses[0] == losses[1]
    assert json.loads((runs / "fp8" / "meta" / "config.json").read_text())["train"]["fp8"] == "all"


def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fp8_quality
    return fp8_quality


def test_fp8_quality_compares_each_switch_with_the_noise_floor():
    q = _bench()
    row = {"tok_s": 100.0, "peak_gib": 10.0, "tail_train_loss": 3.00, "final_eval_loss": 3.10}
    results = {"exact-s0": row, "exact-s1": {**row, "tail_train_loss": 3.02, "final_eval_loss": 3.13},
               "head-s0": {**row, "tok_s": 110.0, "peak_gib": 9.0, "tail_train_loss": 3.01, "final_eval_loss": 3.12},
               "all-s0": {**row, "tail_train_loss": 3.05, "final_eval_loss": 3.11}}
    d = q.compare(results)
    assert d["noise_floor"] == pytest.approx({"tail_train_loss": 0.02, "final_eval_loss": 0.03, "seeds": 2})
    # a third seed widens the floor to the largest distance from exact-s0
    wider = q.compare({**results, "exact-s2": {**row, "tail_train_loss": 2.99, "final_eval_loss": 3.16}})
    assert wider["noise_floor"] == pytest.approx({"tail_train_loss": 0.02, "final_eval_loss": 0.06, "seeds": 3})
    # rows the budget skipped are left out; a seed without an eval widens only the train-loss floor
    partial = q.compare({**results, "exact-s2": {"skipped": "budget"}, "grad_input-s0": {"skipped": "budget"},
                         "exact-s3": {**row, "tail_train_loss": 3.1, "final_eval_loss": None}})
    assert partial["noise_floor"] == pytest.approx({"tail_train_loss": 0.1, "final_eval_loss": 0.03, "seeds": 3})
    assert "grad_input-s0" not in partial
    assert d["head-s0"]["tok_s_ratio"] == pytest.approx(1.1) and d["head-s0"]["peak_gib_delta"] == pytest.approx(-1)
    assert d["head-s0"]["holds"] is True and d["all-s0"]["holds"] is False  # tail +0.05 > floor 0.02
    assert "noise floor" in q.table(results, d)
    # a switch on several seeds: each row against its own seed's exact row, and the mean of those deltas
    seeds = q.compare({**results, "exact-s2": {**row, "tail_train_loss": 2.99, "final_eval_loss": 3.16},
                       "head-s1": {**row, "tail_train_loss": 3.04, "final_eval_loss": 3.13},
                       "head-s2": {**row, "tail_train_loss": 2.96, "final_eval_loss": 3.13}})
    assert seeds["head-s1"]["against"] == "exact-s1" and seeds["all-s0"]["against"] == "exact-s0"
    assert seeds["head-s1"]["final_eval_loss_delta"] == pytest.approx(0.0)
    assert seeds["head (mean)"] == pytest.approx({"seeds": 3, "tail_train_loss_delta": (0.01 + 0.02 - 0.03) / 3,
                                                  "final_eval_loss_delta": (0.02 + 0.0 - 0.03) / 3, "holds": True})
    assert "all (mean)" not in seeds  # one seed: no mean
    # a seed with no exact row of its own is compared with exact-s0 and kept out of the mean; a missing eval
    # gives no eval delta (and no verdict) instead of a number
    more = q.compare({**results, "head-s1": {**row, "tail_train_loss": 3.04, "final_eval_loss": 3.13},
                      "head-s3": {**row, "tail_train_loss": 3.50, "final_eval_loss": 3.90},
                      "head-s4": {**row, "final_eval_loss": None}})
    assert more["head-s3"]["against"] == "exact-s0" and more["head-s3"]["paired"] is False
    assert more["head-s4"]["final_eval_loss_delta"] is None and more["head-s4"]["holds"] is None
    assert more["head (mean)"]["seeds"] == 2  # head-s0 and head-s1 only
    # without exact-s0 the pairs are still compared; there is no floor to judge them by
    no_base = q.compare({"exact-s1": results["exact-s1"], "head-s1": {**row, "final_eval_loss": 3.14}})
    assert "noise_floor" not in no_base and no_base["head-s1"]["final_eval_loss_delta"] == pytest.approx(0.01)
    assert "head (mean)" in q.table(results, seeds)
    # rows from two GPU calls are joined and compared as one
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        a, b, out = (Path(tmp) / n for n in ("a.json", "b.json", "out.json"))
        a.write_text(json.dumps({"steps": 2000, "results": {k: results[k] for k in ("exact-s0", "head-s0")}}))
        b.write_text(json.dumps({"steps": 2000, "results": {"exact-s1": results["exact-s1"],
                                                             "all-s0": {"skipped": "budget"}}}))
        assert q.main(["--merge", str(a), str(b), "--out", str(out)]) == 0
        merged = json.loads(out.read_text())
        assert sorted(merged["results"]) == ["exact-s0", "exact-s1", "head-s0"]
        assert merged["comparison"]["head-s0"]["holds"] is True
    assert q.trainer_switches("exact") == ("none", None) and q.trainer_switches("all") == ("all", None)
    assert q.trainer_switches("bf16resid") == ("none", "bf16") and q.trainer_switches("fp32resid") == ("none", "fp32")
    assert q.trainer_switches("head+bf16resid+grad_input") == ("head,grad_input", "bf16")
    with pytest.raises(SystemExit, match="residual stream twice"):
        q.trainer_switches("bf16resid+fp32resid")
    with pytest.raises(SystemExit, match="not <switches>-s<seed>"):
        q.parse_row("head")


def test_fp8_quality_smoke_runs_a_row_through_the_trainer(tmp_path):
    q = _bench()
    out = tmp_path / "q.json"
    assert q.main(["--smoke", "--rows", "fp32resid+head-s0", "--work", str(tmp_path / "w"), "--out", str(out)]) == 0
    r = json.loads(out.read_text())["results"]["fp32resid+head-s0"]
    # both switches reached the trainer (read back from the run's config), the head's chunking at its default
    assert r["fp8"] == "head" and r["residual_stream"] == "fp32" and r["head_chunk_rows"] == 4096
    assert r["tok_s"] > 0 and r["final_eval_loss"] > 0 and len(r["loss_curve"]) == 10
