"""The streaming loader: packing, the held-out eval documents, epochs, exact resume, ranks."""

import io
from collections import Counter

import numpy as np
import pytest
import torch

from bitnet.data import build_data
from bitnet.data.streaming import epoch_drop
from tests.data.conftest import DOCS, framed, windows_of, write_jsonl

SEQ, SEED = 32, 3
WINDOW = SEQ + 1


def build(tok, spec, **kw):
    opts = dict(rank=0, world_size=1, block_windows=16, docs_per_encode=3, prefetch=True)
    opts.update(kw)
    return build_data(spec, tok, SEQ, SEED, 4, 2, opts.pop("rank"), opts.pop("world_size"), **opts)


def windows(batch) -> np.ndarray:
    x, y = batch
    return torch.cat([x, y[:, -1:]], dim=1).numpy()


def test_eval_is_the_first_documents_and_training_the_rest_framed(tok, corpus):
    data = build(tok, corpus["jsonl"])
    k = data.train.eval_docs
    eval_windows = np.concatenate([windows(b) for b in data.eval])
    assert [tuple(w) for w in eval_windows.tolist()] == windows_of(framed(tok, DOCS[:k]), WINDOW)[:4]
    assert len(framed(tok, DOCS[:k - 1])) < 4 * WINDOW  # no more eval documents than the eval set needs

    stream = framed(tok, DOCS[k:])
    epoch0 = windows_of(stream, WINDOW)
    got = [tuple(w) for w in windows(data.train.next_batch(len(epoch0))).tolist()]
    assert Counter(got) == Counter(epoch0)  # every training window once, eval documents never
    assert got != epoch0  # shuffled within blocks
    assert stream[0] == tok.bos_id and (stream == tok.bos_id).sum() == (stream == tok.eos_id).sum() == len(DOCS) - k

    drop = epoch_drop(SEED, 1, WINDOW)
    epoch1 = windows_of(stream[drop:], WINDOW)
    got1 = [tuple(w) for w in windows(data.train.next_batch(len(epoch1))).tolist()]
    assert data.train.epoch == 1 and Counter(got1) == Counter(epoch1)  # epoch 2 re-cut at another offset
    assert 0 < drop < WINDOW


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # how checkpoints are loaded


@pytest.mark.parametrize("kind,prefetch", [("jsonl", True), ("parquet", False), ("fineweb", True)])
def test_resume_anywhere_gives_the_same_batches(tok, corpus, fake_hub, kind, prefetch):
    spec = "fineweb-edu" if kind == "fineweb" else corpus[kind]
    straight = build(tok, spec, prefetch=prefetch)
    n_windows = len(framed(tok, DOCS)) // WINDOW
    steps = 2 * n_windows // 5 + 5  # batches of 5 windows, past the end of the first epoch
    reference = [windows(straight.train.next_batch(5)) for _ in range(steps)]
    states = []
    for cut in (0, 1, 7, 30, n_windows // 5 + 2):
        first = build(tok, spec, prefetch=prefetch)
        for _ in range(cut):
            first.train.next_batch(5)
        state = roundtrip(first.train.state_dict())
        states.append(state)
        resumed = build(tok, spec, prefetch=not prefetch, docs_per_encode=5)  # batching must not matter
        resumed.train.load_state_dict(state)
        for step in range(cut, min(steps, cut + 25)):
            assert np.array_equal(windows(resumed.train.next_batch(5)), reference[step]), (cut, step)
    carries = [s["carry"].numpy() for s in states]
    assert any(len(c) and c[0] != tok.bos_id for c in carries)  # some cut fell mid-document
    assert any(0 < s["taken"] < 16 for s in states)  # and some mid-block
    assert states[-1]["epoch"] == 1  # and one in the second epoch


def test_two_ranks_split_the_single_rank_stream(tok, corpus):
    single = build(tok, corpus["jsonl"])
    ranks = [build(tok, corpus["jsonl"], rank=r, world_size=2) for r in range(2)]
    seen = [set(), set()]
    for _ in range(40):
        whole = windows(single.train.next_batch(8))
        parts = [windows(r.train.next_batch(8)) for r in ranks]
        assert np.array_equal(parts[0], whole[0::2]) and np.array_equal(parts[1], whole[1::2])
        for r in range(2):
            seen[r].update(tuple(w) for w in parts[r].tolist())
    assert not seen[0] & seen[1]


def test_a_state_from_other_settings_is_refused(tok, corpus):
    state = build(tok, corpus["jsonl"]).train.state_dict()
    other = build_data(corpus["jsonl"], tok, 16, SEED, 4, 2, block_windows=16)
    with pytest.raises(ValueError, match="seq_len was 32, now 16"):
        other.train.load_state_dict(state)
    with pytest.raises(ValueError, match="kind 'windows'"):
        other.train.load_state_dict({"kind": "windows", "epoch": 0, "index": 0})


def test_too_little_data_for_eval_and_training(tok, tmp_path):
    path = write_jsonl(tmp_path / "tiny.jsonl", ["one short document", "and another"])
    with pytest.raises(ValueError, match="cannot fill the eval set"):
        build(tok, str(path))


def test_too_little_training_data_after_the_eval_documents(tok, tmp_path):
    long = max(DOCS, key=len)  # alone fills the 4 eval windows
    path = write_jsonl(tmp_path / "short.jsonl", [long, "hi"])
    with pytest.raises(ValueError, match="too little training data"):
        build(tok, str(path))


def test_an_empty_or_broken_hf_dataset(tok, fake_hub, tmp_path):
    from tests.data.conftest import write_fineweb_parquet
    (tmp_path / "blank.jsonl").write_text("\n\n")
    fake_hub[("someone/empty", None)] = ("json", [str(tmp_path / "blank.jsonl")])
    with pytest.raises(ValueError, match="HF dataset someone/empty is empty"):
        build(tok, "hf:someone/empty")
    fake_hub[("someone/broken", None)] = ("parquet", [str(write_fineweb_parquet(tmp_path / "e.parquet", []))])
    with pytest.raises(ValueError, match="reading HF dataset someone/broken failed after 0 rows") as e:
        build(tok, "hf:someone/broken")
    assert "\n" not in str(e.value)


def test_a_bad_row_later_in_the_stream_surfaces_in_next_batch(tok, tmp_path):
    path = tmp_path / "late.jsonl"
    write_jsonl(path, DOCS[:80])
    with open(path, "a") as f:
        f.write('{"body": "no text here"}\n')
    data = build(tok, str(path))
    with pytest.raises(ValueError, match="no 'text' field"):
        for _ in range(200):
            data.train.next_batch(8)
