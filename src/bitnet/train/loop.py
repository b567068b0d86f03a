"""The training loop: `train(cfg, model_cfg)` reads top to bottom, like nanoGPT's train.py.

    bitnet-train --preset tiny --data embedded --run-id demo        # CPU, ~2 minutes
    bitnet-train --preset 95m                                         # the seed's 400k-step run

Setup -> data -> model -> optimizer -> resume -> run directory -> loop. The loop body: set this
step's LR/WD, fetch the batch, `train_step`, log (the only host sync), hooks, checkpoint.
"""

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from bitnet.data import build_data, load_tokenizer
from bitnet.instrumentation.console import ConsoleProgress
from bitnet.instrumentation.evaluation import EvalHook
from bitnet.instrumentation.jsonl import ScalarsLogger
from bitnet.instrumentation.provenance import provenance
from bitnet.model import ModelConfig, Transformer
from bitnet.train import checkpoint
from bitnet.train.config import TrainConfig, resolve_derived
from bitnet.train.optim import build_optimizer, set_schedule
from bitnet.train.run_dir import create_run_dir, default_run_id, write_json
from bitnet.train.schedule import lr_at, wd_at
from bitnet.train.state import TrainState, rng_state, seed_everything, set_rng_state
from bitnet.train.step import train_step


@dataclass
class RunResult:
    run_dir: Path
    step: int
    tokens: int
    last_loss: float
    stopped_early: bool = False


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
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
    """Run (or continue from `resume`, a loaded checkpoint) a training; returns where it ended."""
    # ---- setup: validate everything before anything is written
    derived = resolve_derived(cfg, world_size=1, max_seq_len=model_cfg.max_seq_len)
    device = pick_device(cfg.device)
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    autocast = (partial(torch.autocast, "cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    boundary, accum, micro = derived["stage_boundary_step"], derived["grad_accum"], derived["micro_batch_size"]
    seed_everything(cfg.seed)

    # ---- data
    tok = load_tokenizer(cfg.tokenizer)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer {tok.name!r} has {tok.vocab_size} tokens, more than the model's "
                         f"vocab_size {model_cfg.vocab_size}")
    data = build_data(cfg.data, tok, cfg.seq_len, cfg.seed, cfg.eval_sequences, micro)

    # ---- model and optimizer
    model = Transformer(model_cfg).to(device)
    model.init_weights(seed=cfg.seed)
    optimizer = build_optimizer(model, cfg, fused=device.type == "cuda")
    state = TrainState()

    # ---- resume: weights, optimizer, position, data order and every RNG stream
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        state.load_state_dict(resume["train_state"])
        data.train.load_state_dict(state.data)
        set_rng_state(resume["rng"])
        if state.step >= cfg.num_steps:
            raise ValueError(f"checkpoint is at step {state.step}, not before --num-steps {cfg.num_steps}: nothing to do")

    # ---- run directory (created only now that every input checked out)
    run_id = cfg.run_id or default_run_id(cfg.preset, cfg.data)
    run_dir = create_run_dir(cfg.runs_dir, run_id, cfg.overwrite)
    full_config = {"model": model_cfg.to_dict(), "train": {**cfg.to_dict(), "run_id": run_id, **derived},
                   "data": data.fingerprint}
    write_json(run_dir / "meta" / "config.json", full_config)
    write_json(run_dir / "meta" / "provenance.json", provenance(cfg.seed, device, resumed_from))
    write_json(run_dir / "meta" / "dataset_fingerprint.json", data.fingerprint)

    step_model = torch.compile(model) if use_compile else model
    progress = ConsoleProgress(cfg.num_steps, state.step, enabled=not quiet)
    hooks = [ScalarsLogger(run_dir), progress]
    if not cfg.no_eval:
        hooks.append(EvalHook(run_dir, step_model, data.eval, autocast, device, cfg.eval_interval, cfg.num_steps))

    def save(milestone: bool) -> Path:
        state.data = data.train.state_dict()
        return checkpoint.save(run_dir, state.step, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "train_state": state.state_dict(), "rng": rng_state(),
            "config": full_config, "step": state.step, "tokens": state.tokens,
        }, milestone=milestone)

    milestones = {boundary - 1, boundary, cfg.num_steps}
    n_params = model.num_params()
    flops_per_token = model.flops_per_token(cfg.seq_len)
    if not quiet:
        progress.write(f"run {run_dir} | {n_params:,} parameters | {device} | compile={use_compile} | "
                       f"batch {cfg.batch_size} x {cfg.seq_len} = {derived['tokens_per_step']:,} tokens/step "
                       f"(micro {micro} x accum {accum}) | steps {state.step + 1}..{cfg.num_steps}")

    # ---- the loop
    last_loss = float("nan")
    stopped_early = False
    t_last = time.perf_counter()
    excluded_s = 0.0  # eval / checkpoint time, kept out of step_ms
    steps_since_log = 0
    loss_sum = torch.zeros((), device=device)
    try:
        for hook in hooks:
            hook.on_train_start(state)
        with GracefulStop() as stop:
            for step in range(state.step + 1, cfg.num_steps + 1):
                lr, wd = lr_at(step, cfg, boundary), wd_at(step, cfg, boundary)
                set_schedule(optimizer, lr, wd)
                micro_batches = [data.train.next_batch(micro) for _ in range(accum)]
                out = train_step(step_model, optimizer, micro_batches, autocast, cfg.grad_clip, lr, wd, device)
                state.step, state.tokens = step, state.tokens + derived["tokens_per_step"]
                loss_sum += out.loss
                steps_since_log += 1

                if step % cfg.log_interval == 0 or step == cfg.num_steps or stop.signal_name:
                    if device.type == "cuda":
                        torch.cuda.synchronize()  # host sync: once per log interval, for honest timings
                    now = time.perf_counter()
                    step_ms = (now - t_last - excluded_s) * 1000 / steps_since_log
                    last_loss = out.loss.item()
                    row = {"step": step, "tokens": state.tokens, "loss": last_loss,
                           "loss_avg": (loss_sum / steps_since_log).item(), "lr": lr, "wd": wd,
                           "grad_norm": out.grad_norm.item(), "step_ms": step_ms,
                           "tok_s": derived["tokens_per_step"] / (step_ms / 1000),
                           "mfu": flops_per_token * derived["tokens_per_step"] / (step_ms / 1000) / peak_flops(device),
                           "mem_gib": memory_gib(device), "epoch": data.train.epochs_float, "time": time.time()}
                    for hook in hooks:
                        hook.on_log(state, row)
                    t_last, excluded_s, steps_since_log = now, 0.0, 0
                    loss_sum.zero_()

                t0 = time.perf_counter()
                for hook in hooks:
                    hook.on_step_end(state, out)
                if step % cfg.checkpoint_interval == 0 or step in milestones or stop.signal_name:
                    path = save(milestone=step in milestones or (cfg.keep_every and step % cfg.keep_every == 0))
                    checkpoint.prune(run_dir, cfg.keep_last)
                    for hook in hooks:
                        hook.on_checkpoint(state, path)
                excluded_s += time.perf_counter() - t0

                halt = [h for h in hooks if h.stop_requested]
                if stop.signal_name or halt:
                    reason = stop.signal_name or halt[0].stop_reason
                    if halt and not stop.signal_name:
                        save(milestone=True)
                    progress.write(f"stopped at step {step} ({reason}); checkpoint saved. Resume with:\n"
                                   f"  bitnet-train --resume-from {run_dir / 'checkpoints' / checkpoint.step_dir_name(step)}")
                    stopped_early = True
                    break
        for hook in hooks:
            hook.on_train_end(state)
    finally:
        for hook in hooks:
            hook.close()
    return RunResult(run_dir=run_dir, step=state.step, tokens=state.tokens, last_loss=last_loss,
                     stopped_early=stopped_early)


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
