"""GGUF export: one file llama.cpp loads as its `bitnet` architecture (and so ollama, LM Studio, ...).

Written with the `gguf` package (llama.cpp's own Python writer and quantizers). What llama.cpp's
bitnet graph does, and so what this file holds (read in llama.cpp's src/models/bitnet.cpp and
llama-graph.cpp `build_lora_mm`):
- each BitLinear as `blk.N.<name>.weight` holding the ternary values W_t themselves (every 256-value
  block's own fp16 scale is exactly 1.0) plus `blk.N.<name>.scale`, one fp32 number the graph
  multiplies the matmul's output by: 1 / s = mean|W| (W_q = W_t / s). The scale stays fp32 and
  separate, so the weights are exact; folding it into the fp16 block scales would round it.
- the SubLN norms as `attn_sub_norm` (before attn_output) and `ffn_sub_norm` (before ffn_down), the
  pre-norms as attn_norm / ffn_norm, the final norm as output_norm, all fp32;
- RoPE: bitnet is a NEOX-rope architecture in llama.cpp (rotates (first half, second half) pairs),
  our convention, so q/k are stored as they are (no permutation), with our rope_theta as freq_base;
- the tied embedding `token_embd` in F16: llama.cpp reads it for the input rows *and* the output
  head (there is no `output.weight`), so its type sets the logits' precision; F16 keeps them within
  float rounding of ours (a 4-bit or ternary head would not), and F16 is the type every llama.cpp
  backend multiplies with. It is most of the file (32,000 x 768 x 2 bytes = 49 MB for 95m).
- the LLaMA-2 SentencePiece vocabulary (tokenizer.ggml.model "llama"): pieces, scores, token types,
  BOS/EOS/UNK ids, add BOS, add a space prefix. See `spm_vocab` for where the scores come from.

llama.cpp's ternary types need rows (the input width) that are a multiple of 256. A layer whose
row isn't falls back to Q8_0 (rows a multiple of 32) holding 127 * W_t with block scales of exactly
1.0 and 1 / (127 s) as its output scale, else to F16 holding W_t: both are exact.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from bitnet.data.tokenizer import TextTokenizer, load_tokenizer
from bitnet.export.files import ExportError, check_parent_writable
from bitnet.export.ternary import ternary_layers
from bitnet.model.llama import Transformer

GGUF_TYPES = ("tq2_0", "tq1_0", "f16")
ARCH = "bitnet"
TERNARY_BLOCK = 256  # QK_K: values per TQ2_0 / TQ1_0 block
Q8_BLOCK = 32

# our module names -> llama.cpp's (gguf-py MODEL_TENSOR names of the bitnet architecture)
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.attn_sub_norm": "attn_sub_norm",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.ffn_sub_norm": "ffn_sub_norm",
    "mlp.down_proj": "ffn_down",
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError("the GGUF export needs the 'gguf' package (pip install gguf, or "
                          "pip install -e '.[dev]')") from None
    return gguf


def gguf_name(ours: str) -> str:
    """llama.cpp's tensor name of one of our module names (without .weight)."""
    if ours == "embed_tokens":
        return "token_embd"
    if ours == "norm":
        return "output_norm"
    _, layer, rest = ours.split(".", 2)  # layers.N.<rest>
    return f"blk.{layer}.{LAYER_NAMES[rest]}"


@dataclass
class GGUFReport:
    """What the export wrote: the types it chose and why (printed by bitnet-export)."""

    path: Path
    gguf_type: str
    tensor_types: dict[str, str] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)  # tensor -> reason

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for name, t in self.tensor_types.items():
            if name.endswith(".weight") and name != "token_embd.weight" and "norm" not in name:
                counts[t] = counts.get(t, 0) + 1
        linears = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
        text = f"linear weights: {linears}; tied token_embd F16 (also the output head); norms F32"
        if self.fallbacks:
            reasons = sorted(set(self.fallbacks.values()))
            text += f"; {len(self.fallbacks)} fell back from {self.gguf_type.upper()}: " + "; ".join(reasons)
        return text


# ---------------------------------------------------------------------------- vocabulary

def spm_vocab(tok: TextTokenizer, n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    """(pieces, scores, token types) of a SentencePiece-style BPE tokenizer for llama.cpp's "llama" model.

    llama.cpp's SentencePiece tokenizer merges, at each step, the adjacent pair whose joined piece has
    the highest score. Our tokenizer (HF `tokenizers` BPE converted from LLaMA-2's SentencePiece model)
    merges the pair of lowest rank in its merges list. Scoring each piece by minus the rank of the
    first merge that makes it gives llama.cpp the same order (tests/test_gguf.py checks the ids on
    the corpus). Pieces no merge makes (single characters, bytes, specials) are never a merge's
    result, so their scores are not read; they get -(merges + id) and 0. Ids past the tokenizer's
    vocabulary (a model vocab padded wider) are unused `[PADn]` pieces.
    """
    spec = json.loads(tok.tok.to_str())
    model = spec.get("model") or {}
    normalizer = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")], ensure_ascii=False)
    if model.get("type") != "BPE" or not model.get("byte_fallback") or "\u2581" not in normalizer:
        raise ExportError(f"tokenizer {tok.name!r} is not a SentencePiece-style BPE (LLaMA-2 kind: "
                          "'\u2581' for spaces, byte fallback); llama.cpp's 'llama' vocabulary cannot reproduce it")
    gguf = _gguf()
    types = gguf.TokenType
    vocab: dict[str, int] = model["vocab"]
    merges = model["merges"]
    first_rank: dict[int, int] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        first_rank.setdefault(vocab[left + right], rank)
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    unk = model.get("unk_token")
    size = tok.vocab_size
    pieces: list[bytes] = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores: list[float] = [-1000.0] * n_vocab
    kinds: list[int] = [int(types.UNUSED)] * n_vocab
    by_id = {i: p for p, i in tok.tok.get_vocab(with_added_tokens=True).items()}
    for i in range(size):
        piece = by_id[i]
        pieces[i] = piece.encode("utf-8")
        if i in added:
            special = added[i].get("special", False)
            kinds[i] = int(types.UNKNOWN if piece == unk else types.CONTROL if special else types.USER_DEFINED)
            scores[i] = 0.0 if special else -1000.0
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            kinds[i], scores[i] = int(types.BYTE), 0.0
        else:
            kinds[i] = int(types.NORMAL)
            scores[i] = -float(first_rank.get(i, len(merges) + i))
    return pieces, scores, kinds


# ---------------------------------------------------------------------------- tensors

def _linear_tensors(w_t: torch.Tensor, inv_scale: float, gguf_type: str, gguf) -> tuple[
        np.ndarray, object, np.ndarray, str | None]:
    """(data, ggml type, fp32 output scale, fallback reason) of one ternary layer."""
    Q = gguf.GGMLQuantizationType
    row = w_t.shape[1]
    w = w_t.numpy().astype(np.float32)
    if gguf_type == "f16":
        return w.astype(np.float16), Q.F16, np.array([inv_scale], np.float32), None
    qtype = Q.TQ2_0 if gguf_type == "tq2_0" else Q.TQ1_0
    if row % TERNARY_BLOCK == 0:
        return gguf.quants.quantize(w, qtype), qtype, np.array([inv_scale], np.float32), None
    if row % Q8_BLOCK == 0:  # 127 * W_t: each block's absmax is 127, so its fp16 scale is exactly 1.0
        reason = f"row length {row} is not a multiple of {TERNARY_BLOCK}: Q8_0 (exact)"
        return (gguf.quants.quantize(127.0 * w, Q.Q8_0), Q.Q8_0,
                np.array([np.float32(inv_scale) / np.float32(127.0)], np.float32), reason)
    reason = f"row length {row} is not a multiple of {Q8_BLOCK}: F16 (exact)"
    return w.astype(np.float16), Q.F16, np.array([inv_scale], np.float32), reason


def _plain_linears(model: Transformer) -> dict[str, torch.Tensor]:
    return {name: m.weight.detach() for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("layers.")}


def export_gguf(model: Transformer, out_file: str | Path, tokenizer: str | TextTokenizer = "llama2",
                gguf_type: str = "tq2_0", overwrite: bool = False, name: str = "bitnet-train") -> GGUFReport:
    """Write `model` as a llama.cpp `bitnet` GGUF file (atomically: a hidden temp file renamed at the end)."""
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"unknown --gguf-type {gguf_type!r} (choose from {', '.join(GGUF_TYPES)})")
    out = check_writable_file(out_file, overwrite)
    gguf = _gguf()
    cfg = model.cfg
    layers = ternary_layers(model)
    if not layers and gguf_type != "f16":
        raise ExportError(f"a quantization={cfg.quantization!r} model has no ternary weights to store as "
                          f"{gguf_type.upper()} (use --gguf-type f16)")
    if cfg.n_heads * cfg.head_dim != cfg.dim:
        raise ExportError(f"llama.cpp's bitnet graph needs n_heads * head_dim == dim, got {cfg.n_heads} x "
                          f"{cfg.head_dim} != {cfg.dim}")
    tok = tokenizer if isinstance(tokenizer, TextTokenizer) else load_tokenizer(tokenizer)
    if tok.vocab_size > cfg.vocab_size:
        raise ExportError(f"tokenizer {tok.name!r} has {tok.vocab_size} tokens, more than the model's {cfg.vocab_size}")
    pieces, scores, kinds = spm_vocab(tok, cfg.vocab_size)

    report = GGUFReport(path=out, gguf_type=gguf_type)
    tensors: list[tuple[str, np.ndarray, object]] = []  # (name, data, raw ggml type or None)

    def add(name: str, data: np.ndarray, raw=None, label: str | None = None) -> None:
        tensors.append((name, data, raw))
        report.tensor_types[name] = label or (raw.name if raw is not None else
                                              {np.float16: "F16", np.float32: "F32"}[data.dtype.type])

    add("token_embd.weight", model.embed_tokens.weight.detach().float().cpu().numpy().astype(np.float16))
    plain = _plain_linears(model) if not layers else {}
    for i in range(cfg.n_layers):
        for ours in LAYER_NAMES:
            module = f"layers.{i}.{ours}"
            target = gguf_name(module)
            if module in layers:
                w_t, s = layers[module]
                inv_scale = (1.0 / s.detach().float().cpu()).item()  # what W_t.float() / s rounds each weight to
                data, qtype, scale, reason = _linear_tensors(w_t.cpu(), inv_scale, gguf_type, gguf)
                add(f"{target}.weight", data, None if data.dtype != np.uint8 else qtype, qtype.name)
                add(f"{target}.scale", scale)
                if reason:
                    report.fallbacks[f"{target}.weight"] = reason
            elif module in plain:  # quantization='none': the full-precision twin, plain F16 weights
                add(f"{target}.weight", plain[module].float().cpu().numpy().astype(np.float16))
            else:  # a norm gain
                norm = model.get_submodule(module).weight
                add(f"{target}.weight", norm.detach().float().cpu().numpy().astype(np.float32))
    add("output_norm.weight", model.norm.weight.detach().float().cpu().numpy().astype(np.float32))

    file_type = {"tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
                 "f16": gguf.LlamaFileType.MOSTLY_F16}[gguf_type]
    tmp = out.absolute().parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        writer.add_name(name)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.dim)
        writer.add_block_count(cfg.n_layers)
        writer.add_feed_forward_length(cfg.ffn_dim)
        writer.add_head_count(cfg.n_heads)
        writer.add_head_count_kv(cfg.n_kv_heads)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(float(cfg.rope_theta))
        writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(pieces)
        writer.add_token_scores(scores)
        writer.add_token_types(kinds)
        writer.add_bos_token_id(tok.bos_id)
        writer.add_eos_token_id(tok.eos_id)
        unk = tok.tok.token_to_id("<unk>")
        if unk is not None:
            writer.add_unk_token_id(unk)
        writer.add_add_bos_token(True)  # we frame every document as [BOS] + ids + [EOS]
        writer.add_add_eos_token(False)
        writer.add_add_space_prefix(True)  # the tokenizer's normalizer prepends '\u2581'
        for tname, data, raw in tensors:
            writer.add_tensor(tname, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return report


def check_writable_file(out_file: str | Path, overwrite: bool) -> Path:
    """Fail early if `out_file` cannot be written or would be clobbered without --overwrite."""
    out = Path(out_file)
    if out.is_dir():
        raise ExportError(f"output {out} is a directory (the GGUF export writes one file, e.g. model.gguf)")
    if out.exists() and not overwrite:
        raise ExportError(f"output file {out} exists (pass --overwrite to replace it)")
    check_parent_writable(out, "output file")
    return out
