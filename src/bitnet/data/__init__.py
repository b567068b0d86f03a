"""Data: sources -> tokenizer -> packed, resumable batches; plus the frozen eval set and the fingerprint.

`build_data` is the one entry point the trainer calls; the model never sees a data source.
Three readers stand behind it (docs/data.md):
- `embedded`: the packaged corpus, tokenized in memory; every 25th address is eval (WindowLoader);
- `shards:<dir>`: token shards from `bitnet-prepare-data`, memory-mapped; eval.bin is eval (WindowLoader);
- everything else (fineweb-edu, hf:..., local files) streams: tokenized on the fly; the first
  documents, as many as fill the eval set, are eval and training starts after them (StreamLoader).
"""

import hashlib
from dataclasses import dataclass

import numpy as np

from bitnet.data.embedded import embedded_documents
from bitnet.data.loader import WindowLoader, eval_batches
from bitnet.data.shards import load_shards
from bitnet.data.sources import next_documents, open_source
from bitnet.data.streaming import DOCS_PER_ENCODE, StreamLoader
from bitnet.data.tokenizer import TextTokenizer, load_tokenizer
from bitnet.data.tokens import frame_texts, tokenize_corpus

EVAL_EVERY_NTH_DOCUMENT = 25  # embedded corpus: 10 of 249 addresses held out (~4%)
FINGERPRINT_TOKENS = 1000
EVAL_DOCS_PER_ENCODE = 32


@dataclass
class DataBundle:
    train: WindowLoader | StreamLoader
    """Resumable training batches (next_batch, state_dict, load_state_dict, epochs_float)."""
    eval: list
    """The frozen eval set: a list of (x, y) CPU tensors, identical across runs and resumes."""
    fingerprint: dict
    """What meta/dataset_fingerprint.json holds."""


def sha256_tokens(tokens) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes()).hexdigest()


def read_eval_documents(source, tok: TextTokenizer, n_tokens: int) -> tuple[np.ndarray, int, object]:
    """The first whole documents of `source` that give >= n_tokens framed tokens.

    Returns (tokens, number of documents, source position after them: where training starts).
    """
    reader = source.open(None)
    docs = iter(reader)
    parts, total, count, position = [], 0, 0, None
    while total < n_tokens:
        texts, positions = next_documents(docs, reader, EVAL_DOCS_PER_ENCODE)
        if not texts and count == 0:
            raise ValueError(f"{source.spec}: empty dataset (no documents)")
        if not texts:
            raise ValueError(f"{source.spec}: all {count} documents ({total} tokens) cannot fill the eval set "
                             f"({n_tokens} tokens) and leave training data; lower --eval-sequences or add data")
        tokens, lengths = frame_texts(tok, texts)
        ends = np.cumsum(lengths)
        k = min(len(texts), int(np.searchsorted(ends, n_tokens - total)) + 1)
        parts.append(tokens[:ends[k - 1]])
        total, count, position = total + int(ends[k - 1]), count + k, positions[k - 1]
    return np.concatenate(parts), count, position


def build_data(spec: str, tok: TextTokenizer, seq_len: int, seed: int, eval_sequences: int,
               eval_batch_size: int, rank: int = 0, world_size: int = 1, *, block_windows: int = 2048,
               prefetch: bool = True, docs_per_encode: int = DOCS_PER_ENCODE) -> DataBundle:
    """Build training and eval data for a `--data` spec. Raises a one-line ValueError on bad input.

    block_windows: windows per shuffled block of a stream; prefetch: prepare stream blocks in a
    background thread; docs_per_encode: documents per tokenizer call (does not change the data).
    """
    window = seq_len + 1
    if spec == "embedded":
        docs = embedded_documents()
        train_tokens, eval_tokens = tokenize_corpus("sotu", docs, tok, EVAL_EVERY_NTH_DOCUMENT)
        train = WindowLoader(train_tokens, seq_len, seed, rank, world_size, source=spec)
        source_id = {"kind": "embedded", "corpus": "sotu", "documents": len(docs),
                     "eval": f"every {EVAL_EVERY_NTH_DOCUMENT}th document"}
        train_size = int(len(train_tokens))
    elif spec.startswith("shards:"):
        manifest, shards, eval_tokens = load_shards(spec[len("shards:"):], tok.vocab_hash())
        train = WindowLoader(shards, seq_len, seed, rank, world_size, source=spec)
        digest = hashlib.sha256("".join(s["sha256"] for s in manifest["shards"] + [manifest["eval"]]).encode())
        source_id = {"kind": "shards", "prepared_from": manifest["source"], "shards": len(shards),
                     "eval_docs": manifest["eval"]["docs"], "shards_sha256": digest.hexdigest()}
        train_size = int(manifest["train_tokens"])
    else:
        source = open_source(spec)
        eval_tokens, eval_docs, start = read_eval_documents(source, tok, eval_sequences * window)
        train = StreamLoader(source, tok, seq_len, seed, start, eval_docs, rank, world_size,
                             block_windows=block_windows, prefetch=prefetch, docs_per_encode=docs_per_encode)
        source_id = {**source.identity(), "eval_docs": eval_docs, "shuffle_block_windows": block_windows}
        train_size = None  # a stream's length is known only once it has been read
    evals = eval_batches(eval_tokens, seq_len, eval_sequences, eval_batch_size)
    first = train.first_windows(-(-FINGERPRINT_TOKENS // seq_len))  # what step 1 reads first (all ranks)
    eval_windows = np.concatenate([np.concatenate([x, y[:, -1:]], axis=1) for x, y in evals])
    fingerprint = {
        "source": spec,
        "source_id": source_id,
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "vocab_hash": tok.vocab_hash(),
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "document_framing": "[BOS] text [EOS] per document",
        "train_tokens": train_size,
        "first_1000_train_tokens_sha256": sha256_tokens(first[:, :-1].reshape(-1)[:FINGERPRINT_TOKENS]),
        "eval_sequences": len(eval_windows),
        "eval_sha256": sha256_tokens(eval_windows),
        "seed": seed,
        "seq_len": seq_len,
    }
    return DataBundle(train, evals, fingerprint)


__all__ = ["DataBundle", "StreamLoader", "TextTokenizer", "WindowLoader", "build_data", "eval_batches",
           "load_tokenizer"]
