"""Token shards: the header, corrupt files, and training on shards (memmap, exact resume, ranks)."""

import numpy as np
import pytest

from bitnet.data import build_data
from bitnet.data.prepare import prepare
from bitnet.data.shards import HEADER_BYTES, open_shard, read_header, write_shard
from tests.data.conftest import DOCS, framed


def test_header_round_trip(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    write_shard(tmp_path / "s.bin", tokens, 32000, 1, 2)
    head = read_header(tmp_path / "s.bin")
    assert head == {"dtype": np.uint16, "vocab_size": 32000, "num_tokens": 1000, "bos_id": 1, "eos_id": 2}
    raw = (tmp_path / "s.bin").read_bytes()
    assert raw[:8] == b"BNTOKENS" and len(raw) == HEADER_BYTES + 2000
    mm = open_shard(tmp_path / "s.bin")
    assert isinstance(mm, np.memmap) and np.array_equal(mm, tokens)


@pytest.mark.parametrize("damage,message", [
    (lambda raw: b"GARBAGE!" + raw[8:], "magic"),
    (lambda raw: raw[:40], "shorter than the 64-byte header"),
    (lambda raw: raw[:-2], "header says 1000 tokens"),
    (lambda raw: raw[:8] + (7).to_bytes(4, "little") + raw[12:], "format version 7"),
    (lambda raw: raw[:16] + (3).to_bytes(4, "little") + raw[20:], "3 bytes per token"),
])
def test_corrupt_shard_header_is_a_one_line_error(tmp_path, damage, message):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(1000, dtype=np.uint16), 32000, 1, 2)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match="corrupt shard header") as e:
        open_shard(path)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def shards(tok, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    manifest = prepare(corpus["jsonl"], str(out), shard_tokens=3000, eval_docs=10, workers=1, progress=False)
    return out, manifest


def test_round_trip_prepare_memmap_gives_the_framed_documents(tok, shards):
    out, manifest = shards
    train = np.concatenate([open_shard(out / s["file"]) for s in manifest["shards"]])
    assert np.array_equal(train, framed(tok, DOCS[10:]))
    assert np.array_equal(open_shard(out / "eval.bin"), framed(tok, DOCS[:10]))
    assert len(manifest["shards"]) > 3 and all(s["tokens"] >= 3000 for s in manifest["shards"][:-1])
    assert all(open_shard(out / s["file"])[-1] == tok.eos_id for s in manifest["shards"])  # cut at document ends


def test_training_reads_shards_by_memmap_and_resumes_exactly(tok, shards):
    spec = f"shards:{shards[0]}"
    straight = build_data(spec, tok, 32, 5, 4, 2)
    assert all(isinstance(s, np.memmap) for s in straight.train.segments)
    n = straight.train.num_windows
    reference = [straight.train.next_batch(6)[0] for _ in range(2 * n // 6 + 3)]  # into the third epoch
    for cut in (1, 13, n // 6 + 1):
        first = build_data(spec, tok, 32, 5, 4, 2)
        for _ in range(cut):
            first.train.next_batch(6)
        resumed = build_data(spec, tok, 32, 5, 4, 2)
        resumed.train.load_state_dict(first.train.state_dict())
        for step in range(cut, len(reference)):
            assert np.array_equal(resumed.train.next_batch(6)[0], reference[step]), (cut, step)
    per_epoch = n // 6
    assert not np.array_equal(np.concatenate(reference[:per_epoch]), np.concatenate(reference[per_epoch + 1:2 * per_epoch + 1]))


def test_shard_windows_cover_each_shard_without_crossing_its_end(tok, shards):
    out, manifest = shards
    data = build_data(f"shards:{out}", tok, 32, 5, 4, 2)
    window = 33
    expected = set()
    for s in manifest["shards"]:
        arr = np.asarray(open_shard(out / s["file"]))
        expected.update(tuple(r) for r in arr[:len(arr) // window * window].reshape(-1, window).tolist())
    x, y = data.train.next_batch(data.train.num_windows)
    got = {tuple(r) for r in np.concatenate([x.numpy(), y[:, -1:].numpy()], axis=1).tolist()}
    assert got == expected and data.train.epoch == 0


def test_two_ranks_split_the_shard_stream(tok, shards):
    spec = f"shards:{shards[0]}"
    single = build_data(spec, tok, 32, 5, 4, 2)
    ranks = [build_data(spec, tok, 32, 5, 4, 2, rank=r, world_size=2) for r in range(2)]
    for _ in range(20):
        x = single.train.next_batch(8)[0]
        a, b = (r.train.next_batch(8)[0] for r in ranks)
        assert np.array_equal(a, x[0::2]) and np.array_equal(b, x[1::2])
        assert not {tuple(r) for r in a.tolist()} & {tuple(r) for r in b.tolist()}


def test_eval_comes_from_the_held_out_documents(tok, shards):
    data = build_data(f"shards:{shards[0]}", tok, 32, 5, 4, 2)
    x, y = data.eval[0]
    assert np.array_equal(x[0].numpy(), framed(tok, DOCS[:10])[:32])


def test_shards_of_another_tokenizer_are_refused(tok, shards, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    small = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "the": 3}, unk_token="<unk>"))
    small.pre_tokenizer = pre_tokenizers.Whitespace()
    small.save(str(tmp_path / "tokenizer.json"))
    from bitnet.data import load_tokenizer
    with pytest.raises(ValueError, match="another vocabulary"):
        build_data(f"shards:{shards[0]}", load_tokenizer(str(tmp_path)), 32, 5, 4, 2)


def test_unfinished_or_missing_shards_directory(tmp_path, tok):
    with pytest.raises(ValueError, match="shards directory not found"):
        build_data(f"shards:{tmp_path / 'nope'}", tok, 32, 5, 4, 2)
    with pytest.raises(ValueError, match="no manifest.json"):
        build_data(f"shards:{tmp_path}", tok, 32, 5, 4, 2)
