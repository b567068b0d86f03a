"""Eval on the frozen held-out set: loss, perplexity and the train-eval gap (eval/eval_results.jsonl)."""

import math
import time
from pathlib import Path

import torch

from bitnet.instrumentation.base import Hook, due
from bitnet.model.kernels.references import IGNORE_INDEX
from bitnet.run import layout
from bitnet.run.jsonl import JsonlWriter


@torch.no_grad()
def evaluate(model, batches, autocast, device) -> float:
    """Token-weighted mean cross entropy over the eval batches. Uses no RNG, so training is unaffected.

    The loss comes from the model's own head + loss (`model(x, targets=y)`, the training kernel on CUDA), so the
    logits exist once, in the matmul dtype: fp32 copies of them for F.cross_entropy made eval the run's memory
    peak (95m, 32 x 1024: 2 GiB of bf16 logits and 8 GiB of fp32 ones and their log-softmax).
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast():
            mean = model(x, targets=y)
        counted = (y != IGNORE_INDEX).sum()  # the mean's denominator (the eval windows hold no ignored targets)
        total += torch.where(counted > 0, mean.double() * counted, 0.0)  # a batch with none counted: mean is NaN
        count += counted
    model.train(was_training)
    return (total / count).item()  # host sync: once per eval


class EvalHook(Hook):
    def __init__(self, run_dir: Path, model, batches, autocast, device, interval: int, num_steps: int):
        self.model, self.batches, self.autocast, self.device = model, batches, autocast, device
        self.interval, self.num_steps = interval, num_steps
        self.writer = JsonlWriter(Path(run_dir) / layout.EVAL_RESULTS)
        self.last_train_loss = float("nan")
        self.last = None

    def on_log(self, state, row):
        self.last_train_loss = row.get("loss_avg", row["loss"])

    def works_at(self, step):
        return due(step, self.interval, self.num_steps)

    def on_step_end(self, state, out):
        if not self.works_at(state.step):
            return
        eval_loss = evaluate(self.model, self.batches, self.autocast, self.device)
        state.best_eval_loss = min(state.best_eval_loss, eval_loss)
        self.last = {"step": state.step, "tokens": state.tokens, "eval_loss": eval_loss,
                     "eval_ppl": math.exp(min(eval_loss, 50.0)), "train_loss": self.last_train_loss,
                     "gap": eval_loss - self.last_train_loss, "best_eval_loss": state.best_eval_loss,
                     "time": time.time()}
        self.writer.write(self.last)

    def close(self):
        self.writer.close()
