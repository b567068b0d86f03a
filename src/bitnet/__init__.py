"""bitnet-train: train BitNet b1.58 LLaMA-style language models, fully instrumented."""

__version__ = "0.1.0"
