"""Hugging Face export: a directory `transformers.AutoModelForCausalLM.from_pretrained` loads offline
as its built-in `BitNetForCausalLM` (model_type "bitnet", transformers >= 4.52).

Our SubLN layout is transformers' BitNet layout, so every tensor maps by adding `model.` to its
name (the head is tied to `model.embed_tokens`). Two weight forms, both under quant_method "bitnet":
- "packed" (shipped by default): linear_class "bitlinear", uint8 weights holding 4 ternary codes
  a byte along the output dimension (export/ternary.py) and `weight_scale` = s, the absmean scale
  with W_q = W_t / s; transformers' BitLinear divides its output by weight_scale. Parity is pinned by
  tests/test_export.py, which also shows that storing 1 / s breaks it.
- "online": linear_class "autobitlinear", quantization_mode "online", bf16 weights that transformers
  re-quantizes on every forward. We store W_t / (s * f), f the share of nonzeros: it quantizes back
  to exactly W_t with scale s (up to bf16 rounding), so neither form leaks the latent training weights.
Embedding and norm gains are bf16 (config dtype bfloat16), as in the packed ternary export.
"""

import gzip
import shutil
from importlib import resources
from pathlib import Path

import torch

from bitnet.data.tokenizer import VENDORED, TextTokenizer, load_tokenizer
from bitnet.export.files import ExportError, write_dir, write_json, write_safetensors
from bitnet.export.packed import ternary_state_dict
from bitnet.export.ternary import ternary_layers
from bitnet.model.llama import Transformer

HF_WEIGHTS = ("packed", "online")
PREFIX = "model."


def hf_config(model: Transformer, tok: TextTokenizer, weights: str) -> dict:
    """config.json of transformers' BitNetConfig for `model` (written for transformers 4.52 through 5.x)."""
    c = model.cfg
    if weights == "packed":
        quant = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"}
    else:
        quant = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}
    quant.update({"modules_to_not_convert": ["lm_head"], "use_rms_norm": False})
    return {
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "vocab_size": c.vocab_size,
        "hidden_size": c.dim,
        "intermediate_size": c.ffn_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        # transformers < 5 reads rope_theta, 5.x reads rope_parameters; both describe plain RoPE
        # rotating (first half, second half) pairs, the convention of model/llama.py apply_rope.
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "tie_word_embeddings": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": c.init_std,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "quantization_config": quant,
    }


def hf_state_dict(model: Transformer, weights: str) -> dict[str, torch.Tensor]:
    """Tensors under transformers' names: `model.` + ours; ternary layers in the chosen weight form."""
    if weights not in HF_WEIGHTS:
        raise ExportError(f"unknown HF weight form {weights!r} (choose from {', '.join(HF_WEIGHTS)})")
    tensors, shapes = ternary_state_dict(model)
    for name, (out_features, _) in shapes.items():
        if out_features % 4:
            raise ExportError(f"{name} has {out_features} output rows; transformers' packed BitLinear needs a "
                              "multiple of 4 (use --hf-weights online)")
    if weights == "online":
        for name, (w_t, scale) in ternary_layers(model).items():
            nonzero_share = w_t.count_nonzero().item() / w_t.numel()
            latent = w_t.float() / (scale.float() * max(nonzero_share, 1e-12))
            tensors[f"{name}.weight"] = latent.to(torch.bfloat16).cpu()
            del tensors[f"{name}.weight_scale"]
    return {PREFIX + k: v.contiguous() for k, v in tensors.items()}


def write_tokenizer(out: Path, tok: TextTokenizer, max_seq_len: int) -> None:
    """tokenizer.json (byte-identical for the vendored LLaMA-2 copy), tokenizer_config.json, special tokens."""
    assets = resources.files("bitnet.data").joinpath("assets")
    if tok.name == VENDORED:
        (out / "tokenizer.json").write_bytes(gzip.decompress(assets.joinpath("llama2_tokenizer.json.gz").read_bytes()))
        with resources.as_file(assets.joinpath("LLAMA2_NOTICE.txt")) as notice:
            shutil.copyfile(notice, out / "LLAMA2_NOTICE.txt")
    else:
        (out / "tokenizer.json").write_text(tok.tok.to_str())
    special = {"bos_token": tok.tok.id_to_token(tok.bos_id), "eos_token": tok.tok.id_to_token(tok.eos_id)}
    unk = tok.tok.id_to_token(0)
    if unk and unk.startswith("<") and unk.endswith(">"):
        special["unk_token"] = unk
    # The generic fast tokenizer runs tokenizer.json as is (its post-processor adds BOS), the same
    # pipeline as our TextTokenizer; a model-specific class could rebuild the pipeline differently.
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False, **special})
    write_json(out / "special_tokens_map.json", special)


def export_hf(model: Transformer, out_dir: str | Path, tokenizer: str = VENDORED, weights: str = "packed",
              overwrite: bool = False) -> Path:
    """Write `model` as a transformers BitNet directory (atomically); returns out_dir."""
    tensors = hf_state_dict(model, weights)
    tok = load_tokenizer(tokenizer)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ExportError(f"tokenizer {tok.name!r} has {tok.vocab_size} tokens, more than the model's "
                          f"{model.cfg.vocab_size}")
    config = hf_config(model, tok, weights)

    def fill(tmp: Path) -> None:
        write_safetensors(tmp / "model.safetensors", tensors, metadata={"format": "pt"})
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json", {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id})
        write_tokenizer(tmp, tok, model.cfg.max_seq_len)

    return write_dir(out_dir, fill, overwrite)
