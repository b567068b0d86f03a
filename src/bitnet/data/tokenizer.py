"""Tokenizers: the vendored LLaMA-2 tokenizer by default, a local `tokenizer.json`, a SentencePiece
`tokenizer.model` (converted in-process, data/sentencepiece.py), a directory holding either, or a
hub name.

Every document is encoded WITHOUT the tokenizer's own special tokens and then framed as
`[BOS] + ids + [EOS]` by the packing code (data/tokens.py), so document boundaries are explicit
whatever the tokenizer's post-processor does.
"""

import gzip
import hashlib
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer

from bitnet.data.sentencepiece import tokenizer_from_sentencepiece

VENDORED = "llama2"


class TextTokenizer:
    """Thin wrapper over HF `tokenizers.Tokenizer` with the ids and hashes the pipeline needs."""

    def __init__(self, tokenizer: Tokenizer, name: str):
        self.tok = tokenizer
        self.name = name
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._special(("<s>", "<|begin_of_text|>", "<|endoftext|>", "<bos>"))
        self.eos_id = self._special(("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"))

    def _special(self, candidates) -> int:
        for piece in candidates:
            i = self.tok.token_to_id(piece)
            if i is not None:
                return i
        raise ValueError(f"tokenizer {self.name!r} has none of the special tokens {candidates}")

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts; HF tokenizers spreads the batch over all cores."""
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def vocab_hash(self) -> str:
        """sha256 over the sorted (piece, id) pairs: identifies the vocabulary, not the file."""
        items = sorted(self.tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        return hashlib.sha256("\n".join(f"{i}\t{p}" for p, i in items).encode()).hexdigest()


def load_tokenizer(spec: str = VENDORED) -> TextTokenizer:
    """'llama2' (vendored), a tokenizer.json / tokenizer.model path, a directory holding one, or a hub name."""
    if spec == VENDORED:
        blob = resources.files("bitnet.data").joinpath("assets/llama2_tokenizer.json.gz").read_bytes()
        return TextTokenizer(Tokenizer.from_str(gzip.decompress(blob).decode()), VENDORED)
    path = Path(spec)
    if path.is_dir():
        found = [path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).is_file()]
        if not found:
            raise ValueError(f"tokenizer directory {path} holds neither tokenizer.json nor tokenizer.model")
        path = found[0]
    if path.suffix in (".json", ".model") or path.exists():
        if not path.is_file():
            raise ValueError(f"tokenizer file not found: {path}")
        try:
            if path.suffix == ".model":
                return TextTokenizer(tokenizer_from_sentencepiece(path.read_bytes()), str(path))
            return TextTokenizer(Tokenizer.from_file(str(path)), str(path))
        except Exception as e:  # tokenizers raises bare Exceptions on malformed files
            raise ValueError(f"cannot read tokenizer {path}: {_first_line(e)}") from None
    try:
        return TextTokenizer(Tokenizer.from_pretrained(spec), spec)
    except Exception as e:
        raise ValueError(f"cannot load tokenizer {spec!r} (not a local file, hub unreachable or unknown): "
                         f"{_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
