"""What a healing run shows and leaves behind while it runs: the progress bar, the metrics file and
the loss plot.

    run_log = RunLog(config, total_steps, start_step)
    run_log.logged(step=10, loss=0.12, lr=5e-4, images=320)     # at log points only (host syncs)
    run_log.finish(step_losses, history)                          # metrics renamed into place, PNG drawn
    run_log.abort()                                               # interrupted: no partial metrics file
    for images, labels in progress_bar(loader, desc="top-1"):     # any other long loop: the same bar

Only the main process shows and writes anything (``main=False`` on the other ranks of a
distributed run). The metrics are written as they come to a hidden temporary file beside
``config.metrics_path`` (``tail -f`` works) that takes that name only when the run finishes:
an interrupted run leaves no partial output.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Sequence

from tqdm.auto import tqdm

from starfish_fast.checkpoint import atomic_path


def progress_bar(iterable=None, *, desc: str | None = None, total: int | None = None, initial: int = 0,
                 unit: str = "batch", enabled: bool = True) -> tqdm:
    """The package's one progress bar (stderr; rate and ETA); off when not ``enabled`` or without ``desc``."""
    if total is None and iterable is not None:
        try:
            total = len(iterable)
        except TypeError:             # a stream: no ETA
            total = None
    return tqdm(iterable, desc=desc, total=total, initial=initial, unit=unit, disable=not enabled or desc is None,
                dynamic_ncols=True)


class RunLog:
    def __init__(self, config, total_steps: int, start_step: int, main: bool = True, desc: str = "heal",
                 item: str = "img"):
        self.config, self.main, self.item = config, main, item        # item: img, or seq for a language model
        self.bar = progress_bar(desc=desc, total=total_steps, initial=start_step, unit="step",
                                enabled=config.progress and main)
        self.tick = time.perf_counter()
        self.files, self.metrics = contextlib.ExitStack(), None
        if main and config.metrics_path:
            self.metrics = open(self.files.enter_context(atomic_path(config.metrics_path)), "w")
            self.files.callback(self.metrics.close)       # closed before the rename (callbacks run last-in first)

    def logged(self, *, step: int, loss: float, lr: float, images: int, steps: int) -> None:
        """``steps`` steps of ``images`` images in all ended at ``step``, with mean ``loss``."""
        now = time.perf_counter()
        rate = images / max(now - self.tick, 1e-9)
        self.tick = now
        self.bar.set_postfix({"loss": f"{loss:.4f}", f"{self.item}_s": f"{rate:.0f}"}, refresh=False)
        self.bar.update(steps)                            # one write per log point (a log file gets each line once)
        self._write({"type": "step", "step": step, "loss": loss, "lr": lr, "images_per_s": rate})

    def _write(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def finish(self, step_losses: Sequence[float], history: Sequence[dict]) -> None:
        self.bar.close()
        if not self.main:
            return
        for record in history:
            self._write({"type": "epoch", **record})
        self.files.close()                                # renames the metrics into place
        if self.config.plot_path:
            plot_loss_curve(step_losses, history, self.config.plot_path)

    def abort(self) -> None:
        """The run failed or was interrupted: the temporary metrics file is removed, not renamed."""
        self.bar.close()
        self.files.__exit__(RuntimeError, RuntimeError("healing aborted"), None)


def plot_loss_curve(step_losses: Sequence[float], history: Sequence[dict], path: str | os.PathLike,
                    title: str = "STARFISH healing loss") -> None:
    """PNG of the per-step loss and the per-epoch mean (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(range(1, len(step_losses) + 1), step_losses, lw=1, alpha=0.6, label="step")
    steps_per_epoch = len(step_losses) / max(1, len(history))
    # sequential order's history has one record per block, its loss the block's last epoch
    key, label = ("epoch", "epoch mean") if all("epoch" in h for h in history) else ("block", "block, last epoch")
    axis.plot([steps_per_epoch * h[key] for h in history], [h["loss"] for h in history], "o-", label=label)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_yscale("log" if min(step_losses, default=1) > 0 else "linear")
    axis.set_title(title)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
