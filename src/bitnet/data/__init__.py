"""Data: sources -> tokenizer -> flat tokens -> packed, resumable batches; plus the frozen eval set.

`build_data` is the one entry point the trainer calls; the model never sees a data source.
"""

import hashlib
from dataclasses import dataclass

import numpy as np

from bitnet.data.embedded import embedded_documents
from bitnet.data.loader import WindowLoader, eval_batches
from bitnet.data.tokenizer import TextTokenizer, load_tokenizer
from bitnet.data.tokens import tokenize_corpus

EVAL_EVERY_NTH_DOCUMENT = 25  # embedded corpus: 10 of 249 addresses held out (~4%)


@dataclass
class DataBundle:
    train: WindowLoader
    """Resumable training batches (next_batch, state_dict, load_state_dict)."""
    eval: list
    """The frozen eval set: a list of (x, y) CPU tensors, identical across runs and resumes."""
    fingerprint: dict
    """What meta/dataset_fingerprint.json holds."""


def sha256_tokens(tokens) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes()).hexdigest()


def build_data(spec: str, tok: TextTokenizer, seq_len: int, seed: int, eval_sequences: int,
               eval_batch_size: int, rank: int = 0, world_size: int = 1) -> DataBundle:
    """Build training and eval data for a `--data` spec."""
    if spec == "embedded":
        train_tokens, eval_tokens = tokenize_corpus("sotu", embedded_documents(), tok, EVAL_EVERY_NTH_DOCUMENT)
    else:
        raise ValueError(f"unknown data source {spec!r} (known: embedded)")
    train = WindowLoader(train_tokens, seq_len, seed, rank, world_size)
    evals = eval_batches(eval_tokens, seq_len, eval_sequences, eval_batch_size)
    first = WindowLoader(train_tokens, seq_len, seed)  # a fresh reader: what step 1 sees first
    x, _ = first.next_batch(-(-1000 // seq_len))
    fingerprint = {
        "source": spec,
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "vocab_hash": tok.vocab_hash(),
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "document_framing": "[BOS] text [EOS] per document",
        "train_tokens": int(len(train_tokens)),
        "first_1000_train_tokens_sha256": sha256_tokens(x.reshape(-1)[:1000]),
        "eval_sequences": sum(len(b[0]) for b in evals),
        "eval_sha256": sha256_tokens(np.concatenate([b[0].reshape(-1).numpy() for b in evals])),
        "seed": seed,
        "seq_len": seq_len,
    }
    return DataBundle(train, evals, fingerprint)


__all__ = ["DataBundle", "TextTokenizer", "build_data", "load_tokenizer"]
