"""From documents to one flat token array: `[BOS] doc [EOS] [BOS] doc [EOS] ...` as uint16/uint32.

`frame_texts` is the one framing step every reader uses (streams, prepare, eval documents);
`pack_documents` / `tokenize_corpus` serve the in-memory embedded corpus.

The frozen eval set is a set of whole held-out documents, so no eval token is ever a training
token. Tokenized corpora are cached on disk (keyed by corpus and vocabulary) because the
embedded corpus takes seconds to encode and every test run would pay it again.
"""

import hashlib
import itertools
import os
from pathlib import Path

import numpy as np

from bitnet.data.tokenizer import TextTokenizer


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32


def pack_documents(docs_ids: list[list[int]], tok: TextTokenizer) -> np.ndarray:
    """Concatenate documents, each framed by BOS and EOS, into one array."""
    total = sum(len(ids) + 2 for ids in docs_ids)
    out = np.empty(total, dtype=token_dtype(tok.vocab_size))
    pos = 0
    for ids in docs_ids:
        out[pos] = tok.bos_id
        out[pos + 1:pos + 1 + len(ids)] = ids
        out[pos + 1 + len(ids)] = tok.eos_id
        pos += len(ids) + 2
    return out


def frame_texts(tok: TextTokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encode a batch (all cores) and frame each document: (flat `[BOS] ids [EOS] ...`, per-document lengths)."""
    ids = tok.encode_batch(texts)
    lengths = np.fromiter((len(x) + 2 for x in ids), dtype=np.int64, count=len(ids))
    ends = np.cumsum(lengths)
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=token_dtype(tok.vocab_size))
    body = np.ones(len(out), dtype=bool)
    body[ends - lengths] = False
    body[ends - 1] = False
    out[~body] = np.tile([tok.bos_id, tok.eos_id], len(ids))
    out[body] = np.fromiter(itertools.chain.from_iterable(ids), dtype=out.dtype, count=int(body.sum()))
    return out, lengths


def split_eval_documents(n_docs: int, eval_every: int) -> tuple[list[int], list[int]]:
    """Deterministic split: every `eval_every`-th document (starting at the middle one) is held out."""
    offset = (eval_every // 2) % max(eval_every, 1)
    eval_idx = [i for i in range(n_docs) if i % eval_every == offset]
    held = set(eval_idx)
    return [i for i in range(n_docs) if i not in held], eval_idx


def cache_dir() -> Path:
    return Path(os.environ.get("BITNET_CACHE", Path.home() / ".cache" / "bitnet"))


def tokenize_corpus(name: str, docs: list[str], tok: TextTokenizer, eval_every: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_tokens, eval_tokens) for an in-memory corpus, cached by content and vocabulary."""
    key = hashlib.sha256()
    for d in docs:
        key.update(hashlib.sha256(d.encode()).digest())
    key.update(f"{tok.vocab_hash()}|{tok.bos_id}|{tok.eos_id}|{eval_every}".encode())
    path = cache_dir() / f"{name}-{key.hexdigest()[:16]}.npz"
    if path.exists():
        try:
            with np.load(path) as z:
                return z["train"], z["eval"]
        except Exception:
            pass  # a corrupt cache entry is rebuilt below
    train_idx, eval_idx = split_eval_documents(len(docs), eval_every)
    ids = tok.encode_batch(docs)
    train = pack_documents([ids[i] for i in train_idx], tok)
    evals = pack_documents([ids[i] for i in eval_idx], tok)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, train=train, eval=evals)
        os.replace(tmp, path)
    except OSError:
        pass  # caching is an optimization; a read-only home must not stop training
    return train, evals
