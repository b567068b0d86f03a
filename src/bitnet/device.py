"""The one `--device` picker, of bitnet-train (train/loop.py) and bitnet-generate (docs/design.md,
section "command-line tools"). A module of its own below both, so the loop does not import the CLI."""

import torch


def pick_device(name: str) -> torch.device:
    """auto (cuda if available, else cpu), cpu, cuda or cuda:N; ValueError names the bad --device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # e.g. "cuda:x"
        raise ValueError(f"unsupported --device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for, but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported --device {name!r} (use auto, cpu, cuda or cuda:N)")
    return device
