"""Model shapes: `ModelConfig` and the named presets.

The 95m preset is the seed's flagship model (docs/design.md, section "model"); `tiny` trains in seconds on a CPU.
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
}
