"""`Checkpointer`: when the loop saves, what it keeps, and what a failed write does (docs/design.md,
"training loop" and "checkpoint format").

Saves every --checkpoint-interval steps, at the milestones (the last step of stage 1, the first of
stage 2, the last step) and when the run stops; milestones, --keep-every multiples and stop checkpoints
are never pruned, the other ones beyond the newest --keep-last are.
"""

import shlex
import warnings
from pathlib import Path

from bitnet.run import checkpoint, layout
from bitnet.train import parallel
from bitnet.train.config import TrainConfig
from bitnet.train.state import TrainState, rng_state


class TrainingFailed(Exception):
    """The run failed mid-way for a reason the user can act on (disk full, unwritable): one line, exit 1."""


def resume_command(cfg: TrainConfig, checkpoint_dir) -> str:
    """The command that continues from `checkpoint_dir` in the same run family and runs directory."""
    cmd = f"bitnet-train --resume-from {shlex.quote(str(checkpoint_dir))}"
    if cfg.runs_dir != TrainConfig.runs_dir:
        cmd += f" --runs-dir {shlex.quote(str(cfg.runs_dir))}"
    return cmd


class Checkpointer:
    """Every rank calls `save` (FSDP2 gathers its shards to rank 0); rank 0 alone writes and prunes."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, world: parallel.World, model, optimizer, data_train,
                 state: TrainState, full_config: dict, boundary: int, hooks: list, log):
        self.cfg, self.run_dir, self.world = cfg, run_dir, world
        self.model, self.optimizer, self.data_train, self.state = model, optimizer, data_train, state
        self.full_config = full_config
        self.hooks = hooks
        """Their state_dict()s go into every checkpoint, under "hooks" -> name (rank 0's hooks)."""
        self.log = log
        self.milestones = {boundary - 1, boundary, cfg.num_steps}

    def due(self, step: int, stopping) -> bool:
        return step % self.cfg.checkpoint_interval == 0 or step in self.milestones or bool(stopping)

    def save(self, milestone: bool, must_succeed: bool = False) -> Path | None:
        """Write this step's checkpoint; its directory, or None if the write failed and the policy goes on.

        A failed write (disk full, unwritable) leaves the previous checkpoint intact; it stops the run
        (TrainingFailed, exit 1) unless --on-checkpoint-error continue, which warns and returns None.
        The final and the stop checkpoints must succeed under either policy.
        """
        state = self.state
        state.data = self.data_train.state_dict()
        # rank 0's detector memory too: spikes after a resume are judged as without one
        hooks = {h.name: s for h in self.hooks if (s := h.state_dict(state))}
        model_sd, optim_sd = parallel.full_state_dicts(self.model, self.optimizer)
        if not self.world.is_main:
            return layout.checkpoint_dir(self.run_dir, state.step)
        try:
            return checkpoint.save(self.run_dir, state.step, {
                "model": model_sd, "optimizer": optim_sd,
                "train_state": state.state_dict(), "rng": rng_state(), "hooks": hooks,
                "config": self.full_config, "step": state.step, "tokens": state.tokens,
            }, milestone=milestone)
        except OSError as e:
            kept = checkpoint.latest(self.run_dir)
            problem = (f"checkpoint of step {state.step} could not be written ({e.strerror or e}); "
                       f"newest intact checkpoint: {kept or 'none'}")
            if self.cfg.on_checkpoint_error == "continue" and not must_succeed:
                self.log(f"warning: {problem}; training goes on (--on-checkpoint-error continue)")
                return None
            resume = f"; resume with: {resume_command(self.cfg, kept)}" if kept else ""
            raise TrainingFailed(problem + resume) from None

    def at_step_end(self, step: int, stopping, hooks) -> None:
        """The interval, milestone or stop checkpoint of this step, then pruning and the hooks' on_checkpoint."""
        cfg = self.cfg
        # a stop checkpoint is what the printed resume command names: never pruned
        path = self.save(milestone=step in self.milestones or bool(stopping)
                         or bool(cfg.keep_every and step % cfg.keep_every == 0),
                         must_succeed=step == cfg.num_steps or bool(stopping))
        if path is not None:  # None: the write failed and --on-checkpoint-error continue
            if self.world.is_main:
                checkpoint.prune(self.run_dir, cfg.keep_last)
            for hook in hooks:
                hook.on_checkpoint(self.state, path)

    def newest(self) -> str:
        """The newest intact checkpoint, for an error message."""
        if not self.world.is_main:
            return "on rank 0"
        with warnings.catch_warnings():  # a skipped corrupt one needs no warning here
            warnings.simplefilter("ignore")
            return str(checkpoint.latest(self.run_dir) or "none")
