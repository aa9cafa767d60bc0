"""Healing quality on real data: the paper's objective comparison (Tables 1 and 3) reproduced on
Fashion-MNIST, with the KL-bound diagnostics of Theorem 1.

    python bench/accuracy.py --quick                  # reduced grid: 65 s on the 2-core CPU
    python bench/accuracy.py                          # full grid, bundled Fashion-MNIST ViT: 29 min (105 runs)
    python bench/accuracy.py --model-name fashion_cnn --extras structured   # the CNN (bench/train_fashion_cnn.py)
    python bench/accuracy.py --model-name fashion_resnet                    # the residual CNN (train_fashion_resnet.py)
    python bench/accuracy.py --resume --extras 2:4 structured structured_qk   # + QK head dims and MLP neurons
    python bench/accuracy.py --model-name deit_base_patch16_224 --dense-path deit_b.pth \
        --imagenet-dir /data/imagenet --calib-samples 5000       # the real thing, on a GPU

Protocol (the paper's Appendix B unless said otherwise): the dense model is pruned by magnitude
per layer on qkv+proj+MLP (ViT; for the MobileNet-style CNN scope conv_fc: every non-depthwise
conv, the stem included, and the classifier; for the ResNet scope conv: its convs but the stem)
at each sparsity, plus a 2:4 setting on the same scope (not for the MobileNet: its stem has a
reduction of 9, not a multiple of 4) and a structured 50% MLP-neuron setting (whole conv filters
for the CNNs); the surviving weights are healed with each objective through the engine
(``starfish_fast.heal``, fast mode; fp32 on CPU) on unlabeled calibration images drawn from
the train split (1,000 = 1.7% of Fashion-MNIST's 60k; only ``ce`` sees their labels), AdamW
(weight decay 0.05), lr 6e-4 cosine to 1e-6, batch 32, 10 epochs; each model is evaluated on
the untouched test split (10k). Seeds change the calibration subset and its batch order; the
masks do not depend on the seed. ImageNet: ``--imagenet-dir`` holds ImageFolder ``train/``
(calibration) and ``val/`` (evaluation), resized and cropped as the reference does; class
folders in the standard synset order, so that ``ce``'s labels are the model's class indices.

Writes ``<prefix>.csv`` (one row per run, written after every run; ``--resume`` skips rows
already there), ``<prefix>.md`` (mean +- std tables, protocol, targets), ``<prefix>.png``
(retention vs sparsity per objective, std error bars), ``<prefix>_block_cosine.png`` and
``<prefix>_kl_bound.png`` (diagnostics before/after STARFISH at ``--diagnostics-sparsity``) and
``<prefix>.json`` (environment, configuration, those diagnostics). Default prefix:
``bench/results/accuracy_<model>[_quick]``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from starfish_fast import HealConfig, heal
from starfish_fast.bundled import BUNDLED_MODEL_NAME
from starfish_fast.checkpoint import atomic_path, save_json_atomic
from starfish_fast.data import (FASHION_MNIST_DIR, TensorLoader, build_transform, load_fashion_mnist,
                                select_calibration)
from starfish_fast.diagnostics import (PAPER_ZETA_POINTS, plot_block_cosine, plot_kl_bound,
                                       representation_diagnostics)
from starfish_fast.checkpoint import tensor_fingerprint
from starfish_fast.plan import resolve_device
from starfish_fast.masks import apply_masks, mask_density
from starfish_fast.models import adapter_for, load_dense, load_model, model_spec
from starfish_fast.objectives import OBJECTIVES, kl_dense_to_pruned
from starfish_fast.prune import magnitude_masks, nm_masks, structured_masks

log = logging.getLogger("accuracy")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FULL = dict(sparsities=(0.5, 0.6, 0.7, 0.8, 0.9), objectives=OBJECTIVES, seeds=(0, 1, 2), extras=("2:4", "structured"),
            epochs=10, calib_samples=1000, eval_samples=0)
# --quick: the two sparsities of the targets, 2:4 and structured, every objective, one seed, and
# 3 epochs on 500 images against 2,000 test images: 65 s on the 2-core CPU (the full grid: 29 min).
QUICK = dict(sparsities=(0.5, 0.8), objectives=OBJECTIVES, seeds=(0,), extras=("2:4", "structured"),
             epochs=3, calib_samples=500, eval_samples=2000)
CSV_FIELDS = ("model", "setting", "sparsity", "objective", "seed", "dense_top1", "top1", "retention", "kl",
              "heal_seconds", "images_per_second", "epochs", "calib_samples", "eval_examples")
TARGETS = {0.5: 0.97, 0.8: 0.90}          # STARFISH retention targets of the issue, by sparsity
ORDER = ("starfish", "mse", "kl", "ce")   # the paper's ranking at high sparsity (Tables 1 and 3)
STRUCTURED_WHAT = {"mlp": " (structured: whole MLP neurons, fc1 rows with their fc2 columns)",
                   "channel": " (structured: whole output filters of the convs)",
                   "qk_mlp": " (structured_qk: whole QK head dims, q and k rows of qkv, with the MLP neurons)"}


@dataclass
class Task:
    """A dense model and its data: calibration pool (images, labels) and evaluation data."""

    name: str
    dense: torch.nn.Module
    calib_images: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]   # (n, seed) -> images, labels
    eval_data: object                   # (images, labels) tensors or a loader of batches
    eval_labels: torch.Tensor | None
    scope: str
    structured_kind: str
    device: torch.device
    dense_logits: torch.Tensor | None = None    # (N, K) on the CPU, filled by evaluate()


@dataclass(frozen=True)
class Setting:
    name: str                            # "magnitude" | "2:4" | "structured"
    sparsity: float                      # requested (2:4: 0.5)


# ----------------------------------------------------------------------------- tasks
def _fashion_task(args, device) -> Task:
    dense = load_dense(args.model_name, args.dense_path)
    adapter = adapter_for(dense)
    # the model's default scope (ViT qkv+proj+MLP; MobileNet conv_fc; ResNet its non-stem convs); structured:
    # MLP neurons for the ViT, whole conv filters for the CNNs
    scope, kind = adapter.default_scope, "mlp" if adapter.family == "timm_vit" else "channel"
    train_images, train_labels = load_fashion_mnist(args.data_dir, "train")
    test_images, test_labels = load_fashion_mnist(args.data_dir, "test")
    if args.eval_samples:
        test_images, test_labels = test_images[:args.eval_samples], test_labels[:args.eval_samples]

    def calib(n: int, seed: int):
        index = select_calibration(torch.arange(train_images.shape[0]), n, seed)   # (n,): subset and order
        return train_images[index], train_labels[index]

    return Task(args.model_name, dense.to(device).eval(), calib, test_images, test_labels, scope, kind, device)


def _imagenet_task(args, device) -> Task:
    from torchvision.datasets import ImageFolder

    if not args.dense_path or not args.imagenet_dir:
        raise SystemExit(f"--model-name {args.model_name} needs --dense-path and --imagenet-dir")
    dense = load_model(args.model_name, args.dense_path, device)
    root = Path(args.imagenet_dir)
    train = ImageFolder(str(root / "train"), transform=build_transform())
    val = ImageFolder(str(root / "val"), transform=build_transform())
    if args.eval_samples:
        val = torch.utils.data.Subset(val, select_calibration(torch.arange(len(val)), args.eval_samples, 0).tolist())
    loader = torch.utils.data.DataLoader(val, batch_size=args.eval_batch_size, num_workers=args.workers,
                                         pin_memory=device.type == "cuda")

    def calib(n: int, seed: int):
        index = select_calibration(torch.arange(len(train)), n, seed).tolist()
        images = torch.stack([train[i][0] for i in index])                    # (n, 3, 224, 224)
        return images, torch.tensor([train.targets[i] for i in index])

    kind = "mobilenet" if adapter_for(dense).kind == "mobilenet" else "vit"
    scope = "conv_fc" if kind == "mobilenet" else "qkv_out_mlp"
    return Task(args.model_name, dense, calib, loader, None, scope, "channel" if kind == "mobilenet" else "mlp", device)


def make_masks(task: Task, setting: Setting) -> dict[str, torch.Tensor]:
    if setting.name == "magnitude":
        return magnitude_masks(task.dense, setting.sparsity, scope=task.scope)
    if setting.name == "2:4":
        return nm_masks(task.dense, 2, 4, scope=task.scope)
    kind = "qk_mlp" if setting.name == "structured_qk" else task.structured_kind
    return structured_masks(task.dense, setting.sparsity, scope=setting_scope(task, setting), kind=kind)


def setting_scope(task: Task, setting: Setting) -> str:
    """The prune scope, which is also what heals: the ViT's structured setting is MLP-only (the
    paper's), its structured_qk setting the paper's QK scope plus the MLP."""
    if setting.name == "structured_qk":
        return "qk_mlp"
    return "mlp" if setting.name == "structured" and task.structured_kind == "mlp" else task.scope


@torch.no_grad()
def _predict(task: Task, model: torch.nn.Module, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, K) and labels (N,) of the evaluation data, on the CPU, in the data's order."""
    data = TensorLoader(task.eval_data, task.eval_labels, batch_size) if isinstance(task.eval_data, torch.Tensor) \
        else task.eval_data
    logits, labels = [], []
    for images, batch_labels in data:
        logits.append(model(images.to(task.device)).float().cpu())
        labels.append(batch_labels)
    return torch.cat(logits), torch.cat(labels)


def evaluate(task: Task, model: torch.nn.Module, batch_size: int) -> dict:
    """Top-1 (percent), retention and mean KL(dense || model) over the evaluation data: one
    forward pass of ``model``; the dense logits are computed once and kept (the full
    diagnostics cost two passes plus the block outputs, so they run only where plotted)."""
    if task.dense_logits is None:
        task.dense_logits = _predict(task, task.dense, batch_size)[0]
    logits, labels = _predict(task, model, batch_size)
    valid = labels >= 0                                                         # (N,)
    top1 = 100.0 * float((logits.argmax(-1).eq(labels) & valid).sum()) / int(valid.sum())
    dense_top1 = 100.0 * float((task.dense_logits.argmax(-1).eq(labels) & valid).sum()) / int(valid.sum())
    return {"top1": top1, "dense_top1": dense_top1, "examples": len(labels),
            "retention": top1 / dense_top1 if dense_top1 > 0 else float("nan"),
            "kl": float(kl_dense_to_pruned(logits, task.dense_logits))}


def diagnose(task: Task, model: torch.nn.Module, batch_size: int) -> dict:
    return representation_diagnostics(task.dense, model, task.eval_data, task.eval_labels, batch_size=batch_size,
                                      device=task.device)


# ----------------------------------------------------------------------------- runs
def heal_one(task: Task, setting: Setting, masks, objective: str, seed: int, args):
    """Prune a copy of the dense model, heal it with ``objective`` on the seed's calibration set
    and evaluate it. Returns (CSV row, healed model)."""
    torch.manual_seed(seed)                   # dropout / drop-path, for models trained with them
    images, labels = task.calib_images(args.calib_samples, seed)
    model = copy.deepcopy(task.dense)
    apply_masks(model, masks)
    config = HealConfig(mode="fast", objective=objective, epochs=args.epochs, lr=args.lr, min_lr=args.min_lr,
                        weight_decay=args.weight_decay, batch_size=args.batch_size, scope=setting_scope(task, setting),
                        device=str(task.device), precision=args.precision, progress=False)
    result = heal(model, task.dense, masks, images, config, labels=labels if objective == "ce" else None)
    scores = evaluate(task, model, args.eval_batch_size)
    row = {"model": task.name, "setting": setting.name, "sparsity": round(1 - mask_density(masks), 4),
           "objective": objective, "seed": seed, "dense_top1": scores["dense_top1"], "top1": scores["top1"],
           "retention": scores["retention"], "kl": scores["kl"], "heal_seconds": result.heal_seconds,
           "images_per_second": result.images_per_second, "epochs": args.epochs,
           "calib_samples": args.calib_samples, "eval_examples": scores["examples"]}
    return row, model


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in CSV_FIELDS:
            if key not in ("model", "setting", "objective"):
                row[key] = float(row[key])
        row["seed"] = int(row["seed"])
    return rows


def _write_csv(rows: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------- summaries
def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std (sample std over seeds; 0 for one seed) of top-1, retention and KL per
    (setting, sparsity, objective), in run order."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["setting"], row["sparsity"], row["objective"]), []).append(row)
    summary = []
    for (setting, sparsity, objective), members in groups.items():
        entry = {"setting": setting, "sparsity": sparsity, "objective": objective, "seeds": len(members),
                 "dense_top1": members[0]["dense_top1"]}
        for key in ("top1", "retention", "kl", "heal_seconds"):
            values = [m[key] for m in members]
            entry[key] = statistics.fmean(values)
            entry[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def _setting_label(setting: str, sparsity: float) -> str:
    return {"magnitude": f"magnitude {sparsity:.2f}", "2:4": f"2:4 ({sparsity:.2f})",
            "structured": f"structured {sparsity:.2f}",
            "structured_qk": f"structured QK+MLP {sparsity:.2f}"}.get(setting, f"{setting} {sparsity:.2f}")


def check_targets(summary: list[dict]) -> list[str]:
    """The issue's targets, each line starting with PASS or FAIL. 'By more than the seeds'
    spread' is read as: mean(a) - mean(b) > std(a) + std(b)."""
    cell = {(s["setting"], s["sparsity"], s["objective"]): s for s in summary}
    lines = []
    for sparsity, target in TARGETS.items():
        entry = cell.get(("magnitude", sparsity, "starfish"))
        if entry:
            ok = entry["retention"] >= target
            lines.append(f"{'PASS' if ok else 'FAIL'} STARFISH retention at {sparsity:g}: "
                         f"{entry['retention']:.1%} (target >= {target:.0%})")
    for sparsity in sorted({s["sparsity"] for s in summary if s["setting"] == "magnitude" and s["sparsity"] >= 0.7}):
        chain = [cell.get(("magnitude", sparsity, o)) for o in ORDER]
        if any(c is None for c in chain):
            continue
        pairs = []
        for a, b in zip(chain, chain[1:]):
            margin = a["top1"] - b["top1"]
            spread = a["top1_std"] + b["top1_std"]
            pairs.append((margin > spread,
                          f"{a['objective']} - {b['objective']} = {margin:+.2f} (spread {spread:.2f})"))
        ok = all(p for p, _ in pairs)
        lines.append(f"{'PASS' if ok else 'FAIL'} order STARFISH > MSE > KL > CE at {sparsity:g}: "
                     + "; ".join(text for _, text in pairs))
    return lines


def markdown_tables(summary: list[dict], pruned: dict, objectives, dense_top1: float) -> str:
    """Top-1 mean +- std (retention) per setting and objective; then KL(dense || healed)."""
    keys = list(dict.fromkeys((s["setting"], s["sparsity"]) for s in summary))
    cell = {(s["setting"], s["sparsity"], s["objective"]): s for s in summary}
    names = ["STARFISH" if o == "starfish" else o.upper() for o in objectives]
    header = "| setting | pruned | " + " | ".join(names) + " |"
    rule = "|---|---:|" + "---:|" * len(objectives)
    lines = [f"Top-1 % on the test split, mean ± std over seeds (retention = healed / dense {dense_top1:.2f}%):", "",
             header, rule]
    for setting, sparsity in keys:
        p = pruned[(setting, sparsity)]
        cells = [f"{p['top1']:.2f} ({p['retention']:.1%})"]
        for objective in objectives:
            s = cell.get((setting, sparsity, objective))
            cells.append("–" if s is None else f"{s['top1']:.2f} ± {s['top1_std']:.2f} ({s['retention']:.1%})")
        lines.append(f"| {_setting_label(setting, sparsity)} | " + " | ".join(cells) + " |")
    lines += ["", "Mean KL(dense || model) over the test split (lower is closer to the dense model):", "",
              header, rule]
    for setting, sparsity in keys:
        cells = [f"{pruned[(setting, sparsity)]['kl']:.4f}"]
        for objective in objectives:
            s = cell.get((setting, sparsity, objective))
            cells.append("–" if s is None else f"{s['kl']:.4f} ± {s['kl_std']:.4f}")
        lines.append(f"| {_setting_label(setting, sparsity)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diagnostics_table(diagnostics: dict, sparsity: float, seed: int) -> str:
    """Theorem 1's quantities for the pruned model and each healed one at the diagnosed setting."""
    lines = [f"Diagnostics at magnitude {sparsity:g}, seed {seed} (test-split means; bound: zeta on "
             f"{PAPER_ZETA_POINTS} points as the paper; certified: never below KL; global: ‖A‖₂ and 1/2):", "",
             "| model | top-1 | KL | bound | certified | global | mean zeta | mean M (‖A‖₂) | mean block cosine |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in [n for n in ("pruned", *OBJECTIVES) if n in diagnostics]:
        d = diagnostics[name]
        cosine = statistics.fmean(d["block_cosine"].values())
        lines.append(f"| {name} | {d['top1_model']:.2f} | {d['kl']:.4f} | {d['bound']:.4f} | "
                     f"{d['bound_certified']:.4f} | {d['bound_global']:.2f} | {d['zeta']:.4f} | "
                     f"{d['head_gain']:.2f} ({d['head_norm']:.2f}) | {cosine:.4f} |")
    return "\n".join(lines)


def plot_retention(summary: list[dict], pruned: dict, objectives, path: Path, title: str) -> None:
    """Retention vs sparsity per objective (magnitude pruning, std error bars) with the pruned
    model; the same zoomed on the healed models (their spread is a few points against the
    pruned model's tens); the 2:4 and structured settings as grouped bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {o: f"C{i}" for i, o in enumerate(objectives)}
    extras = list(dict.fromkeys((s["setting"], s["sparsity"]) for s in summary if s["setting"] != "magnitude"))
    figure, axes = plt.subplots(1, 3 if extras else 2, figsize=(16 if extras else 11, 4.5), squeeze=False,
                                gridspec_kw={"width_ratios": [3, 3, 2] if extras else [1, 1]})
    sparsities = sorted({s["sparsity"] for s in summary if s["setting"] == "magnitude"})
    for zoomed, axis in enumerate(axes[0][:2]):
        if not zoomed:
            axis.plot(sparsities, [100 * pruned[("magnitude", x)]["retention"] for x in sparsities], "k--",
                      label="pruned")
        for objective in objectives:
            points = sorted((s["sparsity"], 100 * s["retention"], 100 * s["retention_std"]) for s in summary
                            if s["setting"] == "magnitude" and s["objective"] == objective)
            if points:
                axis.errorbar(*zip(*points), marker="o", capsize=3, label=objective, color=colors[objective])
        axis.set_xlabel("sparsity of the prune scope (magnitude, per layer)")
        axis.set_ylabel("retention: healed / dense top-1 (%)")
        axis.set_title(f"{title}, healed only" if zoomed else title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    if extras:
        bars = axes[0][2]
        width = 0.8 / len(objectives)
        lowest = 100.0
        for j, objective in enumerate(objectives):
            cells = [next((x for x in summary if (x["setting"], x["sparsity"], x["objective"]) == (*key, objective)),
                          None) for key in extras]
            values = [100 * c["retention"] if c else float("nan") for c in cells]
            lowest = min([lowest] + [v for v in values if v == v])
            bars.bar([i + (j - (len(objectives) - 1) / 2) * width for i in range(len(extras))], values, width,
                     yerr=[100 * c["retention_std"] if c else 0 for c in cells], capsize=2, label=objective,
                     color=colors[objective])
        for i, key in enumerate(extras):
            bars.hlines(100 * pruned[key]["retention"], i - 0.45, i + 0.45, colors="k", linestyles="--",
                        label="pruned" if i == 0 else None)
            lowest = min(lowest, 100 * pruned[key]["retention"])
        bars.set_ylim(lowest - 2, 101.5)
        bars.set_xticks(range(len(extras)), [_setting_label(*key) for key in extras], fontsize=8)
        bars.set_ylabel("retention (%)")
        bars.set_title("50% settings")
        bars.grid(alpha=0.3, axis="y")
        bars.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


# ----------------------------------------------------------------------------- driver
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-name", default=BUNDLED_MODEL_NAME,
                        help="a bundled Fashion-MNIST model (fashion_vit, fashion_cnn, fashion_resnet) or an ImageNet "
                             "model name")
    parser.add_argument("--dense-path", default=None, help="dense weights (needed for ImageNet models)")
    parser.add_argument("--imagenet-dir", default=None, help="ImageFolder root with train/ and val/")
    parser.add_argument("--data-dir", default=FASHION_MNIST_DIR, help="Fashion-MNIST IDX directory")
    parser.add_argument("--quick", action="store_true", help="the reduced grid (defaults below change to QUICK)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=None)
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--extras", nargs="*", choices=("2:4", "structured", "structured_qk"), default=None,
                        help="extra settings at 50%% (default 2:4 and structured; structured_qk: ViTs, whole QK "
                             "head dims and MLP neurons)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--calib-samples", type=int, default=None)
    parser.add_argument("--eval-samples", type=int, default=None, help="0 = the whole test split")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=500)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--min-lr", type=float, default=1e-6)
    parser.add_argument("--weight-decay", type=float, default=0.05, help="> 0: AdamW (the paper's optimizer)")
    parser.add_argument("--diagnostics-sparsity", type=float, default=0.8,
                        help="magnitude sparsity whose STARFISH run (first seed) gets the diagnostics plots")
    parser.add_argument("--device", default=None)
    # fp32: the reference's precision, and what the committed tables used (fast mode's auto now
    # picks bf16 for ViTs on bf16-native CPUs and on CUDA; pass auto to measure that instead)
    parser.add_argument("--precision", choices=("fp32", "auto", "bf16", "fp16"), default="fp32")
    parser.add_argument("--workers", type=int, default=8, help="ImageNet loader workers")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--prefix", default=None, help="output path prefix (default bench/results/accuracy_<model>)")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in <prefix>.csv")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def resolve_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    grid = QUICK if args.quick else FULL
    for key, value in grid.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.prefix is None:
        args.prefix = str(RESULTS_DIR / f"accuracy_{args.model_name}{'_quick' if args.quick else ''}")
    return args


def run(args: argparse.Namespace) -> dict:
    """The grid; returns {"rows", "summary", "pruned", "targets", "diagnostics"} and writes the files."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    fashion = model_spec(args.model_name).source == "bundled"
    task = _fashion_task(args, device) if fashion else _imagenet_task(args, device)
    if "structured_qk" in args.extras and task.structured_kind != "mlp":
        raise ValueError("--extras structured_qk needs a ViT (QK head dims); this model is a CNN")
    prefix = Path(args.prefix)
    csv_path = prefix.with_suffix(".csv")
    rows = _read_rows(csv_path) if args.resume else []
    settings = [Setting("magnitude", s) for s in args.sparsities] + [Setting(e, 0.5) for e in args.extras]
    started = time.perf_counter()
    diagnosed = Setting("magnitude", args.diagnostics_sparsity)
    pruned, diagnostics, masks_of = {}, {}, {}
    earlier_seconds = 0.0
    if args.resume and prefix.with_suffix(".json").exists():      # diagnostics and time of the skipped runs
        earlier = json.loads(prefix.with_suffix(".json").read_text())
        diagnostics, earlier_seconds = earlier.get("diagnostics", {}), earlier.get("wall_seconds", 0.0)
    for setting in settings:
        masks_of[setting] = masks = make_masks(task, setting)
        model = copy.deepcopy(task.dense)
        apply_masks(model, masks)
        key = (setting.name, round(1 - mask_density(masks), 4))
        pruned[key] = evaluate(task, model, args.eval_batch_size)
        if setting == diagnosed:
            diagnostics["pruned"] = diagnose(task, model, args.eval_batch_size)
        log.info("%s: pruned top-1 %.2f%% (dense %.2f%%), KL %.3f", _setting_label(*key), pruned[key]["top1"],
                 pruned[key]["dense_top1"], pruned[key]["kl"])
    runs = [(setting, objective, seed) for setting in settings for objective in args.objectives for seed in args.seeds]
    done = {(r["setting"], r["sparsity"], r["objective"], r["seed"]) for r in rows}
    executed = 0
    bar = tqdm(runs, desc="heal+eval", unit="run", dynamic_ncols=True)
    for setting, objective, seed in bar:
        sparsity = round(1 - mask_density(masks_of[setting]), 4)
        if (setting.name, sparsity, objective, seed) in done:
            continue
        label = _setting_label(setting.name, sparsity)
        bar.set_postfix_str(f"{label} {objective} seed {seed}")
        row, model = heal_one(task, setting, masks_of[setting], objective, seed, args)
        executed += 1
        rows.append(row)
        _write_csv(rows, csv_path)
        if setting == diagnosed and seed == args.seeds[0]:
            diagnostics[objective] = diagnose(task, model, args.eval_batch_size)
        log.info("%s %s seed %d: top-1 %.2f%% (retention %.1f%%), KL %.4f, heal %.1fs", label, objective,
                 seed, row["top1"], 100 * row["retention"], row["kl"], row["heal_seconds"])
    bar.close()
    summary = summarize(rows)
    targets = check_targets(summary)
    dense_top1 = next(iter(pruned.values()))["dense_top1"]
    seconds = time.perf_counter() - started if executed or not earlier_seconds else 0.0   # a rewrite adds none
    _write_reports(args, task, prefix, summary, pruned, targets, diagnostics, dense_top1, earlier_seconds + seconds)
    return {"rows": rows, "summary": summary, "pruned": pruned, "targets": targets, "diagnostics": diagnostics}


def _write_reports(args, task, prefix, summary, pruned, targets, diagnostics, dense_top1, wall_seconds) -> None:
    title = f"{task.name}: healing by objective"
    plot_retention(summary, pruned, args.objectives, prefix.with_suffix(".png"), title)
    if "pruned" in diagnostics and "starfish" in diagnostics:     # missing when --resume skipped those runs
        label = f"{task.name}, magnitude {args.diagnostics_sparsity:g}, STARFISH"
        plot_block_cosine(diagnostics["pruned"]["block_cosine"], diagnostics["starfish"]["block_cosine"],
                          f"{prefix}_block_cosine.png", title=f"{label}: cosine to dense per block")
        plot_kl_bound(diagnostics["pruned"], diagnostics["starfish"], f"{prefix}_kl_bound.png",
                      title=f"{label}: KL(dense || model) and its bounds")
    config = {key: value for key, value in vars(args).items() if key not in ("verbose",)}
    environment = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                   "device": str(task.device), "threads": torch.get_num_threads(),
                   "cuda": torch.cuda.get_device_name(task.device) if task.device.type == "cuda" else None}
    environment["dense_weights_sha256"] = tensor_fingerprint(task.dense.state_dict())   # which weights were healed
    save_json_atomic({"config": config, "environment": environment, "wall_seconds": wall_seconds,
                      "summary": summary, "pruned": {f"{k[0]} {k[1]}": v for k, v in pruned.items()},
                      "targets": targets, "diagnostics": diagnostics}, prefix.with_suffix(".json"))
    text = "\n".join([
        f"# Healing quality: {task.name}", "",
        f"Grid: sparsities {', '.join(f'{s:g}' for s in args.sparsities)} (magnitude, per layer, scope "
        f"{task.scope}){' + ' + ', '.join(args.extras) if args.extras else ''}"
        f"{STRUCTURED_WHAT[task.structured_kind] if 'structured' in args.extras else ''}"
        f"{STRUCTURED_WHAT['qk_mlp'] if 'structured_qk' in args.extras else ''}; objectives "
        f"{', '.join(args.objectives)}; seeds {', '.join(map(str, args.seeds))}; {args.epochs} epochs, "
        f"{args.calib_samples} calibration images, batch {args.batch_size}, AdamW lr {args.lr:g} -> {args.min_lr:g} "
        f"cosine, weight decay {args.weight_decay:g}; device {task.device}, torch {torch.__version__}; "
        f"wall time {wall_seconds / 60:.1f} min (summed over --resume sessions); dense weights sha256 "
        f"{environment['dense_weights_sha256'][:16]}.", "",
        markdown_tables(summary, pruned, args.objectives, dense_top1), "",
        "Targets:", "", *[f"- {line}" for line in targets], "",
        diagnostics_table(diagnostics, args.diagnostics_sparsity, args.seeds[0]) if diagnostics else "", ""])
    with atomic_path(prefix.with_suffix(".md")) as tmp:
        Path(tmp).write_text(text)
    print(text)


def main(argv=None) -> int:
    args = resolve_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("starfish_fast").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
