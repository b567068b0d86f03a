"""metrics/startup.jsonl's row as one line: the trainer prints it at its first step, bitnet-status shows it.

A row: {"step", "started_at", "time_to_first_step_s", "phases_s": {phase: seconds}} (instrumentation/startup.py
writes it). Read rows may be damaged: a value that is not a number shows as n/a or is left out.
"""

import math


def _seconds(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def startup_line(row: dict) -> str:
    """The time to the process's first step and its phases, largest first."""
    phases = row.get("phases_s") if isinstance(row.get("phases_s"), dict) else {}
    timed = sorted(((k, s) for k, v in phases.items() if (s := _seconds(v)) is not None), key=lambda kv: -kv[1])
    step, total = _seconds(row.get("step")), _seconds(row.get("time_to_first_step_s"))
    return (f"step {'n/a' if step is None else f'{int(step):,}'} done {'n/a' if total is None else f'{total:.1f}'} "
            f"s after start: " + ", ".join(f"{name.replace('_', ' ')} {s:.1f} s" for name, s in timed))
