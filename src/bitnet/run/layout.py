"""The run directory's layout as names, in one place (docs/design.md, "run directory").

    runs/<run_id>/
      meta/config.json  meta/provenance.json  meta/dataset_fingerprint.json  meta/lock
      checkpoints/step_000500/{checkpoint.pt, meta.json}      (written as step_000500.tmp/, then renamed)
      metrics/scalars.jsonl  metrics/quant.jsonl  metrics/startup.jsonl
      eval/eval_results.jsonl
      samples/samples.jsonl
      anomalies/step_000123_<event>/info.json ...
      tensorboard/                                              (--tensorboard)

Standard library only: the status tool reads through these names too.
"""

import re
from pathlib import Path

META, CHECKPOINTS, METRICS, EVAL, SAMPLES, ANOMALIES = "meta", "checkpoints", "metrics", "eval", "samples", "anomalies"
SUBDIRS = (META, CHECKPOINTS, METRICS, EVAL, SAMPLES, ANOMALIES)
"""Made when a run directory is created."""

CONFIG = f"{META}/config.json"
PROVENANCE = f"{META}/provenance.json"
FINGERPRINT = f"{META}/dataset_fingerprint.json"
LOCK = f"{META}/lock"
SCALARS = f"{METRICS}/scalars.jsonl"
QUANT = f"{METRICS}/quant.jsonl"
STARTUP = f"{METRICS}/startup.jsonl"
EVAL_RESULTS = f"{EVAL}/eval_results.jsonl"
SAMPLES_FILE = f"{SAMPLES}/samples.jsonl"
TENSORBOARD = "tensorboard"

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_META = "meta.json"
TMP_SUFFIX = ".tmp"  # a checkpoint being written (renamed to its step name when complete)
DELETING_SUFFIX = ".deleting"  # a pruned checkpoint being removed
STEP_DIR = re.compile(r"^step_(\d{6,})$")
"""A checkpoint's step directory (step_000500); the one pattern for it."""
ANOMALY_DIR = re.compile(r"^step_(\d+)_(.+)$")
ANOMALY_INFO = "info.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoint_dir(run_dir, step: int) -> Path:
    """<run>/checkpoints/step_XXXXXX (whether it exists or not)."""
    return Path(run_dir) / CHECKPOINTS / step_dir_name(step)
