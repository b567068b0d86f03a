"""CPU: greedy decoding with and without BitLinear's cached ternary weight (no-grad forwards).

    python benchmarks/decode_cache.py
A 95m-shaped model cut to 2 layers, 32 greedy tokens, one CPU thread, best of 3. Prints one JSON line.
"""

import json
import time

import torch

from bitnet.generation import generate
from bitnet.model import PRESETS, ModelConfig, Transformer
from bitnet.model import bitlinear


def best_of(runs: int, fn) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    torch.set_num_threads(1)
    model = Transformer(ModelConfig(**{**PRESETS["95m"].to_dict(), "n_layers": 2}))
    model.init_weights(seed=0)
    model.eval()

    def decode():
        generate(model, [1, 450, 2106], mode="greedy", max_new_tokens=32)

    decode()  # warm-up
    cached = best_of(3, decode)
    original = bitlinear.BitLinear._inference_weight
    bitlinear.BitLinear._inference_weight = lambda self, dtype: bitlinear.weight_quant(self.weight.detach()).to(dtype)
    try:
        recompute = best_of(3, decode)
    finally:
        bitlinear.BitLinear._inference_weight = original
    print(json.dumps({"benchmark": "decode_cache", "torch": torch.__version__, "device": "cpu",
                      "recompute_s": round(recompute, 3), "cached_s": round(cached, 3),
                      "speedup": round(recompute / cached, 2)}))


if __name__ == "__main__":
    main()
