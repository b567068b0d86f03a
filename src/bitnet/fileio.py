"""Kept for bitnet.cli until it imports bitnet.run.files (docs/design.md, "run directory")."""

from bitnet.run.files import fsync_dir, os_error_message, sha256_file  # noqa: F401
