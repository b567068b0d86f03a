"""bitnet-prepare-data: all cores, atomic shards, a manifest with hashes, resume after interruption."""

import json

import numpy as np
import pytest

from bitnet.data import prepare as prepare_module
from bitnet.cli.prepare import main
from bitnet.data.prepare import prepare
from bitnet.data.shards import open_shard, sha256_file
from tests.data.conftest import DOCS, framed


def files(out) -> dict:
    return {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.suffix == ".bin"}


REAL_WRITE = prepare_module.write_shard


def interrupt_after(monkeypatch, n_writes: int):
    """Count shard writes; make the (n_writes + 1)-th die like a killed process."""
    real = REAL_WRITE
    calls = []

    def write_shard(*args, **kwargs):
        calls.append(args[0].name)
        if len(calls) > n_writes:  # killed halfway through writing the temp file
            args[0].with_name(args[0].name + ".tmp").write_bytes(b"BNTOKENS half a shard")
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "write_shard", write_shard)
    return calls


@pytest.mark.parametrize("kind", ["jsonl", "fineweb"])
def test_interrupted_prepare_resumes_to_identical_shards(tmp_path, corpus, fake_hub, monkeypatch, kind):
    spec = "fineweb-edu" if kind == "fineweb" else corpus["jsonl"]
    opts = dict(shard_tokens=2500, eval_docs=7, workers=1, progress=False)
    prepare(spec, str(tmp_path / "straight"), **opts)

    out = tmp_path / "interrupted"
    calls = interrupt_after(monkeypatch, 3)  # eval.bin and two training shards get written
    with pytest.raises(KeyboardInterrupt):
        prepare(spec, str(out), **opts)
    partial = json.loads((out / "manifest.json").read_text())
    assert not partial["complete"] and len(partial["shards"]) == 2
    assert not (out / "train_000002.bin").exists()  # the half-written shard is not under a shard's name
    written = interrupt_after(monkeypatch, 10_000)
    manifest = prepare(spec, str(out), **opts)
    assert written[0] == "train_000002.bin"  # finished shards were skipped, not rewritten
    assert calls[:3] == ["eval.bin", "train_000000.bin", "train_000001.bin"]
    assert manifest["complete"] and files(out) == files(tmp_path / "straight")
    assert not list(out.glob("*.tmp"))
    for entry in manifest["shards"] + [manifest["eval"]]:
        assert sha256_file(out / entry["file"]) == entry["sha256"]
        assert len(open_shard(out / entry["file"])) == entry["tokens"]


def test_worker_processes_give_the_same_shards(tmp_path, corpus, tok):
    one = prepare(corpus["jsonl_glob"], str(tmp_path / "one"), shard_tokens=4000, eval_docs=5, workers=1,
                  progress=False)
    two = prepare(corpus["jsonl_glob"], str(tmp_path / "two"), shard_tokens=4000, eval_docs=5, workers=2,
                  progress=False)
    assert files(tmp_path / "one") == files(tmp_path / "two")
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]
    train = np.concatenate([open_shard(tmp_path / "two" / s["file"]) for s in two["shards"]])
    assert np.array_equal(train, framed(tok, DOCS[5:]))


def test_manifest_records_tokenizer_and_settings(tmp_path, corpus, tok):
    manifest = prepare(corpus["parquet"], str(tmp_path), shard_tokens=10_000, eval_docs=3, workers=1, progress=False)
    assert manifest["tokenizer"] == "llama2" and manifest["vocab_hash"] == tok.vocab_hash()
    assert manifest["dtype"] == "uint16" and manifest["eval"]["docs"] == 3
    assert manifest["train_docs"] == len(DOCS) - 3
    with pytest.raises(ValueError, match="other settings \\(shard_tokens"):
        prepare(corpus["parquet"], str(tmp_path), shard_tokens=5000, eval_docs=3, workers=1, progress=False)


def test_cli_success_and_one_line_errors(tmp_path, corpus, capsys):
    assert main(["--data", corpus["txt_dir"], "--out", str(tmp_path / "o"), "--shard-tokens", "5000",
                 "--eval-docs", "4", "--workers", "2", "--no-progress", "--verify"]) == 0
    assert "training tokens" in capsys.readouterr().out
    for argv, message in [(["--data", "nonsense"], "unknown data source"),
                          (["--data", str(tmp_path / "*.jsonl")], "matches no files"),
                          (["--data", corpus["jsonl"], "--eval-docs", "500"], "fewer than --eval-docs 500")]:
        assert main(argv + ["--out", str(tmp_path / "x"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
