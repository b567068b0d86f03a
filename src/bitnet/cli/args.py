"""The one argument parser of the console scripts (docs/design.md, section "command-line tools").

argparse answers a bad flag with its usage block and `prog: error: ...`; the house rule for bad
input is one `error: ...` line on stderr and exit 2. Standard library only (bitnet-status uses it).
"""

import argparse
import sys

BAD_INPUT = 2  # = bitnet.exits.BAD_INPUT, restated so this module needs nothing from the package


class UserError(Exception):
    """Bad input: printed as one `error: ...` line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a UserError (one line, naming --help) instead of usage + exit."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def bad_input(error) -> int:
    """Print `error: <error>` on stderr; returns the bad-input exit status."""
    print(f"error: {error}", file=sys.stderr)
    return BAD_INPUT


def parse_or_exit(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parser.parse_args(argv); a bad flag prints its one line and exits 2 (SystemExit, as argparse does)."""
    try:
        return parser.parse_args(argv)
    except UserError as e:
        sys.exit(bad_input(e))
