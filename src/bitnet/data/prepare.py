"""`bitnet-prepare-data`: tokenize any source into uint16 token shards (data/shards.py) once,
so that training reads them by memory map at full GPU speed, on any number of ranks.

    bitnet-prepare-data --data fineweb-edu --out data/fineweb-edu-llama2
    bitnet-train --preset 95m --data shards:data/fineweb-edu-llama2

The first `--eval-docs` documents go to eval.bin (the frozen eval set; training never sees them);
the rest fill train_000000.bin, ... of about `--shard-tokens` tokens each, cut at document ends.
Documents are tokenized by `--workers` processes. After every shard, manifest.json records it
(sha256, tokens) with the source position after it, so an interrupted run, rerun with the same
command, skips the finished shards and writes identical files. The command line is bitnet/cli/prepare.py.
"""

import os
import sys
from collections import deque
from pathlib import Path

import numpy as np

from bitnet.data.shards import (EVAL_FILE, VERSION, read_header, read_manifest, sha256_file, shard_name,
                                write_manifest, write_shard)
from bitnet.data.sources import next_documents, open_source
from bitnet.data.tokenizer import load_tokenizer
from bitnet.data.tokens import frame_texts, token_dtype

DOCS_PER_TASK = 256  # documents per worker task

_worker_tok = None


def _init_worker(tokenizer_json: str, name: str) -> None:
    global _worker_tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    from tokenizers import Tokenizer

    from bitnet.data.tokenizer import TextTokenizer
    _worker_tok = TextTokenizer(Tokenizer.from_str(tokenizer_json), name)


def _frame_in_worker(texts: list[str]):
    return frame_texts(_worker_tok, texts)


def framed_chunks(reader, tok, workers: int):
    """Yield (tokens, lengths, positions) for consecutive chunks of documents, in order.

    positions[j] is the reader position after document j of the chunk. With workers > 1 the
    chunks are tokenized by a process pool, a bounded number in flight.
    """
    docs = iter(reader)

    def next_chunk():
        return next_documents(docs, reader, DOCS_PER_TASK)

    if workers <= 1:
        while True:
            texts, positions = next_chunk()
            if not texts:
                return
            yield (*frame_texts(tok, texts), positions)
    import multiprocessing as mp
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tok.tok.to_str(), tok.name)) as pool:
        pending = deque()
        exhausted = False
        while True:
            while not exhausted and len(pending) < 2 * workers:
                texts, positions = next_chunk()
                if not texts:
                    exhausted = True
                    break
                pending.append((pool.apply_async(_frame_in_worker, (texts,)), positions))
            if not pending:
                return
            result, positions = pending.popleft()
            yield (*result.get(), positions)


def prepare(spec: str, out: str, tokenizer: str = "llama2", shard_tokens: int = 100_000_000, eval_docs: int = 1000,
            workers: int = 0, progress: bool = True, verify: bool = False) -> dict:
    """Tokenize `spec` into shards under `out` (resuming a previous run); returns the manifest."""
    if shard_tokens < 1 or eval_docs < 1:
        raise ValueError("--shard-tokens and --eval-docs must be positive")
    workers = workers or os.cpu_count() or 1
    tok = load_tokenizer(tokenizer)
    source = open_source(spec)
    dtype = token_dtype(tok.vocab_size)
    settings = {"format_version": VERSION, "source": spec, "source_id": source.identity(), "tokenizer": tok.name,
                "vocab_size": tok.vocab_size, "vocab_hash": tok.vocab_hash(), "bos_id": tok.bos_id,
                "eos_id": tok.eos_id, "dtype": np.dtype(dtype).name, "shard_tokens": shard_tokens,
                "eval_docs": eval_docs, "document_framing": "[BOS] text [EOS] per document"}
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(root)
    if manifest is not None:
        changed = [k for k in settings if manifest.get(k) != settings[k]]
        if changed:
            raise ValueError(f"{root} holds shards prepared with other settings ({', '.join(changed)} differ); "
                             f"use another --out or delete it")
        _check_done(root, manifest, verify)
        if manifest.get("complete"):
            return manifest
    else:
        manifest = {**settings, "complete": False, "eval": None, "shards": []}
    for stale in root.glob("*.tmp"):
        stale.unlink()

    done = manifest["shards"]
    position = done[-1]["end_position"] if done else (manifest["eval"] or {}).get("end_position")
    bar = _progress(progress, sum(s["tokens"] for s in done) + (manifest["eval"] or {}).get("tokens", 0))
    in_eval = manifest["eval"] is None
    parts, n_tokens, n_docs, end_position = [], 0, 0, position
    chunks = framed_chunks(source.open(position), tok, workers)
    try:
        for tokens, lengths, positions in chunks:
            ends = np.cumsum(lengths)
            first = 0  # first document of this chunk not yet stored
            while first < len(lengths):
                base = int(ends[first - 1]) if first else 0
                if in_eval:
                    last = min(len(lengths), first + eval_docs - n_docs)  # documents [first, last) are eval
                else:  # up to and including the document that reaches shard_tokens
                    need = shard_tokens - n_tokens  # the first document whose end reaches it closes the shard
                    last = min(len(lengths), int(np.searchsorted(ends - base, need)) + 1)
                parts.append(tokens[base:int(ends[last - 1])])
                n_tokens += int(ends[last - 1]) - base
                n_docs += last - first
                first = last
                full = n_docs == eval_docs if in_eval else n_tokens >= shard_tokens
                if full:
                    _close(root, manifest, in_eval, parts, n_docs, positions[last - 1], tok)
                    in_eval, parts, n_tokens, n_docs = False, [], 0, 0
            end_position = positions[-1]
            bar.update(int(ends[-1]))
        if in_eval:
            raise ValueError(f"{spec}: only {n_docs} documents, fewer than --eval-docs {eval_docs} plus training data")
        if n_docs:
            _close(root, manifest, False, parts, n_docs, end_position, tok)
        if not manifest["shards"]:
            raise ValueError(f"{spec}: no training documents after the {eval_docs} eval documents")
    finally:
        chunks.close()
        bar.close()
    manifest["complete"] = True
    manifest["train_tokens"] = sum(s["tokens"] for s in manifest["shards"])
    manifest["train_docs"] = sum(s["docs"] for s in manifest["shards"])
    write_manifest(root, manifest)
    return manifest


def _close(root: Path, manifest: dict, is_eval: bool, parts: list, n_docs: int, end_position, tok) -> None:
    """Write one finished shard atomically, then record it in the manifest (also atomically)."""
    name = EVAL_FILE if is_eval else shard_name(len(manifest["shards"]))
    tokens = np.concatenate(parts) if parts else np.zeros(0, token_dtype(tok.vocab_size))
    sha = write_shard(root / name, tokens, tok.vocab_size, tok.bos_id, tok.eos_id)
    entry = {"file": name, "tokens": int(len(tokens)), "docs": n_docs, "sha256": sha, "end_position": end_position}
    if is_eval:
        manifest["eval"] = entry
    else:
        manifest["shards"].append(entry)
    write_manifest(root, manifest)


def _check_done(root: Path, manifest: dict, verify: bool) -> None:
    """Shards the manifest lists must still be whole (header and size; sha256 with --verify)."""
    for entry in ([manifest["eval"]] if manifest["eval"] else []) + manifest["shards"]:
        path = root / entry["file"]
        if not path.exists():
            raise ValueError(f"{path} is listed in the manifest but missing; delete {root} and prepare again")
        if read_header(path)["num_tokens"] != entry["tokens"] or (verify and sha256_file(path) != entry["sha256"]):
            raise ValueError(f"{path} does not match the manifest; delete {root} and prepare again")


def _progress(enabled: bool, initial: int):
    from tqdm import tqdm
    return tqdm(unit="tok", unit_scale=True, initial=initial, disable=not enabled, desc="tokenizing",
                dynamic_ncols=True, smoothing=0.1)
