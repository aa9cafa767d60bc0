"""Healing quality on real data: the paper's objective comparison (Tables 1 and 3) reproduced on
Fashion-MNIST, with the KL-bound diagnostics of Theorem 1.

    python bench/accuracy.py --quick                  # reduced grid: 65 s on the 2-core CPU
    python bench/accuracy.py                          # full grid, bundled Fashion-MNIST ViT: 29 min (105 runs)
    python bench/accuracy.py --model-name fashion_cnn --extras structured   # the CNN (bench/train_fashion_cnn.py)
    python bench/accuracy.py --model-name fashion_resnet                    # the residual CNN (train_fashion_resnet.py)
    python bench/accuracy.py --resume --extras 2:4 structured structured_qk   # + QK head dims and MLP neurons
    python bench/accuracy.py --sparsities 0.8 0.85 0.9 --methods magnitude wanda representation \
        --objectives starfish starfish_adaptive --extras --prefix bench/results/beyond_fashion_vit
    python bench/accuracy.py --sparsities --extras structured structured_qk \
        --objectives starfish compensate compensate+starfish --prefix bench/results/compensation_fashion_vit
    python bench/accuracy.py --model-name deit_base_patch16_224 --dense-path deit_b.pth \
        --imagenet-dir /data/imagenet --calib-samples 5000       # the real thing, on a GPU

Protocol (the paper's Appendix B unless said otherwise): the dense model is pruned by magnitude
per layer on qkv+proj+MLP (ViT; for the MobileNet-style CNN scope conv_fc: every non-depthwise
conv, the stem included, and the classifier; for the ResNet scope conv: its convs but the stem)
at each sparsity, plus a 2:4 setting on the same scope (not for the MobileNet: its stem has a
reduction of 9, not a multiple of 4) and a structured 50% MLP-neuron setting (whole conv filters
for the CNNs; ``--structured-sparsities`` sets others); the surviving weights are healed with each
objective through the engine (``starfish_fast.heal``, fast mode; fp32 on CPU) on unlabeled calibration images drawn from
the train split (1,000 = 1.7% of Fashion-MNIST's 60k; only ``ce`` sees their labels), AdamW
(weight decay 0.05), lr 6e-4 cosine to 1e-6, batch 32, 10 epochs; each model is evaluated on
the untouched test split (10k). Seeds change the calibration subset and its batch order; magnitude,
2:4 and structured masks do not depend on the seed, Wanda and representation-aware masks
(``--methods``) are computed from the seed's calibration images.

Beyond the paper (``--objectives`` also takes these healers): ``starfish_adaptive`` is STARFISH with
adaptive block weights; ``compensate`` is the closed-form ridge refit of the layers consuming
structurally pruned units, alone (no training); ``compensate+starfish`` is that refit, then STARFISH
(``HealConfig(warm_start="compensate")``); ``sparsegpt`` and ``sparsegpt+starfish`` the same with
SparseGPT's weight update under the setting's masks (any maker's). ``--methods sparsegpt``: SparseGPT's
masks from the seed's calibration images (its update is then the sparsegpt healers'). ImageNet: ``--imagenet-dir`` holds ImageFolder ``train/``
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
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from accuracy_report import (UNSTRUCTURED, check_targets, read_rows, setting_label,  # bench/ is on sys.path
                             summarize, write_csv, write_reports)
from starfish_fast import HealConfig, heal
from starfish_fast.bundled import BUNDLED_MODEL_NAME
from starfish_fast.compensation import compensate
from starfish_fast.sparsegpt import sparsegpt_update
from starfish_fast.config import OBJECTIVES
from starfish_fast.data import (FASHION_MNIST_DIR, TensorLoader, build_transform, load_fashion_mnist,
                                select_calibration)
from starfish_fast.diagnostics import representation_diagnostics
from starfish_fast.masks import apply_masks, mask_density
from starfish_fast.models import adapter_for, load_dense, load_model, model_spec
from starfish_fast.objectives import kl_dense_to_pruned
from starfish_fast.plan import resolve_device
from starfish_fast.prune import (magnitude_masks, nm_masks, representation_masks, sparsegpt_prune, structured_masks,
                                 wanda_masks)

log = logging.getLogger("accuracy")
# healers beyond the paper's objectives: name -> (objective, HealConfig overrides); the closed-form ones alone
# (CLOSED_FORM) train nothing
HEALERS = {"starfish_adaptive": ("starfish", {"block_weights": "adaptive"}),
           "compensate+starfish": ("starfish", {"warm_start": "compensate"}),
           "sparsegpt+starfish": ("starfish", {"warm_start": "sparsegpt"})}
CLOSED_FORM = {"compensate": compensate, "sparsegpt": sparsegpt_update}
CHOICES = (*OBJECTIVES, *HEALERS, *CLOSED_FORM)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FULL = dict(sparsities=(0.5, 0.6, 0.7, 0.8, 0.9), objectives=OBJECTIVES, seeds=(0, 1, 2), extras=("2:4", "structured"),
            epochs=10, calib_samples=1000, eval_samples=0)
# --quick: the two sparsities of the targets, 2:4 and structured, every objective, one seed, and
# 3 epochs on 500 images against 2,000 test images: 65 s on the 2-core CPU (the full grid: 29 min).
QUICK = dict(sparsities=(0.5, 0.8), objectives=OBJECTIVES, seeds=(0,), extras=("2:4", "structured"),
             epochs=3, calib_samples=500, eval_samples=2000)
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
    name: str                            # "magnitude" | "wanda" | "representation" | "2:4" | "structured[_qk]"
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

    kind = "mobilenet" if adapter_for(dense).cosine_per == "sample" else "vit"      # the reference's word
    scope = "conv_fc" if kind == "mobilenet" else "qkv_out_mlp"
    return Task(args.model_name, dense, calib, loader, None, scope, "channel" if kind == "mobilenet" else "mlp", device)


def make_masks(task: Task, setting: Setting, seed: int, args) -> dict[str, torch.Tensor]:
    """The setting's masks; Wanda and representation-aware ones from the seed's calibration images."""
    if setting.name in Masks.SEEDED:
        images, _ = task.calib_images(args.calib_samples, seed)
        common = dict(scope=task.scope, batch_size=args.eval_batch_size, device=task.device)
        if setting.name == "wanda":
            return wanda_masks(task.dense, setting.sparsity, images, **common)
        if setting.name == "sparsegpt":              # its masks; its weight update is the sparsegpt healers'
            return sparsegpt_prune(copy.deepcopy(task.dense), setting.sparsity, images, **common)
        score = "magnitude" if setting.name == "representation_magnitude" else "wanda"
        return representation_masks(task.dense, setting.sparsity, images, score=score, **common)
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
def heal_one(task: Task, setting: Setting, masks, sparsity: float, healer: str, seed: int, args):
    """Prune a copy of the dense model, heal it with ``healer`` (an objective, one of HEALERS, or a
    CLOSED_FORM alone) on the seed's calibration set and evaluate it. Returns (CSV row, healed model)."""
    torch.manual_seed(seed)                   # dropout / drop-path, for models trained with them
    images, labels = task.calib_images(args.calib_samples, seed)
    model = copy.deepcopy(task.dense)
    apply_masks(model, masks)
    if healer in CLOSED_FORM:
        started = time.perf_counter()
        CLOSED_FORM[healer](model, task.dense, masks, images, batch_size=args.batch_size, device=task.device)
        seconds = time.perf_counter() - started
        speed, epochs = len(images) / seconds, 0
    else:
        objective, overrides = HEALERS.get(healer, (healer, {}))
        config = HealConfig(mode="fast", objective=objective, epochs=args.epochs, lr=args.lr, min_lr=args.min_lr,
                            weight_decay=args.weight_decay, batch_size=args.batch_size,
                            scope=setting_scope(task, setting), device=str(task.device), precision=args.precision,
                            progress=False, **overrides)
        result = heal(model, task.dense, masks, images, config, labels=labels if objective == "ce" else None)
        seconds, speed, epochs = result.heal_seconds, result.images_per_second, args.epochs
    scores = evaluate(task, model, args.eval_batch_size)
    row = {"model": task.name, "setting": setting.name, "sparsity": sparsity, "objective": healer, "seed": seed,
           "dense_top1": scores["dense_top1"], "top1": scores["top1"], "retention": scores["retention"],
           "kl": scores["kl"], "heal_seconds": seconds, "images_per_second": speed, "epochs": epochs,
           "calib_samples": args.calib_samples, "eval_examples": scores["examples"]}
    return row, model


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
    parser.add_argument("--sparsities", type=float, nargs="*", default=None)
    parser.add_argument("--objectives", nargs="+", choices=CHOICES, default=None,
                        help="objectives and healers: starfish_adaptive (adaptive block weights), compensate (the "
                             "closed-form refit alone), compensate+starfish (the refit, then STARFISH), sparsegpt "
                             "(SparseGPT's weight update alone), sparsegpt+starfish (the update, then STARFISH)")
    parser.add_argument("--methods", nargs="+", choices=UNSTRUCTURED, default=["magnitude"],
                        help="unstructured mask makers run at every --sparsities (wanda, representation: from "
                             "the seed's calibration images; representation ranks within layers by Wanda's scores, "
                             "representation_magnitude by magnitude)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--extras", nargs="*", choices=("2:4", "structured", "structured_qk"), default=None,
                        help="extra settings: 2:4, and structured at --structured-sparsities (default: 2:4 and "
                             "structured; structured_qk: ViTs, whole QK head dims and MLP neurons)")
    parser.add_argument("--structured-sparsities", type=float, nargs="+", default=[0.5],
                        help="sparsities of the structured settings (fractions of their units: MLP neurons, QK "
                             "dims, filters)")
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


class Masks:
    """Masks per (setting, seed), made once: seed-independent settings share one set."""

    SEEDED = ("wanda", "representation", "representation_magnitude", "sparsegpt")

    def __init__(self, task: Task, args):
        self.task, self.args, self.made = task, args, {}

    def __call__(self, setting: Setting, seed: int) -> dict[str, torch.Tensor]:
        key = (setting, seed if setting.name in self.SEEDED else None)
        if key not in self.made:
            self.made[key] = make_masks(self.task, setting, seed, self.args)
        return self.made[key]


def evaluate_pruned(task: Task, settings, masks: Masks, args, diagnostics: dict) -> tuple[dict, dict]:
    """Top-1 and KL of each setting's pruned model (the first seed's masks) -> ({(name, sparsity): scores},
    {setting: sparsity}); the diagnosed setting's diagnostics go into ``diagnostics["pruned"]``."""
    pruned, sparsity_of = {}, {}
    for setting in settings:
        model = copy.deepcopy(task.dense)
        apply_masks(model, masks(setting, args.seeds[0]))
        sparsity_of[setting] = round(1 - mask_density(masks(setting, args.seeds[0])), 4)
        key = (setting.name, sparsity_of[setting])
        pruned[key] = evaluate(task, model, args.eval_batch_size)
        if setting == Setting("magnitude", args.diagnostics_sparsity):
            diagnostics["pruned"] = diagnose(task, model, args.eval_batch_size)
        log.info("%s: pruned top-1 %.2f%% (dense %.2f%%), KL %.3f", setting_label(*key), pruned[key]["top1"],
                 pruned[key]["dense_top1"], pruned[key]["kl"])
    return pruned, sparsity_of


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
    rows = read_rows(csv_path) if args.resume else []
    settings = [Setting(method, s) for method in args.methods for s in args.sparsities] + \
        [Setting(e, s) for e in args.extras for s in ((0.5,) if e == "2:4" else args.structured_sparsities)]
    started = time.perf_counter()
    diagnostics, earlier_seconds = {}, 0.0
    if args.resume and prefix.with_suffix(".json").exists():      # diagnostics and time of the skipped runs
        earlier = json.loads(prefix.with_suffix(".json").read_text())
        diagnostics, earlier_seconds = earlier.get("diagnostics", {}), earlier.get("wall_seconds", 0.0)
    masks = Masks(task, args)
    pruned, sparsity_of = evaluate_pruned(task, settings, masks, args, diagnostics)
    runs = [(setting, objective, seed) for setting in settings for objective in args.objectives for seed in args.seeds]
    done = {(r["setting"], r["sparsity"], r["objective"], r["seed"]) for r in rows}
    executed = 0
    bar = tqdm(runs, desc="heal+eval", unit="run", dynamic_ncols=True)
    for setting, objective, seed in bar:
        sparsity = sparsity_of[setting]
        if (setting.name, sparsity, objective, seed) in done:
            continue
        label = setting_label(setting.name, sparsity)
        bar.set_postfix_str(f"{label} {objective} seed {seed}")
        row, model = heal_one(task, setting, masks(setting, seed), sparsity, objective, seed, args)
        executed += 1
        rows.append(row)
        write_csv(rows, csv_path)
        if setting == Setting("magnitude", args.diagnostics_sparsity) and seed == args.seeds[0]:
            diagnostics[objective] = diagnose(task, model, args.eval_batch_size)
        log.info("%s %s seed %d: top-1 %.2f%% (retention %.1f%%), KL %.4f, heal %.1fs", label, objective,
                 seed, row["top1"], 100 * row["retention"], row["kl"], row["heal_seconds"])
    bar.close()
    summary = summarize(rows)
    targets = check_targets(summary)
    dense_top1 = next(iter(pruned.values()))["dense_top1"]
    seconds = time.perf_counter() - started if executed or not earlier_seconds else 0.0   # a rewrite adds none
    write_reports(args, task, prefix, summary, pruned, targets, diagnostics, dense_top1, earlier_seconds + seconds)
    return {"rows": rows, "summary": summary, "pruned": pruned, "targets": targets, "diagnostics": diagnostics}


def main(argv=None) -> int:
    args = resolve_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("starfish_fast").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
