"""Kept for bitnet.cli until it imports bitnet.run.checkpoint and bitnet.model.checkpoint_fit itself:
the checkpoint format, with the loaders that check the weights fit (docs/design.md, "checkpoint format")."""

from bitnet.model.checkpoint_fit import check_contents, load, load_newest, load_with_path  # noqa: F401
from bitnet.run.checkpoint import (CheckpointError, latest, list_checkpoints, prune, resolve,  # noqa: F401
                                   run_dir_of, save, verify)
from bitnet.run.layout import step_dir_name  # noqa: F401
