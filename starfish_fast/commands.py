"""What each ``starfish-fast`` command does, once ``starfish_fast.cli`` has parsed its flags.

    from starfish_fast import cli
    cli.main(["recover", "--model-name", "fashion_vit", "--mask-path", "masks.pt", "--calib-source", "train"])

Every command runs in two parts. First one validation pass over every value and path it takes, before
any model is built or any data read: the values and settings; the outputs (each can be created: its
parent a directory, itself not one, the place writable); the inputs (each exists and holds the right
kind of file: weights, masks, a resume checkpoint, image folders, Fashion-MNIST's IDX files, a dataset
that can be streamed now); the model name and ``--model-kwargs``, checked against the class's signature
on a skeleton built on the meta device (no memory, no weights), which then also checks ``--blocks``,
the prune scope, the masks' keys and shapes, and that the images fit the model. A failure is one line
naming the flag. Then the work, whose outputs are written atomically; the result goes to stdout (JSON
for ``recover``, ``eval``, ``prune`` and ``blocks``, a short report for ``demo``), logs to stderr.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import torch
from torch import nn

from starfish_fast import data
from starfish_fast.checkpoint import (check_input_file, check_output_dir, check_output_path, error_line, export_dense,
                                      save_json_atomic, save_masks, save_recovered_checkpoint)
from starfish_fast.config import CALIBRATED_METHODS, NM_METHODS, HealConfig, config_fields, flag_name
from starfish_fast.engine import heal
from starfish_fast.evaluate import evaluate_top1
from starfish_fast.masks import apply_masks, load_masks, mask_density
from starfish_fast.models import CheckpointMismatchError, ModelSpec, adapter_for, load_dense, model_spec
from starfish_fast.models.registry import check_checkpoint_fits, input_channels, weights_source
from starfish_fast.plan import process_device, resolve_device

log = logging.getLogger("starfish_fast")
MASK_SUFFIXES = (".pt", ".pth", ".safetensors")
RECOVER_SIDECARS = (".json", ".metrics.jsonl", ".loss.png", ".resume")
DIAGNOSTICS_FILES = (".diagnostics.json", ".block_cosine.png", ".kl_bound.png")
DEMO_FILES = ("loss.png", "metrics.jsonl", "healed.safetensors", "summary.json")
RANDOM_INIT = "random (--random-init: untrained weights, seeded; a dry run, its accuracies mean nothing)"


# ----------------------------------------------------------------------------- the validation pass
@dataclass
class Checked:
    """What the validation pass found, for the work after it."""
    spec: ModelSpec
    kwargs: dict
    skeleton: nn.Module | None           # the architecture on the meta device (None: its library cannot)
    blocks: list[str] | None = None      # the blocks, found on the skeleton
    masks: dict | None = None            # --mask-path, validated against the skeleton


def config_from_args(args: argparse.Namespace, **values) -> HealConfig:
    """The ``HealConfig`` the flags (cli.add_config_flags) describe, checked now: a bad value names its flag."""
    fields = {item.name: getattr(args, item.name) for item in config_fields() if hasattr(args, item.name)}
    try:
        return HealConfig(**{**fields, **values})
    except ValueError as error:
        named = re.search(r"HealConfig\.(\w+)", str(error))
        flag = next((flag_name(item) for item in config_fields() if named and item.name == named.group(1)), None)
        if flag is None:
            raise
        raise ValueError(f"{flag}: {error}") from None


def model_kwargs(args) -> dict:
    """``--model-kwargs KEY=VALUE ...`` as a dict (values as Python literals, else strings)."""
    values = {}
    for item in args.model_kwargs:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-kwargs {item!r}: expected KEY=VALUE, e.g. num_classes=10")
        try:
            values[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            values[key] = raw
    return values


def check_model(args, weights: bool) -> Checked:
    """The model name, ``--model-kwargs`` (on the skeleton), ``--blocks``, the weight files given (their
    kind), and with ``weights`` that exactly one source of dense weights applies."""
    try:
        spec = model_spec(args.model_name)
    except ValueError as error:
        raise ValueError(f"--model-name: {error}") from None
    kwargs = model_kwargs(args)
    checked = Checked(spec, kwargs, spec.skeleton(**kwargs))
    for name in ("dense_path", "pretrained_file", "checkpoint"):
        if getattr(args, name, None):
            flag = "--" + name.replace("_", "-")
            check_input_file(getattr(args, name), flag, "weights", args.allow_unsafe_pickle)
            if checked.skeleton is not None and name != "pretrained_file":   # timm adapts those to the model
                with _naming(flag):
                    check_checkpoint_fits(args.model_name, checked.skeleton, getattr(args, name),
                                          args.allow_unsafe_pickle)
    if weights:
        weights_source(args.model_name, args.dense_path, args.pretrained, args.pretrained_file, args.random_init)
    if checked.skeleton is not None:
        checked.blocks = block_names(args, checked.skeleton)
    return checked


def check_masks(args, checked: Checked, scope: str) -> dict | None:
    """``--mask-path``: the right kind of file, then (on the skeleton) its keys, shapes and values."""
    check_input_file(args.mask_path, "--mask-path", "masks", args.allow_unsafe_pickle)
    return None if checked.skeleton is None else read_masks(args, checked.skeleton, checked.blocks, scope)


def read_masks(args, model: nn.Module, blocks, scope: str) -> dict:
    """The masks of ``--mask-path`` for ``model``'s ``scope``, validated (float 0/1 on the CPU)."""
    try:
        predicate = adapter_for(model, blocks).scope_predicate(scope)
    except ValueError as error:
        raise ValueError(f"--prune-scope: {error}") from None
    try:
        return load_masks(args.mask_path, model, predicate, allow_unsafe_pickle=args.allow_unsafe_pickle)
    except ValueError as error:
        raise ValueError(f"--mask-path {error}") from None


def check_data(args, checked: Checked, calibration: bool, evaluation: bool) -> None:
    """The data the command will read is there (image folders, Fashion-MNIST's files and split sizes, a
    dataset that can be streamed now) and its images fit the model (one image through the skeleton)."""
    fashion = fashion_mnist_dir(args, checked.spec)
    calib_dir, eval_dir = getattr(args, "calib_dir", None), getattr(args, "eval_dir", None)
    if calib_dir:
        data.check_image_dir(calib_dir, "--calib-dir", at_least=args.calib_samples if calibration else 1)
    if eval_dir:
        data.check_image_dir(eval_dir, "--eval-dir", labeled=True)
    source = {"calibration": calib_dir and "--calib-dir", "evaluation": eval_dir and "--eval-dir"}
    reads = {use: source[use] or ("--fashion-mnist" if fashion else "--hf-dataset")
             for use, wanted in (("calibration", calibration), ("evaluation", evaluation)) if wanted}
    if reads.get("calibration") == "--fashion-mnist":
        data.check_fashion_mnist(fashion, sorted({"train" if args.calib_source == "train" else "test",
                                                  *(["test"] if reads.get("evaluation") == "--fashion-mnist"
                                                    else [])}))
        data.check_split_counts(args.calib_source, args.calib_samples,
                                args.eval_samples if reads.get("evaluation") == "--fashion-mnist" else 0)
    elif reads.get("evaluation") == "--fashion-mnist":
        data.check_fashion_mnist(fashion, ["test"])
        data.check_fashion_mnist_eval_samples(args.eval_samples or None)
    if "--hf-dataset" in reads.values():
        data.check_hf_streaming(args.hf_dataset)
    if checked.skeleton is not None:
        for flag in dict.fromkeys(reads.values()):
            _check_fits(args, checked, flag)


def _check_fits(args, checked: Checked, flag: str) -> None:
    """One image of the source ``flag``, as the model will get it, through the skeleton (meta tensors:
    shapes are checked, nothing is computed)."""
    if flag == "--fashion-mnist" and fashion_native(checked.spec, checked.skeleton):
        shape = (1, 28, 28)
    else:
        from PIL import Image
        shape = tuple(checked.spec.transform(checked.skeleton)(Image.new("RGB", (64, 64))).shape)
    try:
        with torch.no_grad():
            checked.skeleton.eval()(torch.empty((1, *shape), device="meta"))
    except Exception as error:  # any layer's complaint about the input
        if isinstance(error, NotImplementedError) or "meta" in str(error).lower():
            return                   # an operation the meta device cannot run: the real model tells later
        raise ValueError(f"{flag}: its images ({'x'.join(map(str, shape))} as the model's transform makes them) "
                         f"do not fit {args.model_name} ({error_line(error)})") from None


def check_device(config: HealConfig):
    """``(device, process group or None)`` for ``--device`` (and torchrun); a bad one names the flag."""
    try:
        return process_device(config)
    except ValueError as error:
        raise ValueError(f"--device: {error}") from None


# ----------------------------------------------------------------------------- shared loading
def load_dense_model(args, device) -> nn.Module:
    """The dense model of ``--model-name`` from ``--dense-path`` / ``--pretrained`` / ``--pretrained-file`` /
    ``--random-init`` (or a bundled model's own weights)."""
    with _naming("--dense-path"):
        return load_dense(args.model_name, args.dense_path, device, pretrained=args.pretrained,
                          pretrained_file=args.pretrained_file, random_init=args.random_init,
                          model_kwargs=model_kwargs(args), allow_unsafe_pickle=args.allow_unsafe_pickle)


def load_checkpoint(args, device) -> nn.Module:
    """The model of ``--checkpoint`` (weights of any kind ``checkpoint.read_state_dict`` reads)."""
    with _naming("--checkpoint"):
        return load_dense(args.model_name, args.checkpoint, device, model_kwargs=model_kwargs(args),
                          allow_unsafe_pickle=args.allow_unsafe_pickle)


@contextlib.contextmanager
def _naming(flag: str):
    """A checkpoint of another model (found when its weights are loaded) named by the flag that gave it."""
    try:
        yield
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(f"{flag} {error}") from None


def weights_label(args) -> str:
    """Where the dense weights came from, for the JSON result (``--random-init`` said plainly)."""
    source = weights_source(args.model_name, args.dense_path, args.pretrained, args.pretrained_file, args.random_init)
    return {"--random-init": RANDOM_INIT, "bundled": "bundled", "--pretrained": "pretrained (the library's)"}.get(
        source, f"{source} {args.dense_path or args.pretrained_file}")


def block_names(args, model) -> list[str]:
    """The blocks to align: the adapter's own, or the modules whose names match ``--blocks``."""
    if not args.blocks:
        return adapter_for(model).block_names(model)
    try:
        pattern = re.compile(args.blocks)
    except re.error as error:
        raise ValueError(f"--blocks {args.blocks!r} is not a regular expression ({error})") from None
    names = [name for name, _ in model.named_modules() if name and pattern.fullmatch(name)]
    if not names:
        raise ValueError(f"--blocks {args.blocks!r} matches no module of {args.model_name}; "
                         f"`starfish-fast blocks --model-name {args.model_name}` lists the blocks")
    return names


@contextlib.contextmanager
def output_directory(path: Path):
    """Yield; if the command fails and ``path`` did not exist before and is empty, remove it."""
    existed = path.exists()
    try:
        yield
    except BaseException:
        if not existed and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        raise


def fashion_mnist_dir(args, spec) -> str | None:
    """Fashion-MNIST for ``--fashion-mnist`` (bare: the system copy), and by default for the bundled models."""
    if args.fashion_mnist is not None:
        return args.fashion_mnist or data.FASHION_MNIST_DIR
    return data.FASHION_MNIST_DIR if spec.source == "bundled" else None


def fashion_native(spec, model: nn.Module) -> bool:
    """Whether the model takes Fashion-MNIST as stored (1 channel, 28x28, its mean/std): the bundled models
    and 1-channel ones; any other gets each image through its own transform (channels, size, mean/std)."""
    return spec.source == "bundled" or input_channels(model) == 1


def print_json(result: dict) -> None:
    print(json.dumps(result, indent=2, default=str))


# ----------------------------------------------------------------------------- recover
def recover_config(args, output) -> HealConfig:
    """The healing settings of ``recover``'s flags, its files named after ``output`` (``<output>.resume``,
    ``.metrics.jsonl``, ``.loss.png``); the reference's two flags checked against the engine's."""
    config = config_from_args(args, teacher_store="recompute" if args.no_dense_cache else args.teacher_store,
                              teacher_dtype="fp32" if args.store_dense_float32 else args.teacher_dtype,
                              checkpoint_path=f"{output}.resume", metrics_path=f"{output}.metrics.jsonl",
                              plot_path=f"{output}.loss.png", progress=not args.no_progress)
    if args.no_dense_cache and args.teacher_store not in ("auto", "recompute"):
        raise ValueError(f"--no-dense-cache and --teacher-store {args.teacher_store} contradict each other")
    if args.store_dense_float32 and args.teacher_dtype not in ("auto", "fp32"):
        raise ValueError(f"--store-dense-float32 and --teacher-dtype {args.teacher_dtype} contradict each other")
    if args.teacher_dir:
        check_output_dir(args.teacher_dir, "--teacher-dir")
    if args.resume and Path(config.checkpoint_path).exists():
        check_input_file(config.checkpoint_path, "--resume", "resume")
    return config


def _check_recover(args):
    config = recover_config(args, args.output_path)
    if args.calib_samples <= 0 or args.eval_samples < 0:
        raise ValueError(f"--calib-samples must be positive and --eval-samples >= 0, got {args.calib_samples} "
                         f"and {args.eval_samples}")
    if args.export and not args.export.endswith(".safetensors"):
        raise ValueError(f"--export {args.export}: the export is a .safetensors file")
    for path in (args.output_path, *(f"{args.output_path}{suffix}" for suffix in RECOVER_SIDECARS)):
        check_output_path(path, "--output-path")
    if args.export:
        check_output_path(args.export, "--export")
    checked = check_model(args, weights=True)
    check_data(args, checked, calibration=True, evaluation=args.eval_samples > 0)
    checked.masks = check_masks(args, checked, config.scope)
    device, group = check_device(config)
    return config, checked, device, group is None or group.main


def recover_data(args, spec, dense):
    """(calibration batches, evaluation loader or None), never overlapping."""
    transform = spec.transform(dense)
    fashion = fashion_mnist_dir(args, spec)
    adapted = None if fashion_native(spec, dense) else transform       # Fashion-MNIST through the model's transform
    calib = evaluation = None
    if fashion and not args.calib_dir:
        calib, images, labels = data.fashion_mnist_split(fashion, args.calib_source, args.calib_samples,
                                                         0 if args.eval_dir else args.eval_samples, args.seed,
                                                         normalize=adapted is None)
        if adapted is None:
            calib = data.split_batches(calib, args.batch_size)
            evaluation = data.TensorLoader(images, labels, batch_size=256) if images is not None else None
        else:
            calib = data.cache_calibration_data(data.images_loader(calib, None, adapted, args.batch_size),
                                                args.calib_samples)
            evaluation = data.images_loader(images, labels, adapted, 256) if images is not None else None
    elif args.calib_dir:
        loader = data.image_files_loader(args.calib_dir, batch_size=args.batch_size, transform=transform,
                                         num_samples=args.calib_samples, shuffle=True, seed=args.seed)
        calib = data.cache_calibration_data(loader, args.calib_samples)
    else:
        loader = data.make_calibration_loader(dataset_name=args.hf_dataset, source=args.calib_source,
                                              batch_size=args.batch_size, transform=transform,
                                              calib_samples=args.calib_samples, seed=args.seed,
                                              shuffle_buffer=args.shuffle_buffer)
        calib = data.cache_calibration_data(loader, args.calib_samples)
    if args.eval_samples and evaluation is None:
        if args.eval_dir:
            evaluation = data.image_folder_loader(args.eval_dir, batch_size=256, transform=transform,
                                                  num_samples=args.eval_samples)
        elif fashion:
            evaluation = data.fashion_mnist_eval(fashion, args.eval_samples, transform=adapted)
        else:
            skip = args.calib_samples if args.calib_source == "val" else 0
            evaluation = data.make_eval_loader(dataset_name=args.hf_dataset, batch_size=256, transform=transform,
                                               eval_samples=args.eval_samples, skip=skip)
    return calib, evaluation


def run_recover(args) -> int:
    config, checked, device, main = _check_recover(args)
    output = Path(args.output_path)
    shown = config.progress and main
    with output_directory(output.parent):
        dense = load_dense_model(args, device)
        blocks = checked.blocks or block_names(args, dense)
        pruned = copy.deepcopy(dense)
        masks = checked.masks if checked.masks is not None else read_masks(args, pruned, blocks, config.scope)
        predicate = adapter_for(pruned, blocks).scope_predicate(config.scope)
        calib, evaluation = recover_data(args, checked.spec, dense)
        apply_masks(pruned, masks)
        top1_before = evaluate_top1(pruned, evaluation, device, desc="top-1 pruned" if shown else None) \
            if evaluation is not None else float("nan")
        result = heal(pruned, dense, masks, calib, config, block_names=blocks, predicate=predicate)
        top1_after = evaluate_top1(pruned, evaluation, device, desc="top-1 healed" if shown else None) \
            if evaluation is not None else float("nan")
        if not main:                          # under torchrun rank 0 alone writes and reports
            return 0
        save_recovered_checkpoint(path=output, model=pruned, args=args, blocks=blocks, history=result.history,
                                  before=top1_before, after=top1_after, mask_density_value=mask_density(masks))
        if args.export:
            export_dense(pruned, masks, args.export, {"model_name": args.model_name, "mask_path": args.mask_path,
                                                      "history": result.history, "plan": result.plan.as_dict()})
        Path(config.checkpoint_path).unlink(missing_ok=True)     # the run is whole: its resume checkpoint is spent
    print_json({"output": str(output), "sidecar": f"{output}.json", "metrics": config.metrics_path,
                "plot": config.plot_path, "export": args.export, "dense_weights": weights_label(args),
                "top1_before": _number(top1_before), "top1_after": _number(top1_after),
                "mask_density": mask_density(masks), "final_loss": result.history[-1]["loss"], "steps": result.steps,
                "heal_seconds": round(result.heal_seconds, 2), "images_per_second": round(result.images_per_second, 1),
                "plan": result.plan.summary()})
    return 0


def _number(value: float) -> float | None:
    return None if value != value else value      # NaN (not evaluated) -> null


# ----------------------------------------------------------------------------- eval
def _check_eval(args):
    if args.eval_samples < 0 or args.batch_size <= 0:
        raise ValueError(f"--eval-samples must be >= 0 and --batch-size positive, got {args.eval_samples} and "
                         f"{args.batch_size}")
    if args.mask_path and not args.diagnostics:
        raise ValueError(f"--mask-path {args.mask_path}: the masks are read only with --diagnostics (they add the "
                         f"pruned model to them)")
    if args.diagnostics:
        for suffix in DIAGNOSTICS_FILES:
            check_output_path(diagnostics_stem(args) + suffix, "--diagnostics")
    checked = check_model(args, weights=args.diagnostics or not args.checkpoint)
    if args.mask_path:
        checked.masks = check_masks(args, checked, args.prune_scope)
    check_data(args, checked, calibration=False, evaluation=True)
    device, group = check_device(HealConfig(device=args.device))     # under torchrun: evaluation split
    return checked, device, group is None or group.main


def run_eval(args) -> int:
    checked, device, main = _check_eval(args)
    shown = main and not args.no_progress
    dense = load_dense_model(args, device) if (args.diagnostics or not args.checkpoint) else None
    model = load_checkpoint(args, device) if args.checkpoint else dense
    loader = eval_loader(args, checked.spec, model)
    result = {"model_name": args.model_name, "checkpoint": args.checkpoint,
              "top1": evaluate_top1(model, loader, device, desc="top-1" if shown else None)}
    if dense is not None:
        result["dense_weights"] = weights_label(args)
    if args.diagnostics:
        result.update(diagnostics(args, checked, dense, model, loader, device, main, shown))
    if main:
        print_json(result)
    return 0


def eval_loader(args, spec, model):
    fashion = fashion_mnist_dir(args, spec)
    if args.eval_dir:
        return data.image_folder_loader(args.eval_dir, batch_size=args.batch_size, transform=spec.transform(model),
                                        num_samples=args.eval_samples)
    if fashion:
        return data.fashion_mnist_eval(fashion, args.eval_samples or None, batch_size=args.batch_size,
                                       transform=None if fashion_native(spec, model) else spec.transform(model))
    return data.make_eval_loader(dataset_name=args.hf_dataset, batch_size=args.batch_size,
                                 transform=spec.transform(model), eval_samples=args.eval_samples or 50000)


def diagnostics_stem(args) -> str:
    return str(args.checkpoint or Path("outputs") / args.model_name.replace("/", "_"))


def diagnostics(args, checked: Checked, dense, model, loader, device, main: bool = True, shown: bool = False) -> dict:
    """The paper's bound and per-block cosine, before (dense x masks, with --mask-path) and after; JSON and PNGs."""
    from starfish_fast.diagnostics import plot_block_cosine, plot_kl_bound, representation_diagnostics

    blocks = checked.blocks or block_names(args, dense)
    before = None
    if args.mask_path:
        pruned = copy.deepcopy(dense)
        masks = checked.masks if checked.masks is not None else read_masks(args, pruned, blocks, args.prune_scope)
        apply_masks(pruned, masks)
        before = representation_diagnostics(dense, pruned, loader, block_names=blocks, device=device,
                                            desc="diagnostics: pruned" if shown else None)
    after = representation_diagnostics(dense, model, loader, block_names=blocks, device=device,
                                       desc="diagnostics: model" if shown else None)
    stem = diagnostics_stem(args)
    files = {"diagnostics": stem + DIAGNOSTICS_FILES[0], "block_cosine_plot": stem + DIAGNOSTICS_FILES[1]}
    if not main:
        return {}
    save_json_atomic({"model_name": args.model_name, "checkpoint": args.checkpoint, "before": before,
                      "after": after}, files["diagnostics"])
    plot_block_cosine(before["block_cosine"] if before else None, after["block_cosine"], files["block_cosine_plot"])
    if before:
        files["kl_bound_plot"] = stem + DIAGNOSTICS_FILES[2]
        plot_kl_bound(before, after, files["kl_bound_plot"])
    return {"pruned": before, "model": after, "files": files}


# ----------------------------------------------------------------------------- demo
def _check_demo(args, output: Path):
    config = config_from_args(args, scope="qkv_out_mlp", metrics_path=str(output / DEMO_FILES[1]),
                              plot_path=str(output / DEMO_FILES[0]), progress=not args.no_progress)
    if not 0 <= args.sparsity < 1:
        raise ValueError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.calib_samples <= 0 or args.eval_samples < 0:
        raise ValueError(f"--calib-samples must be positive and --eval-samples >= 0, got {args.calib_samples} "
                         f"and {args.eval_samples}")
    check_output_dir(output, "--output-dir")
    for name in DEMO_FILES:
        check_output_path(output / name, "--output-dir")
    data.check_fashion_mnist(args.fashion_mnist or data.FASHION_MNIST_DIR)
    data.check_split_counts("train", args.calib_samples, args.eval_samples or 10000)
    return config, *check_device(config)


def run_demo(args) -> int:
    from starfish_fast.bundled import load_bundled_model
    from starfish_fast.evaluate import evaluate_top1_tensors
    from starfish_fast.prune import magnitude_masks, sparsity_summary

    output = Path(args.output_dir)
    config, device, group = _check_demo(args, output)
    started = time.perf_counter()
    calib, test_images, test_labels = data.fashion_mnist_split(args.fashion_mnist or data.FASHION_MNIST_DIR, "train",
                                                               args.calib_samples, args.eval_samples or 10000,
                                                               args.seed)
    with output_directory(output):
        dense, metadata = load_bundled_model()
        dense = dense.to(device)
        pruned = copy.deepcopy(dense)
        masks = magnitude_masks(pruned, sparsity=args.sparsity, scope="qkv_out_mlp")
        apply_masks(pruned, masks)
        top1 = {"dense": evaluate_top1_tensors(dense, test_images, test_labels, device=device),
                "pruned": evaluate_top1_tensors(pruned, test_images, test_labels, device=device)}
        result = heal(pruned, dense, masks, calib, config)
        top1["healed"] = evaluate_top1_tensors(pruned, test_images, test_labels, device=device)
        if group is not None and not group.main:          # under torchrun rank 0 alone writes and reports
            return 0
        export_dense(pruned, masks, output / DEMO_FILES[2], {"recipe": vars(args)})
        wall = time.perf_counter() - started
        summary = {"dense_top1": top1["dense"], "pruned_top1": top1["pruned"], "healed_top1": top1["healed"],
                   "retention": top1["healed"] / top1["dense"], "sparsity": sparsity_summary(masks)["sparsity"],
                   "calib_samples": args.calib_samples, "epochs": config.epochs, "heal_seconds": result.heal_seconds,
                   "images_per_second": result.images_per_second, "wall_seconds": wall, "plan": result.plan.as_dict()}
        save_json_atomic(summary, output / DEMO_FILES[3])
    print(f"\nbundled Fashion-MNIST ViT ({metadata.get('test_top1', float('nan')):.2f}% when trained), "
          f"{summary['sparsity']:.0%} of qkv+proj+MLP weights pruned by magnitude, healed with STARFISH on "
          f"{args.calib_samples} unlabeled train images ({config.epochs} epochs, {config.mode} mode, {device}):")
    for label in ("dense", "pruned", "healed"):
        print(f"  {label:<6} top-1  {top1[label]:6.2f}%" + (f"   retention {summary['retention']:.1%}"
                                                             if label == "healed" else ""))
    print(f"  healing {result.heal_seconds:.1f}s ({result.images_per_second:.0f} img/s), wall time {wall:.1f}s")
    print(f"  loss curve: {output / DEMO_FILES[0]}; summary: {output / DEMO_FILES[3]}")
    return 0


# ----------------------------------------------------------------------------- prune
def check_prune_values(args) -> None:
    """``--output`` (a mask file that can be written) and the method's sparsity flags."""
    from starfish_fast.prune import check_sparsity

    if not str(args.output).endswith(MASK_SUFFIXES):
        raise ValueError(f"--output must end with one of {', '.join(MASK_SUFFIXES)}, got {args.output!r}")
    if args.method == "nm" and args.sparsity is not None:
        raise ValueError("--sparsity does not apply to --method nm: N:M fixes it at 1 - n/m")
    if args.method not in NM_METHODS or args.sparsity is not None:
        if args.sparsity is None:
            raise ValueError(f"--method {args.method} needs --sparsity")
        check_sparsity(args.sparsity)
    check_output_path(args.output, "--output")


def _check_prune(args) -> tuple[Checked, str]:
    check_prune_values(args)
    checked = check_model(args, weights=True)
    if checked.skeleton is not None:
        _prune_scope(args, checked.skeleton)
    calibration = args.method in CALIBRATED_METHODS
    if calibration and args.calib_samples <= 0:
        raise ValueError(f"--calib-samples must be positive, got {args.calib_samples}")
    check_data(args, checked, calibration=calibration, evaluation=False)
    try:
        device = resolve_device(args.device) if calibration else "cpu"
    except ValueError as error:
        raise ValueError(f"--device: {error}") from None
    return checked, device


def _prune_scope(args, model) -> str:
    adapter = adapter_for(model, block_names(args, model) if args.blocks else None)
    try:
        return adapter.check_scope(args.prune_scope)
    except ValueError as error:
        raise ValueError(f"--prune-scope: {error}") from None


def run_prune(args) -> int:
    checked, device = _check_prune(args)
    model = load_dense_model(args, device)
    scope = _prune_scope(args, model)
    masks = make_masks(args, model, scope, device, lambda: recover_data(args, checked.spec, model)[0])
    return write_masks(args, masks, scope, weights_label(args))


def make_masks(args, model, scope: str, device, calibration: Callable[[], object]) -> dict:
    """The masks of ``args.method`` (the prune command's flags); ``calibration()`` gives the calibration data,
    called only by the methods that read it (unlabeled images, as recover reads them; a language model's
    token sequences). SparseGPT's updated weights stay in ``model``: a mask file holds masks, and recover's
    ``--warm-start sparsegpt`` recomputes them from the dense model."""
    from starfish_fast import prune

    if args.method == "magnitude":
        return prune.magnitude_masks(model, args.sparsity, scope, per=args.per)
    if args.method == "nm":
        return prune.nm_masks(model, n=args.n, m=args.m, scope=scope)
    if args.method == "structured":
        return prune.structured_masks(model, args.sparsity, scope, kind=args.kind)
    calib = calibration()
    nm = dict(n=args.n, m=args.m) if args.sparsity is None else {}
    if args.method == "wanda":
        return prune.wanda_masks(model, args.sparsity, calib, scope, **nm, batch_size=args.batch_size, device=device)
    if args.method == "sparsegpt":
        masks = prune.sparsegpt_prune(model, args.sparsity, calib, scope, **nm, batch_size=args.batch_size,
                                      device=device)
        log.info("SparseGPT also updates the kept weights: heal with --warm-start sparsegpt to start from them "
                 "(the same calibration flags give the same weights)")
        return masks
    dense = copy.deepcopy(model) if args.gradual_steps else None
    return prune.representation_masks(model, args.sparsity, calib, scope, levels=tuple(args.levels), score=args.score,
                                      batch_size=args.batch_size, device=device, gradual_steps=args.gradual_steps,
                                      dense=dense)


def write_masks(args, masks: dict, scope: str, dense_weights: str, **extra) -> int:
    """Save the prune command's mask file, log its per-layer summary, print the JSON result."""
    from starfish_fast.prune import sparsity_summary

    summary = sparsity_summary(masks)
    save_masks(masks, args.output, {"model_name": args.model_name, "method": args.method, "prune_scope": scope,
                                    "sparsity": f"{summary['sparsity']:.6f}"})
    return report_masks(args, summary, scope, dense_weights, **extra)


def report_masks(args, summary: dict, scope: str, dense_weights: str, **extra) -> int:
    """Log the per-layer summary of the written mask file and print the prune command's JSON result."""
    from starfish_fast.prune import format_summary

    log.info("per layer:\n%s", format_summary(summary))
    print_json({"output": args.output, "method": args.method, "prune_scope": scope, "masks": len(summary["layers"]),
                "weights": summary["total"], "pruned": summary["pruned"], "sparsity": summary["sparsity"],
                "dense_weights": dense_weights, **extra})
    return 0


# ----------------------------------------------------------------------------- blocks
def run_blocks(args) -> int:
    from starfish_fast.models import prunable_weights

    checked = check_model(args, weights=False)
    model = checked.skeleton if checked.skeleton is not None else checked.spec.build(**checked.kwargs)
    blocks = checked.blocks or block_names(args, model)
    adapter = adapter_for(model, blocks if args.blocks else None)
    how = "--blocks" if args.blocks else ("the family's explicit block loop" if adapter.family != "generic" else
                                          "timm's group_matcher" if hasattr(model, "group_matcher") else
                                          "repeated residual units")
    modules = dict(model.named_modules())
    scopes = {scope: sum(w.numel() for w in prunable_weights(model, adapter.scope_predicate(scope)).values())
              for scope in adapter.scopes}
    print_json({"model_name": args.model_name, "source": checked.spec.source, "family": adapter.family,
                "found_by": how, "cosine_rows": adapter.cosine_per,
                "blocks": [{"name": name, "class": type(modules[name]).__name__,
                            "parameters": sum(p.numel() for p in modules[name].parameters())} for name in blocks],
                "default_scope": adapter.default_scope, "scope_weights": scopes})
    return 0
