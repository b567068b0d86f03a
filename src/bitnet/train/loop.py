"""The training loop: `train(cfg, model_cfg)` reads top to bottom, like nanoGPT's train.py
(docs/design.md, "training loop").

    bitnet-train --preset tiny --data embedded --run-id demo        # CPU, ~2 minutes
    bitnet-train --preset 95m                                         # the seed's 400k-step run

Setup -> data -> model -> optimizer -> resume -> run directory -> hooks -> loop (the pieces are built in
train/components.py). The loop body: set this step's LR/WD, fetch the batch, `train_step`, log (the
only host sync, in LogInterval), hooks, checkpoint (Checkpointer).
"""

import contextlib
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bitnet.data import build_data, load_tokenizer
from bitnet.device import pick_device
from bitnet.instrumentation.samples import load_prompts
from bitnet.instrumentation.startup import StartupClock
from bitnet.instrumentation.tensorboard import require_tensorboard
from bitnet.model import ModelConfig
from bitnet.model.kernels import current_kernels, use_kernels
from bitnet.run import layout
from bitnet.train import parallel
from bitnet.train.checkpointer import Checkpointer, TrainingFailed, resume_command  # noqa: F401 (cli)
from bitnet.train.components import (Settings, banner, build_hooks, build_model, build_step, open_run_dir, restore,
                                     settings)
from bitnet.train.config import TrainConfig
from bitnet.train.memory import check_fits, out_of_memory_message
from bitnet.train.metrics import MetricsRow
from bitnet.train.optim import set_schedule
from bitnet.train.schedule import lr_at, wd_at
from bitnet.train.state import TrainState, seed_everything
from bitnet.train.step import start_compile_workers


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
    startup = StartupClock()  # marks the end of each phase until the first step
    world = parallel.init(pick_device(cfg.device), cfg.dist_timeout_s)
    try:
        with use_kernels(current_kernels()):  # the run's --fp8 switches (settings) end with it
            return _train(cfg, model_cfg, world, resume, resumed_from, quiet, startup)
    except BaseException as e:
        parallel.report_failure(world, e)  # every rank says on its own stderr why it stopped
        raise
    finally:
        parallel.teardown(world)


def _train(cfg: TrainConfig, model_cfg: ModelConfig, world: parallel.World, resume: dict | None,
           resumed_from: str | None, quiet: bool, startup: StartupClock) -> RunResult:
    # ---- setup: validate everything before anything is written
    s = settings(cfg, model_cfg, world)
    if s.use_compile and s.device.type == "cuda":
        start_compile_workers()  # they start while the setup below runs
    startup.mark("imports")
    # absurd sizes are refused before anything is allocated
    check_fits(cfg, model_cfg, s.micro, s.device, world.world_size)
    seed_everything(cfg.seed)
    prompts = load_prompts(cfg.sample_prompts) if cfg.sample_interval else []
    if cfg.tensorboard:
        require_tensorboard()

    # ---- data
    tok = load_tokenizer(cfg.tokenizer)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer {tok.name!r} has {tok.vocab_size} tokens, more than the model's "
                         f"vocab_size {model_cfg.vocab_size}")
    data = build_data(cfg.data, tok, cfg.seq_len, cfg.seed, cfg.eval_sequences, s.micro, world.rank, world.world_size)
    startup.mark("data")

    # ---- model, optimizer, resume
    model, optimizer = build_model(cfg, model_cfg, world, resume, s.derived["checkpointed_blocks"])
    state = TrainState()
    if resume is not None:
        restore(resume, cfg, model, optimizer, state, data)
    startup.mark("model")

    # ---- run directory, step function, hooks, checkpointer
    run_dir, full_config, lock = open_run_dir(cfg, model_cfg, world, s, data, resumed_from)
    startup.mark("run_dir")
    step_model, step_fn = build_step(cfg, s, model, optimizer, world)
    startup.mark("step_fn")
    hooks, progress = build_hooks(cfg, s, world, run_dir, model, step_model, data, tok, prompts, state, resume, quiet)
    checkpointer = Checkpointer(cfg, run_dir, world, model, optimizer, data.train, state, full_config, s.boundary,
                                hooks, progress.write)
    log = LogInterval(cfg, s, world, hooks, MetricsRow(s.device, world.world_size, s.tokens_per_step,
                                                        model.flops_per_token(cfg.seq_len)))
    if world.is_main:  # first among the hooks: the first step's end is marked before the others work
        hooks.insert(0, startup.attach(run_dir, None if quiet else progress.write))
    if not quiet and world.is_main:
        progress.write(banner(cfg, s, world, run_dir, model, state))
    startup.mark("hooks")

    # ---- the loop
    stopped_early, stop_reason, stopped_by_policy = False, "", False
    start_step = state.step
    try:
        for hook in hooks:
            hook.on_train_start(state)
        startup.mark("hooks_start")
        if resume is None:  # a fresh run keeps its initial weights: checkpoints/step_000000, as the seed lists it
            checkpointer.save(milestone=True, must_succeed=True)
            startup.mark("initial_checkpoint")
        with GracefulStop() as stop:
            for step in range(state.step + 1, cfg.num_steps + 1):
                lr, wd = lr_at(step, cfg, s.boundary), wd_at(step, cfg, s.boundary)
                set_schedule(optimizer, lr, wd)
                try:  # a failure leaves the loader where this step began, so the checkpoint below resumes here
                    micro_batches = data.train.next_batches(s.accum, s.micro * world.world_size)
                except (ValueError, UnicodeDecodeError, EOFError) as e:  # bad data reached mid-run (prefetch thread)
                    raise TrainingFailed(data_failure(e, checkpointer.save, state, start_step, cfg)) from None
                out = parallel.full_tensors(step_fn(micro_batches, lr=lr, wd=wd), world)  # FSDP2: DTensor norms
                state.step, state.tokens = step, state.tokens + s.tokens_per_step
                log.add(out)
                if log.due(step, stop):
                    log.write(step, state, out, lr, wd, stop, data.train.epochs_float)
                # one process stops at once; under torchrun every rank stops where the vote said so
                stopping = log.voted_stop if world.distributed else stop.signal_name
                log.exclude(after_step(step, stopping, state, out, hooks, checkpointer, s.device))
                halt = [h for h in hooks if h.stop_requested] if not world.distributed else []
                if stopping or halt:
                    stop_reason = stopping or halt[0].stop_reason
                    if halt and not stopping:
                        checkpointer.save(milestone=True, must_succeed=True)
                    if world.is_main:
                        progress.write(f"stopped at step {step} ({stop_reason}); checkpoint saved. Resume with:\n"
                                       f"  {resume_command(cfg, layout.checkpoint_dir(run_dir, step))}")
                    stopped_early = True
                    stopped_by_policy = log.voted_by_policy if world.distributed else not stop.signal_name
                    break
        for hook in hooks:
            hook.on_train_end(state)
    except OSError as e:  # disk full or unwritable outside a checkpoint write (scalars, eval, dumps)
        where = f" ({e.filename})" if e.filename else ""
        raise TrainingFailed(f"{e.strerror or e}{where} at step {state.step}; newest intact checkpoint: "
                             f"{checkpointer.newest()}") from None
    except torch.OutOfMemoryError:  # no checkpoint: the step's state is half-updated; the last one stays intact
        raise TrainingFailed(out_of_memory_message(state.step + 1, s.device, cfg, s.micro, model_cfg.n_layers)
                             + f"; newest intact checkpoint: {checkpointer.newest()}") from None
    finally:
        close_all(hooks, lock)
    return RunResult(run_dir=run_dir, step=state.step, tokens=state.tokens, last_loss=log.last_loss,
                     stopped_early=stopped_early, stop_reason=stop_reason, stopped_by_policy=stopped_by_policy)


class LogInterval:
    """The steps since the last log step: their loss sum and time, and at a log step the one host sync,
    the one all-reduce (losses averaged over ranks, tokens summed, the stop vote) and the metrics row
    for every sink. Eval and checkpoint time (`exclude`) is kept out of step_ms."""

    def __init__(self, cfg: TrainConfig, s: Settings, world: parallel.World, hooks: list, metrics: MetricsRow):
        self.cfg, self.s, self.world, self.hooks, self.metrics = cfg, s, world, hooks, metrics
        self.last_loss = float("nan")
        self.t_last = time.perf_counter()
        self.excluded_s = 0.0
        self.steps = 0
        self.loss_sum = torch.zeros((), device=s.device)
        self.voted_stop = None  # under torchrun: why all ranks agreed to stop (at a log step)
        self.voted_by_policy = False  # ... and whether a hook's policy (not a signal) asked: exit 3 on every rank

    def add(self, out) -> None:
        self.loss_sum += out.loss
        self.steps += 1

    def exclude(self, seconds: float) -> None:
        self.excluded_s += seconds

    def due(self, step: int, stop: "GracefulStop") -> bool:
        return (step % self.cfg.log_interval == 0 or step == self.cfg.num_steps
                or bool(stop.signal_name and not self.world.distributed))

    def write(self, step: int, state: TrainState, out, lr: float, wd: float, stop: "GracefulStop",
              epoch: float) -> None:
        world, device, hooks = self.world, self.s.device, self.hooks
        if device.type == "cuda":
            torch.cuda.synchronize()  # host sync: once per log interval, for honest timings
        now = time.perf_counter()
        step_ms = (now - self.t_last - self.excluded_s) * 1000 / self.steps
        # One all-reduce per log interval, never per step: losses averaged over ranks, tokens
        # summed, and a stop vote (signal or hook) so that every rank stops at this same step.
        by_policy = any(h.stop_requested for h in hooks)
        wants_stop = bool(stop.signal_name) or by_policy
        local_tokens = self.steps * self.s.tokens_per_step // world.world_size
        stats = torch.cat([torch.stack([out.loss, self.loss_sum]).double(),
                           torch.tensor([local_tokens, wants_stop, by_policy], dtype=torch.float64, device=device)])
        loss_total, loss_sum_total, tokens_logged, stop_votes, policy_votes = (
            parallel.all_reduce_sum(stats, world).tolist())
        self.last_loss = loss_total / world.world_size
        if stop_votes and world.distributed:
            self.voted_by_policy = bool(policy_votes)
            self.voted_stop = stop.signal_name or next((h.stop_reason for h in hooks if h.stop_requested),
                                                       "stop requested on another rank")
        row = self.metrics.build(step, state.tokens, self.last_loss, loss_sum_total / world.world_size / self.steps,
                                 lr, wd, out.grad_norm.item(), step_ms,
                                 tokens_logged / self.steps / (step_ms / 1000), epoch)
        for hook in hooks:
            hook.on_log(state, row)
        self.t_last, self.excluded_s, self.steps = now, 0.0, 0
        self.loss_sum.zero_()


def after_step(step: int, stopping, state: TrainState, out, hooks: list, checkpointer: Checkpointer,
               device: torch.device) -> float:
    """The hooks' on_step_end, then this step's checkpoint if one is due; returns the seconds they took."""
    checkpoint_due = checkpointer.due(step, stopping)
    if device.type == "cuda" and (checkpoint_due or any(h.works_at(step) for h in hooks)):
        torch.cuda.synchronize()  # the queued steps' GPU time belongs in step_ms, not in the excluded time
    t0 = time.perf_counter()
    for hook in hooks:
        hook.on_step_end(state, out)
    if checkpoint_due:
        checkpointer.at_step_end(step, stopping, hooks)
    return time.perf_counter() - t0


def close_all(hooks: list, lock) -> None:
    for hook in hooks:
        with contextlib.suppress(OSError):  # a full disk fails the last flush too; the error above says it
            hook.close()
    if lock is not None:
        lock.close()


def data_failure(error: Exception, save, state: TrainState, start_step: int, cfg: TrainConfig) -> str:
    """Bad data reached mid-run (a row of the wrong type, a truncated file): checkpoint the steps done, and
    say which file and row, and how to go on once the file is fixed."""
    reason = " ".join(str(error).split()) or type(error).__name__
    if state.step > start_step:
        path = save(milestone=True, must_succeed=True)
        return (f"bad training data at step {state.step + 1}: {reason}; checkpoint of step {state.step} saved; "
                f"fix or remove the file, then resume with: {resume_command(cfg, path)}")
    return f"bad training data at step {state.step + 1}: {reason}; no step trained since the start, nothing saved"
