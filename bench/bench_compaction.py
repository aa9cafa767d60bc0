"""Healing step time with structured compaction vs the masked dense path.

    python bench/bench_compaction.py                                     # CPU: DeiT-tiny, batch 16
    python bench/bench_compaction.py --model deit_base_patch16_224 --batch-size 128 --steps 40

For each structured kind (``mlp``: whole MLP hidden neurons; ``qk_mlp``: those plus QK head
dims) and sparsity, the same model (random weights), masks, calibration batches and fast-mode
config are healed twice, with ``compact="off"`` (masked dense) and ``compact="on"``, and the
steady-state median step times are compared. The losses of both runs are reported: they must
agree (compaction is exact up to float rounding). Results go to
``bench/results/compaction_<model>_<device tag>.json``.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

import torch

from bench_heal import RESULTS, timed_heal  # bench/ is on sys.path
from devices import device_tag, environment, save_report
from starfish_fast import HealConfig
from starfish_fast.models import build_empty_model
from starfish_fast.prune import structured_masks

log = logging.getLogger("bench_compaction")
SCOPE_OF_KIND = {"mlp": "mlp", "qk": "qk", "qk_mlp": "qk_mlp"}


def run(args, save=lambda report: None) -> dict:
    """The cases; ``save(report)`` after each one, so a run cut short keeps what it measured."""
    torch.manual_seed(0)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dense = build_empty_model(args.model).eval()
    image_size = dense.patch_embed.img_size[0]
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(args.batch_size, 3, image_size, image_size, generator=generator)
               for _ in range(args.steps)]
    report = {"model": args.model, **environment(), "batch_size": args.batch_size, "steps": args.steps,
              "warmup_steps": args.warmup, "precision": args.precision, "cases": []}
    for kind in args.kinds:
        for sparsity in args.sparsities:
            masks = structured_masks(dense, sparsity, scope=SCOPE_OF_KIND[kind], kind=kind)
            case = {"kind": kind, "sparsity": sparsity}
            for compact in ("off", "on"):
                config = HealConfig(epochs=1, lr=6e-4, min_lr=1e-6, batch_size=args.batch_size, mode="fast",
                                    scope=SCOPE_OF_KIND[kind], compact=compact, precision=args.precision,
                                    device=str(device), log_every=args.warmup, progress=False)
                result, _, seconds = timed_heal(dense, masks, batches, config)
                case[f"compact_{compact}"] = {"median_step_s": statistics.median(seconds),
                                              "images_per_s": args.batch_size / statistics.median(seconds),
                                              "loss": result.history[0]["loss"]}
            off, on = case["compact_off"], case["compact_on"]
            case["speedup"] = off["median_step_s"] / on["median_step_s"]
            case["loss_rel_diff"] = abs(on["loss"] - off["loss"]) / off["loss"]
            log.info("%-7s sparsity %.2f: masked dense %.4fs/step, compacted %.4fs/step, x%.2f, loss diff %.1e",
                     kind, sparsity, off["median_step_s"], on["median_step_s"], case["speedup"],
                     case["loss_rel_diff"])
            report["cases"].append(case)
            save(report)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="steps per timing window; the first is left out")
    parser.add_argument("--kinds", nargs="+", choices=tuple(SCOPE_OF_KIND), default=["mlp", "qk_mlp"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.75])
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--output", default=None,
                        help="JSON path (default bench/results/compaction_<model>_<device>.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not 0 < args.warmup <= args.steps // 2:
        parser.error(f"--warmup {args.warmup} must be in [1, steps/2] (steps {args.steps})")
    output = Path(args.output or RESULTS / f"compaction_{args.model}_{device_tag()}.json")
    report = run(args, save=lambda partial: save_report(partial, output))
    for case in report["cases"]:
        print(f"{case['kind']:>7} @ {case['sparsity']:.2f}: x{case['speedup']:.2f} "
              f"({case['compact_off']['images_per_s']:.1f} -> {case['compact_on']['images_per_s']:.1f} img/s), "
              f"loss diff {case['loss_rel_diff']:.1e}")
    print(f"wrote {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
