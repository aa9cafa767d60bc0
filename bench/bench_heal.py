"""End-to-end healing throughput: the reference-equivalent loop vs starfish_fast's fast mode.

    python bench/bench_heal.py --model fashion_vit --batch-size 64 --steps 30          # CPU
    python bench/bench_heal.py --model fashion_cnn --batch-size 64 --steps 60          # CPU, MobileNetV1-style
    python bench/bench_heal.py --model fashion_vit --precisions fp32 bf16 --skip-reference \
        --output bench/results/precision_fashion_vit_cpu.json                          # what precision="auto" picks
    python bench/bench_heal.py --model deit_base_patch16_224 --batch-size 128 --steps 40 --stores gpu pinned \
        --kernels torch triton
    python bench/bench_heal.py --model deit3_huge_patch14_224 --batch-size 32 --steps 20

Both runs use the same model (random weights unless it is a bundled Fashion-MNIST model,
``fashion_vit``, ``fashion_cnn`` or ``fashion_resnet``), the same 50% magnitude masks over the model's
default prune scope, the same calibration batches and batch size. The reference-equivalent loop is
``starfish_fast.baseline.reference_recovery`` (fp32,
hooks, non-pinned fp16 CPU teacher cache copied every step, a host sync every step,
non-foreach Adam). Reported: images/s of each and their ratio, median step time,
achieved TFLOP/s and fraction of the device's bf16 peak and of a measured matmul rate (FLOPs counted
from the model's shapes), peak memory, the teacher store, the plan and what ran (compiled blocks, dynamo's
graphs, breaks and recompiles), each run's epoch loss against its own teacher, and the healed model's
loss against one fp32 teacher (the runs' own teachers differ: fp16 cache in the reference, bf16 in
fast mode).
Results go to ``bench/results/heal_<model>_<device tag>.json``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import logging
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from devices import device_peaks, device_tag, environment, save_report  # bench/ is on sys.path
from starfish_fast import HealConfig, heal
from starfish_fast.baseline import reference_recovery
from starfish_fast.bundled import BUNDLED_MODEL_NAME, load_bundled_model
from starfish_fast.compat import RecoveryConfig
from starfish_fast.models import adapter_for, model_spec
from starfish_fast.prune import magnitude_masks

log = logging.getLogger("bench_heal")
RESULTS = Path(__file__).resolve().parent / "results"


def step_flops_per_image(model: torch.nn.Module, image_size: int, in_chans: int) -> float:
    """FLOPs of one healing step per image: student forward (1x) + backward (2x: input and weight
    gradients) over the blocks' linears and convolutions (shapes from one traced image) and, for
    ViTs, the attention products. Teacher excluded (cached)."""
    adapter = adapter_for(model)
    forward = [0.0]

    def count(module, inputs, output):
        if isinstance(module, torch.nn.Linear):
            forward[0] += 2.0 * output.numel() * module.in_features
        else:                                   # Conv2d: each output element sums in/groups * kh * kw products
            kh, kw = module.kernel_size
            forward[0] += 2.0 * output.numel() * module.in_channels // module.groups * kh * kw
    handles = [m.register_forward_hook(count) for block in adapter._blocks(model) for m in block.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    try:
        with torch.no_grad():
            _, reps = adapter.forward_blocks(model, torch.zeros(1, in_chans, image_size, image_size),
                                             adapter.block_names(model), need_logits=False)
    finally:
        for handle in handles:
            handle.remove()
    if adapter.family.endswith("_vit"):
        tokens, width = reps[0].shape[1], reps[0].shape[2]                     # T, D
        forward[0] += len(reps) * 2.0 * 2.0 * tokens * tokens * width          # QK^T and AV per block
    return 3.0 * forward[0]


def load_dense(name: str) -> tuple[torch.nn.Module, int, int]:
    """(dense model in eval mode, image size, input channels): a bundled Fashion-MNIST model (trained
    weights), or any other registered name with random weights (speed does not depend on them)."""
    spec = model_spec(name)
    if spec.source == "bundled":
        return load_bundled_model(name)[0], 28, 1
    dense = spec.build().eval()
    channels, image_size, _ = getattr(dense, "pretrained_cfg", {}).get("input_size", (3, 224, 224))
    return dense, image_size, channels


def timed_heal(dense: torch.nn.Module, masks, batches, config: HealConfig):
    """Heal a copy of ``dense``; (result, healed model, steady-state seconds per step of each
    ``config.log_every``-step window: one host sync per window; the first window, with compile and
    cache warm-up, left out)."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "metrics.jsonl"
        config = dataclasses.replace(config, metrics_path=str(metrics))
        model = copy.deepcopy(dense)
        result = heal(model, dense, masks, batches, config)
        # under torchrun rank 0 alone writes metrics: the other ranks have no timings to report
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    windows = [r for r in records if r["type"] == "step"][1:]
    return result, model, [config.batch_size / r["images_per_s"] for r in windows]


@torch.no_grad()
def fp32_teacher_loss(model: torch.nn.Module, dense: torch.nn.Module, batches, device) -> float:
    """STARFISH loss of a healed ``model`` against the dense model, both in fp32 without autocast, on
    ``batches``: one yardstick for runs whose own teachers differ in precision (fp16 vs bf16 caches)."""
    from starfish_fast.objectives import block_cosine_loss

    adapter = adapter_for(dense)
    blocks = adapter.block_names(dense)
    model, dense = model.to(device).eval(), dense.to(device).eval()
    losses = []
    for images in batches:
        _, student = adapter.forward_blocks(model, images.to(device), blocks, need_logits=False)
        _, teacher = adapter.forward_blocks(dense, images.to(device), blocks, need_logits=False)
        losses.append(float(block_cosine_loss(student, teacher, per=adapter.cosine_per)))
    return sum(losses) / len(losses)


def dynamo_counters(expected_graphs: int) -> dict:
    """Graphs dynamo compiled, graph breaks, frames left eager and recompiles (graphs beyond one per
    distinct block shape and batch size) since the last ``torch._dynamo.utils.counters.clear()``."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    return {"unique_graphs": graphs, "expected_graphs": expected_graphs,
            "recompiles": max(0, graphs - expected_graphs), "graph_breaks": sum(counters["graph_break"].values()),
            "frames_total": counters["frames"]["total"], "frames_eager": counters["frames"]["total"] -
            counters["frames"]["ok"]}


def run(args, save=lambda report: None) -> dict:
    """The runs; ``save(report)`` after each one, so a run cut short keeps what it measured."""
    torch.manual_seed(0)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dense, image_size, in_chans = load_dense(args.model)
    adapter = adapter_for(dense)
    masks = magnitude_masks(dense, sparsity=args.sparsity, scope=adapter.default_scope)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(args.batch_size, in_chans, image_size, image_size, generator=generator)
               for _ in range(args.steps)]
    blocks = adapter.block_names(dense)
    flops = step_flops_per_image(dense, image_size, in_chans)
    peak = (device_peaks() or {}).get("bf16_tflops") if device.type == "cuda" else None
    report = {"model": args.model, **environment(), "batch_size": args.batch_size, "steps": args.steps,
              "warmup_steps": args.warmup, "sparsity": args.sparsity, "step_gflops_per_image": flops / 1e9,
              "bf16_peak_tflops": peak, "measured_matmul_tflops": args.ceiling_tflops, "runs": {}}

    def summarize(label, step_seconds, model, extra):
        """``step_seconds``: steady-state seconds per step (warm-up already left out)."""
        median = statistics.median(step_seconds)
        tflops = flops * args.batch_size / median / 1e12
        entry = {"median_step_s": median, "images_per_s": args.batch_size / median, "tflops": tflops,
                 "fraction_of_bf16_peak": tflops / peak if peak else None,
                 "fraction_of_measured_matmul": tflops / args.ceiling_tflops if args.ceiling_tflops else None,
                 "fp32_teacher_loss": fp32_teacher_loss(model, dense, batches[:2], device), **extra}
        if device.type == "cuda":
            entry["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        else:
            entry["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        report["runs"][label] = entry
        save(report)
        log.info("%-30s %8.1f img/s  median step %.4fs  %.2f TFLOP/s", label, entry["images_per_s"], median, tflops)

    if not args.skip_reference:
        config = RecoveryConfig(epochs=1, lr=6e-4, min_lr=1e-6, lr_schedule="cosine", weight_decay=0.0,
                                grad_clip=0.0, store_dense_float16=True)
        predicate = adapter.scope_predicate(adapter.default_scope)
        model = copy.deepcopy(dense)
        kind = "vit" if adapter.cosine_per == "token" else "mobilenet"        # the reference's word for the rows
        history, seconds = reference_recovery(model, dense, kind, blocks, masks, batches, predicate, config,
                                              device=device)
        summarize("reference", seconds[args.warmup:], model, {"teacher_store": "cpu-fp16-unpinned",
                                                               "epoch_loss": history[0]["loss"]})
    for store, precision, kernels in itertools.product(args.stores, args.precisions, args.kernels):
        config = HealConfig(epochs=1, lr=6e-4, min_lr=1e-6, batch_size=args.batch_size, mode="fast",
                            teacher_store=store, device=str(device), log_every=args.warmup, progress=False,
                            compile=args.compile, precision=precision, kernels=kernels)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        result, model, seconds = timed_heal(dense, masks, batches, config)
        shapes = {tuple(tuple(p.shape) for p in block.parameters()) for block in adapter.blocks_by_name(dense, blocks)}
        summarize(f"fast[{store},{precision},{kernels}]", seconds, model, {
            "teacher_store": result.teacher_store, "teacher_seconds": result.teacher_seconds,
            "epoch_loss": result.history[0]["loss"], "plan": result.plan.as_dict(), "ran": result.ran,
            "dynamo": dynamo_counters(len(shapes) * len({b.shape[0] for b in batches})) if result.plan.compile
            else None})
    reference = report["runs"].get("reference")
    for label, entry in report["runs"].items():
        if reference and label != "reference":
            entry["speedup_vs_reference"] = entry["images_per_s"] / reference["images_per_s"]
            entry["fp32_teacher_loss_rel_diff_vs_reference"] = abs(
                entry["fp32_teacher_loss"] - reference["fp32_teacher_loss"]) / reference["fp32_teacher_loss"]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=BUNDLED_MODEL_NAME)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the median (compile, caches)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--stores", nargs="+", default=["auto"], help="teacher stores of the fast runs")
    parser.add_argument("--precisions", nargs="+", choices=("auto", "bf16", "fp16", "fp32"), default=["auto"])
    parser.add_argument("--kernels", nargs="+", choices=("auto", "triton", "torch"), default=["auto"])
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--ceiling-tflops", type=float, default=None,
                        help="the matmul rate measured on this device (fraction of it reported)")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--output", default=None, help="JSON path (default bench/results/heal_<model>_<device>.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not 0 < args.warmup <= args.steps // 2:
        parser.error(f"--warmup {args.warmup} must be in [1, steps/2] (steps {args.steps})")
    output = Path(args.output or RESULTS / f"heal_{args.model}_{device_tag()}.json")
    report = run(args, save=lambda partial: save_report(partial, output))
    save_report(report, output)                          # with the speed-ups over the reference
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    for label, entry in report["runs"].items():
        print(f"{label:>30}: {entry['images_per_s']:9.1f} img/s  x{entry.get('speedup_vs_reference', 1.0):5.2f}  "
              f"{entry['tflops']:.3f} TFLOP/s  loss vs fp32 teacher {entry['fp32_teacher_loss']:.5f}")
    print(f"wrote {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
