"""Console progress: a tqdm bar (loss, tok/s, ETA) on a terminal, plain lines when output is redirected.

Refreshed from the log rows, so it never syncs the GPU. A bar redraws itself with carriage returns,
which in a log file run into the banner and every other message; redirected, each log row is one
line instead.
"""

import sys

from tqdm import tqdm

from bitnet.instrumentation.base import Hook


class ConsoleProgress(Hook):
    def __init__(self, num_steps: int, start_step: int, enabled: bool = True, interactive: bool | None = None):
        self.enabled, self.num_steps = enabled, num_steps
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.bar = tqdm(total=num_steps, initial=start_step, disable=not (enabled and self.interactive), unit="step",
                        dynamic_ncols=True, mininterval=1.0)

    def on_step_end(self, state, out):
        self.bar.update(1)

    def on_log(self, state, row):
        if self.interactive:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tok_s']:,.0f}",
                                 refresh=False)
        elif self.enabled:
            print(f"step {row['step']:>{len(str(self.num_steps))}}/{self.num_steps} | loss {row['loss']:.4f} | "
                  f"lr {row['lr']:.2e} | {row['tok_s']:,.0f} tok/s", flush=True)

    def write(self, msg: str) -> None:
        if self.interactive:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self):
        self.bar.close()
