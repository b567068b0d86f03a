"""Token shards: the binary format `bitnet-prepare-data` writes and the trainer memory-maps.

A shard is a 64-byte little-endian header followed by the tokens (docs/data.md):

    offset  type     field
    0       8 bytes  magic b"BNTOKENS"
    8       uint32   format version (1)
    12      uint32   header size in bytes (64)
    16      uint32   bytes per token: 2 (uint16) or 4 (uint32)
    20      uint32   tokenizer vocabulary size
    24      uint64   number of tokens
    32      uint32   BOS id
    36      uint32   EOS id
    40      24 bytes zero (reserved)

A directory of shards holds `train_000000.bin`, ..., `eval.bin` and `manifest.json` (per-shard
sha256 and token counts, the tokenizer and its vocabulary hash, the settings of the run).
Every file is written atomically (temp name, fsync, rename).
"""

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from bitnet.fileio import fsync_dir, sha256_file

MAGIC = b"BNTOKENS"
VERSION = 1
HEADER = struct.Struct("<8sIIIIQII24x")
HEADER_BYTES = HEADER.size  # 64
MANIFEST = "manifest.json"
EVAL_FILE = "eval.bin"
DTYPES = {2: np.uint16, 4: np.uint32}


def shard_name(index: int) -> str:
    return f"train_{index:06d}.bin"


def header_bytes(num_tokens: int, itemsize: int, vocab_size: int, bos_id: int, eos_id: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, HEADER_BYTES, itemsize, vocab_size, num_tokens, bos_id, eos_id)


def atomic_write(path: Path, chunks) -> None:
    """Write byte chunks to `path` via a temp file, fsync and rename: never a half file under `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_shard(path: Path, tokens: np.ndarray, vocab_size: int, bos_id: int, eos_id: int) -> str:
    """Write one shard atomically; returns the sha256 of the whole file (header included)."""
    head = header_bytes(len(tokens), tokens.dtype.itemsize, vocab_size, bos_id, eos_id)
    body = np.ascontiguousarray(tokens).data
    atomic_write(path, [head, body])
    h = hashlib.sha256(head)
    h.update(body)
    return h.hexdigest()


def read_header(path: Path) -> dict:
    """Parse and check a shard header against the file size. Raises a one-line ValueError."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise ValueError(f"corrupt shard header in {path}: file is {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    magic, version, hbytes, itemsize, vocab, n, bos, eos = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ValueError(f"corrupt shard header in {path}: magic {magic!r}, expected {MAGIC!r} (not a bitnet token shard)")
    if version != VERSION or hbytes != HEADER_BYTES:
        raise ValueError(f"corrupt shard header in {path}: format version {version} / header size {hbytes} "
                         f"(this reader knows version {VERSION}, {HEADER_BYTES} bytes)")
    if itemsize not in DTYPES:
        raise ValueError(f"corrupt shard header in {path}: {itemsize} bytes per token (expected 2 or 4)")
    if vocab > 1 << (8 * itemsize) or max(bos, eos) >= max(vocab, 1):
        raise ValueError(f"corrupt shard header in {path}: vocab size {vocab}, BOS {bos}, EOS {eos} "
                         f"do not fit {itemsize}-byte tokens")
    if size != HEADER_BYTES + n * itemsize:
        raise ValueError(f"corrupt shard header in {path}: header says {n} tokens ({HEADER_BYTES + n * itemsize} "
                         f"bytes), file has {size} bytes")
    return {"dtype": DTYPES[itemsize], "vocab_size": vocab, "num_tokens": n, "bos_id": bos, "eos_id": eos}


def open_shard(path: Path) -> np.ndarray:
    """The tokens of a shard as a read-only memory map (no copy, no read until used)."""
    h = read_header(path)
    if h["num_tokens"] == 0:
        return np.zeros(0, dtype=h["dtype"])
    return np.memmap(path, dtype=h["dtype"], mode="r", offset=HEADER_BYTES, shape=(h["num_tokens"],))


def read_manifest(directory: Path) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # invalid JSON or not UTF-8
        raise ValueError(f"corrupt {path}: {e}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"corrupt {path}: not a JSON object")
    return manifest


def write_manifest(directory: Path, manifest: dict) -> None:
    atomic_write(Path(directory) / MANIFEST, [json.dumps(manifest, indent=1).encode()])


def load_shards(directory: str, vocab_hash: str | None = None, verify: bool = False) -> tuple[dict, list, np.ndarray]:
    """(manifest, train shard memmaps, eval tokens) of a finished `bitnet-prepare-data` directory."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"shards directory not found: {root}")
    manifest = read_manifest(root)
    if manifest is None:
        raise ValueError(f"{root} has no {MANIFEST} (not a bitnet-prepare-data output)")
    if not manifest.get("complete"):
        raise ValueError(f"{root}: prepare did not finish ({len(manifest.get('shards', []))} shards so far); "
                         f"rerun the same bitnet-prepare-data command to complete it")
    if vocab_hash is not None and manifest["vocab_hash"] != vocab_hash:
        raise ValueError(f"{root} was tokenized with {manifest['tokenizer']!r} (another vocabulary than "
                         f"the --tokenizer of this run)")
    entries = manifest["shards"] + [manifest["eval"]]
    arrays = []
    for entry in entries:
        path = root / entry["file"]
        if not path.exists():
            raise ValueError(f"missing shard {path} listed in {MANIFEST}")
        arr = open_shard(path)
        if len(arr) != entry["tokens"]:
            raise ValueError(f"shard {path} has {len(arr)} tokens, {MANIFEST} says {entry['tokens']}")
        if verify and sha256_file(path) != entry["sha256"]:
            raise ValueError(f"shard {path} does not match its sha256 in {MANIFEST} (corrupt or modified)")
        arrays.append(arr)
    return manifest, arrays[:-1], arrays[-1]
