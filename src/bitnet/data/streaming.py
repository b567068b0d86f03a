"""Streaming loader: documents -> tokens on the fly -> packed windows, exactly resumable.

Documents are read in the source's fixed order, tokenized in batches (HF tokenizers, all cores),
framed `[BOS] ids [EOS]` and cut into (seq_len + 1)-token windows. Windows are grouped in blocks of
`block_windows`; each block is shuffled by a permutation drawn from (seed, epoch, block). We use no
shuffle buffer from `datasets` (its contents are not in its state_dict, so a resume would lose rows).

The position is the START of the current block (source position, the not-yet-windowed token
carry as an int32 tensor, tokens still to drop) plus the windows of the block already taken. A
resume re-reads that one block (deterministic) and skips the taken windows, so it yields exactly
the batches an uninterrupted run would. Windows do not depend on how documents are batched for
the tokenizer. Each epoch restarts the source after the eval documents; from epoch 1
on it drops an epoch-dependent 0..seq_len tokens first, so windows are cut at new places, and the
block permutations change. The tail of an epoch shorter than one window is dropped.

A background thread prepares the next blocks while the GPU trains (tokenizers releases the GIL).
Distributed: every rank reads the whole stream and keeps rows r, r + world, ... of each global
batch, so the global batch does not depend on the world size (for many GPUs use prepared shards).
"""

import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from bitnet.data.tokens import frame_texts, token_dtype

DOCS_PER_ENCODE = 64  # documents per encode_batch call (parallel over cores); windows do not depend on it


@dataclass
class Block:
    epoch: int
    index: int
    start: dict
    """Where this block's reading begins: {"position", "carry", "drop"}."""
    windows: np.ndarray
    """(n, seq_len + 1) tokens, already in shuffled order."""


def block_permutation(n: int, seed: int, epoch: int, index: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + index) % (2**63 - 1))
    return torch.randperm(n, generator=g)


def epoch_drop(seed: int, epoch: int, window: int) -> int:
    """Tokens dropped at the start of an epoch so that windows are cut at new places (epoch 0: none)."""
    if epoch == 0:
        return 0
    g = torch.Generator().manual_seed(seed * 7_919 + epoch)
    return int(torch.randint(0, window, (1,), generator=g))


@dataclass(frozen=True)
class Packing:
    """What block production needs; kept apart from the loader so the thread does not pin it."""
    source: object
    tok: object
    window: int
    seed: int
    start: object
    block_windows: int
    eval_docs: int
    docs_per_encode: int


def generate_blocks(p: Packing, epoch: int, index: int, start: dict):
    """Blocks from `start` (the beginning of block `index` of `epoch`) onwards, epoch after epoch."""
    dtype = token_dtype(p.tok.vocab_size)
    position, buf, drop = start["position"], start["carry"], start["drop"]
    while True:
        reader = p.source.open(position)
        docs = iter(reader)
        exhausted, produced = False, False
        while not exhausted:
            block_start = {"position": position, "carry": buf, "drop": drop}
            rows, n = [], 0
            while n < p.block_windows:
                k = min(len(buf) // p.window, p.block_windows - n)
                if k:
                    rows.append(buf[:k * p.window].reshape(k, p.window))
                    buf, n = buf[k * p.window:], n + k
                    continue
                texts = [t for _, t in zip(range(p.docs_per_encode), docs)]
                if not texts:
                    exhausted = True
                    break
                tokens, _ = frame_texts(p.tok, texts)
                if drop:
                    tokens, drop = tokens[drop:], max(0, drop - len(tokens))
                buf = np.concatenate([buf, tokens])
                position = reader.position()
            if n:
                windows = np.concatenate(rows)[block_permutation(n, p.seed, epoch, index).numpy()]
                produced = True
                yield Block(epoch, index, block_start, windows)
            index += 1
        if not produced:  # a whole epoch without one window: the data is too small to ever fill a batch
            raise ValueError(f"{p.source.spec}: too little training data after the {p.eval_docs} eval documents "
                             f"(an epoch yields no window of {p.window} tokens)")
        epoch, index = epoch + 1, 0
        position, buf, drop = p.start, np.zeros(0, dtype), epoch_drop(p.seed, epoch, p.window)


class StreamLoader:
    def __init__(self, source, tok, seq_len: int, seed: int, start, eval_docs: int, rank: int = 0,
                 world_size: int = 1, block_windows: int = 2048, prefetch: bool = True,
                 docs_per_encode: int = DOCS_PER_ENCODE):
        self.source, self.seq_len, self.seed = source, seq_len, seed
        self.eval_docs, self.block_windows, self.prefetch = eval_docs, block_windows, prefetch
        self.rank, self.world_size = rank, world_size
        self.packing = Packing(source, tok, seq_len + 1, seed, start, block_windows, eval_docs, docs_per_encode)
        self.window, self.dtype = seq_len + 1, token_dtype(tok.vocab_size)
        self._producer = None
        self._restart(0, 0, self._epoch_start(), taken=0)

    def _epoch_start(self) -> dict:
        return {"position": self.packing.start, "carry": np.zeros(0, self.dtype), "drop": 0}

    def _restart(self, epoch: int, index: int, start: dict, taken: int) -> None:
        self.close()
        self.epoch, self.block, self.taken = epoch, index, taken
        self._start = start
        self._windows = None
        self._skip = taken
        blocks = generate_blocks(self.packing, epoch, index, start)
        self._producer = _Prefetch(blocks) if self.prefetch else blocks

    def _next_block(self) -> None:
        block = self._producer.get() if self.prefetch else next(self._producer)
        self.epoch, self.block, self._start = block.epoch, block.index, block.start
        self._windows = block.windows
        self.taken, self._skip = min(self._skip, len(block.windows)), 0

    def _take(self, n: int) -> np.ndarray:
        out = np.empty((n, self.window), dtype=self.dtype)
        filled = 0
        while filled < n:
            if self._windows is None or self.taken == len(self._windows):
                self._next_block()
                continue
            k = min(n - filled, len(self._windows) - self.taken)
            out[filled:filled + k] = self._windows[self.taken:self.taken + k]
            self.taken += k
            filled += k
        return out

    def next_batches(self, count: int, global_batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`count` micro-batches of one step. If reading fails (a bad row reached by the prefetch thread),
        the position goes back to where this step began, so a checkpoint saved now resumes here."""
        mark = (self.epoch, self.block, self._start, self.taken, self._windows, self._skip)
        try:
            return [self.next_batch(global_batch) for _ in range(count)]
        except BaseException:
            self.epoch, self.block, self._start, self.taken, self._windows, self._skip = mark
            raise

    def next_batch(self, global_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the next global batch: x, y of shape (global_batch // world, seq_len)."""
        rows = self._take(global_batch)[self.rank::self.world_size].astype(np.int64)
        batch = torch.from_numpy(rows)
        return batch[:, :-1], batch[:, 1:]

    def first_windows(self, n: int) -> np.ndarray:
        """The first `n` windows of training (all ranks), without moving this loader."""
        if self.epoch == 0 and self.block == 0 and self.taken == 0 and self._skip == 0:
            if self._windows is None:
                self._next_block()  # block 0 is what training reads first anyway
            if len(self._windows) >= n:
                return self._windows[:n].copy()
        fresh = StreamLoader(self.source, self.packing.tok, self.seq_len, self.seed, self.packing.start,
                             self.eval_docs, block_windows=self.block_windows, prefetch=False,
                             docs_per_encode=self.packing.docs_per_encode)
        try:
            return fresh._take(n)
        finally:
            fresh.close()

    @property
    def epochs_float(self) -> float:
        return float(self.epoch)

    def state_dict(self) -> dict:
        return {"kind": "stream", "source": self.source.spec, "seq_len": self.seq_len, "seed": self.seed,
                "eval_docs": self.eval_docs, "epoch": self.epoch, "block": self.block, "taken": self.taken,
                "block_windows": self.block_windows, "position": self._start["position"],
                "carry": torch.from_numpy(self._start["carry"].astype(np.int32)), "drop": self._start["drop"]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "stream":
            raise ValueError(f"data loader state is of kind {state.get('kind')!r}, this run streams "
                             f"{self.source.spec!r} (resume with the --data of the checkpoint)")
        mine = {"source": self.source.spec, "seq_len": self.seq_len, "seed": self.seed, "eval_docs": self.eval_docs,
                "block_windows": self.block_windows}
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(f"data loader state does not match this data: {key} was {state.get(key)!r}, "
                                 f"now {value!r} (different data, seq-len, seed or eval set?)")
        carry = torch.as_tensor(state["carry"]).numpy().astype(self.dtype)
        start = {"position": state["position"], "carry": carry, "drop": int(state["drop"])}
        self._restart(int(state["epoch"]), int(state["block"]), start, taken=int(state["taken"]))

    def close(self) -> None:
        """Stop the prefetch thread (or close the generator) and the reader it holds."""
        producer = getattr(self, "_producer", None)
        if producer is not None:
            producer.close()
        self._producer = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the daemon thread dies with the process anyway
            pass


class _Prefetch:
    """Runs a generator in a daemon thread, `depth` items ahead; errors surface in get()."""

    def __init__(self, gen, depth: int = 2):
        self.queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(gen,), daemon=True, name="bitnet-stream")
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, gen) -> None:
        try:
            for item in gen:
                if not self._put(item):
                    break
        except BaseException as e:  # handed to the consumer, raised there
            self._put(_Failure(e))
        finally:
            gen.close()

    def get(self):
        item = self.queue.get()
        if isinstance(item, _Failure):
            raise item.error
        return item

    def close(self) -> None:
        self.stop.set()
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.thread.join(timeout=10)


@dataclass
class _Failure:
    error: BaseException
