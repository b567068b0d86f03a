"""`bitnet-status`: read-only monitor of one run directory (text, --json, --plot, --watch).

Standard library only, like the bitnet/status.py it calls (reading, summary, text, plot, watch);
docs/design.md, section "command-line tools".
"""

import json
import math
import sys
from pathlib import Path

from bitnet.cli.args import OneLineParser, UserError
from bitnet.status import StatusError, _f, _json_safe, _refuse_inside, plot, render_text, summarize, watch


def build_parser() -> OneLineParser:
    ap = OneLineParser(description="Read-only monitor of one bitnet run directory.")
    ap.add_argument("run_dir", nargs="?", help="runs/<id>")
    ap.add_argument("--watch", nargs="?", const="10", metavar="SECONDS", help="refresh every SECONDS (default 10)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (JSON lines under --watch)")
    ap.add_argument("--plot", metavar="OUT", help="write a dashboard PNG, or HTML embedding it if OUT ends in .html")
    ap.add_argument("--smoothing", type=int, default=20, metavar="N", help="loss moving-average window in rows")
    return ap


def main(argv=None) -> int:
    """`bitnet-status` and scripts/check_training_status.py; returns the exit code (2 on bad input)."""
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
        # `--watch runs/x`: argparse hands the run dir to --watch's optional value.
        if args.watch is not None and args.run_dir is None:
            args.run_dir, args.watch = args.watch, "10"
        if args.run_dir is None:
            raise StatusError("the following arguments are required: run_dir")
        try:
            interval_s = None if args.watch is None else float(args.watch)
        except ValueError:
            interval_s = math.nan
        if interval_s is not None and not 0 < interval_s < math.inf:
            raise StatusError(f"--watch expects a positive number of seconds, got {args.watch!r}")
        if args.smoothing < 1:
            raise StatusError("--smoothing must be >= 1")
        if args.plot:
            _refuse_inside(Path(args.run_dir), Path(args.plot))

        def render() -> str:
            if args.plot:
                s = plot(args.run_dir, args.plot, args.smoothing, refresh_s=interval_s)
                return f"wrote {args.plot} (step {_f(s['step'], ',')})"
            s = summarize(args.run_dir, args.smoothing)
            return json.dumps(_json_safe(s), allow_nan=False) if args.json else render_text(s)

        if interval_s is None:
            print(render())
            return 0
        summarize(args.run_dir, args.smoothing)  # a wrong path fails now with exit 2, not on screen forever
        return watch(render, interval_s, clear=not args.json)
    except (StatusError, UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
