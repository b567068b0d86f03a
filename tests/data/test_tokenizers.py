"""Tokenizers: the vendored LLaMA-2 ids, a SentencePiece tokenizer.model, directories, the vocab guard."""

import struct

import pytest

from bitnet.data import load_tokenizer
from bitnet.data.sentencepiece import read_model_proto
from tests.data.conftest import DOCS

SAMPLE = DOCS[:20] + ["Hello world", " grabbed", "\n", "\ttabs\t\t\t\tout here", "\U0001F999", "naïve café 日本語"]


def test_hello_world_is_bos_15043_3186(tok):
    assert tok.encode("Hello world", add_bos=True) == [1, 15043, 3186]
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    if wire == 2:
        payload = _varint(len(payload)) + payload
    return _varint(number << 3 | wire) + payload


def write_sentencepiece_model(path, tok) -> None:
    """A LLaMA-style SentencePiece BPE model of `tok`'s vocabulary, written with the protobuf wire
    format. A piece's score is minus the rank of the first merge that makes it (SentencePiece merges
    the highest-scored piece first); pieces no merge makes get -1e9, as in LLaMA's own file."""
    import json
    merges = json.loads(tok.tok.to_str())["model"]["merges"]
    rank = {}
    for r, m in enumerate(merges):
        rank.setdefault("".join(m.split(" ") if isinstance(m, str) else m), r)
    pieces = b""
    for piece, i in sorted(tok.tok.get_vocab().items(), key=lambda kv: kv[1]):
        kind = 2 if i == 0 else 3 if i in (1, 2) else 6 if piece.startswith("<0x") else 1
        score = 0.0 if kind != 1 else -float(rank.get(piece, 1e9))
        pieces += _field(1, 2, _field(1, 2, piece.encode()) + _field(2, 5, struct.pack("<f", score))
                         + _field(3, 0, _varint(kind)))
    trainer = _field(3, 0, _varint(2)) + _field(35, 0, _varint(1)) + _field(40, 0, _varint(0))
    normalizer = _field(1, 2, b"identity") + _field(3, 0, _varint(1)) + _field(4, 0, _varint(0))
    path.write_bytes(pieces + _field(2, 2, trainer) + _field(3, 2, normalizer))


def test_sentencepiece_model_encodes_like_the_vendored_tokenizer(tok, tmp_path):
    write_sentencepiece_model(tmp_path / "tokenizer.model", tok)
    assert len(read_model_proto((tmp_path / "tokenizer.model").read_bytes())["pieces"]) == 32000
    sp = load_tokenizer(str(tmp_path / "tokenizer.model"))
    assert sp.vocab_hash() == tok.vocab_hash() and (sp.bos_id, sp.eos_id) == (1, 2)
    assert sp.encode_batch(SAMPLE) == tok.encode_batch(SAMPLE)
    assert sp.decode(sp.encode("naïve café 日本語")) == "naïve café 日本語"
    assert load_tokenizer(str(tmp_path)).vocab_hash() == tok.vocab_hash()  # a directory holding it


def test_directory_prefers_tokenizer_json(tok, tmp_path):
    tok.tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer.model").write_bytes(b"not read")
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.name.endswith("tokenizer.json") and loaded.encode("Hello world") == [15043, 3186]


@pytest.mark.parametrize("make,message", [
    (lambda p: p, "neither tokenizer.json nor tokenizer.model"),
    (lambda p: p / "missing.model", "tokenizer file not found"),
    (lambda p: p / "bad.model" if (p / "bad.model").write_bytes(b"\x0a\xff\xff") else None, "cannot read tokenizer"),
])
def test_bad_tokenizer_paths_are_one_line_errors(tmp_path, make, message):
    with pytest.raises(ValueError, match=message) as e:
        load_tokenizer(str(make(tmp_path)))
    assert "\n" not in str(e.value)


def test_a_tokenizer_larger_than_the_model_vocab_is_refused(tmp_path):
    from dataclasses import replace

    from bitnet.model import PRESETS
    from bitnet.train.config import TrainConfig
    from bitnet.train.loop import train
    cfg = TrainConfig(preset="tiny", data="embedded", runs_dir=str(tmp_path), run_id="r", device="cpu",
                      compile="off", num_steps=2, warmup_steps=0, batch_size=2, seq_len=16, eval_sequences=2)
    with pytest.raises(ValueError, match="32000 tokens, more than the model's vocab_size 1000"):
        train(cfg, replace(PRESETS["tiny"], vocab_size=1000), quiet=True)
    assert not (tmp_path / "r").exists()  # refused before anything was written
