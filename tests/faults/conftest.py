"""Fixtures of the fault suite: the uninterrupted reference run and the background subprocess scenarios.

The scenarios (scenarios.py) of every collected test module start together, in threads, when the
first test of this folder runs; a test then waits for its own with `scenario(name)`. This keeps the
suite's wall time near that of its slowest chain instead of the sum of a dozen interpreter start-ups.
"""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bitnet.data import build_data, load_tokenizer
from tests.faults.harness import BASE, flags, train
from tests.faults.scenarios import SCENARIOS

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    """BASE trained straight through in-process, every checkpoint kept: the losses every resume must equal."""
    runs = tmp_path_factory.mktemp("reference")
    assert train(flags(runs, "ref", keep_last=100)) == 0
    return runs / "ref"


@pytest.fixture(scope="session", autouse=True)
def _background(request, tmp_path_factory):
    wanted = {Path(str(item.path)).name for item in request.session.items if Path(str(item.path)).parent == HERE}
    jobs = [fn for module, fns in SCENARIOS.items() if module in wanted for fn in fns]
    if jobs:  # tokenize the embedded corpus once (a cached file) before a dozen processes all want it
        build_data("embedded", load_tokenizer("llama2"), BASE["seq_len"], 0, 1, 1)
    pool = ThreadPoolExecutor(max_workers=max(len(jobs), 1), thread_name_prefix="fault-scenario")
    futures = {fn.__name__: pool.submit(fn, tmp_path_factory.mktemp(fn.__name__)) for fn in jobs}
    yield futures
    pool.shutdown(wait=True)


@pytest.fixture
def scenario(_background):
    """scenario(name) -> the result dict of a background scenario (waits for it)."""
    return lambda name: _background[name].result(timeout=300)
