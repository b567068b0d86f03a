"""`Hook`: the named points at which the loop calls instrumentation. Every method does nothing by default.

Hooks observe and never change results. To stop a run, a hook sets `stop_requested`, which the
loop checks in plain sight. A hook with memory that must survive a restart names itself (`name`) and
returns it from `state_dict`: every checkpoint stores it under "hooks" -> name, and a resume hands it
back to `load_state_dict` (docs/design.md, "checkpoint format").
"""


class Hook:
    stop_requested: bool = False
    stop_reason: str = ""
    name: str = ""
    """The key of this hook's state in a checkpoint's "hooks" table."""

    def state_dict(self, state) -> dict:
        """This hook's memory for a checkpoint at `state` (plain values: weights_only loading); {}: none."""
        return {}

    def load_state_dict(self, d: dict) -> None:
        """Restore what `state_dict` returned (only called with a non-empty one)."""

    def on_train_start(self, state) -> None:
        """Called once, after setup and resume, before the first step."""

    def on_step_end(self, state, out) -> None:
        """Called after every optimizer step with the step's detached outputs (no host sync here)."""

    def works_at(self, step: int) -> bool:
        """Whether on_step_end does real work after this step (a forward, a host sync, files).

        The loop first waits for the GPU to finish the queued steps, so that the hook's time, kept out of
        step_ms, holds none of theirs (a replayed CUDA graph lets the host run many steps ahead).
        """
        return False

    def on_log(self, state, row: dict) -> None:
        """Called at log steps with the scalars row (host values, already synced)."""

    def on_checkpoint(self, state, path) -> None:
        """Called after a checkpoint was written."""

    def on_train_end(self, state) -> None:
        """Called once after the last step."""

    def close(self) -> None:
        """Always called (in a finally), also after an error."""


def due(step: int, interval: int, num_steps: int) -> bool:
    """Every `interval` steps and at the last step: when the periodic hooks work."""
    return step % interval == 0 or step == num_steps
