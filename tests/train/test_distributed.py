"""torchrun data parallel on CPU: gloo, 2 processes, the tiny preset.

Two ranks give the losses of one process at the same global batch (DDP and FSDP2); checkpoints
resume across world sizes (1 -> 2 and 2 -> 1, through FSDP2's gathered checkpoint); a failing rank
ends every process with a clear error; a stop on one rank stops all at the same step; a world of
one starts no process group. Each torchrun launch costs seconds, so the runs are module fixtures.

The LR stays in warmup (<= 3e-4): at the peak LR, ternary rounding turns ulp-level differences in
the order of summation into 1e-4 loss differences within a few steps, between 1 process with and
without gradient accumulation as much as between 1 and 2 ranks.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from bitnet.cli.train import train_main
from bitnet.model import checkpoint_fit
from bitnet.run import checkpoint, layout
from bitnet.train import parallel
from bitnet.train.config import TrainConfig, resolve_derived
from tests.conftest import fast_args, read_rows

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
LOSS_RTOL = 1e-5
GRAD_NORM_RTOL = 1e-4  # a sum of 26 squared norms, reduced in a different order


def args(runs: Path, run_id: str, **extra) -> list[str]:
    """Global batch 8 x 32 tokens, LR in warmup, checkpoints at 3 and 6, eval at the last step."""
    # warmup 5 steps to 2.5e-4, 3e-4 at step 6 (the stage boundary): 5e-5 x step, as a 30-step warmup at
    # the default peak gave, but with the warmup ending before the stage boundary (config.py)
    return fast_args(runs, run_id, steps=STEPS, batch_size=8, warmup_steps=5, stage_boundary=0.99, lr_peak=2.5e-4,
                     lr_stage1_end=3e-4, checkpoint_interval=3, quant_interval=0, **extra)


def torchrun(argv: list[str], cwd: Path, script: Path | None = None, nproc: int = 2,
             timeout_s: float = 120) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N -m bitnet.train ARGV` (or a test script instead)."""
    target = [str(script)] if script else ["-m", "bitnet.train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *target, *argv]
    env = parallel.safe_env({**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
                             "OMP_NUM_THREADS": "1"})
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_rows(run_dir / "metrics" / "scalars.jsonl")}


def assert_same_losses(got: dict[int, float], want: dict[int, float], steps) -> None:
    assert sorted(got) == list(steps), sorted(got)
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=LOSS_RTOL), (step, got[step], want[step])


def assert_same_weights(mine: dict, ref: dict) -> None:
    """Equal up to float reduction order, as Adam sees it.

    Another reduction order changes gradients in their last bits; where a gradient is itself near
    that noise level, Adam's normalized update (up to about lr whatever the gradient's size) moves
    too, so a few elements differ by a fraction of the LR (here up to 3e-4 per step). Hence a
    relative norm and a max bound, not an elementwise rtol that holds by luck.
    """
    for name, tensor in ref.items():
        diff = (mine[name].double() - tensor.double())
        assert diff.norm() <= 1e-4 * tensor.double().norm(), (name, diff.norm().item())
        assert diff.abs().max() <= 1e-4, (name, diff.abs().max().item())


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / layout.step_dir_name(step)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("dist") / "runs"


@pytest.fixture(scope="module")
def one(runs):
    """The reference: one process, no torchrun; init_process_group must never be called."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            mp.delenv(var, raising=False)

        def forbidden(*a, **k):
            raise AssertionError("a world of one started a process group")

        mp.setattr(dist, "init_process_group", forbidden)
        # torchrun runs each rank with OMP_NUM_THREADS=1; the CPU kernels split their reductions by
        # thread count, so the bitwise world-of-one comparison needs the same count here
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert train_main(args(runs, "one")) == 0
        finally:
            torch.set_num_threads(threads)
    return runs / "one"


@pytest.fixture(scope="module")
def ddp(runs):
    """2 ranks, DDP, micro-batch 2 (2 accumulation steps per rank: no_sync on the first)."""
    proc = torchrun(args(runs, "ddp", micro_batch_size=2), cwd=runs.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs / "ddp"


@pytest.fixture(scope="module")
def fsdp2_resumed(runs, one):
    """2 ranks, FSDP2, resumed from the one-process step-3 checkpoint (1 -> 2); saves every step."""
    proc = torchrun(["--resume-from", str(ckpt(one, 3)), "--run-id", "fsdp2", "--runs-dir", str(runs),
                     "--parallel", "fsdp2", "--checkpoint-interval", "1", "--quiet"], cwd=runs.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs / "fsdp2"


def test_world_of_one_starts_no_process_group(one):
    assert not dist.is_initialized()
    assert json.loads((one / "meta" / "provenance.json").read_text())["world_size"] == 1
    assert sorted(losses(one)) == list(range(1, STEPS + 1))


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_torchrun_world_of_one_is_the_plain_run(one, runs, mode):
    """nproc_per_node=1: the process group is up but DDP / FSDP2 have nothing to do, so the model stays
    unwrapped (issue 7: the DDP wrapper cost 3.6% at world size 1) and the run is the plain one, bitwise."""
    proc = torchrun(args(runs, f"{mode}1", parallel=mode), cwd=runs.parent, nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, ref = read_rows(runs / f"{mode}1" / "metrics" / "scalars.jsonl"), read_rows(one / "metrics" / "scalars.jsonl")
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in rows] == [(r["step"], r["loss"], r["grad_norm"]) for r in ref]
    assert json.loads((runs / f"{mode}1" / "meta" / "provenance.json").read_text())["world_size"] == 1


def test_ddp_two_ranks_match_one_process(one, ddp):
    assert_same_losses(losses(ddp), losses(one), range(1, STEPS + 1))
    rows, ref = read_rows(ddp / "metrics" / "scalars.jsonl"), read_rows(one / "metrics" / "scalars.jsonl")
    for a, b in zip(rows, ref):
        assert a["tokens"] == b["tokens"] and a["lr"] == b["lr"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=GRAD_NORM_RTOL)
    # rank 0 alone wrote the run directory: one row per step, one eval, its world size recorded
    assert len(read_rows(ddp / "eval" / "eval_results.jsonl")) == 1
    config = json.loads((ddp / "meta" / "config.json").read_text())
    assert config["train"]["world_size"] == 2 and config["train"]["grad_accum"] == 2
    assert config["train"]["micro_batch_size"] == 2
    # its checkpoint is the single-process one (DDP saves the unwrapped model): same weights
    mine, ref = checkpoint_fit.load(ckpt(ddp, STEPS)), checkpoint_fit.load(ckpt(one, STEPS))
    assert mine["model"].keys() == ref["model"].keys()
    assert_same_weights(mine["model"], ref["model"])


def test_fsdp2_resumes_one_process_checkpoint_on_two_ranks(one, fsdp2_resumed):
    assert_same_losses(losses(fsdp2_resumed), losses(one), range(4, STEPS + 1))
    assert len(read_rows(fsdp2_resumed / "eval" / "eval_results.jsonl")) == 1  # every rank took part
    # the gathered checkpoint has the single-process layout and the same weights and moments
    mine, ref = checkpoint_fit.load(ckpt(fsdp2_resumed, STEPS)), checkpoint_fit.load(ckpt(one, STEPS))
    assert mine["model"].keys() == ref["model"].keys()
    assert not any(isinstance(t, torch.distributed.tensor.DTensor) for t in mine["model"].values())
    assert_same_weights(mine["model"], ref["model"])
    assert [g["params"] for g in mine["optimizer"]["param_groups"]] == \
           [g["params"] for g in ref["optimizer"]["param_groups"]]
    # Adam's first moments, to a relative norm: a ternary weight or int8 activation that rounds the
    # other way after float noise shifts many gradients slightly (5e-4 seen), where a lost rank's share
    # or a wrong scale would be off by O(1).
    for i, s in ref["optimizer"]["state"].items():
        diff = (mine["optimizer"]["state"][i]["exp_avg"] - s["exp_avg"]).norm()
        assert diff <= 5e-3 * s["exp_avg"].norm(), (i, (diff / s["exp_avg"].norm()).item())
    assert mine["train_state"]["data"] == ref["train_state"]["data"]


def test_two_rank_checkpoint_resumes_on_one_process(runs, one, fsdp2_resumed):
    assert train_main(args(runs, "from_fsdp2") + ["--resume-from", str(ckpt(fsdp2_resumed, 4))]) == 0
    assert_same_losses(losses(runs / "from_fsdp2"), losses(one), range(5, STEPS + 1))


# A test hook in place of an env var in the trainer: run the real entry point with
# train_step wrapped so that rank 1 raises, or signals itself, at its N-th step.
HOOK_SCRIPT = """
import os, signal, sys
import bitnet.train.components as components  # builds the step function
from bitnet.train.__main__ import main

action, at_step = sys.argv.pop(1), int(sys.argv.pop(1))
real_train_step, calls = components.train_step, 0

def train_step(*args, **kwargs):
    global calls
    calls += 1
    if os.environ["RANK"] == "1" and calls == at_step:
        if action == "raise":
            raise RuntimeError("injected failure on rank 1")
        os.kill(os.getpid(), signal.SIGTERM)
    return real_train_step(*args, **kwargs)

components.train_step = train_step
sys.exit(main())
"""


def test_failing_rank_ends_every_process_with_a_clear_error(tmp_path):
    script = tmp_path / "hook.py"
    script.write_text(HOOK_SCRIPT)
    t0 = time.monotonic()
    proc = torchrun(["raise", "3", *args(tmp_path / "runs", "fail", dist_timeout_s=30)], cwd=tmp_path,
                    script=script, timeout_s=90)
    elapsed_s = time.monotonic() - t0
    assert proc.returncode != 0
    assert "[rank 1/2] failed: RuntimeError: injected failure on rank 1" in proc.stderr, proc.stderr[-3000:]
    assert elapsed_s < 60, f"took {elapsed_s:.0f} s: a hang, not a clean exit"


def test_stop_on_one_rank_stops_all_at_the_next_log_step(tmp_path):
    script = tmp_path / "hook.py"
    script.write_text(HOOK_SCRIPT)
    runs = tmp_path / "runs"
    proc = torchrun(["sigterm", "2", *args(runs, "stop")], cwd=tmp_path, script=script, timeout_s=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(losses(runs / "stop")) == [1, 2]  # --log-interval 1: the vote is at step 2
    assert checkpoint.latest(runs / "stop") == ckpt(runs / "stop", 2)


def test_process_group_start_times_out_without_peers(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key in parallel.MULTICAST_OFF:
        monkeypatch.delenv(key, raising=False)  # restored after the test
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    t0 = time.monotonic()
    with pytest.raises(dist.DistStoreError, match=r"Timed out after \d+ seconds waiting for clients\. 1/2 clients joined"):
        parallel.init(torch.device("cpu"), timeout_s=2)
    assert time.monotonic() - t0 < 30
    assert not dist.is_initialized()
    assert os.environ["NCCL_NVLS_ENABLE"] == "0" and os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"


def test_safe_env_keeps_multicast_off_and_never_overrides():
    env = parallel.safe_env({"PATH": "/bin"})
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["PATH"] == "/bin"
    kept = parallel.safe_env({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"})
    assert kept == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def test_world_without_torchrun_is_plain(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = parallel.init(torch.device("cpu"), timeout_s=1)
    assert world == parallel.World(device=torch.device("cpu"))
    model = torch.nn.Linear(2, 2)
    # without torchrun, and under torchrun with one process (nothing to all-reduce or shard)
    for w in (world, parallel.World(distributed=True, owns_group=True)):
        assert parallel.wrap_model(model, "ddp", w) is model
        assert parallel.wrap_model(model, "fsdp2", w) is model
    with pytest.raises(ValueError, match="--parallel must be ddp or fsdp2"):
        parallel.wrap_model(model, "zero3", world)
    t = torch.ones(3)
    assert parallel.all_reduce_sum(t, world) is t and parallel.broadcast_from_main("x", world) == "x"


def test_global_batch_must_divide_over_ranks():
    with pytest.raises(ValueError, match="not divisible by the world size 4"):
        resolve_derived(TrainConfig(batch_size=6), world_size=4, max_seq_len=1024)
    with pytest.raises(ValueError, match="per-rank batch 4 .* --micro-batch-size 3"):
        resolve_derived(TrainConfig(batch_size=8, micro_batch_size=3), world_size=2, max_seq_len=1024)
    with pytest.raises(ValueError, match="--parallel"):
        resolve_derived(TrainConfig(parallel="zero3"), world_size=1, max_seq_len=1024)
    derived = resolve_derived(TrainConfig(batch_size=32, micro_batch_size=2), world_size=8, max_seq_len=1024)
    assert derived["grad_accum"] == 2 and derived["tokens_per_step"] == 32 * 1024


def test_optimizer_state_keys_round_trip():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW([{"params": [model[0].weight]}, {"params": [model[0].bias, *model[1].parameters()]}])
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    native = opt.state_dict()
    by_name = parallel._name_keyed(native, model, opt)
    assert by_name["param_groups"][1]["params"] == ["0.bias", "1.weight", "1.bias"]
    back = parallel._index_keyed(by_name)
    assert back["param_groups"] == native["param_groups"]
    assert back["state"].keys() == native["state"].keys()
