"""tqdm progress bar: loss, tok/s and ETA, refreshed from the log rows (so it never syncs the GPU)."""

from tqdm import tqdm

from bitnet.instrumentation.base import Hook


class ConsoleProgress(Hook):
    def __init__(self, num_steps: int, start_step: int, enabled: bool = True):
        self.bar = tqdm(total=num_steps, initial=start_step, disable=not enabled, unit="step",
                        dynamic_ncols=True, mininterval=1.0)

    def on_step_end(self, state, out):
        self.bar.update(1)

    def on_log(self, state, row):
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tok_s']:,.0f}",
                             refresh=False)

    def write(self, msg: str) -> None:
        self.bar.write(msg)

    def close(self):
        self.bar.close()
