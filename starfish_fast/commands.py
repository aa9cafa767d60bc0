"""Each ``starfish-fast`` command, once, for images and text alike, after ``starfish_fast.cli`` has parsed
its flags and ``starfish_fast.checks`` has checked their values.

    from starfish_fast import cli
    cli.main(["recover", "--model-name", "fashion_vit", "--mask-path", "masks.pt", "--calib-source", "train"])

``run_command`` chooses the model's modality (``commands_images.Images`` or ``commands_lm.Text``: what
to check, how to read data, which metric, how to save), refuses the flags of the other modality (from
each flag's metadata), and runs ``recover``, ``eval``, ``prune`` or ``blocks``, each written once.
Every command runs in two parts. First the validation passes: the torch-free one over every value and
path (``checks.check_values``), then the modality's over what needs the model (its skeleton on the
meta device: weights files, masks, scope, the data or text), each reporting every mistake it finds,
one line each, before any model is built or anything written; a refused ``--resume`` is among them.
Then the work, whose outputs are written atomically; the result goes to stdout (JSON for ``recover``,
``eval``, ``prune`` and ``blocks``, a short report for ``demo``), logs and a closing human summary of
``recover`` and ``eval`` to stderr.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

from torch import nn

from starfish_fast import data
from starfish_fast.checkpoint import (check_input_file, check_output_path, export_dense, resume_settings_differ,
                                      save_json_atomic, save_masks)
from starfish_fast.checks import Mistakes, UserMistakes
from starfish_fast.config import HealConfig, config_fields, finish_epochs, flag_name, phase_configs, phase_path
from starfish_fast.engine import heal
from starfish_fast.masks import apply_masks
from starfish_fast.modality import (Modality, block_names, check_device, model_kwargs, output_directory, print_json,
                                    prune_scope)
from starfish_fast.models import adapter_for, model_spec
from starfish_fast.objectives import FINISHES
from starfish_fast.plan import resolve_device

log = logging.getLogger("starfish_fast")
DEMO_FILES = ("loss.png", "metrics.jsonl", "healed.safetensors", "summary.json")
GB = 1e9


# ----------------------------------------------------------------------------- the one command path
def run_command(args, flags: dict) -> int:
    """Run ``args.command`` for its model's modality; ``flags`` (each flag's metadata, cli.Parser.flags)
    tell which flags were given and to which modality each belongs."""
    if args.command == "demo":
        return run_demo(args)
    kind = modality_for(args)
    foreign = kind.foreign_flags(args, flags)
    if foreign:
        raise UserMistakes(foreign)
    kind.resolve_defaults(args, flags)
    if args.command == "plan":
        from starfish_fast.commands_plan import run_plan

        return run_plan(args, kind)
    return {"recover": run_recover, "eval": run_eval, "prune": run_prune, "blocks": run_blocks}[args.command](
        args, kind)


def modality_for(args) -> Modality:
    """The modality of ``--model-name``: text for a Hugging Face causal LM, images for any other model."""
    from starfish_fast.commands_images import Images
    from starfish_fast.commands_lm import language_model, name_hint

    try:
        spec = model_spec(args.model_name)
    except ValueError as error:
        raise ValueError(f"--model-name: {error}{name_hint(args.model_name)}") from None
    return (language_model(spec) if spec.source == "hf" else None) or Images(spec)


def recover_config(args, output) -> HealConfig:
    """The healing settings of ``recover``'s flags, its files named after ``output`` (``<output>.resume``,
    ``.metrics.jsonl``, ``.loss.png``); the reference's two flags mapped to the engine's."""
    fields = {item.name: getattr(args, item.name) for item in config_fields()}
    return HealConfig(**{**fields, "teacher_store": "recompute" if args.no_dense_cache else args.teacher_store,
                         "teacher_dtype": "fp32" if args.store_dense_float32 else args.teacher_dtype,
                         "checkpoint_path": f"{output}.resume", "metrics_path": f"{output}.metrics.jsonl",
                         "plot_path": f"{output}.loss.png", "progress": not args.no_progress})


def check_resume(args, config: HealConfig) -> None:
    """A resume checkpoint of other settings is refused now, before any work: each changed setting with the
    checkpoint's value and this run's, and the command that resumes it."""
    path = config.checkpoint_path
    if not (config.resume and Path(path).exists()):
        return
    check_input_file(path, "--resume", "resume")
    # a run with a finish phase checkpoints its first phase here (config.phase_configs): either settings resume
    candidates = [config, phase_configs(config, FINISHES[0])[0]] if finish_epochs(config) and config.finish != "none" \
        else [config]
    changed = {} if any(not resume_settings_differ(path, candidate) for candidate in candidates[1:]) \
        else resume_settings_differ(path, config)
    if changed:
        flags = {item.name: flag_name(item) for item in config_fields()}
        argv = list(getattr(args, "argv", sys.argv[1:]))
        for name, (saved, _) in changed.items():
            value = ",".join(map(str, saved)) if isinstance(saved, list) else str(saved)
            if flags[name] in argv and argv.index(flags[name]) + 1 < len(argv):
                argv[argv.index(flags[name]) + 1] = value
            else:
                argv += [flags[name], value]
        raise ValueError(f"--resume: refusing to resume from {path}: settings differ: " + ", ".join(
            f"{flags[name]} {now} here, {saved} in the checkpoint" for name, (saved, now) in changed.items())
            + f"; to resume it: starfish-fast {shlex.join(argv)}; to start afresh, leave out --resume")


def check_calibration_batch(args, kind: Modality, config: HealConfig) -> HealConfig:
    """Fewer calibration samples than --batch-size: one warning, and the batch size that runs is recorded."""
    count = kind.calibration_count(args)
    if count >= config.batch_size:
        return config
    log.warning("--batch-size %d is more than the %d calibration %s: each step takes all %d (batch size %d is "
                "recorded)", config.batch_size, count, kind.item, count, count)
    args.batch_size = count
    return dataclasses.replace(config, batch_size=count)


# ----------------------------------------------------------------------------- recover
def _check_recover(args, kind: Modality):
    """Every mistake of ``recover`` at once: the outputs, the model and its files, the masks, the device, a
    refused resume; then, once those are right, the text (read and tokenized here)."""
    config = recover_config(args, args.output_path)
    mistakes = Mistakes()
    kind.check(args, mistakes, "recover", scope=config.scope)
    with mistakes.check():
        device, group = check_device(config)
    if not mistakes.lines:                     # the joint estimate reads the scope and device found right above
        with mistakes.check():
            kind.check_joint(config, device)
    with mistakes.check():
        check_resume(args, config)
    mistakes.done()
    kind.read_inputs(args, mistakes, "recover")
    mistakes.done()
    return check_calibration_batch(args, kind, config), device, group is None or group.main


def run_recover(args, kind: Modality) -> int:
    config, device, main = _check_recover(args, kind)
    output = Path(args.output_path)
    shown = config.progress and main
    if kind.streamed:
        result, scores = kind.recover_streamed(args, output, config, shown, device)
        human_line(recover_summary(kind, scores, result, output, how="block by block "))
        return 0
    with output_directory(output.parent), kind.quiet(shown):
        log.info("loading the model")
        dense = kind.load_dense(args, device)
        pruned = copy.deepcopy(dense)
        masks = kind.masks = kind.masks_for(args, pruned, config.scope)
        predicate = adapter_for(pruned, kind.blocks).scope_predicate(config.scope)
        calib, evaluation = kind.recover_data(args, dense)
        apply_masks(pruned, masks)
        scores = {"dense": kind.score(dense, evaluation, "dense", shown, device),
                  "pruned": kind.score(pruned, evaluation, "pruned", shown, device)}
        log.info("%s", estimate_line(kind, dense, masks, config))
        result = heal(pruned, dense, masks, calib, config, block_names=kind.blocks, predicate=predicate)
        scores["healed"] = kind.score(pruned, evaluation, "healed", shown, device)
        if not main:                          # under torchrun rank 0 alone writes and reports
            return 0
        report = kind.save_recovered(args, output, pruned, config, result, scores)
        for path in (config.checkpoint_path, phase_path(config.checkpoint_path)):
            Path(path).unlink(missing_ok=True)     # the run is whole: its resume checkpoints are spent
    print_json(report)
    human_line(recover_summary(kind, scores, result, output))
    return 0


def recover_summary(kind: Modality, scores: dict, result, output: Path, how: str = "") -> str:
    """One line a person reads: dense -> pruned -> healed, the share of the gap closed, where it was written."""
    done = f"healed {how}in {result.steps} steps ({result.heal_seconds:.0f} s); written to {output}"
    if scores["healed"] is None:
        hint = "--eval-samples N" if kind.metric == "top1" else "--eval-text PATH"
        return f"{done} (not evaluated: {hint} measures it)"
    dense, pruned, healed = scores["dense"], scores["pruned"], scores["healed"]
    gap = (f", {(healed - pruned) / (dense - pruned):.0%} of the gap closed"
           if abs(dense - pruned) > 1e-3 * abs(dense) else "")              # no gap to speak of: no share
    unit = "%" if kind.metric == "top1" else ""
    return (f"{METRIC_WORDS[kind.metric]}: dense {dense:.2f}{unit} -> pruned {pruned:.2f}{unit} -> healed "
            f"{healed:.2f}{unit}{gap}; {done}")


METRIC_WORDS = {"top1": "top-1", "perplexity": "perplexity"}


def human_line(line: str) -> None:
    """The closing line a person reads (stderr: stdout stays one JSON document)."""
    print(line, file=sys.stderr, flush=True)


def estimate_line(kind: Modality, dense: nn.Module, masks: dict, config: HealConfig) -> str:
    """The expected peak memory and resume-file size, from the model's sizes: an estimate, said as one."""
    params = sum(p.numel() for p in dense.parameters())
    trained = sum(int(m.numel()) for m in masks.values())
    moments = (2 if config.moments_dtype == "bf16" else 4) * 2 * trained
    resume = 4 * params + moments
    peak = 2 * 4 * params + 4 * trained + moments + kind.activation_bytes(dense, config)
    every = (f"written every {config.checkpoint_every} steps" if config.checkpoint_every else
             "with --checkpoint-every N")
    return (f"expected: peak memory about {peak / GB:.1f} GB (dense and student weights, gradients, Adam moments, "
            f"{kind.activation_words}; teacher outputs and the libraries come on top); resume file about "
            f"{resume / GB:.2f} GB, {every}")


# ----------------------------------------------------------------------------- eval
def _check_eval(args, kind: Modality):
    mistakes = Mistakes()
    kind.check(args, mistakes, "eval", scope=args.prune_scope)
    with mistakes.check():
        device, group = check_device(HealConfig(device=args.device))     # under torchrun: evaluation split
    mistakes.done()
    kind.read_inputs(args, mistakes, "eval")
    mistakes.done()
    return device, group is None or group.main


def run_eval(args, kind: Modality) -> int:
    device, main = _check_eval(args, kind)
    shown = main and not args.no_progress
    with kind.quiet(shown):
        log.info("loading the model")
        dense = kind.load_dense(args, device) if kind.needs_dense(args) else None
        model = kind.load_checkpoint(args, device) if args.checkpoint else dense
    result = kind.eval_report(args, dense, model, kind.eval_data(args, model), device, main, shown)
    if main:
        print_json(result)
        human_line(kind.eval_summary(args, result))
    return 0


# ----------------------------------------------------------------------------- prune
def _check_prune(args, kind: Modality) -> tuple[str, str]:
    mistakes = Mistakes()
    kind.check(args, mistakes, "prune", scope=args.prune_scope)
    scope = None
    if kind.skeleton is not None and not mistakes.lines:
        with mistakes.check():
            scope = prune_scope(args, kind.skeleton)
    with mistakes.check():
        device = resolve_device(args.device) if kind.calibrated(args) else "cpu"
    mistakes.done()
    kind.read_inputs(args, mistakes, "prune")
    mistakes.done()
    return scope, device


def run_prune(args, kind: Modality) -> int:
    scope, device = _check_prune(args, kind)
    if kind.streams_prune(args):
        return report_masks(args, kind.stream_prune(args, scope, device), scope, kind.weights_label(args),
                            **kind.prune_extra())
    model = kind.load_dense(args, device)
    scope = scope or prune_scope(args, model)
    masks = make_masks(args, model, scope, device, lambda: kind.prune_calibration(args, model))
    return write_masks(args, masks, scope, kind.weights_label(args), **kind.prune_extra())


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
def run_blocks(args, kind: Modality) -> int:
    from starfish_fast.models import prunable_weights

    kind.check_model(args, weights=False)
    model = kind.skeleton if kind.skeleton is not None else kind.spec.build(**model_kwargs(args))
    blocks = kind.blocks or block_names(args, model)
    adapter = adapter_for(model, blocks if args.blocks else None)
    how = "--blocks" if args.blocks else ("the family's explicit block loop" if adapter.family != "generic" else
                                          "timm's group_matcher" if hasattr(model, "group_matcher") else
                                          "repeated residual units")
    modules = dict(model.named_modules())
    scopes = {scope: sum(w.numel() for w in prunable_weights(model, adapter.scope_predicate(scope)).values())
              for scope in adapter.scopes}
    print_json({"model_name": args.model_name, "source": kind.spec.source, "family": adapter.family,
                "found_by": how, "cosine_rows": adapter.cosine_per,
                "blocks": [{"name": name, "class": type(modules[name]).__name__,
                            "parameters": sum(p.numel() for p in modules[name].parameters())} for name in blocks],
                "default_scope": adapter.default_scope, "scope_weights": scopes})
    return 0


# ----------------------------------------------------------------------------- demo
def _check_demo(args, output: Path):
    fields = {item.name: getattr(args, item.name) for item in config_fields() if hasattr(args, item.name)}
    config = HealConfig(**{**fields, "scope": "qkv_out_mlp", "metrics_path": str(output / DEMO_FILES[1]),
                           "plot_path": str(output / DEMO_FILES[0]), "progress": not args.no_progress})
    mistakes = Mistakes()
    for name in DEMO_FILES:
        with mistakes.check():
            check_output_path(output / name, "--output-dir")
    with mistakes.check():
        data.check_fashion_mnist(args.fashion_mnist or data.FASHION_MNIST_DIR)
        data.check_split_counts("train", args.calib_samples, args.eval_samples or 10000)
    with mistakes.check():
        device, group = check_device(config)
    mistakes.done()
    return config, device, group


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
