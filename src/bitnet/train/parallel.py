"""Data parallelism under torchrun: process group, device, model wrapping, collectives, state dicts.

    torchrun --standalone --nproc_per_node=8 -m bitnet.train --preset 95m                    # DDP
    torchrun --standalone --nproc_per_node=8 -m bitnet.train --preset 95m --parallel fsdp2   # FSDP2

Without torchrun (no RANK / WORLD_SIZE in the environment) no process group is started: `init`
returns a world of one and every helper below is a no-op, so a plain run is exactly a plain run.
docs/distributed.md has the multi-node commands and what was tested.
"""

import inspect
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from bitnet.instrumentation.base import Hook, due
from bitnet.instrumentation.evaluation import evaluate
from bitnet.train.optim import portable_state_dict

# The project never turns NVLink multicast (NVLS / symmetric-memory multicast) on: any environment
# it builds keeps these, and a value the user set is never overridden (issue 7).
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def safe_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of `base` (default: os.environ) for a child process, with NVLink multicast kept off."""
    env = dict(os.environ if base is None else base)
    for key, value in MULTICAST_OFF.items():
        env.setdefault(key, value)
    return env


def keep_multicast_off() -> None:
    """Set MULTICAST_OFF in this process (setdefault) before NCCL reads its environment."""
    for key, value in MULTICAST_OFF.items():
        os.environ.setdefault(key, value)


@dataclass(frozen=True)
class World:
    """Where this process sits. `distributed` means a process group is up (torchrun), even at size 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    distributed: bool = False
    owns_group: bool = False
    """True when `init` started the process group (and `teardown` should end it)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """torchrun (or any env:// launcher) sets RANK and WORLD_SIZE for every worker."""
    env = os.environ if env is None else env
    return "RANK" in env and "WORLD_SIZE" in env


def init(device: torch.device, timeout_s: float) -> World:
    """Join the process group torchrun describes: gloo on CPU, NCCL with one GPU per LOCAL_RANK.

    `timeout_s` bounds the rendezvous and every collective: a rank that died or hangs makes the
    others fail with an error after at most that long instead of waiting forever.
    """
    if not launched_by_torchrun():
        return World(device=device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    keep_multicast_off()
    if device.type == "cuda":
        if device.index not in (None, local_rank):
            raise ValueError(f"--device {device} under torchrun: each rank uses cuda:LOCAL_RANK "
                             f"(here cuda:{local_rank}); pass --device cuda or auto")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                             f"--nproc_per_node must not exceed the GPUs per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return World(rank, local_rank, world_size, device, distributed=True, owns_group=owns_group)


def teardown(world: World) -> None:
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def report_failure(world: World, exc: BaseException) -> None:
    """Every rank names itself and its error on its own stderr (rank 0 alone writes the run directory)."""
    if not world.distributed:
        return
    what = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"failed: {type(exc).__name__}: {exc}"
    print(f"[rank {world.rank}/{world.world_size}] {what}", file=sys.stderr, flush=True)


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only (or always, without a process group)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs)


# ---- models


def wrap_model(model: nn.Module, mode: str, world: World) -> nn.Module:
    """The module the training step calls: DDP around `model`, or `model` sharded in place by FSDP2.

    DDP all-reduces gradients in the backward of the last micro-batch (train_step enters
    `no_sync()` for the others). FSDP2 shards each block and the root (embedding, final norm) with
    fp32 parameters, so its numerics match DDP's; it reduce-scatters every micro-batch, since
    skipping that would keep full unsharded gradients, which is what FSDP is there to avoid.
    A world of one (`torchrun --nproc_per_node=1`) has nothing to all-reduce or shard, so the model
    stays unwrapped there and runs exactly as a plain run: DDP's wrapper alone cost 3.6% of a 95m step
    at world size 1 on an H100 (reducer hooks, single-rank all-reduces), FSDP2 7.2% (issue 7).
    Checkpoints do not notice: they always hold the one-process state (`full_state_dicts`).
    """
    if mode not in ("ddp", "fsdp2"):
        raise ValueError(f"--parallel must be ddp or fsdp2, got {mode!r}")
    if not world.distributed or world.world_size == 1:
        return model
    if mode == "ddp":
        # Our only buffers are RoPE tables, equal on every rank: no broadcast in each forward.
        # (torch 2.13 renamed broadcast_buffers to forward_sync_buffers.)
        ddp = nn.parallel.DistributedDataParallel
        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
                          else {"broadcast_buffers": False})
        device_ids = [world.device.index] if world.device.type == "cuda" else None
        # gradient_as_bucket_view: .grad are views into the all-reduce buckets, so no copy of every
        # gradient into the buckets and back (the cost of DDP at world size 1, issue 7).
        return ddp(model, device_ids=device_ids, gradient_as_bucket_view=True, **no_buffer_sync)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(world.device.type, (world.world_size,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# ---- checkpoints: always the state one process would hold, so N ranks' checkpoint resumes on M


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts in the single-process format (optimizer keyed by parameter index).

    `model` is the unwrapped model. Under FSDP2 this gathers the shards to rank 0's CPU, a collective
    every rank must enter; the other ranks get empty dicts.
    """
    if not is_sharded(model):
        return model.state_dict(), portable_state_dict(optimizer)
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=options)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=options)
    return model_sd, (_index_keyed(optim_sd) if optim_sd else {})


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a single-process optimizer state dict; under FSDP2 each rank keeps its shard of it."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, _name_keyed(state, model, optimizer),
                             options=StateDictOptions(full_state_dict=True))


def _index_keyed(state: dict) -> dict:
    """Parameter names -> indices, numbered across groups in order as Optimizer.state_dict() does."""
    index: dict[str, int] = {}
    groups = [{**g, "params": [index.setdefault(name, len(index)) for name in g["params"]]}
              for g in state["param_groups"]]
    return {"state": {index[name]: s for name, s in state["state"].items()}, "param_groups": groups}


def _name_keyed(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The inverse of `_index_keyed` for this optimizer's parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {order[int(i)]: s for i, s in state["state"].items()}, "param_groups": groups}


# ---- collectives


def all_reduce_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    """Sum `t` over ranks in place (gloo has no AVG; callers divide by world_size for means)."""
    if world.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def full_tensors(out, world: World):
    """The step's output dataclass with DTensor fields (FSDP2's grad norms) made plain tensors.

    A Partial norm becomes a replicated one by a small all-reduce on the device, with no host sync.
    """
    if not world.distributed:
        return out
    from torch.distributed.tensor import DTensor

    changes = {f.name: getattr(out, f.name).full_tensor() for f in fields(out)
               if isinstance(getattr(out, f.name), DTensor)}
    return replace(out, **changes) if changes else out


def broadcast_from_main(obj, world: World):
    """Rank 0's value of a small picklable `obj` on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class MirrorEval(Hook):
    """Runs rank 0's evaluations on the other ranks, writing nothing.

    FSDP2's forward all-gathers parameters, so every rank must take part in each eval forward;
    rank 0's EvalHook keeps the results.
    """

    def __init__(self, model, batches, autocast, device, interval: int, num_steps: int):
        self.model, self.batches, self.autocast, self.device = model, batches, autocast, device
        self.interval, self.num_steps = interval, num_steps

    def works_at(self, step):
        return due(step, self.interval, self.num_steps)

    def on_step_end(self, state, out):
        if self.works_at(state.step):
            evaluate(self.model, self.batches, self.autocast, self.device)
