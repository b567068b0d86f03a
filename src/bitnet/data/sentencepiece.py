"""Read a SentencePiece `tokenizer.model` and rebuild it as an HF `tokenizers.Tokenizer`.

A `.model` file is a protobuf `ModelProto` (sentencepiece_model.proto): pieces with scores and
types, a TrainerSpec (model type, byte fallback) and a NormalizerSpec. We decode the few fields
we need with a 40-line wire-format reader, so neither `sentencepiece` nor `protobuf` is needed.
BPE models (LLaMA's) become a `tokenizers` BPE whose merges are ranked by the merged piece's
score, which is how SentencePiece's BPE picks merges; unigram models become a `Unigram`.
"""

import struct

from tokenizers import Tokenizer, decoders, normalizers
from tokenizers.models import BPE, Unigram

# sentencepiece_model.proto: SentencePiece.Type and TrainerSpec.ModelType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM_MODEL, BPE_MODEL = 1, 2
SPACE = "\u2581"


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes):
    """Yield (field_number, value) of one protobuf message; value is int, bytes or a 4/8-byte blob."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
            if i > len(buf):
                raise ValueError("truncated field")
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def read_model_proto(data: bytes) -> dict:
    """The parts of a ModelProto we use: pieces [(piece, score, type)], trainer and normalizer fields."""
    pieces, trainer, normalizer = [], {}, {}
    for number, value in _fields(data):
        if number == 1:  # repeated SentencePiece {1: piece, 2: score (float), 3: type}
            piece, score, kind = "", 0.0, NORMAL
            for n, v in _fields(value):
                if n == 1:
                    piece = v.decode("utf-8")
                elif n == 2:
                    score = struct.unpack("<f", v)[0]
                elif n == 3:
                    kind = v
            pieces.append((piece, score, kind))
        elif number == 2:  # TrainerSpec: 3 model_type, 35 byte_fallback, 40 unk_id
            trainer = dict(_fields(value))
        elif number == 3:  # NormalizerSpec: 1 name, 2 precompiled_charsmap, 3 add_dummy_prefix, 4 remove_extra_whitespaces
            normalizer = dict(_fields(value))
    if not pieces:
        raise ValueError("no pieces (not a SentencePiece model)")
    return {"pieces": pieces, "trainer": trainer, "normalizer": normalizer}


def _bpe_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces is a merge; higher-scored results merge first."""
    ranked = []
    for piece, score in scores.items():
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        ranked.extend((-score, vocab[piece], j, pair) for j, pair in enumerate(splits))
    ranked.sort(key=lambda r: r[:3])
    return [pair for *_, pair in ranked]


def tokenizer_from_sentencepiece(data: bytes) -> Tokenizer:
    """Build the equivalent `tokenizers.Tokenizer` (no special tokens added by its post-processor)."""
    proto = read_model_proto(data)
    pieces, trainer, norm = proto["pieces"], proto["trainer"], proto["normalizer"]
    model_type = trainer.get(3, UNIGRAM_MODEL)
    byte_fallback = bool(trainer.get(35, 0))
    unk_id = trainer.get(40, 0)
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    if model_type == BPE_MODEL:
        # Only ordinary pieces take part in merges (control, unknown and byte pieces never do).
        scores = {p: s for p, s, t in pieces if t in (NORMAL, USER_DEFINED)}
        model = BPE(vocab=vocab, merges=_bpe_merges(vocab, scores), unk_token=pieces[unk_id][0],
                    fuse_unk=True, byte_fallback=byte_fallback)
    elif model_type == UNIGRAM_MODEL:
        model = Unigram([(p, s) for p, s, _ in pieces], unk_id=unk_id, byte_fallback=byte_fallback)
    else:
        raise ValueError(f"SentencePiece model type {model_type} is not supported (only BPE and unigram)")
    tok = Tokenizer(model)
    steps = []
    charsmap = norm.get(2, b"")
    if charsmap:
        steps.append(normalizers.Precompiled(charsmap))
    if norm.get(4, 1):  # remove_extra_whitespaces (default on; LLaMA turns it off)
        steps += [normalizers.Replace(normalizers.Regex(" {2,}"), " "), normalizers.Strip()]
    if norm.get(3, 1):  # add_dummy_prefix: a leading space, as SentencePiece adds
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace(SPACE, " ")]
    if byte_fallback:
        decode.append(decoders.ByteFallback())
    decode.append(decoders.Fuse())
    if norm.get(3, 1):
        decode.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(decode)
    tok.add_special_tokens([p for p, _, t in pieces if t in (CONTROL, UNKNOWN)])
    return tok
