"""Every source kind reads its documents in a fixed order and resumes exactly from a position."""

import pytest

from bitnet.data.sources import open_source
from tests.data.conftest import DOCS, write_fineweb_parquet, write_jsonl

LOCAL_KINDS = ["txt_dir", "jsonl", "jsonl_gz", "parquet", "jsonl_glob"]


def read_all(source, position=None) -> list[str]:
    return list(source.open(position))


@pytest.mark.parametrize("kind", LOCAL_KINDS)
def test_local_sources_read_every_document_in_order(corpus, kind):
    assert read_all(open_source(corpus[kind])) == DOCS


def test_a_directory_reads_its_files_in_sorted_order(corpus):
    directory = corpus["jsonl_glob"].rsplit("/", 1)[0]
    assert read_all(open_source(directory)) == DOCS


@pytest.mark.parametrize("kind", LOCAL_KINDS + ["fineweb"])
def test_position_resumes_after_any_document(corpus, kind, fake_hub):
    source = open_source("fineweb-edu" if kind == "fineweb" else corpus[kind])
    for cut in (1, 17, 40, 41, 119):  # mid-file, at a parquet row-group edge, at a file edge, the last
        reader = source.open()
        docs = iter(reader)
        head = [next(docs) for _ in range(cut)]
        position = reader.position()
        assert head + read_all(source, position) == DOCS, cut


def test_fake_fineweb_goes_through_datasets_streaming(fake_hub):
    import datasets
    source = open_source("fineweb-edu")
    reader = source.open()
    assert isinstance(reader.ds, datasets.IterableDataset)  # the real streaming object, not a stand-in
    assert read_all(source) == DOCS


def test_hf_spec_with_config_and_jsonl_builder(fake_hub, corpus):
    fake_hub[("someone/corpus", "en")] = ("json", [corpus["jsonl"]])
    assert read_all(open_source("hf:someone/corpus:en")) == DOCS


def test_embedded_source_reads_the_packaged_corpus():
    source = open_source("embedded")
    reader = source.open({"row": 247})
    assert len(list(reader)) == 2 and source.identity()["documents"] == 249


def one_line_error(spec_or_fn) -> str:
    with pytest.raises(ValueError) as e:
        if callable(spec_or_fn):
            spec_or_fn()
        else:
            read_all(open_source(spec_or_fn))
    message = str(e.value)
    assert "\n" not in message and message
    return message


def test_unknown_source():
    assert "unknown data source 'wikipedia'" in one_line_error("wikipedia")


def test_glob_matching_nothing(tmp_path):
    assert "matches no files" in one_line_error(str(tmp_path / "*.jsonl"))


def test_missing_file(tmp_path):
    assert "no such file" in one_line_error(str(tmp_path / "absent.jsonl"))


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl", "empty.parquet", "blank.jsonl"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    if name == "empty.parquet":
        write_fineweb_parquet(path, [])
    elif name == "blank.jsonl":
        path.write_text("\n\n")
    else:
        path.write_text("")
    assert "empty file" in one_line_error(str(path))


def test_jsonl_without_text_field(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", ["a", "b"], key="content")
    assert "no 'text' field" in one_line_error(str(path))


def test_jsonl_with_a_broken_line(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text('{"text": "fine"}\n{"text": broken\n')
    assert "invalid JSON at byte 17" in one_line_error(str(path))


def test_parquet_without_text_column(tmp_path):
    path = write_fineweb_parquet(tmp_path / "c.parquet", ["a", "b"], text_column="content")
    assert "no 'text' column" in one_line_error(str(path))


def test_hf_dataset_without_text_column(fake_hub, tmp_path):
    fake_hub[("someone/no-text", None)] = ("parquet", [str(write_fineweb_parquet(tmp_path / "n.parquet", ["a"],
                                                                                  text_column="body"))])
    assert "no 'text' column" in one_line_error("hf:someone/no-text")


def test_hf_dataset_that_does_not_exist(fake_hub):
    assert "cannot open HF dataset nobody/nothing" in one_line_error("hf:nobody/nothing")


def test_datasets_too_old_or_missing(monkeypatch):
    import sys

    import datasets
    monkeypatch.setattr(datasets, "__version__", "4.4.1")
    assert ">= 5.0.1" in one_line_error("fineweb-edu")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as on a GPU box without `datasets`
    assert "pip install" in one_line_error("fineweb-edu")


def test_shards_spec_is_not_a_document_source():
    assert "already tokenized" in one_line_error("shards:/nowhere")
