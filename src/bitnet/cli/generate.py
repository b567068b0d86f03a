"""`bitnet-generate`: text from a bitnet-train checkpoint, streamed as it decodes.

    bitnet-generate --checkpoint runs/<id> --prompt "The history of" --mode typical --max-new-tokens 100
Decoding lives in bitnet/generation.py; docs/design.md, section "command-line tools".
"""

import contextlib
import sys

import torch

from bitnet import exits
from bitnet.cli.args import OneLineParser, parse_or_exit
from bitnet.generation import MODES, continuation_text, generate, sample_metrics


class _Streamer:
    """Prints the continuation's text as it grows (decoding it whole each time, so SentencePiece
    spaces and characters spread over several byte tokens come out right)."""

    def __init__(self, tok, prompt_ids: list[int], stream):
        self.tok, self.prompt_ids, self.stream, self.ids, self.shown = tok, prompt_ids, stream, [], ""

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = continuation_text(self.tok, self.prompt_ids, self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte
            return
        if text.startswith(self.shown):
            self.stream.write(text[len(self.shown):])
            self.stream.flush()
        self.shown = text


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="bitnet-generate", description="Generate text from a bitnet-train checkpoint "
                      "or a bitnet-export directory (packed or hf).")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint.pt, its step directory, a run directory (latest), or an export directory "
                        "of bitnet-export (packed or hf)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--mode", default="typical", choices=list(MODES), help="decoding mode (default: typical)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate at most (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default: 0)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    p.add_argument("--tokenizer", default=None, help="tokenizer spec (default: the one the run trained with)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_or_exit(build_parser(), argv)
    exits.one_line_warnings()

    from bitnet.cli.load import load_for_inference
    from bitnet.data import load_tokenizer
    from bitnet.device import pick_device
    from bitnet.export.files import ExportError
    from bitnet.run.checkpoint import CheckpointError

    try:
        device = pick_device(args.device)
        if args.max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be positive")
        model, tokenizer = load_for_inference(args.checkpoint, device)
        tok = load_tokenizer(args.tokenizer or tokenizer or "llama2")
        autocast = (contextlib.nullcontext if device.type != "cuda" else
                    lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        prompt_ids = tok.encode(args.prompt, add_bos=True)
        max_new = min(args.max_new_tokens, model.cfg.max_seq_len - len(prompt_ids))
        if max_new < 1:
            raise ValueError(f"the prompt ({len(prompt_ids)} tokens) fills the model's context "
                             f"of {model.cfg.max_seq_len}")
        sys.stdout.write(args.prompt)
        gen = generate(model, prompt_ids, args.mode, max_new, seed=args.seed, eos_id=tok.eos_id, autocast=autocast,
                       vocab_limit=tok.vocab_size, on_token=_Streamer(tok, prompt_ids, sys.stdout))
    except (CheckpointError, ExportError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = sample_metrics(gen)
    print(f"\n\n[{len(gen.token_ids)} tokens in {gen.seconds:.2f} s (prompt included): {gen.tokens_per_s:.1f} tok/s | "
          f"mode {args.mode} | "
          f"seed {args.seed} | mean entropy {m['mean_entropy']:.2f} nats | max repetition {m['max_repetition']} | "
          f"unique tokens {m['unique_tokens']} ({m['unique_ratio']:.2f}) | {device}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
