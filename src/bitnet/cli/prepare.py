"""`bitnet-prepare-data`: tokenize a source into token shards once (bitnet/data/prepare.py does the
work); docs/design.md, section "command-line tools".

    bitnet-prepare-data --data fineweb-edu --out data/fineweb-edu-llama2
"""

import sys

from bitnet.cli.args import OneLineParser, parse_or_exit
from bitnet.data import prepare as library


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="bitnet-prepare-data", description=library.__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="source: fineweb-edu, hf:<repo>[:<config>], embedded, "
                        "or local .txt/.jsonl/.jsonl.gz/.parquet files, a directory or a glob")
    parser.add_argument("--out", required=True, help="output directory (rerun the same command to resume)")
    parser.add_argument("--tokenizer", default="llama2", help="llama2 (vendored), tokenizer.json/.model, dir or hub name")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (cut at a document end)")
    parser.add_argument("--eval-docs", type=int, default=1000, help="first N documents held out as eval.bin")
    parser.add_argument("--workers", type=int, default=0, help="tokenizer processes (0: all CPU cores)")
    parser.add_argument("--verify", action="store_true", help="re-hash already finished shards against the manifest")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    args = parse_or_exit(build_parser(), argv)
    try:
        manifest = library.prepare(args.data, args.out, args.tokenizer, args.shard_tokens, args.eval_docs,
                                   args.workers, progress=not args.no_progress, verify=args.verify)
    except ValueError as e:
        print(f"bitnet-prepare-data: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {len(manifest['shards'])} shards, {manifest['train_tokens']:,} training tokens "
          f"({manifest['train_docs']:,} documents), eval {manifest['eval']['tokens']:,} tokens "
          f"({manifest['eval']['docs']} documents)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
