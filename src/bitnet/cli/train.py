"""`bitnet-train`: flags and config files into a TrainConfig, then the training loop
(docs/design.md, section "command-line tools"). `bitnet-train --help` lists every flag.

Values layer as: TrainConfig defaults < the preset's train defaults < the resumed checkpoint's
config < --config FILE (TOML or YAML, parsed, never evaluated) < flags given on the command line.
"""

import argparse
import contextlib
import dataclasses
import errno
import sys
import warnings
from pathlib import Path

from bitnet import exits
from bitnet.cli.args import OneLineParser, UserError
from bitnet.run.files import os_error_message
from bitnet.model.config import PRESETS, ModelConfig
from bitnet.train.config import PRESET_TRAIN_DEFAULTS, TrainConfig, field_names, fit_default_warmup

NOT_FROM_CHECKPOINT = {"run_id", "overwrite", "resume_from", "runs_dir"}


def build_parser(prog: str = "bitnet-train") -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=prog,
        description="Train a BitNet b1.58 LLaMA-style model. Quick start (CPU, a few minutes): "
                    f"{prog} --preset tiny --run-id demo",
        epilog="Defaults: the '(default: X)' values are the 95m preset's (the seed's 400k-step FineWeb-Edu run); "
               "'tiny: Y' is what --preset tiny sets instead (CPU quick start), '1.3b: Y' and '3b: Y' what those "
               "presets set (the paper's LRs, a micro-batch for an 80 GB GPU). Values layer as: these defaults < "
               "the preset's < the resumed checkpoint's config (--resume-from) < the --config file < flags given "
               "here. A config file's keys are the flag names (batch_size or batch-size).",
        argument_default=argparse.SUPPRESS)
    p.add_argument("--config", metavar="FILE", help="TOML or YAML file of the flags below (flags win); "
                   "a [model] table overrides the preset's model fields")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        is_bool = f.type is bool or f.type == "bool"
        if not is_bool and f.default != "" and "(default:" not in help_text:  # "" defaults are described in words
            preset_note = "".join(f"; {name}: {d[f.name]}" for name, d in PRESET_TRAIN_DEFAULTS.items() if f.name in d)
            help_text += f" (default: {f.default}{preset_note})"
        if is_bool:
            p.add_argument(flag, action="store_true", help=help_text)
        else:  # the allowed values show as the metavar; resolve_config and resolve_derived check them
            kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__)
            choices = f.metadata.get("choices")
            p.add_argument(flag, type=kind, metavar="{" + ",".join(choices) + "}" if choices else f.name.upper(),
                           help=help_text)
    p.add_argument("--quantization", choices=["bitnet", "none"],
                   help="bitnet: ternary BitLinear (default); none: the same network with plain linears (the bf16 twin)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or banner")
    return p


def read_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        if p.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            raise UserError(f"config file must end in .toml, .yaml or .yml: {path}")
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot parse config file {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a table of keys")
    for table in [data] + [v for v in data.values() if isinstance(v, dict)]:
        bad = [k for k in table if not isinstance(k, str)]
        if bad:
            raise UserError(f"config file {path}: key {bad[0]!r} is a {type(bad[0]).__name__}, keys must be names")
    return {k.replace("-", "_"): v for k, v in data.items()}


def check_types(values: dict, source: str, cls=TrainConfig) -> dict:
    types = {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in dataclasses.fields(cls)}
    for key, v in values.items():
        if key not in types:
            raise UserError(f"unknown key {key!r} in {source}")
        want = types[key]
        ok = {"int": isinstance(v, int) and not isinstance(v, bool),
              "float": isinstance(v, (int, float)) and not isinstance(v, bool),
              "bool": isinstance(v, bool), "str": isinstance(v, str)}[want]
        if not ok:
            raise UserError(f"{key} in {source} must be {want}, got {v!r}")
    return {k: float(v) if types[k] == "float" else v for k, v in values.items()}


def resolve_config(argv: list[str], prog: str = "bitnet-train") -> tuple[TrainConfig, ModelConfig, dict | None, bool]:
    """Parse flags and files into (train config, model config, loaded resume checkpoint, quiet)."""
    args = vars(build_parser(prog).parse_args(argv))
    quiet = args.pop("quiet", False)
    file_values = read_config_file(args.pop("config")) if "config" in args else {}
    model_overrides = file_values.pop("model", {})
    if not isinstance(model_overrides, dict):
        raise UserError("the config file's 'model' entry must be a table")
    if "quantization" in args:
        model_overrides = {**model_overrides, "quantization": args.pop("quantization")}
    file_values = check_types(file_values, "config file")
    model_overrides = check_types(model_overrides, "the config file's [model] table", ModelConfig)

    resume, ckpt_train, ckpt_model = None, {}, None
    resume_from = args.get("resume_from") or file_values.get("resume_from")
    if resume_from:
        from bitnet.model import checkpoint_fit
        from bitnet.run import checkpoint

        with one_line_warnings():  # e.g. "skipping checkpoint: ... corrupt or truncated"
            try:
                if resume_from in ("auto", "latest"):
                    resume_from, args["run_id"], resume = find_auto_resume(args, file_values)
                else:
                    pt, resume = checkpoint_fit.load_with_path(resume_from, need="resume")
                    if checkpoint.run_dir_of(resume_from) is not None:  # name the checkpoint the run dir gave
                        resume_from = str(pt.parent)
                args["resume_from"] = resume_from
            except checkpoint.CheckpointError as e:
                raise UserError(str(e)) from None
        try:  # a checkpoint is data from elsewhere: its config gets the same checks as a config file
            saved = resume["config"]
            ckpt_train = check_types({k: v for k, v in saved["train"].items()
                                      if k in field_names() and k not in NOT_FROM_CHECKPOINT}, resume_from)
            ckpt_model = check_types(dict(saved["model"]), resume_from, ModelConfig)
            if "residual_stream" not in saved["train"]:  # saved before these switches: resume the step it trained
                ckpt_train.update(residual_stream="fp32", head_chunk_rows=0)  # with (fp32 stream, whole head)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise UserError(f"{resume_from} holds no usable training config") from None
        if not (args.get("run_id") or file_values.get("run_id")):  # a resume's default id: <run>_r<step>
            from bitnet.run.directory import continuation_id

            runs_dir = args.get("runs_dir") or file_values.get("runs_dir") or TrainConfig.runs_dir
            with contextlib.suppress(ValueError):  # a recorded id that is no valid id: the default name
                args["run_id"] = continuation_id(runs_dir, str(saved["train"].get("run_id")), resume["step"])

    preset = args.get("preset") or file_values.get("preset") or ckpt_train.get("preset") or TrainConfig.preset
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    if ckpt_model is not None and preset != ckpt_train.get("preset"):
        raise UserError(f"--preset {preset} conflicts with the checkpoint's preset {ckpt_train.get('preset')}")

    values = {**PRESET_TRAIN_DEFAULTS[preset], **ckpt_train, **file_values, **args, "preset": preset}
    values = fit_default_warmup(values, given={*ckpt_train, *file_values, *args})
    cfg = TrainConfig(**values)
    try:
        if ckpt_model is not None:
            if model_overrides:
                raise UserError("a [model] table cannot change the model of a resumed checkpoint")
            model_cfg = ModelConfig.from_dict(ckpt_model)
        else:
            model_cfg = ModelConfig.from_dict({**PRESETS[preset].to_dict(), **model_overrides})
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None
    if cfg.run_id:  # a bad or taken run id fails now, not after minutes of data setup
        from bitnet.run.directory import check_run_dir

        check_run_dir(cfg.runs_dir, cfg.run_id, cfg.overwrite)
    return cfg, model_cfg, resume, quiet


@contextlib.contextmanager
def one_line_warnings():
    """Show the warnings raised inside as `warning: ...` lines on stderr (not Python's two-line format)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                print(exits.warning_line(w.message), file=sys.stderr)


def find_auto_resume(args: dict, file_values: dict) -> tuple[str, str, dict]:
    """--resume-from auto|latest: (newest checkpoint of --run-id's family that loads, the new run's id,
    its contents).

    The family is run X and its continuations X_r<step>[-n] (bitnet/run/directory.py), so the same command line
    resumes a run however often it was killed; each resume starts a new directory X_r<step>.
    Checkpoints that fail their checksum or cannot be used are skipped with a warning each.
    """
    from bitnet.model import checkpoint_fit
    from bitnet.run import checkpoint
    from bitnet.run.directory import check_run_id, continuation_id, live_run, run_family

    run_id = args.get("run_id") or file_values.get("run_id")
    runs_dir = args.get("runs_dir") or file_values.get("runs_dir") or TrainConfig.runs_dir
    if not run_id:
        raise UserError("--resume-from auto needs --run-id, the run to continue")
    check_run_id(run_id)
    found = []
    for run in run_family(runs_dir, run_id):
        busy = live_run(run)
        if busy:  # its trainer still holds the run's lock: two resumes of one run would race
            raise UserError(f"another run of {run_id!r} is in progress in {run} ({busy}); wait for it to end "
                            f"or stop it, then resume again")
        for step, step_dir in checkpoint.list_checkpoints(run):
            found.append((step, step_dir.stat().st_mtime_ns, step_dir))
    if not found:
        raise UserError(f"no intact checkpoint of run {run_id!r} (or its continuations) in {runs_dir}")
    found.sort(reverse=True)
    try:
        step_dir, state = checkpoint_fit.load_newest([d for _, _, d in found], need="resume",
                                                 where=f"run {run_id!r} (or its continuations) in {runs_dir}")
    except checkpoint.CheckpointError as e:
        raise UserError(str(e)) from None
    return str(step_dir), continuation_id(runs_dir, run_id, state["step"]), state


def train_main(argv: list[str] | None = None, prog: str = "bitnet-train") -> int:
    """`bitnet-train`: the exit statuses of bitnet/exits.py (README "Exit codes")."""
    argv = sys.argv[1:] if argv is None else argv
    exits.one_line_warnings()
    try:
        cfg, model_cfg, resume, quiet = resolve_config(argv, prog)
        from bitnet.train.loop import train

        result = train(cfg, model_cfg, resume=resume, resumed_from=cfg.resume_from or None, quiet=quiet)
    except (UserError, ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exits.BAD_INPUT
    except OSError as e:  # a path that cannot be used is bad input; a disk that fills or fails is the machine's
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        return exits.FAILED if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO) else exits.BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return exits.INTERRUPTED
    except Exception as e:  # a failure mid-run with a one-line reason (disk full); any other error raises
        from bitnet.train.loop import TrainingFailed

        if isinstance(e, (MemoryError, torch_oom())):  # while setting up (the loop names its step itself)
            print(f"error: out of memory while setting up the run; lower --micro-batch-size, --batch-size or "
                  f"--seq-len", file=sys.stderr)
            return exits.FAILED
        if not isinstance(e, TrainingFailed):
            raise
        print(f"error: {e}", file=sys.stderr)
        return exits.FAILED
    if result.stopped_by_policy:
        print(f"stopped: {result.stop_reason}; checkpoint of step {result.step} saved in {result.run_dir} "
              f"(exit {exits.STOPPED_BY_POLICY})", file=sys.stderr)
        return exits.STOPPED_BY_POLICY
    if not quiet:
        print(f"done: {result.run_dir} at step {result.step} ({result.tokens:,} tokens), last loss {result.last_loss:.4f}")
    return exits.DONE


def torch_oom() -> type:
    import torch

    return torch.OutOfMemoryError


if __name__ == "__main__":
    sys.exit(train_main())
