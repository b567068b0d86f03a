"""WindowLoader over one array or several (shards): epochs, resume, state checks."""

import numpy as np
import pytest

from bitnet.data import WindowLoader


def segments():
    rng = np.random.default_rng(0)
    # a shard shorter than one window (never read), and shards with ragged tails
    return [rng.integers(0, 32000, n).astype(np.uint16) for n in (100, 5, 257, 1000)]


def test_windows_come_from_within_each_segment_once_per_epoch():
    segs = segments()
    loader = WindowLoader(segs, 15, seed=1)
    expected = {tuple(s[i:i + 16]) for s in segs for i in range(0, len(s) // 16 * 16, 16)}
    assert loader.num_windows == len(expected) == 6 + 0 + 16 + 62
    x, y = loader.next_batch(loader.num_windows)
    got = {tuple(r) for r in np.concatenate([x.numpy(), y[:, -1:].numpy()], axis=1).tolist()}
    assert got == expected and loader.epoch == 0
    assert np.array_equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    first_epoch = x.clone()
    x2, _ = loader.next_batch(loader.num_windows)
    assert loader.epoch == 1 and not np.array_equal(x2, first_epoch)  # reshuffled


def test_resume_and_ranks():
    straight = WindowLoader(segments(), 15, seed=2)
    reference = [straight.next_batch(6)[0] for _ in range(40)]
    first = WindowLoader(segments(), 15, seed=2)
    for _ in range(17):
        first.next_batch(6)
    resumed = WindowLoader(segments(), 15, seed=2, rank=1, world_size=2)
    resumed.load_state_dict(first.state_dict())
    for step in range(17, 40):
        assert np.array_equal(resumed.next_batch(6)[0], reference[step][1::2])


def test_states_of_older_runs_load_and_other_sources_are_refused():
    loader = WindowLoader(segments(), 15, seed=2, source="shards:a")
    old = {"epoch": 1, "index": 3, "seed": 2, "seq_len": 15, "num_windows": loader.num_windows}  # no kind/source
    loader.load_state_dict(old)
    assert (loader.epoch, loader.index) == (1, 3)
    with pytest.raises(ValueError, match="source was shards:b, now shards:a"):
        loader.load_state_dict({**old, "kind": "windows", "source": "shards:b"})
    with pytest.raises(ValueError, match="kind 'stream'"):
        loader.load_state_dict({**old, "kind": "stream"})
    with pytest.raises(ValueError, match="num_windows"):
        loader.load_state_dict({**old, "num_windows": 7})
