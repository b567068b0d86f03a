"""CPU decode speed: llama.cpp (our GGUF export, via llama-cpp-python) against our own `bitnet-generate` path.

    PYTHONPATH=src python benchmarks/gguf_decode.py [--checkpoint RUN] [--threads 1,2] [--tokens 64]

Without --checkpoint it builds the 95m preset with random weights (decode speed depends only on the
shapes). Both sides: the same prompt, greedy decoding with a KV cache, the same number of CPU threads,
best of --repeats; llama.cpp reads the TQ2_0 file, ours runs `bitnet.generation.generate_batch` (what
bitnet-generate runs) on the checkpoint model in fp32. Prints one JSON line per thread count.
Needs the gguf and llama-cpp-python packages.
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from bitnet.export.gguf_export import export_gguf
from bitnet.generation import generate_batch
from bitnet.model import PRESETS, Transformer

PROMPT = [1, 450, 4306, 310, 278, 7761, 338]  # "<s> The State of the Union is"


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def load(checkpoint: str | None) -> Transformer:
    if checkpoint is None:
        model = Transformer(PRESETS["95m"])
        model.init_weights(seed=0)
        return model.eval()
    from bitnet.cli.load import load_source

    return load_source(checkpoint)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint, run directory or packed export (default: random 95m)")
    p.add_argument("--threads", default="1,2", help="comma-separated CPU thread counts (default: 1,2)")
    p.add_argument("--tokens", type=int, default=64, help="tokens to decode (default: 64)")
    p.add_argument("--repeats", type=int, default=3, help="best of N (default: 3)")
    p.add_argument("--gguf-type", default="tq2_0")
    args = p.parse_args()
    from llama_cpp import Llama, __version__ as llama_cpp_version

    model = load(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.gguf"
        t = time.perf_counter()
        export_gguf(model, path, gguf_type=args.gguf_type)
        export_s = time.perf_counter() - t
        size = path.stat().st_size
        for threads in (int(x) for x in args.threads.split(",")):
            llm = Llama(str(path), n_ctx=len(PROMPT) + args.tokens + 8, n_threads=threads, n_threads_batch=threads,
                        verbose=False)

            def llama_decode():
                llm.reset()
                llm.eval(PROMPT)
                for _ in range(args.tokens):
                    llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])

            def ours_decode():
                generate_batch(model, PROMPT, ["greedy"], [0], args.tokens, threads=threads)

            llama_decode()  # warm-up (page in the weights)
            ours_decode()
            llama_s = best_of(args.repeats, llama_decode)
            ours_s = best_of(args.repeats, ours_decode)
            llm.close()
            print(json.dumps({
                "benchmark": "gguf_decode", "model": args.checkpoint or "95m (random init)",
                "gguf_type": args.gguf_type, "gguf_mb": round(size / 1e6, 2), "export_s": round(export_s, 1),
                "threads": threads, "prompt_tokens": len(PROMPT), "new_tokens": args.tokens,
                "llama_cpp_tok_s": round(args.tokens / llama_s, 1), "bitnet_generate_tok_s": round(args.tokens / ours_s, 1),
                "speedup": round(ours_s / llama_s, 2), "llama_cpp_python": llama_cpp_version, "torch": torch.__version__,
                "cpu": platform.processor() or platform.machine()}), flush=True)


if __name__ == "__main__":
    main()
