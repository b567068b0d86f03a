"""Does a loaded checkpoint fit the model its own config describes? (docs/design.md, "checkpoint format").

bitnet.run.checkpoint checks a checkpoint's entries and types; the weights' and the optimizer state's
names and shapes need the model, built here on the meta device (no memory). The loaders below are
bitnet.run.checkpoint's with this check added: what generate, export and resume use.
"""

from functools import partial

import torch

from bitnet.model.config import ModelConfig
from bitnet.model.llama import Transformer
from bitnet.run import checkpoint


def decay_groups(model: torch.nn.Module) -> tuple[list, list]:
    """(decayed, not decayed) parameters in named_parameters order: weight decay on matrices only,
    not on norms, not on the embedding / tied head. build_optimizer's groups, in this order."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
    return decay, no_decay


def check_fits(state: dict, need: str) -> str | None:
    """What keeps `state`'s weights (and for need="resume" its optimizer state) from fitting the model
    of its own config, in a few words; None if they fit. Called by checkpoint.check_contents."""
    try:
        with torch.device("meta"):
            model = Transformer(ModelConfig.from_dict(state["config"]["model"]))
    except (TypeError, ValueError) as e:
        return f"its model config is unusable: {str(e).splitlines()[0][:200]}"
    weights = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state["model"].items()}
    problem = _compare_shapes("weight", weights, {k: v.shape for k, v in model.state_dict().items()})
    if problem or need != "resume":
        return problem
    return _check_optimizer(state["optimizer"], model)


def check_contents(state, need: str | None = "model") -> str | None:
    """checkpoint.check_contents with the model check: what makes `state` unusable for `need`."""
    return checkpoint.check_contents(state, need, fits=check_fits)


load = partial(checkpoint.load, fits=check_fits)
load_with_path = partial(checkpoint.load_with_path, fits=check_fits)
load_newest = partial(checkpoint.load_newest, fits=check_fits)


def _compare_shapes(what: str, got: dict, want: dict) -> str | None:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing:
        return f"{what} {missing[0]!r} missing ({len(missing)} missing in all) for its model config"
    if extra:
        return f"unexpected {what} {extra[0]!r} ({len(extra)} unexpected in all) for its model config"
    for name, shape in want.items():
        value = got[name]
        if not isinstance(value, torch.Tensor):
            return f"{what} {name!r} is a {type(value).__name__}, not a tensor"
        if value.shape != shape:
            return f"{what} {name!r} has shape {tuple(value.shape)}, its model config needs {tuple(shape)}"
    return None


def _check_optimizer(optim: dict, model) -> str | None:
    """AdamW state of the parameters in decay_groups' order (build_optimizer's): group sizes and moment shapes."""
    expected = decay_groups(model)
    groups, moments = optim.get("param_groups"), optim.get("state")
    if not isinstance(groups, list) or not isinstance(moments, dict) or not all(isinstance(g, dict) for g in groups):
        return "its optimizer state has no param_groups list or state table"
    sizes = [len(g.get("params", ())) for g in groups]
    want_sizes = [len(g) for g in expected]
    if sizes != want_sizes:
        return f"its optimizer state has parameter groups of {sizes}, the model needs {want_sizes}"
    shapes = [p.shape for g in expected for p in g]
    for index, s in moments.items():
        if not isinstance(index, int) or not 0 <= index < len(shapes) or not isinstance(s, dict):
            return f"its optimizer state has an entry for parameter {index!r}, which the model does not have"
        for key in ("exp_avg", "exp_avg_sq"):
            t = s.get(key)
            if t is not None and (not isinstance(t, torch.Tensor) or t.shape != shapes[index]):
                return f"its optimizer {key} of parameter {index} does not match the parameter's shape"
    return None
