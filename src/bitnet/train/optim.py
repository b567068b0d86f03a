"""AdamW with weight decay on matrices only (not norms, not the embedding / tied head)."""

import torch
import torch.nn as nn

from bitnet.model.checkpoint_fit import decay_groups
from bitnet.train.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    decay, no_decay = decay_groups(model)
    groups = [
        {"params": decay, "weight_decay": cfg.wd_stage1, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr_peak, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                             fused=fused or None)


def set_schedule(opt: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """Apply this step's LR to every group and its weight decay to the decayed group."""
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):  # a captured step (train/graphed.py) reads it on the GPU
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
        if group["name"] == "decay":
            group["weight_decay"] = wd


def portable_state_dict(opt: torch.optim.Optimizer) -> dict:
    """opt.state_dict() as any run loads it: the LR a number and `capturable` off.

    A CUDA-graphed step (train/graphed.py) keeps the LR in a GPU tensor and AdamW capturable; a checkpoint
    holding those would make a CPU resume fail. The graphed step turns both back on when it captures.
    """
    sd = opt.state_dict()
    sd["param_groups"] = [{**g, "lr": float(g["lr"]), "capturable": False} for g in sd["param_groups"]]
    return sd
