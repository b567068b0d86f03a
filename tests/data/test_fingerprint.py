"""meta/dataset_fingerprint.json: stable across runs and resumes, sensitive to the data."""

import pytest

from bitnet.data import build_data, sha256_tokens
from tests.data.conftest import DOCS, write_jsonl

SEQ = 32


def fingerprint(tok, spec, seed=3, **kw):
    return build_data(spec, tok, SEQ, seed, 4, 2, block_windows=16, **kw).fingerprint


def test_fingerprint_names_the_first_1000_training_tokens(tok, corpus):
    data = build_data(corpus["jsonl"], tok, SEQ, 3, 4, 2, block_windows=16)
    x, _ = data.train.next_batch(-(-1000 // SEQ))
    fp = data.fingerprint
    assert fp["first_1000_train_tokens_sha256"] == sha256_tokens(x.reshape(-1)[:1000])
    assert fp["source"] == corpus["jsonl"] and fp["tokenizer"] == "llama2" and len(fp["vocab_hash"]) == 64
    assert fp["eval_sequences"] == 4 and fp["source_id"]["eval_docs"] >= 1


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "fineweb"])
def test_fingerprint_is_stable(tok, corpus, fake_hub, kind):
    spec = "fineweb-edu" if kind == "fineweb" else corpus[kind]
    assert fingerprint(tok, spec) == fingerprint(tok, spec, prefetch=False, docs_per_encode=7)


def test_fingerprint_changes_with_the_data(tok, tmp_path):
    base = fingerprint(tok, str(write_jsonl(tmp_path / "a.jsonl", DOCS)))
    changed_train = DOCS[:5] + ["A different early training document."] + DOCS[6:]
    other = fingerprint(tok, str(write_jsonl(tmp_path / "b.jsonl", changed_train)))
    assert other["first_1000_train_tokens_sha256"] != base["first_1000_train_tokens_sha256"]
    assert other["source_id"] != base["source_id"] and other["eval_sha256"] == base["eval_sha256"]
    changed_eval = ["Another first document, held out for eval."] + DOCS[1:]
    assert fingerprint(tok, str(write_jsonl(tmp_path / "c.jsonl", changed_eval)))["eval_sha256"] != base["eval_sha256"]
    reseeded = fingerprint(tok, str(tmp_path / "a.jsonl"), seed=4)
    assert reseeded["first_1000_train_tokens_sha256"] != base["first_1000_train_tokens_sha256"]


def test_embedded_fingerprint_is_stable_and_its_eval_documents_never_train(tok):
    a = build_data("embedded", tok, SEQ, 3, 4, 2)
    b = build_data("embedded", tok, SEQ, 3, 4, 2)
    assert a.fingerprint == b.fingerprint and a.fingerprint["source_id"]["documents"] == 249
    eval_rows = {tuple(x.tolist()) for batch in a.eval for x in batch[0]}
    x, _ = a.train.next_batch(2000)
    assert not eval_rows & {tuple(r) for r in x.tolist()}
