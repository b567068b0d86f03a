"""Packing loader with an exactly resumable position.

Training reads (seq_len + 1)-token windows of flat token arrays (in memory, or memory-mapped
shards: windows never cross a shard's end, whose last < seq_len + 1 tokens are not read):
input = window[:-1], target = window[1:]. Each epoch visits every window once in a
permutation drawn from (seed, epoch), so repeated epochs reshuffle deterministically. The whole
position is two integers (epoch, windows consumed), so a checkpoint restores it exactly.

Distributed: a step takes `global_batch` consecutive windows of the permutation and rank r keeps
rows r, r + world, ...; the global batch is the same tokens whatever the world size.
"""

import numpy as np
import torch


class WindowLoader:
    def __init__(self, tokens, seq_len: int, seed: int, rank: int = 0, world_size: int = 1, source: str = ""):
        """`tokens`: one array, or a list of arrays (shards) read as one sequence of windows."""
        self.segments = [tokens] if isinstance(tokens, np.ndarray) else list(tokens)
        self.tokens = self.segments[0] if len(self.segments) == 1 else None
        self.seq_len = seq_len
        self.seed = seed
        self.source = source
        self.rank, self.world_size = rank, world_size
        self.window = seq_len + 1
        counts = [len(seg) // self.window for seg in self.segments]
        self._first_window = np.cumsum([0] + counts)  # global index of each segment's first window
        self.num_windows = int(self._first_window[-1])
        if self.num_windows < 1:
            total = sum(len(seg) for seg in self.segments)
            raise ValueError(f"data has {total} tokens, fewer than one window of {self.window}")
        self.epoch = 0
        self.index = 0  # windows of this epoch's permutation already consumed (globally)
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_windows, generator=g)

    def _next_window_ids(self, n: int) -> list[int]:
        ids = []
        while len(ids) < n:
            if self.index == self.num_windows:
                self.epoch += 1
                self.index = 0
                self._perm = self._permutation(self.epoch)
            take = min(n - len(ids), self.num_windows - self.index)
            ids.extend(self._perm[self.index:self.index + take].tolist())
            self.index += take
        return ids

    def next_batches(self, count: int, global_batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`count` micro-batches of one step (the loop's call; StreamLoader's can fail and rewind)."""
        return [self.next_batch(global_batch) for _ in range(count)]

    def next_batch(self, global_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the next global batch: x, y of shape (global_batch // world, seq_len)."""
        ids = self._next_window_ids(global_batch)[self.rank::self.world_size]
        batch = torch.from_numpy(self._rows(ids).astype(np.int64))
        return batch[:, :-1], batch[:, 1:]

    def _rows(self, ids) -> np.ndarray:
        seg_of = np.searchsorted(self._first_window, ids, side="right") - 1
        out = np.empty((len(ids), self.window), dtype=self.segments[0].dtype)
        for row, (i, s) in enumerate(zip(ids, seg_of.tolist())):
            start = (i - int(self._first_window[s])) * self.window
            out[row] = self.segments[s][start:start + self.window]
        return out

    def first_windows(self, n: int) -> np.ndarray:
        """The first `n` windows of training (all ranks): epoch 0's permutation, whatever the position."""
        return self._rows(self._permutation(0)[:n].tolist())

    @property
    def epochs_float(self) -> float:
        return self.epoch + self.index / self.num_windows

    def state_dict(self) -> dict:
        return {"kind": "windows", "source": self.source, "epoch": self.epoch, "index": self.index,
                "seed": self.seed, "seq_len": self.seq_len, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind", "windows") != "windows":
            raise ValueError(f"data loader state is of kind {state.get('kind')!r}, this run reads windows of "
                             f"{self.source or 'token arrays'} (resume with the --data of the checkpoint)")
        keys = ("seed", "seq_len", "num_windows") + (("source",) if state.get("source") and self.source else ())
        for key in keys:
            if state.get(key) != getattr(self, key):
                raise ValueError(f"data loader state does not match this data: {key} was {state.get(key)}, "
                                 f"now {getattr(self, key)} (different data, seq-len or seed?)")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._perm = self._permutation(self.epoch)


def eval_batches(tokens: np.ndarray, seq_len: int, num_sequences: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The frozen eval set: the first `num_sequences` windows of the held-out tokens, in order."""
    window = seq_len + 1
    n = min(num_sequences, len(tokens) // window)
    if n < 1:
        raise ValueError(f"eval set has {len(tokens)} tokens, fewer than one window of {window}")
    rows = torch.from_numpy(tokens[:n * window].astype(np.int64).reshape(n, window))
    return [(rows[i:i + batch_size, :-1], rows[i:i + batch_size, 1:]) for i in range(0, n, batch_size)]
