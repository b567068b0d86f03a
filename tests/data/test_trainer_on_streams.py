"""The trainer on a streamed source: a resumed run reads exactly the next tokens (bit-identical losses).

Shards and the embedded corpus share WindowLoader, whose trainer resume tests/train/test_resume.py covers.
"""

import json

from bitnet.cli.train import train_main
from tests.conftest import fast_args, read_rows


def test_resume_on_a_stream_is_bit_identical(runs, corpus):
    data = corpus["jsonl"]
    assert train_main(fast_args(runs, "straight", steps=4, checkpoint_interval=2, data=data)) == 0
    ckpt = runs / "straight" / "checkpoints" / "step_000002"
    assert train_main(fast_args(runs, "resumed", steps=4, checkpoint_interval=2, data=data)
                      + ["--resume-from", str(ckpt)]) == 0
    straight = read_rows(runs / "straight" / "metrics" / "scalars.jsonl")
    resumed = read_rows(runs / "resumed" / "metrics" / "scalars.jsonl")
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in straight[2:]] == [r["loss"] for r in resumed]
    fingerprints = [json.loads((runs / r / "meta" / "dataset_fingerprint.json").read_text())
                    for r in ("straight", "resumed")]
    assert fingerprints[0] == fingerprints[1] and fingerprints[0]["source"] == data
