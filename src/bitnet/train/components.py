"""The pieces `_train` assembles, in its order (docs/design.md, "training loop"): settings, model and
optimizer, resume, run directory, the step function, the hooks."""

import contextlib
import warnings
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from bitnet.instrumentation.anomalies import AnomalyHook
from bitnet.instrumentation.console import ConsoleProgress
from bitnet.instrumentation.evaluation import EvalHook
from bitnet.instrumentation.jsonl import ScalarsLogger
from bitnet.instrumentation.provenance import provenance
from bitnet.instrumentation.quant_stats import QuantStatsHook
from bitnet.instrumentation.samples import SampleHook
from bitnet.instrumentation.tensorboard import TensorBoardHook
from bitnet.model import ModelConfig, Transformer
from bitnet.model.kernels import current_kernels, fp8, set_kernels
from bitnet.run import layout
from bitnet.run.directory import create_run_dir, default_run_id, lock_run_dir
from bitnet.run.files import write_json
from bitnet.train import parallel
from bitnet.train.config import TrainConfig, fp8_parts, resolve_derived
from bitnet.train.graphed import GraphedTrainStep, use_cuda_graphs
from bitnet.train.optim import build_optimizer
from bitnet.train.state import TrainState, saved_hook_states, set_rng_state
from bitnet.train.step import compile_step, train_step


@dataclass
class Settings:
    """What the flags, the world and the device decide before anything is built."""

    derived: dict
    device: torch.device
    use_compile: bool
    use_graphs: bool
    autocast: object
    boundary: int
    accum: int
    micro: int

    @property
    def tokens_per_step(self) -> int:
        return self.derived["tokens_per_step"]


def settings(cfg: TrainConfig, model_cfg: ModelConfig, world: parallel.World) -> Settings:
    derived = resolve_derived(cfg, world_size=world.world_size, max_seq_len=model_cfg.max_seq_len,
                              n_layers=model_cfg.n_layers)
    device = world.device
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    use_graphs = use_cuda_graphs(cfg.cuda_graphs, device, world.world_size, cfg.anomaly_policy)
    autocast = (partial(torch.autocast, "cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    use_fp8(fp8_parts(cfg.fp8), device)
    launch = current_kernels().cross_entropy_launch  # --head-chunk-rows; `train` puts the previous choice back
    set_kernels(replace(current_kernels(), cross_entropy_launch=replace(launch, chunk_rows=cfg.head_chunk_rows)))
    return Settings(derived, device, use_compile, use_graphs, autocast, derived["stage_boundary_step"],
                    derived["grad_accum"], derived["micro_batch_size"])


def use_fp8(parts: tuple[str, ...], device: torch.device) -> None:
    """Turn the FP8 switches named by --fp8 on (the others off) for this run (`train` puts the previous choice
    back when it ends); refuse a CUDA card without FP8 tensor cores, and say so where they do not apply (CPU
    runs keep the exact math)."""
    if parts and device.type == "cuda" and not fp8.supported(torch.empty(0, device=device)):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"--fp8 {','.join(parts)} needs FP8 tensor cores (compute capability 8.9+); "
                         f"{torch.cuda.get_device_name(device)} has {major}.{minor}; use --fp8 none")
    if parts and device.type != "cuda":
        warnings.warn(f"--fp8 {','.join(parts)} applies on CUDA only; this {device.type} run uses the exact bf16/fp32 math")
    set_kernels(replace(current_kernels(), fp8_head="head" in parts, fp8_grad_input="grad_input" in parts,
                        fp8_grad_weight="grad_weight" in parts, fp8_forward="forward" in parts))


def build_model(cfg: TrainConfig, model_cfg: ModelConfig, world: parallel.World, resume: dict | None,
                checkpointed_blocks: int = 0):
    """(model, optimizer): initialized, or with the checkpoint's weights, its first `checkpointed_blocks`
    blocks recomputed in the backward; sharded under FSDP2."""
    model = Transformer(model_cfg).to(world.device)
    model.init_weights(seed=cfg.seed)
    model.checkpoint_blocks(checkpointed_blocks)
    model.residual_in_matmul_dtype = cfg.residual_stream == "bf16"
    if resume is not None:
        model.load_state_dict(resume["model"])  # the full weights, before FSDP2 shards them
    if cfg.parallel == "fsdp2":  # shards `model` in place (under torchrun), before the optimizer takes the shards
        parallel.wrap_model(model, "fsdp2", world)
    optimizer = build_optimizer(model, cfg, fused=world.device.type == "cuda")  # after fully_shard: it holds the shards
    return model, optimizer


def restore(resume: dict, cfg: TrainConfig, model, optimizer, state: TrainState, data) -> None:
    """Optimizer, position, data order and every RNG stream (the weights are in already)."""
    parallel.load_optimizer_state(model, optimizer, resume["optimizer"])
    state.load_state_dict(resume["train_state"])
    data.train.load_state_dict(state.data)
    set_rng_state(resume["rng"])
    if state.step >= cfg.num_steps:
        raise ValueError(f"checkpoint is at step {state.step}, not before --num-steps {cfg.num_steps}: nothing to do")


def open_run_dir(cfg: TrainConfig, model_cfg: ModelConfig, world: parallel.World, s: Settings, data,
                 resumed_from: str | None):
    """(run_dir, full config, lock): created only now that every input checked out; rank 0 alone writes it
    and holds its lock until the process ends (auto-resume refuses a live run)."""
    # rank 0's name (the default holds a timestamp)
    run_id = parallel.broadcast_from_main(cfg.run_id or default_run_id(cfg.preset, cfg.data), world)
    run_dir = Path(cfg.runs_dir) / run_id
    # the derived values first: the flags as given win, so a resume on another world size re-derives
    # the micro-batch instead of inheriting the old per-rank one
    full_config = {"model": model_cfg.to_dict(), "train": {**s.derived, **cfg.to_dict(), "run_id": run_id},
                   "data": data.fingerprint}
    lock = None
    if world.is_main:
        run_dir = create_run_dir(cfg.runs_dir, run_id, cfg.overwrite, resumed_from)
        lock = lock_run_dir(run_dir)
        write_json(run_dir / layout.CONFIG, full_config)
        write_json(run_dir / layout.PROVENANCE, provenance(cfg.seed, s.device, resumed_from, world.world_size))
        write_json(run_dir / layout.FINGERPRINT, data.fingerprint)
    return run_dir, full_config, lock


def build_step(cfg: TrainConfig, s: Settings, model, optimizer, world: parallel.World):
    """(step_model, step_fn): compiled blocks, the head and the loss one Triton-backed function
    (benchmarks/train_throughput.py); DDP around them; one CUDA graph for the whole step, or op by op."""
    step_model = compile_step(model) if s.use_compile else model
    if cfg.parallel == "ddp":  # DDP around the compiled blocks (torchrun), so it runs the one-GPU graphs
        step_model = parallel.wrap_model(step_model, "ddp", world)
    if s.use_graphs:
        step_fn = GraphedTrainStep(step_model, optimizer, s.autocast, cfg.grad_clip, s.device)
    else:
        step_fn = partial(train_step, step_model, optimizer, autocast=s.autocast, grad_clip=cfg.grad_clip,
                          device=s.device, skip_nonfinite=cfg.anomaly_policy == "skip")
    return step_model, step_fn


def build_hooks(cfg: TrainConfig, s: Settings, world: parallel.World, run_dir: Path, model, step_model, data, tok,
                prompts, state: TrainState, resume: dict | None, quiet: bool):
    """(hooks, progress): rank 0's sinks and instruments (the other ranks write nothing), each with the
    memory a resumed checkpoint saved for it."""
    progress = ConsoleProgress(cfg.num_steps, state.step, enabled=not quiet and world.is_main)
    hooks = [ScalarsLogger(run_dir), progress] if world.is_main else []
    if not cfg.no_eval and world.is_main:
        hooks.append(EvalHook(run_dir, step_model, data.eval, s.autocast, s.device, cfg.eval_interval, cfg.num_steps))
    elif not cfg.no_eval:  # FSDP2's eval forward needs every rank
        hooks.append(parallel.MirrorEval(step_model, data.eval, s.autocast, s.device, cfg.eval_interval,
                                         cfg.num_steps))
    # Quant stats, samples and anomaly checks use the plain model: no recompiles for their shapes.
    # They write the run directory, so only rank 0 has them; under FSDP2 rank 0 holds only a shard
    # of the model, so the two that run it stay off (docs/distributed.md).
    whole_model = not parallel.is_sharded(model)
    if world.is_main:
        anomalies = AnomalyHook(run_dir, model, cfg.anomaly_policy, cfg.anomaly_window, cfg.anomaly_zscore,
                                log=progress.write, warmup_steps=cfg.warmup_steps)
        hooks.append(anomalies)
        if cfg.quant_interval and whole_model:  # activation stats on the first 4 eval sequences
            hooks.append(QuantStatsHook(run_dir, model, data.eval[0][0][:4], cfg.quant_interval, cfg.num_steps,
                                        s.autocast, anomalies))
        if cfg.sample_interval and whole_model:
            hooks.append(SampleHook(run_dir, model, tok, prompts, cfg.sample_interval, cfg.num_steps,
                                    cfg.sample_max_tokens, cfg.seed, s.autocast))
        if cfg.tensorboard:
            hooks.append(TensorBoardHook(run_dir))
    if resume is not None:  # each hook's memory (the spike windows) continues where it was saved
        saved = saved_hook_states(resume)
        for hook in hooks:
            if saved.get(hook.name):
                hook.load_state_dict(saved[hook.name])
    return hooks, progress


def banner(cfg: TrainConfig, s: Settings, world: parallel.World, run_dir: Path, model, state: TrainState) -> str:
    ranks = f" x {world.world_size} ranks ({cfg.parallel})" if world.distributed else ""
    return (f"run {run_dir} | {model.num_params():,} parameters | {s.device} | compile={s.use_compile} | "
            f"cuda graphs={s.use_graphs} | "
            f"batch {cfg.batch_size} x {cfg.seq_len} = {s.tokens_per_step:,} tokens/step "
            f"(micro {s.micro} x accum {s.accum}{ranks}) | steps {state.step + 1}..{cfg.num_steps}"
            + (f" | activation checkpointing {blocks} of {len(model.layers)} blocks"
               if (blocks := s.derived["checkpointed_blocks"]) else "")
            + (" | residual stream in bf16" if cfg.residual_stream == "bf16" and s.device.type == "cuda" else ""))
