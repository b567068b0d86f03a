"""benchmarks/long_run.py's corpus packing: which files become documents, and which are held out."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "long_run.py"


def load_script():
    spec = importlib.util.spec_from_file_location("long_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tree(root: Path) -> None:
    (root / "pkg" / "sub").mkdir(parents=True)
    for i in range(6):
        (root / "pkg" / f"m{i}.py").write_text(f"def f{i}():\n    return {i}\n" * (i + 1))
    (root / "pkg" / "sub" / "README.md").write_text("# title\n\ntext\n")
    (root / "pkg" / "sub" / "api.h").write_text("int f(void);\n")
    (root / "pkg" / "copy.py").write_text((root / "pkg" / "m0.py").read_text())  # exact duplicate
    (root / "pkg" / "empty.txt").write_text("  \n")
    (root / "pkg" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8
    (root / "pkg" / "data.json").write_text("{}")  # not a text suffix
    (root / "pkg" / "link.py").symlink_to(root / "pkg" / "m1.py")  # the same file twice


def test_pack_corpus_keeps_unique_utf8_text_files_and_holds_out_the_first(tmp_path):
    long_run = load_script()
    make_tree(tmp_path / "root")
    out = tmp_path / "corpus.jsonl"
    info = long_run.pack_corpus([str(tmp_path / "root"), str(tmp_path / "missing")], out, eval_chars=40)
    docs = [json.loads(line)["text"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert info["files_found"] == 11  # 6 + README.md + api.h + copy.py + empty.txt + latin1.txt (link = m1.py)
    assert info["skipped"] == {"too_large": 0, "not_utf8": 1, "empty": 1, "duplicate": 1}
    assert info["documents"] == len(docs) == 8
    assert sorted(docs) == sorted([f"def f{i}():\n    return {i}\n" * (i + 1) for i in range(6)]
                                  + ["# title\n\ntext\n", "int f(void);\n"])
    assert info["roots"] == [str(tmp_path / "root")]
    # held out: the fewest leading documents that reach eval_chars
    lengths = [len(d) for d in docs]
    n = info["eval_docs"]
    assert sum(lengths[:n]) >= 40 > sum(lengths[:n - 1])
    assert info["eval_chars"] == sum(lengths[:n])
    # the order is a fixed shuffle: the same files give the same corpus
    again = tmp_path / "again.jsonl"
    long_run.pack_corpus([str(tmp_path / "root")], again, eval_chars=40)
    assert again.read_bytes() == out.read_bytes()
