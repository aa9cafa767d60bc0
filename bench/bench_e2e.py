"""End to end: the whole call a user waits for, fast mode against the reference-equivalent loop, on the
paper's jobs.

    python bench/bench_e2e.py                                   # DeiT-B 5,000 x 10 at batch 32, DeiT3-H 1,000 x 5
    python bench/bench_e2e.py --jobs deit_b --images 1000 --epochs 3     # scaled to a time box
    python bench/bench_e2e.py --reference-repo DIR              # also the public reference library's own loop
    python bench/bench_e2e.py --jobs llama_1b --images 64       # a 1B-class causal LM (random weights), tokens/s
    python bench/bench_e2e.py --rehearse                        # the bundled ViT on a CPU, tiny (CI runs it)

Each job (model, calibration images, epochs, batch) builds its model with random weights (speed does not
depend on them) and 50% magnitude masks on the default scope, draws random calibration images, and then
times every implementation on copies of the same pruned model and the same tensors:
- ``reference_loop``: ``starfish_fast.baseline.reference_recovery``, the reference's loop written plainly
  (fp32, gradient hooks, an fp16 teacher cache on the CPU copied every step, a host sync every step);
- ``reference_library``: ``recovery.starfish_recovery`` of the public reference library found at
  ``--reference-repo`` (its modules imported from there; skipped without it);
- ``fast``: ``heal(..., HealConfig())`` with every ``auto`` as the plan decides it (compile included);
- ``fast_eager`` / ``fast_compiled``: the same with ``compile="off"`` / ``"on"``.
The language-model job (``llama_1b``: Llama-3.2-1B's shapes, random weights, 512-token sequences of random
ids; ``--images`` counts sequences) uses the same loops: the reference loop runs the whole model with hooks.
Reported per implementation: the whole call in seconds (teacher pass, compile, every step; the model's
construction and the random data excluded), steady-state images (sequences) and tokens per second (the loop
after its first logged window), the peak GPU memory, the speed-up over ``reference_loop`` and the epoch
losses; for fast mode also compile seconds and the plan's compile reason. JSON to ``bench/results/e2e_<device tag>.json`` (written after every run)
and a plot of whole-call seconds per job and implementation beside it.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from bench_heal import load_dense  # bench/ is on sys.path
from devices import device_tag, environment, save_report
from starfish_fast import HealConfig, heal
from starfish_fast.baseline import reference_recovery
from starfish_fast.compat import RecoveryConfig
from starfish_fast.models import adapter_for
from starfish_fast.prune import magnitude_masks

log = logging.getLogger("bench_e2e")
RESULTS = Path(__file__).resolve().parent / "results"
# the paper's jobs: DeiT-B 5,000 images x 10 epochs at batch 32; DeiT3-H 1,000 x 5 (its 16-minute A10 job)
JOBS = {"deit_b": ("deit_base_patch16_224", 5000, 10, 32), "deit3_h": ("deit3_huge_patch14_224", 1000, 5, 32),
        "llama_1b": ("llama_1b", 256, 1, 8)}
# Llama-3.2-1B's shapes (1.24B parameters), built with random weights: speed does not depend on them
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=2048, tie_word_embeddings=True)
SEQUENCE = 512
REHEARSAL = {"fashion_vit": ("fashion_vit", 96, 2, 32)}
IMPLEMENTATIONS = ("reference_loop", "reference_library", "fast", "fast_eager", "fast_compiled")
LR, MIN_LR = 6e-4, 1e-6


def make_job(model_name: str, images: int, seed: int = 0, device: str = "cpu"):
    """(dense model, pruned model, masks, calibration images (N, C, H, W) or token ids (N, T) on the CPU)."""
    torch.manual_seed(seed)
    if model_name == "llama_1b":
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.device(device):                   # 1.2B parameters: initialised where they will run
            dense = LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).eval()
        pruned = copy.deepcopy(dense)
        tokens = torch.randint(0, LLAMA_1B["vocab_size"], (images, SEQUENCE), generator=torch.Generator().manual_seed(seed))
        return dense, pruned, magnitude_masks(pruned, 0.5), tokens
    dense, size, channels = load_dense(model_name)
    pruned = copy.deepcopy(dense)
    masks = magnitude_masks(pruned, 0.5)
    calib = torch.randn(images, channels, size, size, generator=torch.Generator().manual_seed(seed))
    return dense, pruned, masks, calib


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _start_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def run_reference_loop(dense, pruned, masks, batches, epochs, device) -> dict:
    adapter = adapter_for(dense)
    config = RecoveryConfig(epochs=epochs, lr=LR, min_lr=MIN_LR, lr_schedule="cosine", weight_decay=0.0,
                            grad_clip=0.0, store_dense_float16=True)
    kind = "vit" if adapter.cosine_per == "token" else "mobilenet"          # the reference's word for the rows
    _start_memory(device)
    started = time.perf_counter()
    history, step_seconds = reference_recovery(copy.deepcopy(pruned), dense, kind, adapter.block_names(dense), masks,
                                               batches, adapter.scope_predicate(adapter.default_scope), config,
                                               device=device)
    _sync(device)
    seconds = time.perf_counter() - started
    steady = step_seconds[len(batches):] or step_seconds                    # after the first epoch
    return {"seconds": seconds, "images_per_second": batches[0].shape[0] / statistics.median(steady),
            "losses": [h["loss"] for h in history], "peak_memory_gib": _peak_gib(device)}


def run_reference_library(repo: str, model_name: str, dense, pruned, masks, batches, epochs, device) -> dict:
    """The public reference library's own loop (its recovery and models modules, imported from ``repo``)."""
    sys.path.insert(0, str(Path(repo).resolve()))
    try:
        recovery, models = importlib.import_module("recovery"), importlib.import_module("models")
    finally:
        sys.path.pop(0)
    config = recovery.RecoveryConfig(epochs=epochs, lr=LR, min_lr=MIN_LR, lr_schedule="cosine", weight_decay=0.0,
                                     grad_clip=0.0, store_dense_float16=True)
    model = copy.deepcopy(pruned)
    started = time.perf_counter()
    history = recovery.starfish_recovery(
        pruned_model=model, dense_model=dense, kind=models.infer_model_kind(model_name),
        block_names=models.all_block_names(model_name, model), masks={k: v.float() for k, v in masks.items()},
        calib_batches=batches, device=device, is_prunable_weight=models.is_prunable_weight(
            model_name, models.default_prune_scope(model_name)), config=config)
    _sync(device)
    return {"seconds": time.perf_counter() - started, "images_per_second": None,
            "losses": [h["loss"] for h in history]}


def run_fast(dense, pruned, masks, calib, epochs, batch, device, compile_setting: str) -> dict:
    config = HealConfig(epochs=epochs, batch_size=batch, lr=LR, min_lr=MIN_LR, device=device, progress=False,
                        compile=compile_setting, finish="none")          # the reference loop's one objective
    _start_memory(device)
    result = heal(copy.deepcopy(pruned), dense, masks, calib, config)
    _sync(device)
    return {"seconds": result.wall_seconds, "images_per_second": result.images_per_second,
            "peak_memory_gib": _peak_gib(device),
            "compile_seconds": result.compile_seconds, "teacher_seconds": result.teacher_seconds,
            "losses": [h["loss"] for h in result.history], "compile": result.plan.compile,
            "compile_reason": result.plan.reasons["compile"], "plan": result.plan.summary()}


def run_job(name: str, spec: tuple, args, report: dict, save) -> None:
    model_name, images, epochs, batch = spec
    images, epochs, batch = args.images or images, args.epochs or epochs, args.batch or batch
    dense, pruned, masks, calib = make_job(model_name, images, device=args.device)
    batches = list(calib.split(batch))
    # once per process, excluded: CUDA context, cuBLAS/cuDNN handles, oneDNN and allocator warm-up, which
    # would otherwise land on whichever implementation runs first
    run_reference_loop(dense, pruned, masks, batches[:2], 1, args.device)
    run_fast(dense, pruned, masks, calib[:2 * batch], 1, batch, args.device, "off")
    job = report["jobs"].setdefault(name, {"model": model_name, "images": images, "epochs": epochs, "batch": batch,
                                           "runs": {}})
    for impl in args.implementations:
        if impl == "reference_library" and not args.reference_repo:
            job["runs"][impl] = {"skipped": "no --reference-repo given"}
            save(report)
            continue
        log.info("%s: %s (%d images x %d epochs, batch %d)", name, impl, images, epochs, batch)
        if impl == "reference_loop":
            numbers = run_reference_loop(dense, pruned, masks, batches, epochs, args.device)
        elif impl == "reference_library":
            numbers = run_reference_library(args.reference_repo, model_name, dense, pruned, masks, batches, epochs,
                                            args.device)
        else:
            setting = {"fast": "auto", "fast_eager": "off", "fast_compiled": "on"}[impl]
            numbers = run_fast(dense, pruned, masks, calib, epochs, batch, args.device, setting)
        if calib.dim() == 2 and numbers.get("images_per_second"):                # token ids (N, T)
            numbers["tokens_per_second"] = numbers["images_per_second"] * calib.shape[1]
        job["runs"][impl] = numbers
        base = job["runs"].get("reference_loop", {}).get("seconds")
        if base:
            for run in job["runs"].values():
                if "seconds" in run:
                    run["speedup_whole_call"] = base / run["seconds"]
        save(report)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def plot(report: dict, path: Path) -> None:
    """Bars: whole-call seconds per job (one group) and implementation, the speed-up over the reference loop
    written on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from starfish_fast.checkpoint import atomic_path

    jobs = list(report["jobs"])
    impls = [i for i in IMPLEMENTATIONS if any("seconds" in report["jobs"][j]["runs"].get(i, {}) for j in jobs)]
    figure, axis = plt.subplots(figsize=(max(6.0, 1.8 + 1.6 * len(jobs) * max(1, len(impls)) / 3), 4.4))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        xs, heights, labels = [], [], []
        for j, job in enumerate(jobs):
            run = report["jobs"][job]["runs"].get(impl, {})
            if "seconds" in run:
                xs.append(j + (k - (len(impls) - 1) / 2) * width)
                heights.append(run["seconds"])
                labels.append(f"{run['speedup_whole_call']:.1f}x" if "speedup_whole_call" in run else "")
        bars = axis.bar(xs, heights, width, label=impl)
        axis.bar_label(bars, labels, fontsize=7, padding=2)
    axis.set_xticks(range(len(jobs)), [f"{j}\n{report['jobs'][j]['images']} img x {report['jobs'][j]['epochs']} ep, "
                                       f"batch {report['jobs'][j]['batch']}" for j in jobs], fontsize=8)
    axis.set_ylabel("whole call, seconds")
    axis.set_title(f"STARFISH healing, the whole call\n{report['environment']['device']}", fontsize=9)
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", nargs="+", default=None, help=f"jobs to run (default: {', '.join(JOBS)})")
    parser.add_argument("--images", type=int, default=None, help="calibration images (default: the job's)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: the job's)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the job's)")
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--reference-repo", default=None, metavar="DIR",
                        help="a checkout of the public reference library (its recovery.py and models.py)")
    parser.add_argument("--rehearse", action="store_true", help="the bundled ViT on the CPU, tiny (CI)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--output", default=None, help="JSON path (default: bench/results/e2e_<device>.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.rehearse else "cpu")
    catalogue = REHEARSAL if args.rehearse else JOBS
    jobs = args.jobs or list(catalogue)
    unknown = [job for job in jobs if job not in catalogue]
    if unknown:
        parser.error(f"unknown jobs {unknown}; allowed: {', '.join(catalogue)}")
    output = Path(args.output or RESULTS / f"e2e_{device_tag()}{'_rehearsal' if args.rehearse else ''}.json")
    report = {"environment": environment(), "rehearsal": args.rehearse, "jobs": {}}
    for job in jobs:
        run_job(job, catalogue[job], args, report, lambda r: save_report(r, output))
    plot(report, output.with_suffix(".png"))
    for job, data in report["jobs"].items():
        for impl, run in data["runs"].items():
            print(f"{job:8s} {impl:18s} " + (f"{run['seconds']:8.2f} s  {run.get('speedup_whole_call', 0):5.2f}x"
                                             if "seconds" in run else f"skipped: {run['skipped']}"))
    return report


if __name__ == "__main__":
    main()
