"""What a healing run shows and leaves behind while it runs: the progress bar, the metrics file and
the loss plot.

    run_log = RunLog(config, total_steps, start_step)
    run_log.stepped()                                             # every step: the bar's count (no host sync)
    run_log.logged(step=10, loss=0.12, lr=5e-4, images=320)     # at log points only (host syncs)
    run_log.finish(step_losses, history)                          # metrics renamed into place, PNG drawn
    run_log.abort()                                               # interrupted: no partial metrics file
    join_phases(config, later, first_steps, step_losses, history)  # a run in phases: one metrics file, one plot
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

RATE_KEYS = {"img": "images_per_s", "seq": "sequences_per_s"}     # the metrics file's rate, by what a sample is


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

    def stepped(self) -> None:
        """One step done: the count moves at once (no host sync: the loss waits for the next log point)."""
        self.bar.update(1)

    def logged(self, *, step: int, loss: float, lr: float, images: int, steps: int) -> None:
        """``steps`` steps of ``images`` images (or sequences) in all ended at ``step``, with mean ``loss``."""
        now = time.perf_counter()
        rate = images / max(now - self.tick, 1e-9)
        self.tick = now
        self.bar.set_postfix({"loss": f"{loss:.4f}", f"{self.item}/s": f"{rate:.3g}"})
        self._write({"type": "step", "step": step, "loss": loss, "lr": lr, RATE_KEYS.get(self.item, "images_per_s"):
                     rate})

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


def join_phases(config, later, first_steps: int, step_losses: Sequence[float], history: Sequence[dict]) -> None:
    """A run healed in phases (``config.phase_configs``) leaves one metrics file and one plot at ``config``'s
    paths: the ``later`` phase's step records numbered on after the ``first_steps`` of the first, each record with
    its phase's objective, the epochs of the joined ``history``; the later phase's own files are removed."""
    if config.metrics_path and later.metrics_path:
        records = []
        for path, objective, offset in ((config.metrics_path, config.objective, 0),
                                        (later.metrics_path, later.objective, first_steps)):
            with open(path) as lines:
                records += [{**record, "step": record["step"] + offset, "objective": objective}
                            for record in map(json.loads, lines) if record["type"] == "step"]
        with atomic_path(config.metrics_path) as tmp, open(tmp, "w") as out:
            epochs = [{"type": "epoch", **h} for h in history]
            out.writelines(json.dumps(record) + "\n" for record in [*records, *epochs])
        os.remove(later.metrics_path)
    if config.plot_path and later.plot_path:
        plot_loss_curve(step_losses, history, config.plot_path,
                        title=f"healing loss: {config.objective}, then {later.objective} from step {first_steps + 1}")
        os.remove(later.plot_path)


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
