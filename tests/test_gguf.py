"""bitnet-export --format gguf: a file llama.cpp runs as its `bitnet` architecture (issue 23).

Two layers of tests:
- the file itself, read back with the `gguf` package (a dev dependency): every ternary weight times
  its output scale is exactly our dequantized weight, types and fallbacks, metadata, vocabulary,
  bad input;
- llama.cpp itself through llama-cpp-python, on a model with widths a multiple of 256 trained a
  few hundred steps on the embedded corpus: same token ids, teacher-forced top-1 agreement with our
  ternary inference, identical greedy continuations. These skip when llama-cpp-python is not
  installed: it compiles llama.cpp from source (minutes on 2 cores), so scripts/run_tests.sh builds
  it only on request (BITNET_LLAMA_CPP=1) and then reuses the cached wheel.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from bitnet.data.embedded import embedded_documents
from bitnet.data.tokenizer import load_tokenizer
from bitnet.export import main, to_ternary_inference
from bitnet.export.gguf_export import GGUF_TYPES, export_gguf, gguf_name
from bitnet.export.ternary import ternary_layers
from bitnet.generation import generate
from bitnet.model import PRESETS, ModelConfig, Transformer

from .test_export import save_ckpt

HAS_GGUF = importlib.util.find_spec("gguf") is not None
HAS_LLAMA = importlib.util.find_spec("llama_cpp") is not None
needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="the gguf package is not installed (pip install -e '.[dev]')")
needs_llama = pytest.mark.skipif(
    not (HAS_GGUF and HAS_LLAMA),
    reason="llama-cpp-python is not installed: it compiles llama.cpp (600+ CPU-seconds: 5+ min on 2 cores), so it is opt-in: "
           "BITNET_LLAMA_CPP=1 bash scripts/run_tests.sh builds it once and caches the wheel")

# every row (input width) a multiple of 256: all linears TQ2_0, no fallback
WIDE = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, max_seq_len=256)
TRAIN_STEPS = 300


def make_model(seed: int = 1, **overrides) -> Transformer:
    model = Transformer(ModelConfig(**{**PRESETS["tiny"].to_dict(), **overrides}))
    model.init_weights(seed=seed)
    return model.eval()


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def read(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


def field(reader, key):
    return reader.fields[key].contents()


def dequantized(tensor) -> np.ndarray:
    """A GGUF tensor as fp32 (rows, row length), through gguf-py's own dequantizers."""
    import gguf

    data = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape(int(tensor.shape[1]), int(tensor.shape[0]))


# ---------------------------------------------------------------------------- the file (gguf package)

@needs_gguf
@pytest.mark.parametrize("gguf_type", GGUF_TYPES)
def test_ternary_weights_round_trip_exactly(gguf_type, tmp_path):
    model = make_model(**WIDE)
    report = export_gguf(model, tmp_path / "m.gguf", gguf_type=gguf_type)
    assert not report.fallbacks
    reader, tensors = read(tmp_path / "m.gguf")
    layers = ternary_layers(model)
    assert len(layers) == 7 * WIDE["n_layers"]
    for name, (w_t, s) in layers.items():
        weight, scale = tensors[gguf_name(name) + ".weight"], tensors[gguf_name(name) + ".scale"]
        assert weight.tensor_type.name == gguf_type.upper()
        assert scale.tensor_type.name == "F32" and scale.n_elements == 1
        w = dequantized(weight)
        assert set(np.unique(w)) <= {-1.0, 0.0, 1.0}  # block scales are exactly 1: the values are W_t
        # llama.cpp multiplies the matmul's output by the scale: W_t * (1 / s), bit for bit ours
        ours = (w_t.float() / s).numpy()
        assert np.array_equal(w * np.float32(scale.data[0]), ours), name
    embd = tensors["token_embd.weight"]
    assert embd.tensor_type.name == "F16" and "output.weight" not in tensors  # tied: the head reads token_embd
    assert np.array_equal(dequantized(embd), model.embed_tokens.weight.detach().numpy().astype(np.float16))
    assert np.array_equal(np.asarray(tensors["blk.1.ffn_sub_norm.weight"].data),
                          model.layers[1].mlp.ffn_sub_norm.weight.detach().numpy())
    assert tensors["blk.0.attn_sub_norm.weight"].tensor_type.name == "F32"
    assert field(reader, "general.file_type") == {"tq2_0": 37, "tq1_0": 36, "f16": 1}[gguf_type]


@needs_gguf
def test_metadata_and_vocabulary(tmp_path):
    import gguf

    model = make_model(**WIDE)
    export_gguf(model, tmp_path / "m.gguf")
    reader, _ = read(tmp_path / "m.gguf")
    c = model.cfg
    expected = {"general.architecture": "bitnet", "bitnet.embedding_length": c.dim, "bitnet.block_count": c.n_layers,
                "bitnet.feed_forward_length": c.ffn_dim, "bitnet.attention.head_count": c.n_heads,
                "bitnet.attention.head_count_kv": c.n_kv_heads, "bitnet.context_length": c.max_seq_len,
                "bitnet.rope.dimension_count": c.head_dim, "bitnet.rope.freq_base": c.rope_theta,
                "tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
                "tokenizer.ggml.add_eos_token": False, "tokenizer.ggml.add_space_prefix": True}
    for key, value in expected.items():
        assert field(reader, key) == value, key
    assert field(reader, "bitnet.attention.layer_norm_rms_epsilon") == pytest.approx(c.norm_eps)
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    scores = field(reader, "tokenizer.ggml.scores")
    tok = load_tokenizer("llama2")
    assert len(tokens) == len(types) == len(scores) == c.vocab_size == tok.vocab_size
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[13] == "<0x0A>" and tokens[450] == "\u2581The"
    T = gguf.TokenType
    assert types[:3] == [T.UNKNOWN, T.CONTROL, T.CONTROL]
    assert set(types[3:259]) == {T.BYTE} and set(types[259:]) == {T.NORMAL}
    # SentencePiece merges the highest-scoring pair first: the first merge of tokenizer.json ("▁ t") scores highest
    normal = scores[259:]
    assert max(normal) == scores[tokens.index("\u2581t")] == 0.0
    assert scores[tokens.index("er")] == -1.0 and scores[tokens.index("\u2581The")] < scores[tokens.index("\u2581t")]


@needs_gguf
def test_rows_not_a_multiple_of_256_fall_back_exactly(tmp_path, capsys):
    # tiny: width 64 (Q8_0, a multiple of 32) but ffn_down rows of 256 (TQ2_0)
    model = make_model()
    ckpt = save_ckpt(tmp_path / "run", model)
    rc, out, err = run_cli(capsys, ckpt, "--format", "gguf", "--out", tmp_path / "tiny.gguf")
    assert rc == 0, err
    assert "12 fell back from TQ2_0: row length 64 is not a multiple of 256: Q8_0 (exact)" in out
    assert "2 TQ2_0" in out and "token_embd F16" in out
    # width 48: not even a multiple of 32, so F16
    odd = make_model(dim=48, n_heads=4, n_kv_heads=2)
    report = export_gguf(odd, tmp_path / "odd.gguf")
    assert set(report.fallbacks.values()) == {"row length 48 is not a multiple of 32: F16 (exact)"}
    for path, m in ((tmp_path / "tiny.gguf", model), (tmp_path / "odd.gguf", odd)):
        _, tensors = read(path)
        for name, (w_t, s) in ternary_layers(m).items():
            w = dequantized(tensors[gguf_name(name) + ".weight"]) * np.float32(tensors[gguf_name(name) + ".scale"].data[0])
            np.testing.assert_allclose(w, (w_t.float() / s).numpy(), rtol=2e-7, atol=0)
        assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "TQ2_0"


@needs_gguf
def test_gguf_size_follows_the_shapes(tmp_path):
    """TQ2_0 is 66 bytes per 256 weights (2 bits + an fp16 block scale), TQ1_0 54; the rest is F16/F32 + vocab."""
    model = make_model(**WIDE)
    sizes = {t: export_gguf(model, tmp_path / f"{t}.gguf", gguf_type=t).path.stat().st_size for t in GGUF_TYPES}
    n_ternary = sum(w.numel() for w, _ in ternary_layers(model).values())
    assert sizes["f16"] - sizes["tq2_0"] == pytest.approx(n_ternary * (2 - 66 / 256), abs=64 * 32)
    assert sizes["tq2_0"] - sizes["tq1_0"] == pytest.approx(n_ternary * (66 - 54) / 256, abs=64 * 32)


# ---------------------------------------------------------------------------- bad input

@needs_gguf
def test_gguf_bad_input(tmp_path, capsys):
    model = make_model()
    ckpt = save_ckpt(tmp_path / "run", model)
    out = tmp_path / "m.gguf"

    rc, _, err = run_cli(capsys, ckpt, "--format", "gguf", "--gguf-type", "q4_0", "--out", out)
    assert rc == 2 and err.strip().splitlines() == ["error: unknown --gguf-type 'q4_0' (choose from tq2_0, tq1_0, f16)"]
    assert not out.exists()

    out.write_bytes(b"keep me")
    rc, _, err = run_cli(capsys, ckpt, "--format", "gguf", "--out", out)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "exists (pass --overwrite" in err
    assert out.read_bytes() == b"keep me"
    assert run_cli(capsys, ckpt, "--format", "gguf", "--out", out, "--overwrite", "--quiet")[0] == 0
    assert out.read_bytes()[:4] == b"GGUF"

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc, _, err = run_cli(capsys, ckpt, "--format", "gguf", "--out", blocker / "m.gguf")
    assert rc == 2 and err.startswith("error: cannot write the output file") and "is not a directory" in err
    rc, _, err = run_cli(capsys, ckpt, "--format", "gguf", "--out", tmp_path)
    assert rc == 2 and "is a directory" in err

    plain = make_model(quantization="none")
    plain_ckpt = save_ckpt(tmp_path / "plain", plain)
    for gguf_type in ("tq2_0", "tq1_0"):
        rc, _, err = run_cli(capsys, plain_ckpt, "--format", "gguf", "--gguf-type", gguf_type,
                             "--out", tmp_path / "p.gguf")
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert "quantization='none'" in err
    assert not (tmp_path / "p.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left


@needs_gguf
def test_gguf_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    import gguf

    def boom(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError):
        export_gguf(make_model(), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


@needs_gguf
def test_full_precision_model_exports_as_f16(tmp_path, capsys):
    """quantization='none' (the bf16 twin): no ternary weights, but llama.cpp's bitnet graph without
    scale tensors is exactly its forward, so --gguf-type f16 exports it."""
    plain = make_model(quantization="none")
    ckpt = save_ckpt(tmp_path / "run", plain)
    rc, out, err = run_cli(capsys, ckpt, "--format", "gguf", "--gguf-type", "f16", "--out", tmp_path / "p.gguf")
    assert rc == 0, err
    _, tensors = read(tmp_path / "p.gguf")
    assert not any(n.endswith(".scale") for n in tensors)
    q = dequantized(tensors["blk.0.attn_q.weight"])
    assert np.array_equal(q, plain.layers[0].self_attn.q_proj.weight.detach().numpy().astype(np.float16))


# ---------------------------------------------------------------------------- llama.cpp itself

def corpus_texts(n: int, chars: int) -> list[str]:
    """n passages of the embedded corpus, from documents spread over it."""
    docs = embedded_documents()
    picks = [docs[i * len(docs) // n + 3] for i in range(n)]
    return [d[len(d) // 3:len(d) // 3 + chars] for d in picks]


def training_passages() -> list[str]:
    """Four 2,000-character passages of the embedded corpus: the llama.cpp tests' training data.

    A model trained TRAIN_STEPS steps on the whole corpus (loss ~6.6) decodes greedily into loops
    ("the United the United the the") whose top two logits sit 1e-4..5e-3 apart, where any float
    difference picks the other token. Trained as long on these passages, it learns them (loss ~1.9)
    and its predictions have margins that llama.cpp's arithmetic cannot flip.
    """
    docs = embedded_documents()
    picks = [docs[i * len(docs) // 4 + 5] for i in range(4)]
    return [d[len(d) // 3:len(d) // 3 + 2000] for d in picks]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A WIDE model trained TRAIN_STEPS steps (batch 2 x 64 tokens, CPU) on `training_passages`, and its checkpoint."""
    from bitnet.cli import train_main
    from bitnet.export.cli import model_from_checkpoint
    from bitnet.train import checkpoint

    runs = tmp_path_factory.mktemp("gguf_runs")
    data = runs / "data"
    data.mkdir()
    for i, text in enumerate(training_passages()):
        (data / f"passage{i}.txt").write_text(text)
    config = runs / "wide.toml"
    config.write_text("[model]\n" + "".join(f"{k} = {v}\n" for k, v in WIDE.items()))
    args = ["--config", config, "--preset", "tiny", "--data", data, "--runs-dir", runs, "--run-id", "wide",
            "--device", "cpu", "--num-steps", TRAIN_STEPS, "--batch-size", 2, "--seq-len", 64,
            "--warmup-steps", 20, "--lr-peak", "3e-3", "--no-eval", "--eval-sequences", 1, "--sample-interval", 0,
            "--quant-interval", 0, "--log-interval", 50, "--checkpoint-interval", 100000, "--quiet"]
    assert train_main([str(a) for a in args]) == 0
    path = checkpoint.resolve(str(runs / "wide"))
    return path, model_from_checkpoint(checkpoint.load(path), str(path))


@pytest.fixture(scope="session")
def llama_files(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    for gguf_type in ("tq2_0", "tq1_0"):
        assert main([str(trained[0]), "--format", "gguf", "--gguf-type", gguf_type,
                     "--out", str(out / f"{gguf_type}.gguf"), "--quiet"]) == 0
    return out


class Llama:
    """llama-cpp-python's Llama over a file, closed on exit (its __del__ at interpreter exit is noisy)."""

    def __init__(self, path: Path):
        from llama_cpp import Llama as _Llama

        self.llm = _Llama(str(path), n_ctx=WIDE["max_seq_len"], n_threads=2, n_batch=256, logits_all=True,
                          verbose=False, seed=0)

    def __enter__(self):
        return self.llm

    def __exit__(self, *exc):
        self.llm.close()


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    """Teacher-forced logits (len(ids), vocab) from llama.cpp."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


@pytest.fixture(scope="module")
def random_gguf(tmp_path_factory):
    """A WIDE model with random weights: enough for everything that does not read the logits."""
    return export_gguf(make_model(**WIDE), tmp_path_factory.mktemp("random") / "m.gguf").path


@needs_llama
def test_llama_cpp_tokenizes_like_us(random_gguf):
    tok = load_tokenizer("llama2")
    texts = corpus_texts(12, 2000) + [
        "Hello world", " leading space", "two  spaces and\ttab\nnewline\n\n", "1776 and 2024: 3.14159",
        "caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e \U0001f389 \u2014 dashes \u2013", "   ", "",
        "ALL CAPS, MixedCase, snake_case", "http://example.com/a?b=c&d=e"]
    n = 0
    with Llama(random_gguf) as llm:
        for text in texts:
            theirs = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
            assert theirs == tok.encode(text, add_bos=True), text
            # llama.cpp keeps the space prefix when it decodes without the BOS; ours strips it
            assert llm.detokenize(theirs[1:]).decode("utf-8").removeprefix(" ") == tok.decode(theirs)
            n += len(theirs)
    assert n > 4000


@needs_llama
def test_llama_cpp_logits_agree_with_our_ternary_inference(trained, llama_files):
    tok = load_tokenizer("llama2")
    ours = to_ternary_inference(trained[1]).eval()
    agree, total, diffs = 0, 0, []
    with Llama(llama_files / "tq2_0.gguf") as llm, Llama(llama_files / "tq1_0.gguf") as llm1:
        for text in training_passages():
            ids = tok.encode(text, add_bos=True)[:128]
            theirs = llama_logits(llm, ids)
            with torch.no_grad():
                mine = ours(torch.tensor([ids]))[0].numpy()
            agree += int((theirs.argmax(-1) == mine.argmax(-1)).sum())
            total += len(ids)
            diffs.append(np.abs(theirs - mine).max() / mine.std())
            # TQ1_0 holds the same ternary values: llama.cpp computes the same logits from it
            np.testing.assert_allclose(llama_logits(llm1, ids), theirs, atol=1e-3 * mine.std())
    print(f"\nllama.cpp vs ours, teacher-forced: top-1 agree {agree}/{total} = {agree / total:.2%}, "
          f"max |logit diff| / logit std {max(diffs):.3f}")
    assert total >= 300
    assert agree / total >= 0.98, (agree, total)
    assert max(diffs) < 0.5, diffs  # llama.cpp quantizes activations per 256 values, we per token


@needs_llama
def test_llama_cpp_greedy_continuations_match_ours(trained, llama_files):
    tok = load_tokenizer("llama2")
    model = to_ternary_inference(trained[1]).eval()
    new = 40
    with Llama(llama_files / "tq2_0.gguf") as llm:
        for prompt in [p[:80] for p in training_passages()] + ["The Congress of the United States", "Our economy"]:
            ids = tok.encode(prompt, add_bos=True)
            mine = generate(model, ids, mode="greedy", max_new_tokens=new).token_ids
            llm.reset()
            llm.eval(ids)
            theirs = []
            for _ in range(new):
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                theirs.append(nxt)
                llm.eval([nxt])
            same = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), new)
            print(f"\ngreedy {prompt!r}: identical for {same}/{new} tokens: {tok.decode(mine)!r}")
            assert same >= 32, (prompt, same, tok.decode(mine), tok.decode(theirs))
