"""`bitnet-status`: read-only monitor of one run directory (text, --json, --plot, --watch).

Standard library only, like the bitnet/status.py it calls (reading, summary, text, plot, watch);
docs/design.md, section "command-line tools".
"""

import math
import sys
from pathlib import Path

from bitnet.cli.args import OneLineParser, UserError
from bitnet.run.jsonl import JsonlReader
from bitnet.status import (MAX_SMOOTHING, StatusError, plot, plot_message, refuse_inside_run, render_json,
                           render_text, summarize, watch)

USAGE = "%(prog)s RUN_DIR [--watch [SECONDS]] [--json] [--plot OUT.png|OUT.html] [--smoothing N]"


def build_parser() -> OneLineParser:
    ap = OneLineParser(prog="bitnet-status", usage=USAGE, description="Read-only monitor of one bitnet run directory.")
    ap.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="the run directory, runs/<id> (required)")
    ap.add_argument("--watch", nargs="?", const="10", metavar="SECONDS",
                    help="refresh every SECONDS (default 10) until Ctrl-C or the run finishes")
    ap.add_argument("--json", action="store_true", help="print one JSON object (JSON lines under --watch)")
    ap.add_argument("--plot", metavar="OUT", help="write a dashboard PNG, or HTML embedding it if OUT ends in .html")
    ap.add_argument("--smoothing", type=int, default=None, metavar="N",
                    help=f"loss moving-average window in rows (default: a fifth of the rows, at most {MAX_SMOOTHING})")
    return ap


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def main(argv=None) -> int:
    """`bitnet-status` and scripts/check_training_status.py; returns the exit code (2 on bad input)."""
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
        # `--watch runs/x`: argparse hands the run dir to --watch's optional value; `--watch 10` alone
        # names no run (a number is an interval unless such a directory exists).
        if args.watch is not None and args.run_dir is None and (not _is_number(args.watch) or Path(args.watch).is_dir()):
            args.run_dir, args.watch = args.watch, "10"
        if args.run_dir is None:
            raise StatusError("a run directory is required: bitnet-status runs/<id> [--watch [SECONDS]] [--json] "
                              "[--plot OUT]")
        try:
            interval_s = None if args.watch is None else float(args.watch)
        except ValueError:
            interval_s = math.nan
        if interval_s is not None and not 0 < interval_s < math.inf:
            raise StatusError(f"--watch expects a positive number of seconds, got {args.watch!r}")
        if args.smoothing is not None and args.smoothing < 1:
            raise StatusError("--smoothing must be >= 1")
        if args.plot:
            refuse_inside_run(Path(args.run_dir), Path(args.plot))
        last, reader = {}, JsonlReader()  # one reader for every refresh: each parses only the appended rows

        def render() -> str:
            if args.plot:
                s = last["s"] = plot(args.run_dir, args.plot, args.smoothing, refresh_s=interval_s, reader=reader)
                return plot_message(args.plot, s)
            s = last["s"] = summarize(args.run_dir, args.smoothing, reader=reader)
            return render_json(s) if args.json else render_text(s)

        if interval_s is None:
            print(render())
            return 0
        summarize(args.run_dir, args.smoothing)  # a wrong path fails now with exit 2, not on screen forever
        return watch(render, interval_s, clear=not args.json, finished=lambda: last.get("s", {}).get("finished"))
    except (StatusError, UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
