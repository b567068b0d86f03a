"""Anomaly detection and debug dumps: non-finite loss or gradients, loss and grad-norm spikes,
ternary collapse. Each event writes anomalies/step_XXXXXX_<event>/ and then acts on the policy.

No host sync per step: each step's loss, grad norm and per-parameter grad norms stay on the device
(with a reference to the step's CPU batch) until the next log step, where the loop has just synced
anyway (and at checkpoints); there they are read in one transfer and checked step by step. So a
dump names the exact step and holds its batch, but a warning or a stop comes up to one log interval
late. The spike windows and events are saved in checkpoints (`state_dict`, under "hooks" -> "anomaly"), so a resumed run judges
its first steps against the steps before the restart. The 'skip'
policy cannot wait: train_step checks finiteness before optimizer.step itself (one sync a step).

Policies: warn (dump, print, go on), skip (as warn, and a non-finite step's update is not applied),
stop (as warn, then `stop_requested`: the loop saves a checkpoint and exits).
"""

import json
import math
import os
import sys
import time
from collections import deque
from pathlib import Path

import torch

from bitnet.instrumentation.base import Hook
from bitnet.run import layout
from bitnet.run.jsonl import _clean

MIN_HISTORY = 20
"""Finite post-warmup values needed in the window before spikes are judged."""
LOSS_MIN_JUMP = 1.0
"""A loss spike is at least this many nats above the recent median, however quiet the window."""
GRAD_MIN_RATIO = 100.0
"""A grad-norm spike is at least this many times the recent median grad norm, however quiet the window.
High on purpose: with gradient clipping a large norm alone does not harm the update, and healthy tiny
runs reached 70x (docs/anomalies.md); broken batches and LR spikes show up in the loss."""
WEIGHT_JUMP = 3.0
"""A parameter whose RMS moved by more than this many times the summed LR since the last check moved
further than AdamW can move it (|update| <= ~lr per element): something else wrote it."""
MAD_TO_STD = 1.4826
"""Median absolute deviation -> standard deviation of a normal distribution."""
CENTER_STEPS = 5
"""A step is compared with the median of this many steps before it."""
COLLAPSE_ZERO_FRAC = 0.9
"""A BitLinear layer with more zeros than this among its ternary weights has collapsed."""
MAX_DUMPS = 20
"""Dump directories per run at most (a diverged run would otherwise dump at every check)."""
MAX_PENDING = 1000
"""Steps buffered before a check is forced even without a log step (bounds the batches kept)."""
RECENT_ROWS = 20
"""Log rows kept for a dump's recent_scalars.json."""


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_clean(obj), f, indent=1, allow_nan=False)
        f.write("\n")


def _median(xs: list[float]) -> float:
    ordered, n = sorted(xs), len(xs)
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


def spike_test(value: float, history, threshold: float, min_jump: float) -> tuple[float, float, float] | None:
    """(robust z, center, scale) of value against the history (oldest first), or None while it is too short.

    center: the median of the last CENTER_STEPS values, so a loss that is still falling fast is
    compared with where it is now, not with the window's older, higher values. scale: the step-to-step
    noise, 1.4826 x the MAD of successive differences / sqrt(2), which a trend does not inflate and
    one large value cannot (early gradient norms are heavy-tailed). The scale is floored at
    min_jump / threshold, so z > threshold also means value - center > min_jump: a nearly constant
    window cannot turn noise into a spike.
    """
    n = len(history)
    if n < MIN_HISTORY:
        return None
    values = list(history)
    center = _median(values[-CENTER_STEPS:])
    diffs = [b - a for a, b in zip(values, values[1:])]
    mid = _median(diffs)
    noise = MAD_TO_STD * _median([abs(d - mid) for d in diffs]) / math.sqrt(2)
    scale = max(noise, min_jump / threshold, 1e-12)
    return (value - center) / scale, center, scale


class AnomalyHook(Hook):
    name = "anomaly"

    def __init__(self, run_dir: Path, model, policy: str = "warn", window: int = 100, zscore_threshold: float = 6.0,
                 log=None, warmup_steps: int = 0):
        if policy not in ("warn", "skip", "stop"):
            raise ValueError(f"anomaly policy must be warn, skip or stop, got {policy!r}")
        self.dir = Path(run_dir) / layout.ANOMALIES
        self.policy, self.threshold = policy, zscore_threshold
        self.warmup_steps = warmup_steps  # spikes are judged after warmup only, against post-warmup steps
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.param_names = [name for name, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.weight_rms = None  # per-parameter RMS at the last check (not checkpointed: re-measured after a resume)
        self.pending = []  # per-step records since the last check (device tensors + CPU batch)
        self.last_record = None
        self.losses, self.grad_norms = deque(maxlen=window), deque(maxlen=window)  # finite values only
        self.per_step = deque(maxlen=window)  # (step, loss, grad_norm, lr), all steps
        self.rows = deque(maxlen=RECENT_ROWS)
        self.check_due = False
        self.in_nonfinite_run = False
        self.collapsed = set()
        self.events = []  # (step, event) of every event seen
        self.dumps = 0

    # ---- checkpointed memory: a resumed run judges spikes against the steps before the restart

    def state_dict(self, state) -> dict:
        """The detector's memory for a checkpoint (plain lists, loadable with weights_only=True).

        Steps not yet checked (a checkpoint between log steps) are checked first, so the windows
        hold every step up to the checkpoint, as in a run that never stopped.
        """
        if self.pending:
            self.check(state)
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms),
                "per_step": [list(r) for r in self.per_step], "rows": [_clean(r) for r in self.rows],
                "in_nonfinite_run": self.in_nonfinite_run, "collapsed": sorted(self.collapsed),
                "events": [list(e) for e in self.events], "dumps": self.dumps}

    def load_state_dict(self, d: dict) -> None:
        """Restore `state_dict()`'s memory; windows keep their current length (--anomaly-window may change)."""
        self.losses = deque(d["losses"], maxlen=self.losses.maxlen)
        self.grad_norms = deque(d["grad_norms"], maxlen=self.grad_norms.maxlen)
        self.per_step = deque((tuple(r) for r in d["per_step"]), maxlen=self.per_step.maxlen)
        self.rows = deque(d["rows"], maxlen=self.rows.maxlen)
        self.in_nonfinite_run = bool(d["in_nonfinite_run"])
        self.collapsed = set(d["collapsed"])
        self.events = [tuple(e) for e in d["events"]]
        self.dumps = int(d["dumps"])

    # ---- per step: buffer on device, check at log steps

    def on_log(self, state, row):
        self.rows.append(row)
        self.check_due = True

    def on_step_end(self, state, out):
        self.last_record = {"step": state.step, "loss": out.loss, "grad_norm": out.grad_norm, "lr": out.lr,
                            "wd": out.wd, "param_grad_norms": out.param_grad_norms, "skipped": out.skipped,
                            "micro_batches": out.micro_batches}
        self.pending.append(self.last_record)
        if self.check_due or len(self.pending) >= MAX_PENDING:
            self.check(state)

    def on_train_end(self, state):
        if self.pending:
            self.check(state)

    def check(self, state) -> None:
        self.check_due = False
        pending, self.pending = self.pending, []
        if not pending:
            return
        values = torch.stack([torch.stack([r["loss"] for r in pending]).float(),
                              torch.stack([r["grad_norm"] for r in pending]).float()], dim=1)  # (steps, 2)
        for rec, (loss, grad_norm) in zip(pending, values.tolist()):  # host sync: at log steps only
            rec["loss"], rec["grad_norm"] = loss, grad_norm
            self.per_step.append((rec["step"], loss, grad_norm, rec["lr"]))  # a dump shows the steps after, too
        for rec in pending:
            loss, grad_norm = rec["loss"], rec["grad_norm"]
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                if not self.in_nonfinite_run:  # dump the first step of a run of non-finite steps
                    event = "nonfinite_loss" if not math.isfinite(loss) else "nonfinite_grad"
                    what = "update skipped" if rec["skipped"] else "update applied"
                    self.report(state, rec, event, f"non-finite {'loss' if event == 'nonfinite_loss' else 'gradient'}"
                                f" (loss {loss}, grad norm {grad_norm}; {what})")
                self.in_nonfinite_run = True
                continue
            self.in_nonfinite_run = False
            if rec["step"] <= self.warmup_steps:  # warmup: LR and grad norms still ramping; not judged, not kept
                continue
            # the loss in nats; the grad norm in log space, where its heavy right tail is closer to symmetric
            for name, value, history in (("loss", loss, self.losses), ("grad_norm", grad_norm, self.grad_norms)):
                if name == "loss":
                    z = spike_test(value, history, self.threshold, LOSS_MIN_JUMP)
                    center = z and z[1]
                else:
                    z = spike_test(math.log(max(value, 1e-30)), [math.log(max(g, 1e-30)) for g in history],
                                   self.threshold, math.log(GRAD_MIN_RATIO))
                    center = z and math.exp(z[1])
                if z is not None and z[0] > self.threshold:
                    event = "loss_spike" if name == "loss" else "grad_spike"
                    unit = "x its step-to-step noise" if name == "loss" else "x the noise of log(grad norm)"
                    self.report(state, rec, event, f"{name} {value:.4g} is {z[0]:.1f} {unit} above the median "
                                f"{center:.4g} of the last {CENTER_STEPS} steps (noise from the last {len(history)})",
                                {"zscore": z[0], "window_median": center, "window_scale": z[2],
                                 "threshold": self.threshold})
                history.append(value)
        self.check_weights(state, pending[-1], sum(float(r["lr"]) for r in pending))

    @torch.no_grad()
    def _weight_rms(self) -> list[float]:
        """RMS of every parameter (one foreach norm, one transfer); under FSDP2 of this rank's shard."""
        local = [(p.to_local() if hasattr(p, "to_local") else p).detach() for p in self.params]
        if not local:
            return []
        norms = torch.stack([n.float() for n in torch._foreach_norm(local)])
        return (norms / torch.tensor([max(t.numel(), 1) ** 0.5 for t in local], device=norms.device)).tolist()

    def on_train_start(self, state):
        self.weight_rms = self._weight_rms()

    def check_weights(self, state, rec: dict, lr_sum: float) -> None:
        """weight_jump: parameters whose RMS changed by more than WEIGHT_JUMP x the LR summed over the
        steps since the last check (at a log step, where the loop has synced anyway)."""
        rms = self._weight_rms()
        previous, self.weight_rms = self.weight_rms, rms
        if previous is None or len(previous) != len(rms):
            return
        limit = WEIGHT_JUMP * lr_sum
        # non-finite weights follow a non-finite update, which is reported as such
        jumped = [(name, a, b) for name, a, b in zip(self.param_names, previous, rms)
                  if math.isfinite(a) and math.isfinite(b) and abs(b - a) > limit]
        if jumped:
            detail = ", ".join(f"{n} {a:.3g} -> {b:.3g}" for n, a, b in jumped[:5])
            self.report(state, rec, "weight_jump", f"weight RMS moved more than {WEIGHT_JUMP:g} x the summed LR "
                        f"({limit:.3g}) since the last check: {detail}",
                        {"layers": {n: {"rms_before": a, "rms_after": b} for n, a, b in jumped}, "limit": limit})

    def check_ternary(self, state, layers: dict[str, dict]) -> None:
        """Called with each quant row's per-layer stats: a layer newly past 90% zeros is an event."""
        new = sorted(n for n, row in layers.items() if row["zero"] > COLLAPSE_ZERO_FRAC and n not in self.collapsed)
        if not new:
            return
        self.collapsed.update(new)
        rec = self.last_record if self.last_record and self.last_record["step"] == state.step else {"step": state.step}
        detail = ", ".join(f"{n} {layers[n]['zero']:.1%}" for n in new)
        self.report(state, rec, "ternary_collapse", f"ternary collapse (> {COLLAPSE_ZERO_FRAC:.0%} zeros): {detail}",
                    {"layers": {n: layers[n] for n in new}})

    # ---- one event: dump, warn, act on the policy

    def report(self, state, rec: dict, event: str, message: str, extra: dict | None = None) -> None:
        step = rec["step"]
        self.events.append((step, event))
        action = {"warn": "continuing", "skip": "continuing", "stop": "stopping the run"}[self.policy]
        where = "(dump limit reached, not dumped)"
        if self.dumps < MAX_DUMPS:
            where = str(self.dump(state, rec, event, message, action, extra or {}))
            self.dumps += 1
        self.log(f"anomaly at step {step}: {event}: {message}; {action} -> {where}")
        if self.policy == "stop" and not self.stop_requested:
            self.stop_requested = True
            self.stop_reason = f"anomaly policy stop: {event} at step {step}"

    def dump(self, state, rec: dict, event: str, message: str, action: str, extra: dict) -> Path:
        """Write the dump into a hidden temp dir and rename it, so readers never see half a dump."""
        name = f"step_{rec['step']:06d}_{event}"
        final = self.dir / name
        n = 1
        while final.exists():
            n += 1
            final = self.dir / f"{name}{n}"
        tmp = self.dir / f".{final.name}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        files = []
        if rec.get("micro_batches") is not None:
            batches = [(x.clone(), y.clone()) for x, y in rec["micro_batches"]]
            torch.save({"micro_batches": batches, "step": rec["step"]}, tmp / "batch.pt")
            files.append("batch.pt")
        if rec.get("param_grad_norms") is not None:
            norms = rec["param_grad_norms"].float().tolist()
            names = (self.param_names if len(self.param_names) == len(norms)
                     else [f"param_{i}" for i in range(len(norms))])
            _write_json(tmp / "grad_norms.json", dict(zip(names, norms)))
            files.append("grad_norms.json")
        _write_json(tmp / "recent_scalars.json", {
            "per_step": [{"step": s, "loss": lo, "grad_norm": g, "lr": lr} for s, lo, g, lr in self.per_step],
            "log_rows": list(self.rows)})
        files.append("recent_scalars.json")
        loss, grad_norm = rec.get("loss"), rec.get("grad_norm")
        _write_json(tmp / "info.json", {
            "step": rec["step"], "event": event, "message": message, "policy": self.policy, "action": action,
            "update_skipped": bool(rec.get("skipped", False)),
            "loss": loss if isinstance(loss, float) else None,
            "grad_norm": grad_norm if isinstance(grad_norm, float) else None,
            "lr": rec.get("lr"), "wd": rec.get("wd"), "detected_at_step": state.step, "tokens": state.tokens,
            "files": files + ["info.json"], "time": time.time(), **extra})
        os.rename(tmp, final)
        return final
