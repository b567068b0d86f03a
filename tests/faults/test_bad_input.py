"""Bad input: every wrong input below gives one line on stderr, exit status 2, no traceback and
nothing written. In-process through `train_main` for speed; a handful as real processes to show
that nothing else reaches the user's terminal."""

import pytest

from tests.faults.harness import flags, train, tree

FILES = {  # written into the test's temp dir before each case
    "empty.txt": "",
    "empty_dir/.keep": "",
    "float_for_int.toml": "batch_size = 4.0\n",
    "str_for_bool.toml": "no_eval = 'yes'\n",
    "model_bad_type.toml": "[model]\ndim = 'big'\n",
    "model_not_table.toml": "model = 3\n",
    "model_unknown.toml": "[model]\nwidth = 64\n",
    "model_on_resume.toml": "[model]\nn_layers = 1\n",
    "small_vocab.toml": "[model]\nvocab_size = 8000\n",
    "list.yaml": "- num_steps\n- 3\n",
    "broken.toml": "num_steps = = 3\n",
    "config.json": "{}",
    "traversal.toml": "run_id = '../../../tmp/x'\n",
    "runs_file": "not a directory",
    "notarun/notes.txt": "someone's files",
    "taken/meta/config.json": "{}",
    "truncated.pt": "PK\x03\x04 half a zip",
}

# (what is wrong, flag overrides of harness.flags, a piece of the expected message);
# "{tmp}" is the test's temp dir, "{ref}" the reference run; "_argv" is appended as is.
BAD = [
    # out of range
    ("zero steps", dict(num_steps=0), "--num-steps must be positive"),
    ("negative batch", dict(batch_size=-4), "--batch-size must be positive"),
    ("zero seq-len", dict(seq_len=0), "--seq-len must be positive"),
    ("negative peak LR", dict(lr_peak=-1e-3), "--lr-peak must be positive"),
    ("NaN peak LR", dict(lr_peak="nan"), "--lr-peak must be a finite number"),
    ("infinite z-score", dict(anomaly_zscore="inf"), "--anomaly-zscore must be a finite number"),
    ("zero Adam epsilon", dict(adam_eps=0), "--adam-eps must be positive"),
    ("beta2 of 1", dict(beta2=1.0), "--beta1 and --beta2 must be in [0, 1)"),
    ("negative warmup", dict(warmup_steps=-1), "--warmup-steps must be >= 0"),
    ("negative keep-last", dict(keep_last=-1), "--keep-last must be positive"),
    ("zero keep-last", dict(keep_last=0), "--keep-last must be positive"),
    ("zero log interval", dict(log_interval=0), "--log-interval must be positive"),
    ("zero checkpoint interval", dict(checkpoint_interval=0), "--checkpoint-interval must be positive"),
    ("negative grad clip", dict(grad_clip=-1), "--grad-clip must be >= 0"),
    ("stage boundary 0", dict(stage_boundary=0), "--stage-boundary must be in (0, 1)"),
    ("seq-len above the context", dict(seq_len=257), "--seq-len 257 exceeds the model's context of 256"),
    # wrong types
    ("text for an int", dict(num_steps="ten"), "argument --num-steps: invalid int value: 'ten'"),
    ("fraction for an int", dict(batch_size=1.5), "argument --batch-size: invalid int value: '1.5'"),
    ("text for a float", dict(lr_peak="fast"), "argument --lr-peak: invalid float value: 'fast'"),
    ("value for a switch", dict(_argv=["--no-eval", "yes"]), "unrecognized arguments: yes"),
    ("unknown flag", dict(_argv=["--learning-rate", "1e-3"]), "unrecognized arguments: --learning-rate"),
    ("config: float for an int", dict(config="{tmp}/float_for_int.toml"), "batch_size in config file must be int"),
    ("config: text for a bool", dict(config="{tmp}/str_for_bool.toml"), "no_eval in config file must be bool"),
    ("config: [model] wrong type", dict(config="{tmp}/model_bad_type.toml"), "dim in the config file's [model] table"),
    ("config: model not a table", dict(config="{tmp}/model_not_table.toml"), "'model' entry must be a table"),
    ("config: unknown [model] key", dict(config="{tmp}/model_unknown.toml"), "unknown key 'width'"),
    ("config: not a table", dict(config="{tmp}/list.yaml"), "must hold a table of keys"),
    ("config: unparsable", dict(config="{tmp}/broken.toml"), "cannot parse config file"),
    ("config: unknown format", dict(config="{tmp}/config.json"), "must end in .toml, .yaml or .yml"),
    ("config: missing", dict(config="{tmp}/nope.toml"), "config file not found"),
    # unknown choices
    ("unknown preset", dict(preset="7b"), "unknown preset '7b'"),
    ("unknown parallelism", dict(parallel="tp"), "--parallel must be ddp or fsdp2"),
    ("unknown anomaly policy", dict(anomaly_policy="explode"), "--anomaly-policy must be warn, skip or stop"),
    ("unknown checkpoint-error policy", dict(on_checkpoint_error="ignore"), "--on-checkpoint-error must be stop or"),
    ("malformed device", dict(device="cuda:x"), "unsupported --device 'cuda:x'"),
    ("device of another kind", dict(device="meta"), "unsupported --device 'meta'"),
    # conflicting flags
    ("batch not divisible by micro-batch", dict(batch_size=4, micro_batch_size=3), "is not divisible by"),
    ("micro-batch above batch", dict(micro_batch_size=8), "is not divisible by --micro-batch-size 8"),
    ("preset against the checkpoint's", dict(preset="95m", resume_from="{ref}/checkpoints/step_000004"),
     "--preset 95m conflicts with the checkpoint's preset tiny"),
    ("[model] table on a resume",
     dict(config="{tmp}/model_on_resume.toml", resume_from="{ref}/checkpoints/step_000004"),
     "a [model] table cannot change the model of a resumed checkpoint"),
    ("resume at the last step", dict(resume_from="{ref}/checkpoints/step_000024"), "nothing to do"),
    ("auto resume without a run id", dict(run_id=None, resume_from="auto"), "--resume-from auto needs --run-id"),
    # missing or empty files
    ("missing checkpoint", dict(resume_from="{tmp}/nope/checkpoint.pt"), "checkpoint not found"),
    ("truncated checkpoint", dict(resume_from="{tmp}/truncated.pt"), "cannot load checkpoint"),
    ("run to auto-resume does not exist", dict(run_id="ghost", resume_from="auto"), "no intact checkpoint of run"),
    ("missing data file", dict(data="{tmp}/nope.jsonl"), "no such file or directory"),
    ("empty data file", dict(data="{tmp}/empty.txt"), "empty.txt"),
    ("data directory without text files", dict(data="{tmp}/empty_dir"), "empty_dir"),
    ("unknown data source", dict(data="wikipedia"), "unknown data source 'wikipedia'"),
    ("missing tokenizer", dict(tokenizer="{tmp}/nope.json"), "tokenizer file not found"),
    ("tokenizer vocab above the model's", dict(config="{tmp}/small_vocab.toml"),
     "has 32000 tokens, more than the model's vocab_size 8000"),
    ("missing sample prompts", dict(sample_interval=5, sample_prompts="{tmp}/nope.txt"), "--sample-prompts"),
    # paths and run ids
    ("run id with a separator", dict(run_id="a/b"), "invalid --run-id 'a/b'"),
    ("run id climbing out", dict(run_id="../up"), "invalid --run-id '../up'"),
    ("absolute run id", dict(run_id="/tmp/abs"), "invalid --run-id '/tmp/abs'"),
    ("run id from a config climbing out", dict(run_id=None, config="{tmp}/traversal.toml"), "invalid --run-id"),
    ("existing run id without --overwrite", dict(runs_dir="{tmp}", run_id="taken"), "already exists"),
    ("--overwrite of a directory that is no run", dict(runs_dir="{tmp}", run_id="notarun", overwrite=True),
     "is not a run directory"),
    ("runs dir is a file", dict(runs_dir="{tmp}/runs_file"), "runs_file"),
]


@pytest.fixture
def inputs(tmp_path):
    for name, content in FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    return tmp_path


def test_every_numeric_flag_refuses_a_negative_value_by_name():
    """resolve_derived on -1 for each int/float field: refused, with a message that names the flag."""
    import dataclasses

    from bitnet.train.config import TrainConfig, resolve_derived

    assert len({name for name, _, _ in BAD}) == len(BAD)  # every row of the table above has its own id
    accepted = []
    for f in dataclasses.fields(TrainConfig):
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if kind not in ("int", "float"):
            continue
        flag = "--" + f.name.replace("_", "-")
        try:
            resolve_derived(TrainConfig(**{f.name: -1 if kind == "int" else -1.0}), 1, 1024)
        except ValueError as e:
            bound = "must be in [0, 1)" if f.name in ("beta1", "beta2") else "must be"
            assert flag in str(e) and bound in str(e), (flag, str(e))
            continue
        accepted.append(f.name)
    assert accepted == []


@pytest.mark.parametrize("name,overrides,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, overrides, message, inputs, reference, capsys):
    fill = {k: str(v).format(tmp=inputs, ref=reference) if isinstance(v, str) else v for k, v in overrides.items()}
    extra = fill.pop("_argv", [])
    argv = flags(fill.pop("runs_dir", inputs / "runs"), fill.pop("run_id", "bad"), **fill) + extra
    before = tree(inputs)
    assert train(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert tree(inputs) == before


def test_as_a_real_process_only_one_line_reaches_stderr(scenario):
    r = scenario("bad_input_processes")
    for name, res in r["results"].items():
        lines = res["stderr"].splitlines()
        assert res["returncode"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, res)
        assert res["stdout"] == "", (name, res)
    assert r["tree_after"] == r["tree_before"] and not r["marker"].exists()
