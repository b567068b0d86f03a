"""The training loop: `train(cfg, model_cfg)` reads top to bottom, like nanoGPT's train.py.

    bitnet-train --preset tiny --data embedded --run-id demo        # CPU, ~2 minutes
    bitnet-train --preset 95m                                         # the seed's 400k-step run

Setup -> data -> model -> optimizer -> resume -> run directory -> loop. The loop body: set this
step's LR/WD, fetch the batch, `train_step`, log (the only host sync), hooks, checkpoint.
"""

import contextlib
import math
import shlex
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from bitnet.data import build_data, load_tokenizer
from bitnet.instrumentation.anomalies import AnomalyHook
from bitnet.instrumentation.console import ConsoleProgress
from bitnet.instrumentation.evaluation import EvalHook
from bitnet.instrumentation.jsonl import ScalarsLogger
from bitnet.instrumentation.provenance import provenance
from bitnet.instrumentation.quant_stats import QuantStatsHook
from bitnet.instrumentation.samples import SampleHook, load_prompts
from bitnet.instrumentation.tensorboard import TensorBoardHook, require_tensorboard
from bitnet.model import ModelConfig, Transformer
from bitnet.train import checkpoint, parallel
from bitnet.train.config import TrainConfig, resolve_derived
from bitnet.train.graphed import GraphedTrainStep, use_cuda_graphs
from bitnet.train.memory import check_fits, out_of_memory_message
from bitnet.train.optim import build_optimizer, set_schedule
from bitnet.train.run_dir import create_run_dir, default_run_id, lock_run_dir, write_json
from bitnet.train.schedule import lr_at, wd_at
from bitnet.train.state import TrainState, rng_state, seed_everything, set_rng_state
from bitnet.train.step import compile_step, train_step


@dataclass
class RunResult:
    run_dir: Path
    step: int
    tokens: int
    last_loss: float
    stopped_early: bool = False
    stop_reason: str = ""
    """Why the run stopped early: a signal's name, or a hook's reason (--anomaly-policy stop)."""
    stopped_by_policy: bool = False
    """Stopped by a hook's policy (exit 3), not by a signal (exit 0)."""


class TrainingFailed(Exception):
    """The run failed mid-way for a reason the user can act on (disk full, unwritable): one line, exit 1."""


def resume_command(cfg: TrainConfig, checkpoint_dir) -> str:
    """The command that continues from `checkpoint_dir` in the same run family and runs directory."""
    cmd = f"bitnet-train --resume-from {shlex.quote(str(checkpoint_dir))}"
    if cfg.runs_dir != TrainConfig.runs_dir:
        cmd += f" --runs-dir {shlex.quote(str(cfg.runs_dir))}"
    return cmd


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # e.g. "cuda:x"
        raise ValueError(f"unsupported --device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for, but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported --device {name!r} (use auto, cpu, cuda or cuda:N)")
    return device


class GracefulStop:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.signal_name = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None:  # a second Ctrl-C aborts at once
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: TrainConfig, model_cfg: ModelConfig, resume: dict | None = None, resumed_from: str | None = None,
          quiet: bool = False) -> RunResult:
    """Run (or continue from `resume`, a loaded checkpoint) a training; returns where it ended.

    Under torchrun every rank runs this (parallel.py starts and ends the process group); without
    torchrun no process group exists and nothing below communicates.
    """
    world = parallel.init(pick_device(cfg.device), cfg.dist_timeout_s)
    try:
        return _train(cfg, model_cfg, world, resume, resumed_from, quiet)
    except BaseException as e:
        parallel.report_failure(world, e)  # every rank says on its own stderr why it stopped
        raise
    finally:
        parallel.teardown(world)


def _train(cfg: TrainConfig, model_cfg: ModelConfig, world: parallel.World, resume: dict | None,
           resumed_from: str | None, quiet: bool) -> RunResult:
    # ---- setup: validate everything before anything is written
    derived = resolve_derived(cfg, world_size=world.world_size, max_seq_len=model_cfg.max_seq_len)
    device = world.device
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    use_graphs = use_cuda_graphs(cfg.cuda_graphs, device, world.world_size, cfg.anomaly_policy)
    autocast = (partial(torch.autocast, "cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    boundary, accum, micro = derived["stage_boundary_step"], derived["grad_accum"], derived["micro_batch_size"]
    check_fits(cfg, model_cfg, micro, device)  # absurd sizes are refused before anything is allocated
    seed_everything(cfg.seed)
    prompts = load_prompts(cfg.sample_prompts) if cfg.sample_interval else []
    if cfg.tensorboard:
        require_tensorboard()

    # ---- data
    tok = load_tokenizer(cfg.tokenizer)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer {tok.name!r} has {tok.vocab_size} tokens, more than the model's "
                         f"vocab_size {model_cfg.vocab_size}")
    data = build_data(cfg.data, tok, cfg.seq_len, cfg.seed, cfg.eval_sequences, micro, world.rank, world.world_size)

    # ---- model and optimizer
    model = Transformer(model_cfg).to(device)
    model.init_weights(seed=cfg.seed)
    if resume is not None:
        model.load_state_dict(resume["model"])  # the full weights, before FSDP2 shards them
    if cfg.parallel == "fsdp2":  # shards `model` in place (under torchrun), before the optimizer takes the shards
        parallel.wrap_model(model, "fsdp2", world)
    optimizer = build_optimizer(model, cfg, fused=device.type == "cuda")  # after fully_shard: it holds the shards
    state = TrainState()

    # ---- resume: optimizer, position, data order and every RNG stream (the weights are in already)
    if resume is not None:
        parallel.load_optimizer_state(model, optimizer, resume["optimizer"])
        state.load_state_dict(resume["train_state"])
        data.train.load_state_dict(state.data)
        set_rng_state(resume["rng"])
        if state.step >= cfg.num_steps:
            raise ValueError(f"checkpoint is at step {state.step}, not before --num-steps {cfg.num_steps}: nothing to do")

    # ---- run directory (created only now that every input checked out)
    # rank 0's name (the default holds a timestamp) and rank 0 alone writes the directory
    run_id = parallel.broadcast_from_main(cfg.run_id or default_run_id(cfg.preset, cfg.data), world)
    run_dir = Path(cfg.runs_dir) / run_id
    # the derived values first: the flags as given win, so a resume on another world size re-derives
    # the micro-batch instead of inheriting the old per-rank one
    full_config = {"model": model_cfg.to_dict(), "train": {**derived, **cfg.to_dict(), "run_id": run_id},
                   "data": data.fingerprint}
    lock = None
    if world.is_main:
        run_dir = create_run_dir(cfg.runs_dir, run_id, cfg.overwrite, resumed_from)
        lock = lock_run_dir(run_dir)  # held until the process ends: auto-resume refuses a live run
        write_json(run_dir / "meta" / "config.json", full_config)
        write_json(run_dir / "meta" / "provenance.json", provenance(cfg.seed, device, resumed_from, world.world_size))
        write_json(run_dir / "meta" / "dataset_fingerprint.json", data.fingerprint)

    # compiled blocks; the head and the loss one Triton-backed function (benchmarks/train_throughput.py)
    step_model = compile_step(model) if use_compile else model
    if cfg.parallel == "ddp":  # DDP around the compiled blocks (torchrun), so it runs the one-GPU graphs
        step_model = parallel.wrap_model(step_model, "ddp", world)
    # one CUDA graph for the whole step, replayed (train/graphed.py), or the step op by op
    if use_graphs:
        step_fn = GraphedTrainStep(step_model, optimizer, autocast, cfg.grad_clip, device)
    else:
        step_fn = partial(train_step, step_model, optimizer, autocast=autocast, grad_clip=cfg.grad_clip, device=device,
                          skip_nonfinite=cfg.anomaly_policy == "skip")
    progress = ConsoleProgress(cfg.num_steps, state.step, enabled=not quiet and world.is_main)
    hooks = [ScalarsLogger(run_dir), progress] if world.is_main else []  # the other ranks write nothing
    if not cfg.no_eval and world.is_main:
        hooks.append(EvalHook(run_dir, step_model, data.eval, autocast, device, cfg.eval_interval, cfg.num_steps))
    elif not cfg.no_eval:  # FSDP2's eval forward needs every rank
        hooks.append(parallel.MirrorEval(step_model, data.eval, autocast, device, cfg.eval_interval, cfg.num_steps))
    # Quant stats, samples and anomaly checks use the plain model: no recompiles for their shapes.
    # They write the run directory, so only rank 0 has them; under FSDP2 rank 0 holds only a shard
    # of the model, so the two that run it stay off (docs/distributed.md).
    whole_model = not parallel.is_sharded(model)
    anomalies = None
    if world.is_main:
        anomalies = AnomalyHook(run_dir, model, cfg.anomaly_policy, cfg.anomaly_window, cfg.anomaly_zscore,
                                log=progress.write, warmup_steps=cfg.warmup_steps)
        if state.anomaly:  # resumed: the spike windows continue where the checkpoint left them
            anomalies.load_state_dict(state.anomaly)
        hooks.append(anomalies)
        if cfg.quant_interval and whole_model:  # activation stats on the first 4 eval sequences
            hooks.append(QuantStatsHook(run_dir, model, data.eval[0][0][:4], cfg.quant_interval, cfg.num_steps,
                                        autocast, anomalies))
        if cfg.sample_interval and whole_model:
            hooks.append(SampleHook(run_dir, model, tok, prompts, cfg.sample_interval, cfg.num_steps,
                                    cfg.sample_max_tokens, cfg.seed, autocast))
        if cfg.tensorboard:
            hooks.append(TensorBoardHook(run_dir))

    def save(milestone: bool, must_succeed: bool = False) -> Path | None:
        """Every rank calls this (FSDP2 gathers its shards to rank 0); rank 0 alone writes.

        A failed write (disk full, unwritable) leaves the previous checkpoint intact; it stops the run
        (TrainingFailed, exit 1) unless --on-checkpoint-error continue, which warns and returns None.
        The final and the stop checkpoints must succeed under either policy.
        """
        state.data = data.train.state_dict()
        if anomalies is not None:  # rank 0's detector memory: spikes after a resume are judged as without one
            state.anomaly = anomalies.state_dict(state)
        model_sd, optim_sd = parallel.full_state_dicts(model, optimizer)
        if not world.is_main:
            return run_dir / "checkpoints" / checkpoint.step_dir_name(state.step)
        try:
            return checkpoint.save(run_dir, state.step, {
                "model": model_sd, "optimizer": optim_sd,
                "train_state": state.state_dict(), "rng": rng_state(),
                "config": full_config, "step": state.step, "tokens": state.tokens,
            }, milestone=milestone)
        except OSError as e:
            kept = checkpoint.latest(run_dir)
            problem = (f"checkpoint of step {state.step} could not be written ({e.strerror or e}); "
                       f"newest intact checkpoint: {kept or 'none'}")
            if cfg.on_checkpoint_error == "continue" and not must_succeed:
                progress.write(f"warning: {problem}; training goes on (--on-checkpoint-error continue)")
                return None
            resume = f"; resume with: {resume_command(cfg, kept)}" if kept else ""
            raise TrainingFailed(problem + resume) from None

    milestones = {boundary - 1, boundary, cfg.num_steps}
    n_params = model.num_params()
    flops_per_token = model.flops_per_token(cfg.seq_len)
    if not quiet and world.is_main:
        ranks = f" x {world.world_size} ranks ({cfg.parallel})" if world.distributed else ""
        progress.write(f"run {run_dir} | {n_params:,} parameters | {device} | compile={use_compile} | "
                       f"cuda graphs={use_graphs} | "
                       f"batch {cfg.batch_size} x {cfg.seq_len} = {derived['tokens_per_step']:,} tokens/step "
                       f"(micro {micro} x accum {accum}{ranks}) | steps {state.step + 1}..{cfg.num_steps}")

    # ---- the loop
    last_loss = float("nan")
    stopped_early = False
    t_last = time.perf_counter()
    excluded_s = 0.0  # eval / checkpoint time, kept out of step_ms
    steps_since_log = 0
    loss_sum = torch.zeros((), device=device)
    voted_stop = None  # under torchrun: why all ranks agreed to stop (at a log step)
    voted_by_policy = False  # ... and whether a hook's policy (not a signal) asked for it: exit 3 on every rank
    stop_reason, stopped_by_policy = "", False
    start_step = state.step
    try:
        for hook in hooks:
            hook.on_train_start(state)
        if resume is None:  # a fresh run keeps its initial weights: checkpoints/step_000000, as the seed lists it
            save(milestone=True, must_succeed=True)
        with GracefulStop() as stop:
            for step in range(state.step + 1, cfg.num_steps + 1):
                lr, wd = lr_at(step, cfg, boundary), wd_at(step, cfg, boundary)
                set_schedule(optimizer, lr, wd)
                try:  # a failure leaves the loader where this step began, so the checkpoint below resumes here
                    micro_batches = data.train.next_batches(accum, micro * world.world_size)
                except (ValueError, UnicodeDecodeError, EOFError) as e:  # bad data reached mid-run (prefetch thread)
                    raise TrainingFailed(data_failure(e, save, state, start_step, run_dir, cfg)) from None
                out = step_fn(micro_batches, lr=lr, wd=wd)
                out = parallel.full_tensors(out, world)  # FSDP2 returns its grad norms as DTensors
                state.step, state.tokens = step, state.tokens + derived["tokens_per_step"]
                loss_sum += out.loss
                steps_since_log += 1

                if step % cfg.log_interval == 0 or step == cfg.num_steps or (stop.signal_name and not world.distributed):
                    if device.type == "cuda":
                        torch.cuda.synchronize()  # host sync: once per log interval, for honest timings
                    now = time.perf_counter()
                    step_ms = (now - t_last - excluded_s) * 1000 / steps_since_log
                    # One all-reduce per log interval, never per step: losses averaged over ranks, tokens
                    # summed, and a stop vote (signal or hook) so that every rank stops at this same step.
                    by_policy = any(h.stop_requested for h in hooks)
                    wants_stop = bool(stop.signal_name) or by_policy
                    local_tokens = steps_since_log * derived["tokens_per_step"] // world.world_size
                    stats = torch.cat([torch.stack([out.loss, loss_sum]).double(),
                                       torch.tensor([local_tokens, wants_stop, by_policy], dtype=torch.float64,
                                                    device=device)])
                    loss_total, loss_sum_total, tokens_logged, stop_votes, policy_votes = (
                        parallel.all_reduce_sum(stats, world).tolist())
                    last_loss = loss_total / world.world_size
                    if stop_votes and world.distributed:
                        voted_by_policy = bool(policy_votes)
                        voted_stop = stop.signal_name or next((h.stop_reason for h in hooks if h.stop_requested),
                                                              "stop requested on another rank")
                    row = {"step": step, "tokens": state.tokens, "loss": last_loss,
                           "loss_avg": loss_sum_total / world.world_size / steps_since_log, "lr": lr, "wd": wd,
                           "grad_norm": out.grad_norm.item(), "step_ms": step_ms,
                           "tok_s": tokens_logged / steps_since_log / (step_ms / 1000),  # step_ms is per step
                           "mfu": flops_per_token * derived["tokens_per_step"] / (step_ms / 1000) / peak_flops(device)
                                  / world.world_size,
                           "mem_gib": memory_gib(device), "epoch": data.train.epochs_float, "time": time.time()}
                    for hook in hooks:
                        hook.on_log(state, row)
                    t_last, excluded_s, steps_since_log = now, 0.0, 0
                    loss_sum.zero_()

                # one process stops at once; under torchrun every rank stops where the vote said so
                stopping = voted_stop if world.distributed else stop.signal_name
                checkpoint_due = step % cfg.checkpoint_interval == 0 or step in milestones or stopping
                if device.type == "cuda" and (checkpoint_due or any(h.works_at(step) for h in hooks)):
                    torch.cuda.synchronize()  # the queued steps' GPU time belongs in step_ms, not in excluded_s
                t0 = time.perf_counter()
                for hook in hooks:
                    hook.on_step_end(state, out)
                if checkpoint_due:
                    # a stop checkpoint is what the printed resume command names: never pruned
                    path = save(milestone=step in milestones or bool(stopping)
                                or bool(cfg.keep_every and step % cfg.keep_every == 0),
                                must_succeed=step == cfg.num_steps or bool(stopping))
                    if path is not None:  # None: the write failed and --on-checkpoint-error continue
                        if world.is_main:
                            checkpoint.prune(run_dir, cfg.keep_last)
                        for hook in hooks:
                            hook.on_checkpoint(state, path)
                excluded_s += time.perf_counter() - t0

                halt = [h for h in hooks if h.stop_requested] if not world.distributed else []
                if stopping or halt:
                    reason = stopping or halt[0].stop_reason
                    if halt and not stopping:
                        save(milestone=True, must_succeed=True)
                    if world.is_main:
                        ckpt = run_dir / "checkpoints" / checkpoint.step_dir_name(step)
                        progress.write(f"stopped at step {step} ({reason}); checkpoint saved. Resume with:\n"
                                       f"  {resume_command(cfg, ckpt)}")
                    stopped_early, stop_reason = True, reason
                    stopped_by_policy = voted_by_policy if world.distributed else not stop.signal_name
                    break
        for hook in hooks:
            hook.on_train_end(state)
    except OSError as e:  # disk full or unwritable outside a checkpoint write (scalars, eval, dumps)
        where = f" ({e.filename})" if e.filename else ""
        raise TrainingFailed(f"{e.strerror or e}{where} at step {state.step}; newest intact checkpoint: "
                             f"{newest_checkpoint(run_dir, world)}") from None
    except torch.OutOfMemoryError:  # no checkpoint: the step's state is half-updated; the last one stays intact
        raise TrainingFailed(out_of_memory_message(state.step + 1, device, cfg, micro)
                             + f"; newest intact checkpoint: {newest_checkpoint(run_dir, world)}") from None
    finally:
        for hook in hooks:
            with contextlib.suppress(OSError):  # a full disk fails the last flush too; the error above says it
                hook.close()
        if lock is not None:
            lock.close()
    return RunResult(run_dir=run_dir, step=state.step, tokens=state.tokens, last_loss=last_loss,
                     stopped_early=stopped_early, stop_reason=stop_reason, stopped_by_policy=stopped_by_policy)


def newest_checkpoint(run_dir: Path, world: parallel.World) -> str:
    if not world.is_main:
        return "on rank 0"
    with warnings.catch_warnings():  # a skipped corrupt one needs no warning here
        warnings.simplefilter("ignore")
        return str(checkpoint.latest(run_dir) or "none")


def data_failure(error: Exception, save, state: TrainState, start_step: int, run_dir: Path, cfg: TrainConfig) -> str:
    """Bad data reached mid-run (a row of the wrong type, a truncated file): checkpoint the steps done, and
    say which file and row, and how to go on once the file is fixed."""
    reason = " ".join(str(error).split()) or type(error).__name__
    if state.step > start_step:
        path = save(milestone=True, must_succeed=True)
        return (f"bad training data at step {state.step + 1}: {reason}; checkpoint of step {state.step} saved; "
                f"fix or remove the file, then resume with: {resume_command(cfg, path)}")
    return f"bad training data at step {state.step + 1}: {reason}; no step trained since the start, nothing saved"


def peak_flops(device: torch.device) -> float:
    """Dense bf16 peak used for MFU: H100 SXM 989 TFLOP/s (datasheet); CPU: a nominal 1 TFLOP/s."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12), ("4090", 165e12)):
            if key in name:
                return flops
        return 312e12
    return 1e12


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    except ImportError:
        return math.nan
