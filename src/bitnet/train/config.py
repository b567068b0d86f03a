"""`TrainConfig`: every knob of a training run, with units, defaults and per-preset defaults.

Values are layered: dataclass defaults (the 95m preset's) < the preset's train defaults < the resumed
checkpoint's config < --config FILE < CLI flags.
`resolve_derived` computes and checks the values that follow from the others (accumulation,
stage boundary) in one place.
"""

import math
from dataclasses import asdict, dataclass, field, fields

from bitnet.model.config import PRESETS


FP8_PARTS = ("head", "grad_input", "grad_weight")
"""What --fp8 all turns on: every switch that leaves the model's forward alone."""
FP8_SWITCHES = (*FP8_PARTS, "forward")
"""Every name --fp8 takes in a list; 'forward' trains the activations as e4m3 and must be named."""


def fp8_parts(value: str) -> tuple[str, ...]:
    """The FP8 switches named by --fp8: 'none', 'all' (FP8_PARTS), or a comma list of FP8_SWITCHES."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if names in (["none"], []):
        return ()
    if names == ["all"]:
        return FP8_PARTS
    unknown = [n for n in names if n not in FP8_SWITCHES]
    if unknown:
        raise ValueError(f"--fp8 takes none, all or a comma list of {', '.join(FP8_SWITCHES)}; got {value!r}")
    return tuple(n for n in FP8_SWITCHES if n in names)


def checkpointed_blocks(value: str, n_layers: int) -> int:
    """How many blocks --activation-checkpointing names: none (0), all (n_layers) or a count N <= n_layers."""
    value = str(value).strip()
    if value == "none":
        return 0
    if value == "all":
        return n_layers
    if not value.isdigit():
        raise ValueError(f"--activation-checkpointing takes none, all or a number of blocks; got {value!r}")
    if int(value) > n_layers:
        raise ValueError(f"--activation-checkpointing {value} exceeds the model's {n_layers} blocks (all: every one)")
    return int(value)


def _f(default, help: str, choices: tuple = ()):
    """A field with its --help line (and, for a closed set of values, the allowed ones)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # ---- run
    preset: str = _f("95m", "model preset: 95m (the seed's 95.4M model), tiny (CPU seconds), or the BitNet b1.58 "
                            "paper's 700m, 1.3b, 3b (README, section 'Model'); it also sets the train defaults "
                            "marked 'tiny:', '1.3b:' or '3b:' below", choices=tuple(PRESETS))
    run_id: str = _f("", "run directory name under --runs-dir (default: <preset>_<data>_<timestamp>)")
    runs_dir: str = _f("runs", "parent directory of run directories")
    overwrite: bool = _f(False, "replace an existing run directory of the same id")
    resume_from: str = _f("", "resume from a checkpoint: its checkpoint.pt, its step directory, a run directory (its "
                              "newest intact checkpoint), or 'auto' (the newest of --run-id and its continuations); "
                              "starts a new run directory, the config comes from the checkpoint")
    seed: int = _f(42, "seed of model init, data order and every RNG")
    device: str = _f("auto", "auto (cuda if available), cuda, cuda:N, cpu")
    compile: str = _f("auto", "torch.compile the model: auto (on for CUDA), on, off", choices=("auto", "on", "off"))
    cuda_graphs: str = _f("auto", "capture the whole step as one CUDA graph and replay it: auto (on for one CUDA "
                                  "process unless --anomaly-policy skip), on, off", choices=("auto", "on", "off"))
    fp8: str = _f("none", "FP8 tensor cores (CUDA, compute capability 8.9+) for: head (the tied head + loss), "
                          "grad_input / grad_weight (BitLinear's backward GEMMs), forward (BitLinear's forward "
                          "GEMM, activations trained as e4m3 instead of int8: eval, samples and exports keep "
                          "int8); a comma list, all (the first three), or none. Elsewhere the exact bf16 math runs")
    activation_checkpointing: str = _f("none", "recompute activations in the backward instead of keeping them: "
                                               "none, all, or N (the first N blocks); each block saves about its "
                                               "activation memory and costs one more forward of it (README, "
                                               "'Memory')")
    residual_stream: str = _f("bf16", "dtype of the residual stream between blocks under autocast (CUDA): bf16 "
                                      "(the matmul dtype: half the stream's memory and traffic, each block's sum "
                                      "rounded: 1.03x the speed, loss within seed noise) or fp32 (the seed's); CPU runs "
                                      "stay fp32 (README, 'Memory')", choices=("bf16", "fp32"))
    head_chunk_rows: int = _f(4096, "training runs the tied head and its loss this many tokens at a time (CUDA), so "
                                    "the step never holds the whole batch's logits (2 GiB at 32 x 1024); 0: all "
                                    "at once (1.008x the speed, 1.75 GiB more); --fp8 head keeps its own chunks "
                                    "of 8192")
    # ---- distributed (under torchrun; docs/distributed.md)
    parallel: str = _f("ddp", "data parallelism under torchrun: ddp (replicated weights) or fsdp2 (fully_shard: "
                              "sharded weights, gradients and optimizer state)", choices=("ddp", "fsdp2"))
    dist_timeout_s: float = _f(600.0, "seconds the process-group start or a collective waits for the other ranks "
                                      "before failing")
    # ---- data
    data: str = _f("fineweb-edu", "data source: embedded (packaged corpus), fineweb-edu, ...")
    tokenizer: str = _f("llama2", "tokenizer: llama2 (vendored), a tokenizer.json path or a hub name")
    batch_size: int = _f(32, "global batch in sequences per optimizer step (all ranks, all micro-batches)")
    micro_batch_size: int = _f(0, "sequences per forward/backward on one rank (0: the whole per-rank batch)")
    seq_len: int = _f(1024, "tokens per training sequence (<= the model's context)")
    # ---- schedule (docs/design.md, section "training loop")
    num_steps: int = _f(400_000, "optimizer steps")
    warmup_steps: int = _f(375, "linear warmup steps from lr_peak/warmup_steps to lr_peak")
    lr_peak: float = _f(1.5e-3, "LR at the end of warmup (stage 1 start)")
    lr_stage1_end: float = _f(1.0e-3, "LR at the end of stage 1 (linear decay from lr_peak)")
    lr_stage2_start: float = _f(1.0e-3, "LR at the start of stage 2")
    lr_end: float = _f(1.5e-5, "LR at the last step (linear decay from lr_stage2_start)")
    stage_boundary: float = _f(0.5, "fraction of num_steps after which stage 2 starts")
    wd_stage1: float = _f(0.1, "AdamW weight decay in stage 1 (matrices only)")
    wd_stage2: float = _f(0.0, "AdamW weight decay in stage 2")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "clip the global grad norm to this (0: no clipping)")
    # ---- logging, eval, checkpoints
    log_interval: int = _f(100, "write a scalars.jsonl row every N steps")
    eval_interval: int = _f(5000, "evaluate on the frozen eval set every N steps")
    eval_sequences: int = _f(256, "sequences in the frozen eval set")
    no_eval: bool = _f(False, "skip evaluation")
    sample_interval: int = _f(5000, "generate samples every N steps (0: never)")
    sample_prompts: str = _f("", "file of sample prompts, one a line, '#' starts a comment (default: the packaged "
                                 "bitnet/prompts.txt)")
    sample_max_tokens: int = _f(64, "tokens generated per sample at most")
    quant_interval: int = _f(1000, "write ternary weight / activation stats to metrics/quant.jsonl every N steps "
                                   "and at the last step (0: never)")
    anomaly_policy: str = _f("warn", "on NaN/Inf, loss or grad-norm spikes, ternary collapse: warn (dump, go on), "
                                     "skip (also drop non-finite updates; one host sync per step), stop (dump, "
                                     "checkpoint, exit)", choices=("warn", "skip", "stop"))
    anomaly_window: int = _f(100, "recent post-warmup steps whose loss and grad norm a step is compared against "
                                  "(spikes are judged after warmup, with >= 20 of them; docs/anomalies.md)")
    anomaly_zscore: float = _f(6.0, "robust z-score (against the median of the last 5 steps, in units of the "
                                    "window's step-to-step noise; log scale for grad norms) above which a step's "
                                    "loss or grad norm counts as a spike; a spike also needs loss +1 nat or grad "
                                    "norm x100 over that median")
    tensorboard: bool = _f(False, "also write TensorBoard event files to <run>/tensorboard (pip install tensorboard)")
    checkpoint_interval: int = _f(10_000, "save a checkpoint every N steps")
    keep_last: int = _f(3, "checkpoints kept besides milestones (boundary, final, keep_every)")
    keep_every: int = _f(50_000, "also keep every N-th step's checkpoint forever (0: none)")
    on_checkpoint_error: str = _f("stop", "when a checkpoint cannot be written (disk full, unwritable): stop (exit 1, "
                                          "the previous checkpoint intact) or continue (warn, retry at the next one)",
                                       choices=("stop", "continue"))

    def to_dict(self) -> dict:
        return asdict(self)


# Train defaults per preset: the 95m preset is the seed's recipe; tiny is the CPU quick start. The paper's
# sizes take the LRs of Table 2 of "The Era of 1-bit LLMs: Training Tips, Code and FAQ" (stage 1 peak -> stage
# 2 start: 700M 1.5e-3 -> 1e-3, the seed's values; 1.3B and 3B 1.2e-3 -> 8e-4; the end LR at 1% of the peak,
# the seed's ratio), and a micro-batch that fits an 80 GB GPU at 32 x 1024 with fp32 weights and AdamW state
# (README, section 'Model'): the 700m takes the whole batch at once. The 1.3b and 3b take it at once too, every
# block checkpointed: 4.6% and 1.6% faster than micro-batches of 16 and 4 without, and 25.5 and 13.6 GiB less
# (benchmarks/RESULTS.md, side by side on one H100).
PRESET_TRAIN_DEFAULTS = {
    "95m": {},
    "700m": {},
    "1.3b": dict(lr_peak=1.2e-3, lr_stage1_end=8e-4, lr_stage2_start=8e-4, lr_end=1.2e-5, micro_batch_size=32,
                 activation_checkpointing="all"),
    "3b": dict(lr_peak=1.2e-3, lr_stage1_end=8e-4, lr_stage2_start=8e-4, lr_end=1.2e-5, micro_batch_size=32,
               activation_checkpointing="all"),
    # sized so that scripts/quickstart.sh takes a few minutes on 2 CPU cores (README, measured)
    "tiny": dict(data="embedded", batch_size=8, seq_len=128, num_steps=150, warmup_steps=15,
                 log_interval=10, eval_interval=50, eval_sequences=32, sample_interval=150,
                 checkpoint_interval=50, keep_every=0, quant_interval=50),
}


SEED_MAX = 2**32 - 1


def stage_boundary_step(num_steps: int, stage_boundary: float) -> int:
    """The last step of stage 1."""
    return max(1, int(round(num_steps * stage_boundary)))


def fit_default_warmup(values: dict, given: set[str]) -> dict:
    """A warmup nobody asked for (the preset's) ends before the stage boundary of a short run: the
    default is the preset's warmup, at most the steps before the boundary. A --warmup-steps that was
    given is left alone (resolve_derived refuses it if it contradicts the boundary)."""
    if "warmup_steps" in given:
        return values
    cfg = TrainConfig(**values)
    if isinstance(cfg.num_steps, int) and isinstance(cfg.stage_boundary, float) and cfg.num_steps > 0:
        if 0.0 < cfg.stage_boundary < 1.0:
            boundary = stage_boundary_step(cfg.num_steps, cfg.stage_boundary)
            return {**values, "warmup_steps": min(cfg.warmup_steps, boundary - 1)}
    return values


def field_names() -> set[str]:
    return {f.name for f in fields(TrainConfig)}


def resolve_derived(cfg: TrainConfig, world_size: int, max_seq_len: int, n_layers: int | None = None) -> dict:
    """Check the config and derive grad accumulation, the stage boundary and (given the model's n_layers) the
    checkpointed blocks. Raises ValueError."""
    for f in fields(cfg):  # NaN and Inf pass every comparison below, so they are refused first
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
    positive = ["batch_size", "seq_len", "num_steps", "log_interval", "eval_interval", "checkpoint_interval",
                "eval_sequences", "sample_max_tokens", "anomaly_window", "anomaly_zscore", "adam_eps", "keep_last"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in ["warmup_steps", "micro_batch_size", "sample_interval", "quant_interval", "keep_every",
                 "grad_clip", "wd_stage1", "wd_stage2", "lr_end"]:
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    for name in ["lr_peak", "lr_stage1_end", "lr_stage2_start"]:
        if not getattr(cfg, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if not 0 <= cfg.seed <= SEED_MAX:  # torch.manual_seed and the data order's seeds overflow beyond it
        raise ValueError(f"--seed must be in [0, {SEED_MAX}], got {cfg.seed}")
    if not 0.0 < cfg.stage_boundary < 1.0:
        raise ValueError(f"--stage-boundary must be in (0, 1), got {cfg.stage_boundary}")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        raise ValueError("--beta1 and --beta2 must be in [0, 1)")
    if cfg.seq_len > max_seq_len:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's context of {max_seq_len}")
    if cfg.on_checkpoint_error not in ("stop", "continue"):
        raise ValueError(f"--on-checkpoint-error must be stop or continue, got {cfg.on_checkpoint_error!r}")
    if cfg.anomaly_policy not in ("warn", "skip", "stop"):
        raise ValueError(f"--anomaly-policy must be warn, skip or stop, got {cfg.anomaly_policy!r}")
    for name in ("compile", "cuda_graphs"):
        if getattr(cfg, name) not in ("auto", "on", "off"):
            raise ValueError(f"--{name.replace('_', '-')} must be auto, on or off, got {getattr(cfg, name)!r}")
    fp8_parts(cfg.fp8)  # refuses unknown parts
    if cfg.residual_stream not in ("fp32", "bf16"):
        raise ValueError(f"--residual-stream must be bf16 or fp32, got {cfg.residual_stream!r}")
    if cfg.head_chunk_rows < 0:
        raise ValueError(f"--head-chunk-rows must be >= 0 (0: the whole batch at once), got {cfg.head_chunk_rows}")
    if cfg.parallel not in ("ddp", "fsdp2"):
        raise ValueError(f"--parallel must be ddp or fsdp2, got {cfg.parallel!r}")
    if not cfg.dist_timeout_s > 0:
        raise ValueError(f"--dist-timeout-s must be positive, got {cfg.dist_timeout_s}")
    if cfg.batch_size % world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the world size {world_size}")
    per_rank = cfg.batch_size // world_size
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise ValueError(f"per-rank batch {per_rank} (--batch-size {cfg.batch_size} / {world_size} ranks) is not "
                         f"divisible by --micro-batch-size {micro}")
    boundary = stage_boundary_step(cfg.num_steps, cfg.stage_boundary)
    if cfg.warmup_steps >= boundary:
        raise ValueError(f"--warmup-steps {cfg.warmup_steps} does not end before the stage boundary at step {boundary} "
                         f"(--stage-boundary {cfg.stage_boundary} of --num-steps {cfg.num_steps}): the LR would still "
                         f"climb in stage 2; use --warmup-steps below {boundary}, or more --num-steps")
    derived = {"world_size": world_size, "micro_batch_size": micro, "grad_accum": per_rank // micro,
               "tokens_per_step": cfg.batch_size * cfg.seq_len, "stage_boundary_step": boundary}
    if n_layers is not None:
        derived["checkpointed_blocks"] = checkpointed_blocks(cfg.activation_checkpointing, n_layers)
    return derived
