"""Healing on 1 and 2 processes (torchrun): images/s in all and per process, the exposed all-reduce time,
and whether the results agree.

    python bench/bench_distributed.py                                   # CPU: gloo, the bundled ViT, 1 thread each
    python bench/bench_distributed.py --model deit_base_patch16_224 --batch-size 128 --steps 30   # GPUs: NCCL

The same model (random weights unless bundled), 50% magnitude masks, calibration batches and fast-mode
settings run (a) on one process with the global batch, (b) on two processes under torchrun with the
global batch split between them (DDP averages the gradients), (c) on one process with half the batch:
one process's share of (b) without any communication. The exposed all-reduce time per step is (b)'s
step time less (c)'s. Agreement: the largest relative difference of (a)'s and (b)'s per-epoch losses
and weights. JSON under ``bench/results/distributed_<device>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench_heal import RESULTS, load_dense, timed_heal  # bench/ is on sys.path
from devices import device_tag, environment, save_report
from starfish_fast import HealConfig
from starfish_fast.prune import magnitude_masks


def heal_once(args, batch_size: int, out: Path | None = None) -> dict:
    """Heal a copy of the model; seconds per step (median of the steady windows), losses, weights."""
    torch.manual_seed(0)
    dense, size, channels = load_dense(args.model)
    masks = magnitude_masks(dense, 0.5)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(args.steps * args.batch_size, channels, size, size, generator=generator)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = HealConfig(epochs=2, batch_size=batch_size, mode="fast", precision=args.precision, device=device,
                        log_every=args.warmup, progress=False)
    per_process = images if batch_size == args.batch_size else images[:args.steps * batch_size]
    result, model, seconds = timed_heal(dense, masks, per_process, config)
    if result.plan.rank != 0:
        return {}
    report = {"step_s": statistics.median(seconds), "history": result.history, "world_size": result.plan.world_size,
              "images_per_s": args.batch_size / statistics.median(seconds) if batch_size == args.batch_size
              else batch_size / statistics.median(seconds)}
    if out is not None and result.plan.rank == 0:
        torch.save({"report": report, "state": model.state_dict()}, out)
    return {**report, "state": model.state_dict()}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    report = {"model": args.model, **environment(), "batch_size": args.batch_size, "steps": args.steps,
              "threads_per_process": args.threads, "runs": {}}
    one = heal_once(args, args.batch_size)
    half = heal_once(args, args.batch_size // 2)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "two.pt"
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
                   "--worker", str(out), *sys.argv[1:]]
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"the 2-process run failed:\n{proc.stderr[-3000:]}")
        two = torch.load(out, weights_only=True)
    rel = lambda a, b: abs(a - b) / max(abs(b), 1e-12)                                # noqa: E731
    report["runs"] = {
        "1 process, global batch": {"images_per_s": one["images_per_s"], "step_s": one["step_s"]},
        "1 process, half batch (one process's share, no communication)": {
            "images_per_s": half["images_per_s"], "step_s": half["step_s"]},
        "2 processes, global batch": {"images_per_s": two["report"]["images_per_s"],
                                      "images_per_s_per_process": two["report"]["images_per_s"] / 2,
                                      "step_s": two["report"]["step_s"]}}
    report["exposed_all_reduce_s_per_step"] = two["report"]["step_s"] - half["step_s"]
    report["speedup_2_over_1"] = two["report"]["images_per_s"] / one["images_per_s"]
    report["agreement"] = {
        "epoch_loss_max_rel_diff": max(rel(a["loss"], b["loss"]) for a, b in zip(two["report"]["history"],
                                                                                 one["history"])),
        "weight_max_abs_diff": max(float((two["state"][k].float() - v.float()).abs().max())
                                   for k, v in one["state"].items())}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="fashion_vit")
    parser.add_argument("--batch-size", type=int, default=64, help="the global batch (even)")
    parser.add_argument("--steps", type=int, default=30, help="steps per epoch (2 epochs)")
    parser.add_argument("--warmup", type=int, default=5, help="steps per timed window; the first is left out")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--output", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:                       # one of the torchrun processes
        torch.set_num_threads(args.threads)
        heal_once(args, args.batch_size, Path(args.worker))
        return
    report = run(args)
    output = Path(args.output or RESULTS / f"distributed_{args.model}_{device_tag()}.json")
    save_report(report, output)
    print(json.dumps({k: v for k, v in report.items() if k not in ("peaks",)}, indent=2, default=str))


if __name__ == "__main__":
    main()
