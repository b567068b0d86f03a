"""TensorBoard (--tensorboard): mirrors the run directory's JSONL files into <run>/tensorboard.

    tensorboard --logdir runs/

The training scalars come from the metrics row the loop hands every sink (on_log); the other hooks'
files (eval/eval_results.jsonl, metrics/quant.jsonl, samples/samples.jsonl) and the anomaly dumps are
tailed at each log step, so the hook needs no link to the other hooks and shows what the files hold.
`tensorboard` is imported only when asked for.
"""

import json
import math
from pathlib import Path

from bitnet.instrumentation.base import Hook
from bitnet.run import layout
from bitnet.run.jsonl import parse_lines


def require_tensorboard():
    """SummaryWriter, or a ValueError saying how to install it (checked before the run directory exists)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class TensorBoardHook(Hook):
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.writer = require_tensorboard()(log_dir=str(self.run_dir / layout.TENSORBOARD))
        self.offsets = {}
        self.anomalies_seen = set()

    def _new_rows(self, rel: str) -> list[dict]:
        """Complete lines appended to run_dir/rel since the last call (a torn last line waits)."""
        path = self.run_dir / rel
        if not path.is_file():
            return []
        with open(path, "rb") as f:
            f.seek(self.offsets.get(rel, 0))
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offsets[rel] = self.offsets.get(rel, 0) + end
        return parse_lines(data[:end].splitlines())

    def add_row(self, row: dict) -> None:
        """The metrics row's numbers as train/<name>; non-finite ones are left out (scalars.jsonl holds
        them as strings)."""
        for k, v in row.items():
            if _number(v) and math.isfinite(v) and k not in ("step", "time"):
                self.writer.add_scalar(f"train/{k}", v, row["step"])

    def sync(self) -> None:
        w = self.writer
        for row in self._new_rows(layout.EVAL_RESULTS):
            for k, v in row.items():
                if _number(v) and k not in ("step", "time", "tokens"):
                    w.add_scalar(f"eval/{k}", v, row["step"])
        for row in self._new_rows(layout.QUANT):
            for group, stats in row.get("groups", {}).items():
                for k, v in stats.items():
                    if _number(v) and k != "numel":
                        w.add_scalar(f"quant/{group}/{k}", v, row["step"])
            for layer, stats in row.get("layers", {}).items():
                for k in ("zero", "gamma", "act_absmax_mean"):
                    if _number(stats.get(k)):
                        w.add_scalar(f"quant_layers/{k}/{layer}", stats[k], row["step"])
        for row in self._new_rows(layout.SAMPLES_FILE):
            w.add_text(f"samples/{row.get('mode')}/prompt_{row.get('prompt_index')}",
                       f"**{row.get('prompt')}** {row.get('text')}", row["step"])
        anomalies = self.run_dir / layout.ANOMALIES
        for d in sorted(anomalies.iterdir()) if anomalies.is_dir() else []:
            if d.name in self.anomalies_seen or d.name.startswith(".") or not (d / layout.ANOMALY_INFO).is_file():
                continue
            self.anomalies_seen.add(d.name)
            info = json.loads((d / layout.ANOMALY_INFO).read_text())
            w.add_text("anomalies", f"{info.get('event')}: {info.get('message')}", info.get("step", 0))
        w.flush()

    def on_log(self, state, row):
        self.add_row(row)
        self.sync()

    def on_train_end(self, state):
        self.sync()

    def close(self):
        try:
            self.sync()
        finally:
            self.writer.close()
