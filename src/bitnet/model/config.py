"""Model shapes: `ModelConfig` and the named presets.

The 95m preset is the seed's flagship model (docs/design.md, section "model"); `tiny` trains in seconds on a CPU;
700m, 1.3b and 3b are the sizes of the BitNet b1.58 paper (Ma et al. 2024, "The Era of 1-bit LLMs: All Large
Language Models are in 1.58 Bits"), shaped as its companion note lists them (below).
"""

from dataclasses import asdict, dataclass, fields


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    """Tokenizer vocabulary (LLaMA-2: 32,000)."""
    dim: int = 768
    """Hidden size of the residual stream."""
    n_layers: int = 8
    """Transformer blocks."""
    n_heads: int = 12
    """Query heads."""
    n_kv_heads: int = 6
    """Key/value heads (GQA: n_heads must be a multiple)."""
    ffn_dim: int = 3072
    """SwiGLU hidden width (gate/up output, down input)."""
    max_seq_len: int = 1024
    """Context length the RoPE tables are built for."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal init; residual projections get init_std / sqrt(2 * n_layers)."""
    quantization: str = "bitnet"
    """'bitnet' (ternary weights, int8 activations) or 'none' (plain linear, the bf16 twin)."""

    def __post_init__(self):
        checks = {
            "vocab_size": self.vocab_size > 0, "dim": self.dim > 0, "n_layers": self.n_layers > 0,
            "n_heads": self.n_heads > 0 and self.dim % self.n_heads == 0,
            "n_kv_heads": self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0,
            "ffn_dim": self.ffn_dim > 0, "max_seq_len": self.max_seq_len > 0,
            "quantization": self.quantization in ("bitnet", "none"),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid model config field(s) {bad}: {self.to_dict()}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config key(s): {sorted(unknown)}")
        return cls(**d)


PRESETS = {
    # The seed's model: 95.4M parameters with tied embeddings (docs/design.md, section "model").
    "95m": ModelConfig(),
    # A few hundred thousand non-embedding parameters: seconds per hundred steps on a laptop CPU.
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, max_seq_len=256),
    # The paper's sizes. Hidden size (dim), GLU size (ffn_dim), heads and layers: Table 1 of "The Era of 1-bit
    # LLMs: Training Tips, Code and FAQ" (Ma, Wang, Wei; microsoft/unilm, bitnet/The-Era-of-1-bit-LLMs__Training_
    # Tips_Code_FAQ.pdf, March 2024), the configurations of the paper's models, read from the PDF:
    #     Size  Hidden  GLU    Heads  Layers  Batch  Tokens  Seq length
    #     700M  1536    4096   24     24      1M     100B    2048
    #     1.3B  2048    5460   32     24      1M     100B    2048
    #     3B    3200    8640   32     26      1M     100B    2048
    # The note lists no key/value heads; the paper's models adopt LLaMA's components and the public reproductions
    # (Hugging Face 1bitLLM/bitnet_b1_58-large, -xl and -3B: the same dims, GLU sizes and layers) set
    # num_key_value_heads = num_attention_heads, so n_kv_heads = n_heads: no GQA, unlike the 95m preset. Those
    # reproductions use LLaMA's 32,000 pieces plus 2 added tokens (pad, </line>); vocab_size stays our LLaMA-2
    # tokenizer's 32,000.
    # max_seq_len stays 1024, the trainer's --seq-len (the paper trained at 2048: a config file's [model] table
    # with max_seq_len = 2048, plus --seq-len 2048). Per-preset train defaults (the note's Table 2 LRs, a
    # micro-batch for an 80 GB GPU): bitnet.train.config.PRESET_TRAIN_DEFAULTS.
    # 728,839,680 parameters (679.7M outside the tied embedding); head_dim 64 (the note's 24 heads; the
    # 1bitLLM/bitnet_b1_58-large reproduction used 16).
    "700m": ModelConfig(dim=1536, n_layers=24, n_heads=24, n_kv_heads=24, ffn_dim=4096),
    # 1,273,579,488 parameters (1.208B outside the embedding); head_dim 64.
    "1.3b": ModelConfig(dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, ffn_dim=5460),
    # 3,324,381,440 parameters (3.222B outside the embedding); head_dim 100.
    "3b": ModelConfig(dim=3200, n_layers=26, n_heads=32, n_kv_heads=32, ffn_dim=8640),
}
