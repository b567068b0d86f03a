"""Sample prompts and seeds: the packaged default, overrides, errors, stable seeds."""

import pytest

from bitnet.instrumentation.samples import load_prompts, sample_seed


def test_packaged_prompts():
    prompts = load_prompts()
    assert len(prompts) == 5 and all(p and not p.startswith("#") for p in prompts)


def test_prompt_file_override_and_errors(tmp_path, two_prompts):
    assert load_prompts(str(two_prompts)) == ["The President said", "Science is"]
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(str(empty))
    with pytest.raises(ValueError, match="cannot read"):
        load_prompts(str(tmp_path / "missing.txt"))


def test_sample_seeds_differ_by_every_part():
    base = sample_seed(42, 100, 0, "typical")
    assert base == sample_seed(42, 100, 0, "typical")
    others = [sample_seed(43, 100, 0, "typical"), sample_seed(42, 200, 0, "typical"),
              sample_seed(42, 100, 1, "typical"), sample_seed(42, 100, 0, "stress")]
    assert base not in others and len(set(others)) == 4
