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
    assert evals == split_eval_documents(249, 25)[1] and len(evals) == 10
