"""`TrainState`: everything besides model and optimizer that must survive a restart."""

import random
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps completed."""
    tokens: int = 0
    """Training tokens consumed (all ranks)."""
    best_eval_loss: float = float("inf")
    """Lowest eval loss so far."""
    data: dict = field(default_factory=dict)
    """The loader's position (WindowLoader.state_dict())."""

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "best_eval_loss": self.best_eval_loss, "data": self.data}

    def load_state_dict(self, d: dict) -> None:
        self.step, self.tokens = int(d["step"]), int(d["tokens"])
        self.best_eval_loss = float(d.get("best_eval_loss", float("inf")))
        self.data = dict(d.get("data", {}))  # an old checkpoint's "anomaly" entry is saved_hook_states' to read


def saved_hook_states(ckpt: dict) -> dict:
    """Each hook's saved state by name (the checkpoint's "hooks" table). Checkpoints from before that table
    kept the anomaly detector's memory in train_state["anomaly"]: read from there (docs/design.md,
    "checkpoint format")."""
    hooks = dict(ckpt.get("hooks") or {})
    legacy = ckpt.get("train_state", {}).get("anomaly")
    if legacy and "anomaly" not in hooks:
        hooks["anomaly"] = legacy
    return hooks


def rng_state() -> dict:
    """Every RNG stream, as plain tensors / lists so `weights_only=True` loading accepts it."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, keys, pos, has_gauss, cached = state["numpy"]
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    np.random.set_state((version, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available() and "torch_cuda" in state:
        cuda_states = state["torch_cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
