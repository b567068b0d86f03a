"""evaluate(): the token-weighted mean loss over the eval batches, from the model's own head + loss."""

import contextlib
import math

import torch
import torch.nn.functional as F

from bitnet.instrumentation.evaluation import evaluate
from bitnet.model import PRESETS, Transformer


def test_eval_is_the_token_weighted_mean_of_the_model_losses():
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"])
    model.init_weights(seed=0)
    batches = [(torch.randint(0, 32000, (n, 16)), torch.randint(0, 32000, (n, 16))) for n in (3, 1)]
    with torch.no_grad():  # what the old eval computed: F.cross_entropy summed over fp32 logits
        total = sum(F.cross_entropy(model(x).float().reshape(-1, 32000), y.reshape(-1), reduction="sum").item()
                    for x, y in batches)
    got = evaluate(model, batches, contextlib.nullcontext, torch.device("cpu"))
    assert math.isclose(got, total / (4 * 16), rel_tol=1e-6)
    assert model.training  # the train/eval mode is put back


def test_eval_asks_the_model_for_its_loss_not_its_logits():
    """The logits of a 95m eval batch are 2 GiB in bf16; fp32 copies of them for F.cross_entropy were the run's
    memory peak. evaluate() hands the targets to the model, whose loss path (on CUDA the training kernel) makes
    none; ignored targets (-100) are left out of the count."""
    calls = []

    class Recorder(torch.nn.Module):
        def forward(self, x, targets=None):
            calls.append(targets is not None)
            if (targets == -100).all():  # a mean over no targets, as F.cross_entropy gives it
                return torch.tensor(math.nan)
            return torch.tensor(float(x.shape[0]))  # "loss" = batch size, to check the weighting

    y = torch.zeros(2, 4, dtype=torch.long)
    y[1, :2] = -100  # 6 of 8 targets count in the first batch, all 4 in the second, none in the third
    batches = [(torch.zeros(2, 4), y), (torch.zeros(1, 4), torch.zeros(1, 4, dtype=torch.long)),
               (torch.zeros(3, 4), torch.full((3, 4), -100))]
    got = evaluate(Recorder(), batches, contextlib.nullcontext, torch.device("cpu"))
    assert calls == [True, True, True]
    assert math.isclose(got, (2.0 * 6 + 1.0 * 4) / 10)
