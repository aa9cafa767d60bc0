"""The ``starfish-fast`` command line.

    starfish-fast demo                                   # bundled Fashion-MNIST ViT: prune 75%, heal, report
    starfish-fast prune --model-name fashion_vit --method magnitude --sparsity 0.75 --output masks.pt
    starfish-fast recover --model-name fashion_vit --mask-path masks.pt --calib-source train --eval-samples 10000
    starfish-fast eval --model-name fashion_vit --checkpoint outputs/recovered.pt

``recover`` takes every flag of the reference ``starfish.py`` with the same defaults
and output files, plus local data flags and the engine's settings.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch

from starfish_fast import compat
from starfish_fast.bundled import BUNDLED_MODEL_NAME, load_bundled_model
from starfish_fast.checkpoint import save_recovered_checkpoint
from starfish_fast.data import (FASHION_MNIST_DIR, TensorLoader, build_transform, fashion_mnist_transform,
                                image_folder_loader, load_fashion_mnist, select_calibration, split_batches)
from starfish_fast.evaluate import evaluate_top1, evaluate_top1_tensors
from starfish_fast.config import HealConfig
from starfish_fast.engine import heal
from starfish_fast.plan import resolve_device
from starfish_fast.masks import apply_masks, load_masks, mask_density
from starfish_fast.models import adapter_for, infer_model_kind, supported_model_names

log = logging.getLogger("starfish_fast")


# ----------------------------------------------------------------------------- shared flags
def _add_engine_flags(parser: argparse.ArgumentParser, default_mode: str) -> None:
    group = parser.add_argument_group("engine (starfish_fast)")
    group.add_argument("--mode", choices=("exact", "fast"), default=default_mode,
                       help=f"exact: the reference's step semantics; fast: bf16/compiled on CUDA (default {default_mode})")
    group.add_argument("--objective", choices=("starfish", "mse", "kl", "ce", "starfish+kl"), default="starfish")
    group.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                       help="fast mode compute precision (auto: bf16 on CUDA and for ViTs on bf16-native CPUs, else fp32)")
    group.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="per-block torch.compile")
    group.add_argument("--teacher-store", choices=("auto", "gpu", "pinned", "disk", "recompute", "memory"),
                       default="auto", help="where the dense block outputs live")
    group.add_argument("--teacher-dir", default=None, help="directory of the disk teacher store")
    group.add_argument("--checkpoint-every", type=int, default=0, help="resume checkpoint every N steps (0: none)")
    group.add_argument("--resume", action="store_true", help="continue from <output-path>.resume if present")
    group.add_argument("--allow-unsafe-pickle", action="store_true",
                       help="load pickled checkpoints/masks with weights_only=False (trusted files only)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_local_data_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("local data (instead of Hugging Face streaming)")
    group.add_argument("--fashion-mnist", metavar="DIR", nargs="?", const=FASHION_MNIST_DIR, default=None,
                       help=f"Fashion-MNIST IDX directory (default {FASHION_MNIST_DIR}; the bundled model's default)")
    group.add_argument("--calib-dir", metavar="DIR", default=None, help="ImageFolder directory of calibration images")
    group.add_argument("--eval-dir", metavar="DIR", default=None, help="ImageFolder directory of labeled images")


def _fashion_mnist_dir(args) -> str | None:
    if args.fashion_mnist:
        return args.fashion_mnist
    if args.model_name == BUNDLED_MODEL_NAME and not args.calib_dir and not getattr(args, "eval_dir", None):
        return FASHION_MNIST_DIR
    return None


def _check_paths(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and not Path(value).exists():
            raise FileNotFoundError(f"--{name.replace('_', '-')}: {value} does not exist")


# ----------------------------------------------------------------------------- recover
def build_recover_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "recover", help="heal a pruned model (the reference starfish.py, same flags and outputs)",
        description="Heal a pruned model with STARFISH. Flags and defaults of the reference starfish.py, "
                    "plus local data sources and the engine's settings.")
    parser.add_argument("--dense-path", default=None,
                        help="dense checkpoint (state dict or {'state_dict': ...}; .pt or .safetensors); "
                             f"required except for --model-name {BUNDLED_MODEL_NAME}")
    parser.add_argument("--mask-path", required=True, help="mask file (dict weight name -> 0/1 tensor)")
    parser.add_argument("--model-name", required=True, choices=supported_model_names(), metavar="NAME",
                        help=f"one of: {', '.join(supported_model_names())}")
    parser.add_argument("--output-path", default="outputs/recovered.pt")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--calib-samples", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--min-lr", type=float, default=1e-6)
    parser.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--grad-clip", type=float, default=0.0)
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--hf-dataset", default="ILSVRC/imagenet-1k")
    parser.add_argument("--calib-source", choices=("test", "train", "val"), default="test")
    parser.add_argument("--shuffle-buffer", type=int, default=5000)
    parser.add_argument("--eval-samples", type=int, default=0, help="0 = no before/after top-1")
    parser.add_argument("--prune-scope", default="auto")
    parser.add_argument("--store-dense-float32", action="store_true")
    parser.add_argument("--no-dense-cache", action="store_true")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    _add_local_data_flags(parser)
    _add_engine_flags(parser, default_mode="exact")
    parser.set_defaults(handler=run_recover)


def _load_dense(args, device) -> torch.nn.Module:
    if args.dense_path is None:
        if args.model_name != BUNDLED_MODEL_NAME:
            raise ValueError(f"--dense-path is required for --model-name {args.model_name}")
        return load_bundled_model()[0].to(device)
    return compat.load_model(args.model_name, args.dense_path, device, allow_unsafe_pickle=args.allow_unsafe_pickle)


def _image_transform(model_name: str):
    return fashion_mnist_transform() if model_name == BUNDLED_MODEL_NAME else build_transform()


def _recover_data(args):
    """(calibration batches, evaluation loader or None), from local files or Hugging Face."""
    fmnist = _fashion_mnist_dir(args)
    calib_index = None          # Fashion-MNIST indices of the calibration images, to keep them out of evaluation
    if args.calib_dir:
        loader = image_folder_loader(args.calib_dir, batch_size=args.batch_size, transform=_image_transform(
            args.model_name), num_samples=args.calib_samples, shuffle=True, seed=args.seed)
        calib = compat.cache_calibration_data(loader, args.calib_samples)
    elif fmnist:
        pool, _ = load_fashion_mnist(fmnist, "train" if args.calib_source == "train" else "test")
        if args.calib_samples > pool.shape[0]:
            raise ValueError(f"calibration set too small: --calib-samples {args.calib_samples} but only "
                             f"{pool.shape[0]} images available")
        calib_index = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(args.seed))
        calib_index = calib_index[:args.calib_samples]
        calib = split_batches(pool[calib_index], args.batch_size)
    else:
        loader = compat.make_calibration_loader(dataset_name=args.hf_dataset, split_source=args.calib_source,
                                                batch_size=args.batch_size, num_samples=args.calib_samples,
                                                seed=args.seed, shuffle_buffer=args.shuffle_buffer)
        calib = compat.cache_calibration_data(loader, args.calib_samples)
    if args.eval_samples <= 0:
        return calib, None
    if args.eval_dir:
        return calib, image_folder_loader(args.eval_dir, batch_size=256, transform=_image_transform(args.model_name),
                                          num_samples=args.eval_samples)
    if fmnist:
        images, labels = load_fashion_mnist(fmnist, "test")
        keep = torch.ones(images.shape[0], dtype=torch.bool)
        if calib_index is not None and args.calib_source == "val":      # evaluation skips the calibration images
            keep[calib_index] = False
        index = keep.nonzero().flatten()[:args.eval_samples]
        return calib, TensorLoader(images[index], labels[index], batch_size=256)
    skip = args.calib_samples if args.calib_source == "val" else 0
    return calib, compat.make_eval_loader(dataset_name=args.hf_dataset, split_source="val", batch_size=256,
                                          num_samples=args.eval_samples, skip_samples=skip, seed=args.seed)


def run_recover(args) -> int:
    infer_model_kind(args.model_name)
    _check_paths(args, "mask_path", "dense_path", "fashion_mnist", "calib_dir", "eval_dir")
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    dense = _load_dense(args, device)
    pruned = copy.deepcopy(dense)
    scope = compat.default_prune_scope(args.model_name) if args.prune_scope == "auto" else args.prune_scope
    adapter_for(pruned).check_scope(scope)
    predicate = compat.is_prunable_weight(args.model_name, scope)
    masks = load_masks(args.mask_path, pruned, predicate, allow_unsafe_pickle=args.allow_unsafe_pickle)
    calib, eval_loader = _recover_data(args)
    blocks = compat.all_block_names(args.model_name, pruned)
    apply_masks(pruned, masks)
    top1_before = evaluate_top1(pruned, eval_loader, device) if eval_loader is not None else float("nan")
    if args.grad_checkpointing:
        compat.enable_grad_checkpointing(pruned)
    output = Path(args.output_path)
    config = HealConfig(
        epochs=args.epochs, lr=args.lr, min_lr=args.min_lr, lr_schedule=args.lr_schedule,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, batch_size=args.batch_size, scope=scope,
        mode=args.mode, objective=args.objective, precision=args.precision, compile=args.compile,
        teacher_store="recompute" if args.no_dense_cache else args.teacher_store,
        teacher_dtype="fp32" if args.store_dense_float32 else "auto", teacher_dir=args.teacher_dir,
        device=str(device), checkpoint_every=args.checkpoint_every, resume=args.resume,
        checkpoint_path=str(output) + ".resume" if (args.checkpoint_every or args.resume) else None,
        metrics_path=str(output) + ".metrics.jsonl", plot_path=str(output) + ".loss.png",
        progress=not args.no_progress)
    output.parent.mkdir(parents=True, exist_ok=True)
    Path(config.metrics_path).unlink(missing_ok=True)
    result = heal(pruned, dense, masks, calib, config, block_names=blocks, predicate=predicate)
    top1_after = evaluate_top1(pruned, eval_loader, device) if eval_loader is not None else float("nan")
    save_recovered_checkpoint(path=output, model=pruned, args=args, blocks=blocks, history=result.history,
                                     before=top1_before, after=top1_after, mask_density_value=mask_density(masks))
    log.info("healed %d steps in %.1fs (%.0f img/s, teacher store %s); top-1 %.2f%% -> %.2f%%; wrote %s",
             result.steps, result.heal_seconds, result.images_per_second, result.teacher_store, top1_before,
             top1_after, output)
    return 0


# ----------------------------------------------------------------------------- eval
def build_eval_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="top-1 of a checkpoint",
                                   description="Top-1 accuracy of a dense or recovered checkpoint.")
    parser.add_argument("--model-name", required=True, choices=supported_model_names(), metavar="NAME",
                        help=f"one of: {', '.join(supported_model_names())}")
    parser.add_argument("--checkpoint", default=None,
                        help=f"checkpoint to evaluate (default for {BUNDLED_MODEL_NAME}: the bundled weights)")
    parser.add_argument("--eval-samples", type=int, default=0, help="0 = the whole evaluation split")
    parser.add_argument("--hf-dataset", default="ILSVRC/imagenet-1k")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default=None)
    parser.add_argument("--allow-unsafe-pickle", action="store_true",
                        help="load a pickled checkpoint with weights_only=False (trusted files only)")
    group = parser.add_argument_group("diagnostics (the paper's Theorem 1)")
    group.add_argument("--diagnostics", action="store_true",
                       help="also KL(dense || model), its representation bounds and per-block cosine to the dense "
                            "model; writes <checkpoint>.diagnostics.json and PNG plots")
    group.add_argument("--dense-path", default=None,
                       help=f"the dense reference checkpoint (default for {BUNDLED_MODEL_NAME}: the bundled weights)")
    group.add_argument("--mask-path", default=None,
                       help="masks: adds the pruned-before-healing model (dense weights x masks) for comparison")
    group.add_argument("--prune-scope", default="auto")
    _add_local_data_flags(parser)
    parser.set_defaults(handler=run_eval)


def run_eval(args) -> int:
    infer_model_kind(args.model_name)
    _check_paths(args, "checkpoint", "fashion_mnist", "eval_dir", "dense_path", "mask_path")
    device = resolve_device(args.device)
    if args.checkpoint is None:
        if args.model_name != BUNDLED_MODEL_NAME:
            raise ValueError(f"--checkpoint is required for --model-name {args.model_name}")
        model = load_bundled_model()[0].to(device)
    else:
        model = compat.load_model(args.model_name, args.checkpoint, device,
                                  allow_unsafe_pickle=args.allow_unsafe_pickle)
    fmnist = _fashion_mnist_dir(args)
    if args.eval_dir:
        loader = image_folder_loader(args.eval_dir, batch_size=args.batch_size,
                                     transform=_image_transform(args.model_name), num_samples=args.eval_samples)
    elif fmnist:
        images, labels = load_fashion_mnist(fmnist, "test")
        if args.eval_samples > 0:
            images, labels = images[:args.eval_samples], labels[:args.eval_samples]
        loader = TensorLoader(images, labels, batch_size=args.batch_size)
    else:
        loader = compat.make_eval_loader(dataset_name=args.hf_dataset, split_source="val", batch_size=args.batch_size,
                                         num_samples=args.eval_samples or 50000)
    if args.diagnostics:
        return _run_diagnostics(args, model, loader, device)
    top1 = evaluate_top1(model, loader, device)
    print(json.dumps({"model_name": args.model_name, "checkpoint": args.checkpoint, "top1": top1}))
    return 0


def _run_diagnostics(args, model, loader, device) -> int:
    from starfish_fast.checkpoint import save_json_atomic
    from starfish_fast.diagnostics import format_diagnostics, plot_block_cosine, plot_kl_bound, \
        representation_diagnostics

    dense = _load_dense(args, device)
    before = None
    if args.mask_path:
        pruned = copy.deepcopy(dense)
        scope = compat.default_prune_scope(args.model_name) if args.prune_scope == "auto" else args.prune_scope
        masks = load_masks(args.mask_path, pruned, compat.is_prunable_weight(args.model_name, scope),
                           allow_unsafe_pickle=args.allow_unsafe_pickle)
        apply_masks(pruned, masks)
        before = representation_diagnostics(dense, pruned, loader, device=device)
        print(format_diagnostics(before, "pruned"))
    after = representation_diagnostics(dense, model, loader, device=device)
    print(format_diagnostics(after, "healed" if before else "model"))
    stem = str(args.checkpoint or BUNDLED_MODEL_NAME)
    save_json_atomic({"model_name": args.model_name, "checkpoint": args.checkpoint, "before": before,
                      "after": after}, stem + ".diagnostics.json")
    plot_block_cosine(before["block_cosine"] if before else None, after["block_cosine"],
                      stem + ".block_cosine.png")
    if before:
        plot_kl_bound(before, after, stem + ".kl_bound.png")
    print(f"wrote {stem}.diagnostics.json and plots")
    return 0


# ----------------------------------------------------------------------------- demo
def build_demo_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="prune the bundled Fashion-MNIST ViT 75%% and heal it (the embedded default)",
        description="Load the bundled Fashion-MNIST ViT, prune 75%% of qkv+proj+MLP weights by magnitude, heal "
                    "with STARFISH on unlabeled train images, and report dense / pruned / healed test top-1.")
    parser.add_argument("--fashion-mnist", metavar="DIR", default=FASHION_MNIST_DIR)
    parser.add_argument("--sparsity", type=float, default=0.75)
    parser.add_argument("--calib-samples", type=int, default=1000)
    parser.add_argument("--eval-samples", type=int, default=0, help="0 = the whole 10k test split")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--mode", choices=("exact", "fast"), default="fast")
    parser.add_argument("--output-dir", default="outputs/demo", help="loss curve PNG, metrics and healed weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(handler=run_demo)


def run_demo(args) -> int:
    from starfish_fast.checkpoint import save_safetensors_atomic
    from starfish_fast.prune import magnitude_masks

    _check_paths(args, "fashion_mnist")
    started = time.perf_counter()
    device = resolve_device(args.device)
    train_images, _ = load_fashion_mnist(args.fashion_mnist, "train")
    test_images, test_labels = load_fashion_mnist(args.fashion_mnist, "test")
    if args.eval_samples > 0:
        test_images, test_labels = test_images[:args.eval_samples], test_labels[:args.eval_samples]
    calib = select_calibration(train_images, args.calib_samples, seed=args.seed)    # labels never used
    dense, metadata = load_bundled_model()
    dense = dense.to(device)
    pruned = copy.deepcopy(dense)
    masks = magnitude_masks(pruned, sparsity=args.sparsity, scope="qkv_out_mlp")
    apply_masks(pruned, masks)
    top1_dense = evaluate_top1_tensors(dense, test_images, test_labels, device=device)
    top1_pruned = evaluate_top1_tensors(pruned, test_images, test_labels, device=device)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.jsonl").unlink(missing_ok=True)
    config = HealConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, scope="qkv_out_mlp",
                        mode=args.mode, device=str(device), metrics_path=str(output / "metrics.jsonl"),
                        plot_path=str(output / "loss.png"), progress=not args.no_progress)
    result = heal(pruned, dense, masks, calib, config)
    top1_healed = evaluate_top1_tensors(pruned, test_images, test_labels, device=device)
    save_safetensors_atomic(pruned.state_dict(), output / "healed.safetensors",
                            metadata={"recipe": json.dumps(vars(args), default=str)})
    wall = time.perf_counter() - started
    summary = {"dense_top1": top1_dense, "pruned_top1": top1_pruned, "healed_top1": top1_healed,
               "retention": top1_healed / top1_dense, "sparsity": 1 - mask_density(masks),
               "calib_samples": args.calib_samples, "epochs": args.epochs, "mode": args.mode,
               "heal_seconds": result.heal_seconds, "images_per_second": result.images_per_second,
               "wall_seconds": wall, "device": str(device)}
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nbundled Fashion-MNIST ViT ({metadata.get('test_top1', float('nan')):.2f}% when trained), "
          f"{summary['sparsity']:.0%} of qkv+proj+MLP weights pruned by magnitude, healed with STARFISH on "
          f"{args.calib_samples} unlabeled train images ({args.epochs} epochs, {args.mode} mode, {device}):")
    print(f"  dense  top-1  {top1_dense:6.2f}%")
    print(f"  pruned top-1  {top1_pruned:6.2f}%")
    print(f"  healed top-1  {top1_healed:6.2f}%   retention {summary['retention']:.1%}")
    print(f"  healing {result.heal_seconds:.1f}s ({result.images_per_second:.0f} img/s), wall time {wall:.1f}s")
    print(f"  loss curve: {output / 'loss.png'}; summary: {output / 'summary.json'}")
    return 0


# ----------------------------------------------------------------------------- prune
def build_prune_parser(subparsers) -> None:
    from starfish_fast.prune import add_prune_arguments, run_prune

    parser = subparsers.add_parser("prune", help="make a mask file (magnitude, N:M, structured)",
                                   description="Make a pruning mask file in the reference format (.pt) or "
                                               "as safetensors.")
    add_prune_arguments(parser)
    parser.set_defaults(handler=run_prune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="starfish-fast", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Heal pruned networks with STARFISH: train the surviving weights so that every block's "
                    "output aligns with the dense model's.",
        epilog="examples:\n" + "\n".join(line.strip() for line in __doc__.splitlines() if "starfish-fast " in line
                                          and not line.startswith("The")))
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for build in (build_demo_parser, build_recover_parser, build_eval_parser, build_prune_parser):
        build(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"starfish-fast {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
