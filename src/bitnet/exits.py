"""Exit statuses shared by the bitnet commands (README "Exit codes"), and one-line warnings.

    0    done (or stopped by SIGINT/SIGTERM with a checkpoint saved)
    1    failed: disk full (mid-run, or while setting up), out of memory, bad data reached mid-run
    2    bad input: nothing was trained or written
    3    stopped by a policy (--anomaly-policy stop), checkpoint saved
    130  interrupted: a second Ctrl-C, or Ctrl-C before training started
"""

import sys
import warnings

DONE, FAILED, BAD_INPUT, STOPPED_BY_POLICY, INTERRUPTED = 0, 1, 2, 3, 130


def warning_line(message) -> str:
    """`warning: ...` on one line, whatever line breaks the message holds."""
    return "warning: " + " ".join(str(message).split())


def _show(message, category, filename, lineno, file=None, line=None):
    print(warning_line(message), file=file or sys.stderr)


def one_line_warnings() -> None:
    """From now on print every warning as one `warning: ...` line, not Python's two-line format."""
    warnings.showwarning = _show
