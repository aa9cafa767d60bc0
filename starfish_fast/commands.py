"""What each ``starfish-fast`` command does, once ``starfish_fast.cli`` has parsed its flags.

    from starfish_fast import cli
    cli.main(["recover", "--model-name", "fashion_vit", "--mask-path", "masks.pt", "--calib-source", "train"])

Every command checks its arguments first (names, files, counts, settings, device), then works, then
writes its outputs atomically and prints its result on stdout: a JSON object for ``recover``, ``eval``,
``prune`` (the summary) and ``blocks``, a short report for ``demo``. Logs go to stderr.
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
from pathlib import Path


from starfish_fast import data
from starfish_fast.checkpoint import export_dense, save_json_atomic, save_masks, save_recovered_checkpoint, \
    save_safetensors_atomic
from starfish_fast.engine import heal
from starfish_fast.evaluate import evaluate_top1
from starfish_fast.masks import apply_masks, load_masks, mask_density
from starfish_fast.models import adapter_for, load_dense, model_spec
from starfish_fast.config import HealConfig, config_fields
from starfish_fast.plan import process_device, resolve_device

log = logging.getLogger("starfish_fast")
MASK_SUFFIXES = (".pt", ".pth", ".safetensors")


# ----------------------------------------------------------------------------- shared checks and loading
def config_from_args(args: argparse.Namespace, **values) -> HealConfig:
    """The ``HealConfig`` the flags (cli.add_config_flags) describe (checked now: a bad value fails before any work)."""
    fields = {item.name: getattr(args, item.name) for item in config_fields() if hasattr(args, item.name)}
    return HealConfig(**{**fields, **values})


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


def check_files(args, *names: str) -> None:
    """Every named path flag that is set must exist."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and not Path(value).exists():
            raise FileNotFoundError(f"--{name.replace('_', '-')} {value}: no such file or directory")


def load_dense_model(args, device):
    """The dense model of ``--model-name`` from ``--dense-path`` / ``--pretrained`` / ``--pretrained-file``
    (or a bundled model's own weights), and its spec."""
    spec = model_spec(args.model_name)
    dense = load_dense(args.model_name, getattr(args, "dense_path", None), device,
                       pretrained=getattr(args, "pretrained", False), pretrained_file=getattr(args, "pretrained_file",
                                                                                              None),
                       model_kwargs=model_kwargs(args), allow_unsafe_pickle=args.allow_unsafe_pickle)
    return spec, dense


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
    """Fashion-MNIST for ``--fashion-mnist``, and by default for the bundled models."""
    if args.fashion_mnist:
        return args.fashion_mnist
    return "/usr/share/datasets/fashion-mnist" if spec.source == "bundled" else None


def print_json(result: dict) -> None:
    print(json.dumps(result, indent=2, default=str))


# ----------------------------------------------------------------------------- recover
def _check_recover(args):
    config = config_from_args(args, teacher_store="recompute" if args.no_dense_cache else args.teacher_store,
                              teacher_dtype="fp32" if args.store_dense_float32 else args.teacher_dtype,
                              checkpoint_path=str(args.output_path) + ".resume",
                              metrics_path=str(args.output_path) + ".metrics.jsonl",
                              plot_path=str(args.output_path) + ".loss.png", progress=not args.no_progress)
    if args.no_dense_cache and args.teacher_store not in ("auto", "recompute"):
        raise ValueError(f"--no-dense-cache and --teacher-store {args.teacher_store} contradict each other")
    if args.store_dense_float32 and args.teacher_dtype not in ("auto", "fp32"):
        raise ValueError(f"--store-dense-float32 and --teacher-dtype {args.teacher_dtype} contradict each other")
    if args.calib_samples <= 0 or args.eval_samples < 0:
        raise ValueError(f"--calib-samples must be positive and --eval-samples >= 0, got {args.calib_samples} "
                         f"and {args.eval_samples}")
    if args.export and not args.export.endswith(".safetensors"):
        raise ValueError(f"--export {args.export}: the export is a .safetensors file")
    check_files(args, "mask_path", "dense_path", "pretrained_file", "fashion_mnist", "calib_dir", "eval_dir")
    spec = model_spec(args.model_name)
    device, group = process_device(config)
    return config, spec, device, group is None or group.main


def recover_data(args, spec, dense):
    """(calibration batches, evaluation loader or None), never overlapping."""
    transform = spec.transform(dense)
    fashion = fashion_mnist_dir(args, spec)
    calib = evaluation = None
    if fashion and not args.calib_dir:
        calib, images, labels = data.fashion_mnist_split(fashion, args.calib_source, args.calib_samples,
                                                         0 if args.eval_dir else args.eval_samples, args.seed)
        calib = data.split_batches(calib, args.batch_size)
        evaluation = data.TensorLoader(images, labels, batch_size=256) if images is not None else None
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
            evaluation = data.fashion_mnist_eval(fashion, args.eval_samples)
        else:
            skip = args.calib_samples if args.calib_source == "val" else 0
            evaluation = data.make_eval_loader(dataset_name=args.hf_dataset, batch_size=256, transform=transform,
                                               eval_samples=args.eval_samples, skip=skip)
    return calib, evaluation


def run_recover(args) -> int:
    config, spec, device, main = _check_recover(args)
    output = Path(args.output_path)
    with output_directory(output.parent):
        spec, dense = load_dense_model(args, device)
        blocks = block_names(args, dense)
        pruned = copy.deepcopy(dense)
        adapter = adapter_for(pruned, blocks)
        predicate = adapter.scope_predicate(config.scope)
        masks = load_masks(args.mask_path, pruned, predicate, allow_unsafe_pickle=args.allow_unsafe_pickle)
        calib, evaluation = recover_data(args, spec, dense)
        apply_masks(pruned, masks)
        top1_before = evaluate_top1(pruned, evaluation, device) if evaluation is not None else float("nan")
        result = heal(pruned, dense, masks, calib, config, block_names=blocks, predicate=predicate)
        top1_after = evaluate_top1(pruned, evaluation, device) if evaluation is not None else float("nan")
        if not main:                          # under torchrun rank 0 alone writes and reports
            return 0
        save_recovered_checkpoint(path=output, model=pruned, args=args, blocks=blocks, history=result.history,
                                  before=top1_before, after=top1_after, mask_density_value=mask_density(masks))
        if args.export:
            export_dense(pruned, masks, args.export, {"model_name": args.model_name, "history": result.history,
                                                      "plan": result.plan.as_dict()})
    print_json({"output": str(output), "sidecar": f"{output}.json", "metrics": config.metrics_path,
                "plot": config.plot_path, "export": args.export, "top1_before": _number(top1_before),
                "top1_after": _number(top1_after), "mask_density": mask_density(masks),
                "final_loss": result.history[-1]["loss"], "steps": result.steps,
                "heal_seconds": round(result.heal_seconds, 2), "images_per_second": round(result.images_per_second, 1),
                "plan": result.plan.summary()})
    return 0


def _number(value: float) -> float | None:
    return None if value != value else value      # NaN (not evaluated) -> null


# ----------------------------------------------------------------------------- eval
def run_eval(args) -> int:
    if args.eval_samples < 0:
        raise ValueError(f"--eval-samples must be >= 0, got {args.eval_samples}")
    check_files(args, "checkpoint", "dense_path", "pretrained_file", "fashion_mnist", "eval_dir", "mask_path")
    spec = model_spec(args.model_name)
    device, group = process_device(HealConfig(device=args.device))     # under torchrun: evaluation split
    dense = load_dense_model(args, device)[1] if (args.diagnostics or not args.checkpoint) else None
    model = load_dense(args.model_name, args.checkpoint, device, model_kwargs=model_kwargs(args),
                       allow_unsafe_pickle=args.allow_unsafe_pickle) if args.checkpoint else dense
    loader = eval_loader(args, spec, model)
    result = {"model_name": args.model_name, "checkpoint": args.checkpoint, "top1": evaluate_top1(model, loader, device)}
    if args.diagnostics:
        result.update(diagnostics(args, spec, dense, model, loader, device, group is None or group.main))
    if group is None or group.main:
        print_json(result)
    return 0


def eval_loader(args, spec, model):
    fashion = fashion_mnist_dir(args, spec)
    if args.eval_dir:
        return data.image_folder_loader(args.eval_dir, batch_size=args.batch_size, transform=spec.transform(model),
                                        num_samples=args.eval_samples)
    if fashion:
        return data.fashion_mnist_eval(fashion, args.eval_samples or None, batch_size=args.batch_size)
    return data.make_eval_loader(dataset_name=args.hf_dataset, batch_size=args.batch_size,
                                 transform=spec.transform(model), eval_samples=args.eval_samples or 50000)


def diagnostics(args, spec, dense, model, loader, device, main: bool = True) -> dict:
    """The paper's bound and per-block cosine, before (dense x masks, with --mask-path) and after; JSON and PNGs."""
    from starfish_fast.diagnostics import plot_block_cosine, plot_kl_bound, representation_diagnostics

    blocks = block_names(args, dense)
    before = None
    if args.mask_path:
        pruned = copy.deepcopy(dense)
        masks = load_masks(args.mask_path, pruned, adapter_for(pruned, blocks).scope_predicate(args.prune_scope),
                           allow_unsafe_pickle=args.allow_unsafe_pickle)
        apply_masks(pruned, masks)
        before = representation_diagnostics(dense, pruned, loader, block_names=blocks, device=device)
    after = representation_diagnostics(dense, model, loader, block_names=blocks, device=device)
    stem = str(args.checkpoint or Path("outputs") / args.model_name.replace("/", "_"))
    files = {"diagnostics": stem + ".diagnostics.json", "block_cosine_plot": stem + ".block_cosine.png"}
    if not main:
        return {}
    save_json_atomic({"model_name": args.model_name, "checkpoint": args.checkpoint, "before": before,
                      "after": after}, files["diagnostics"])
    plot_block_cosine(before["block_cosine"] if before else None, after["block_cosine"], files["block_cosine_plot"])
    if before:
        files["kl_bound_plot"] = stem + ".kl_bound.png"
        plot_kl_bound(before, after, files["kl_bound_plot"])
    return {"pruned": before, "model": after, "files": files}


# ----------------------------------------------------------------------------- demo
def run_demo(args) -> int:
    from starfish_fast.bundled import load_bundled_model
    from starfish_fast.evaluate import evaluate_top1_tensors
    from starfish_fast.prune import magnitude_masks, sparsity_summary

    output = Path(args.output_dir)
    config = config_from_args(args, scope="qkv_out_mlp", metrics_path=str(output / "metrics.jsonl"),
                              plot_path=str(output / "loss.png"), progress=not args.no_progress)
    device, group = process_device(config)
    if not 0 <= args.sparsity < 1:
        raise ValueError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    started = time.perf_counter()
    calib, test_images, test_labels = data.fashion_mnist_split(args.fashion_mnist, "train", args.calib_samples,
                                                               args.eval_samples or 10000, args.seed)
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
        save_safetensors_atomic(pruned.state_dict(), output / "healed.safetensors",
                                metadata={"recipe": json.dumps(vars(args), default=str)})
        wall = time.perf_counter() - started
        summary = {"dense_top1": top1["dense"], "pruned_top1": top1["pruned"], "healed_top1": top1["healed"],
                   "retention": top1["healed"] / top1["dense"], "sparsity": sparsity_summary(masks)["sparsity"],
                   "calib_samples": args.calib_samples, "epochs": config.epochs, "heal_seconds": result.heal_seconds,
                   "images_per_second": result.images_per_second, "wall_seconds": wall, "plan": result.plan.as_dict()}
        save_json_atomic(summary, output / "summary.json")
    print(f"\nbundled Fashion-MNIST ViT ({metadata.get('test_top1', float('nan')):.2f}% when trained), "
          f"{summary['sparsity']:.0%} of qkv+proj+MLP weights pruned by magnitude, healed with STARFISH on "
          f"{args.calib_samples} unlabeled train images ({config.epochs} epochs, {config.mode} mode, {device}):")
    for label in ("dense", "pruned", "healed"):
        print(f"  {label:<6} top-1  {top1[label]:6.2f}%" + (f"   retention {summary['retention']:.1%}"
                                                             if label == "healed" else ""))
    print(f"  healing {result.heal_seconds:.1f}s ({result.images_per_second:.0f} img/s), wall time {wall:.1f}s")
    print(f"  loss curve: {output / 'loss.png'}; summary: {output / 'summary.json'}")
    return 0


# ----------------------------------------------------------------------------- prune
def run_prune(args) -> int:
    from starfish_fast.prune import check_sparsity, format_summary, sparsity_summary

    if not str(args.output).endswith(MASK_SUFFIXES):
        raise ValueError(f"--output must end with one of {', '.join(MASK_SUFFIXES)}, got {args.output!r}")
    if args.method == "nm" and args.sparsity is not None:
        raise ValueError("--sparsity does not apply to --method nm: N:M fixes it at 1 - n/m")
    if args.method not in ("nm", "wanda") or args.sparsity is not None:
        if args.sparsity is None:
            raise ValueError(f"--method {args.method} needs --sparsity")
        check_sparsity(args.sparsity)
    check_files(args, "dense_path", "pretrained_file", "fashion_mnist", "calib_dir")
    device = resolve_device(args.device) if args.method in ("wanda", "representation") else "cpu"
    spec, model = load_dense_model(args, device)
    adapter = adapter_for(model, block_names(args, model) if args.blocks else None)
    scope = adapter.check_scope(args.prune_scope)
    masks = _make_masks(args, spec, model, scope, device)
    summary = sparsity_summary(masks)
    save_masks(masks, args.output, {"model_name": args.model_name, "method": args.method, "prune_scope": scope,
                                    "sparsity": f"{summary['sparsity']:.6f}"})
    log.info("per layer:\n%s", format_summary(summary))
    print_json({"output": args.output, "method": args.method, "prune_scope": scope, "masks": len(masks),
                "weights": summary["total"], "pruned": summary["pruned"], "sparsity": summary["sparsity"]})
    return 0


def _make_masks(args, spec, model, scope: str, device):
    from starfish_fast import prune

    if args.method == "magnitude":
        return prune.magnitude_masks(model, args.sparsity, scope, per=args.per)
    if args.method == "nm":
        return prune.nm_masks(model, n=args.n, m=args.m, scope=scope)
    if args.method == "structured":
        return prune.structured_masks(model, args.sparsity, scope, kind=args.kind)
    calib, _ = recover_data(args, spec, model)              # unlabeled images, as recover reads them
    if args.method == "wanda":
        nm = dict(n=args.n, m=args.m) if args.sparsity is None else {}
        return prune.wanda_masks(model, args.sparsity, calib, scope, **nm, batch_size=args.batch_size, device=device)
    dense = copy.deepcopy(model) if args.gradual_steps else None
    return prune.representation_masks(model, args.sparsity, calib, scope, levels=tuple(args.levels), score=args.score,
                                      batch_size=args.batch_size, device=device, gradual_steps=args.gradual_steps,
                                      dense=dense)


# ----------------------------------------------------------------------------- blocks
def run_blocks(args) -> int:
    from starfish_fast.models import prunable_weights

    spec = model_spec(args.model_name)
    model = spec.build(**model_kwargs(args))
    blocks = block_names(args, model)
    adapter = adapter_for(model, blocks if args.blocks else None)
    how = "--blocks" if args.blocks else ("the family's explicit block loop" if adapter.family != "generic" else
                                          "timm's group_matcher" if hasattr(model, "group_matcher") else
                                          "repeated residual units")
    modules = dict(model.named_modules())
    scopes = {scope: sum(w.numel() for w in prunable_weights(model, adapter.scope_predicate(scope)).values())
              for scope in adapter.scopes}
    print_json({"model_name": args.model_name, "source": spec.source, "family": adapter.family, "found_by": how,
                "cosine_rows": adapter.rows, "blocks": [{"name": name, "class": type(modules[name]).__name__,
                                                         "parameters": sum(p.numel() for p in modules[name].parameters())}
                                                        for name in blocks],
                "default_scope": adapter.default_scope, "scope_weights": scopes})
    return 0
