"""Small local corpora in every supported format, the vendored tokenizer, and a fake FineWeb-Edu.

The fake FineWeb-Edu is parquet in the real schema (id, text, url, score, ...), served through the
real `datasets.load_dataset(..., streaming=True)`: only the repo name is redirected to local files.
"""

import gzip
import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bitnet.data import load_tokenizer  # noqa: E402
from bitnet.data.tokens import frame_texts  # noqa: E402

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which "
         "Congress nation people government year war peace law trade Union States citizens").split()
EXTRA = ["naïve café", "日本語", "\U0001F999", "\n\n", "  spaced  ", "x=1;", "§ 12"]


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Deterministic documents of 3..250 words, some with unicode, newlines and odd spacing."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 250))]
        if i % 7 == 0:
            words.insert(rng.randint(0, len(words)), rng.choice(EXTRA))
        docs.append(f"Doc {i}: " + " ".join(words) + ".")
    return docs


DOCS = make_docs(120)


def framed(tok, docs) -> np.ndarray:
    """The token stream a reader of `docs` must produce: [BOS] ids [EOS] per document."""
    return frame_texts(tok, list(docs))[0]


def windows_of(stream: np.ndarray, window: int) -> list[tuple]:
    n = len(stream) // window
    return [tuple(r) for r in stream[:n * window].reshape(n, window).tolist()]


def write_jsonl(path, docs, gz=False, key="text"):
    rows = "".join(json.dumps({"id": i, key: d}) + "\n" for i, d in enumerate(docs))
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(rows)
    else:
        path.write_text(rows, encoding="utf-8")
    return path


def write_fineweb_parquet(path, docs, start_id=0, row_group_size=17, text_column="text"):
    """Parquet in FineWeb-Edu's schema (its column names and types)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    n = len(docs)
    table = pa.table({
        text_column: docs,
        "id": [f"<urn:uuid:{start_id + i:08d}>" for i in range(n)],
        "dump": ["CC-MAIN-2024-10"] * n,
        "url": [f"https://example.org/{start_id + i}" for i in range(n)],
        "file_path": ["s3://commoncrawl/fake.warc.gz"] * n,
        "language": ["en"] * n,
        "language_score": [0.97] * n,
        "token_count": [len(d.split()) for d in docs],
        "score": [3.2] * n,
        "int_score": [3] * n,
    })
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


@pytest.fixture(scope="session")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """DOCS written in every local format; returns {kind: spec}."""
    root = tmp_path_factory.mktemp("corpus")
    txt = root / "txt"
    txt.mkdir()
    for i, d in enumerate(DOCS):
        (txt / f"doc_{i:04d}.txt").write_text(d, encoding="utf-8")
    parts = root / "parts"
    parts.mkdir()
    for k in range(3):
        write_jsonl(parts / f"part_{k}.jsonl", DOCS[k * 40:(k + 1) * 40])
    write_jsonl(root / "all.jsonl", DOCS)
    write_jsonl(root / "all.jsonl.gz", DOCS, gz=True)
    write_fineweb_parquet(root / "all.parquet", DOCS)
    fineweb = root / "fineweb"
    fineweb.mkdir()
    for k in range(3):  # sample-10BT is many parquet files; three stand in for them
        write_fineweb_parquet(fineweb / f"{k:03d}_00000.parquet", DOCS[k * 40:(k + 1) * 40], start_id=k * 40)
    return {"txt_dir": str(txt), "jsonl": str(root / "all.jsonl"), "jsonl_gz": str(root / "all.jsonl.gz"),
            "parquet": str(root / "all.parquet"), "jsonl_glob": str(parts / "part_*.jsonl"),
            "fineweb_dir": str(fineweb)}


@pytest.fixture
def fake_hub(monkeypatch, corpus):
    """Redirect hub repo names to local files at the `datasets.load_dataset` boundary.

    Returns the mapping, so a test can add repos: name -> (builder, data_files).
    """
    datasets = pytest.importorskip("datasets")
    real = datasets.load_dataset
    fineweb = sorted(str(p) for p in __import__("pathlib").Path(corpus["fineweb_dir"]).glob("*.parquet"))
    repos = {("HuggingFaceFW/fineweb-edu", "sample-10BT"): ("parquet", fineweb)}

    def load_dataset(path, name=None, **kwargs):
        if (path, name) in repos:
            builder, files = repos[(path, name)]
            return real(builder, data_files={"train": files}, **kwargs)
        raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return repos
