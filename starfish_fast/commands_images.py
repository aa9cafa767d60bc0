"""The image modality of the commands: timm, torchvision, the bundled and Hugging Face image classifiers.

    kind = Images(model_spec("fashion_vit"))
    kind.check(args, mistakes, "recover", scope="auto")   # the model, weights files, masks, images
    calib, evaluation = kind.recover_data(args, dense)      # calibration batches, a labeled loader or None
    kind.score(model, evaluation, "healed", shown=True)     # top-1 (%)

What it checks, before any model is built or any data read: the model name and ``--model-kwargs``
(against the class's signature, on a skeleton built on the meta device, no weights), ``--blocks``, the
weights files given (their kind, keys and shapes), the masks' keys and shapes, the data that will be
read (image folders, Fashion-MNIST's files and split sizes, a dataset that can be streamed now) and
that its images fit the model (one image through the skeleton). Calibration images are never
evaluated on. A healed model is saved as the reference's checkpoint (``{"state_dict", "metadata"}``)
with ``--export``'s safetensors beside it.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from torch import nn

from starfish_fast import data
from starfish_fast.checkpoint import (check_input_file, check_output_path, error_line, export_dense,
                                      save_recovered_checkpoint)
from starfish_fast.checks import IMAGES
from starfish_fast.config import CALIBRATED_METHODS
from starfish_fast.evaluate import evaluate_top1
from starfish_fast.masks import apply_masks, load_masks, mask_density
from starfish_fast.modality import Modality, block_names, model_kwargs
from starfish_fast.text import HF_TEXT_DATASETS
from starfish_fast.models import CheckpointMismatchError, adapter_for, load_dense
from starfish_fast.models.registry import check_checkpoint_fits, input_channels, weights_source

IMAGENET = "ILSVRC/imagenet-1k"
RECOVER_SIDECARS = (".json", ".metrics.jsonl", ".loss.png", ".resume")
DIAGNOSTICS_FILES = (".diagnostics.json", ".block_cosine.png", ".kl_bound.png")
EVAL_BATCH = 256
RANDOM_INIT = "random (--random-init: untrained weights, seeded; a dry run, its accuracies mean nothing)"


class Images(Modality):
    name, metric, higher_is_better, item = IMAGES, "top1", True, "images"
    data_hint = " (images come from --fashion-mnist, --calib-dir, --eval-dir or --hf-dataset)"

    def __init__(self, spec, skeleton=None):
        super().__init__(spec, skeleton)
        self.kwargs: dict = {}

    def foreign_flags(self, args, flags: dict) -> list[str]:
        lines = super().foreign_flags(args, flags)
        if getattr(args, "hf_dataset", None) in HF_TEXT_DATASETS:
            lines.append(f"--hf-dataset {args.hf_dataset} is for language models; {args.model_name} is an image "
                         f"model{self.data_hint}")
        return lines

    def resolve_defaults(self, args, flags: dict) -> None:
        if "hf_dataset" in flags and args.hf_dataset is None:
            args.hf_dataset = IMAGENET
        if args.command == "eval" and args.batch_size is None:
            args.batch_size = EVAL_BATCH

    # ------------------------------------------------------------------------- the validation pass
    def check(self, args, mistakes, command: str, scope: str | None = None) -> None:
        """Everything ``command`` reads, against the model: one line per mistake into ``mistakes``."""
        evaluation = {"recover": args.eval_samples > 0, "eval": True}.get(command, False)
        calibration = command == "recover" or (command == "prune" and args.method in CALIBRATED_METHODS)
        if command == "recover":
            with mistakes.check():
                self.check_outputs(args)
        if command == "eval":
            with mistakes.check():
                self.check_eval_outputs(args)
        seen = len(mistakes.lines)
        with mistakes.check():
            self.check_model(args, weights=command != "eval" or args.diagnostics or not args.checkpoint)
        model_ok = len(mistakes.lines) == seen
        if command == "recover" and not args.mask_path:
            mistakes.lines.append("--mask-path is required: the masks of the pruned weights (starfish-fast prune "
                                  "writes them)")
        if getattr(args, "mask_path", None) and model_ok:
            with mistakes.check():
                check_input_file(args.mask_path, "--mask-path", "masks", args.allow_unsafe_pickle)
                if self.skeleton is not None:
                    self.masks = self.read_masks(args, self.skeleton, scope)
        if model_ok or self.skeleton is None:
            with mistakes.check():
                self.check_data(args, calibration, evaluation)

    def check_outputs(self, args) -> None:
        for path in (args.output_path, *(f"{args.output_path}{suffix}" for suffix in RECOVER_SIDECARS)):
            check_output_path(path, "--output-path")
        if args.export:
            check_output_path(args.export, "--export")

    def check_eval_outputs(self, args) -> None:
        if args.mask_path and not args.diagnostics:
            raise ValueError(f"--mask-path {args.mask_path}: the masks are read only with --diagnostics (they add "
                             f"the pruned model to them)")
        if args.diagnostics:
            for suffix in DIAGNOSTICS_FILES:
                check_output_path(diagnostics_stem(args) + suffix, "--diagnostics")

    def check_model(self, args, weights: bool) -> None:
        """``--model-kwargs`` (on the skeleton), ``--blocks``, the weight files given (their kind and fit),
        and with ``weights`` that exactly one source of dense weights applies."""
        self.kwargs = model_kwargs(args)
        self.skeleton = self.spec.skeleton(**self.kwargs)
        for name in ("dense_path", "pretrained_file", "checkpoint"):
            if getattr(args, name, None):
                flag = "--" + name.replace("_", "-")
                check_input_file(getattr(args, name), flag, "weights", args.allow_unsafe_pickle)
                if self.skeleton is not None and name != "pretrained_file":   # timm adapts those to the model
                    with naming(flag):
                        check_checkpoint_fits(args.model_name, self.skeleton, getattr(args, name),
                                              args.allow_unsafe_pickle)
        if weights:
            weights_source(args.model_name, args.dense_path, args.pretrained, args.pretrained_file, args.random_init)
        if self.skeleton is not None:
            self.blocks = block_names(args, self.skeleton)

    def read_masks(self, args, model: nn.Module, scope: str) -> dict:
        """The masks of ``--mask-path`` for ``model``'s ``scope``, validated (float 0/1 on the CPU)."""
        try:
            predicate = adapter_for(model, self.blocks).scope_predicate(scope)
        except ValueError as error:
            raise ValueError(f"--prune-scope: {error}") from None
        try:
            return load_masks(args.mask_path, model, predicate, allow_unsafe_pickle=args.allow_unsafe_pickle)
        except ValueError as error:
            raise ValueError(f"--mask-path {error}") from None

    def check_data(self, args, calibration: bool, evaluation: bool) -> None:
        """The images the command will read are there and fit the model (one image through the skeleton)."""
        fashion = self.fashion_mnist_dir(args)
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
        if self.skeleton is not None:
            for flag in dict.fromkeys(reads.values()):
                self._check_fits(args, flag)

    def _check_fits(self, args, flag: str) -> None:
        """One image of the source ``flag``, as the model will get it, through the skeleton (meta tensors:
        shapes are checked, nothing is computed)."""
        if flag == "--fashion-mnist" and self.fashion_native(self.skeleton):
            shape = (1, 28, 28)
        else:
            from PIL import Image
            shape = tuple(self.spec.transform(self.skeleton)(Image.new("RGB", (64, 64))).shape)
        try:
            with torch.no_grad():
                self.skeleton.eval()(torch.empty((1, *shape), device="meta"))
        except Exception as error:  # any layer's complaint about the input
            if isinstance(error, NotImplementedError) or "meta" in str(error).lower():
                return                   # an operation the meta device cannot run: the real model tells later
            raise ValueError(f"{flag}: its images ({'x'.join(map(str, shape))} as the model's transform makes "
                             f"them) do not fit {args.model_name} ({error_line(error)})") from None

    # ------------------------------------------------------------------------- loading and data
    def load_dense(self, args, device) -> nn.Module:
        """The dense model from ``--dense-path`` / ``--pretrained`` / ``--pretrained-file`` / ``--random-init``
        (or a bundled model's own weights)."""
        with naming("--dense-path"):
            return load_dense(args.model_name, args.dense_path, device, pretrained=args.pretrained,
                              pretrained_file=args.pretrained_file, random_init=args.random_init,
                              model_kwargs=model_kwargs(args), allow_unsafe_pickle=args.allow_unsafe_pickle)

    def load_checkpoint(self, args, device) -> nn.Module:
        """The model of ``--checkpoint`` (weights of any kind ``checkpoint.read_state_dict`` reads)."""
        with naming("--checkpoint"):
            return load_dense(args.model_name, args.checkpoint, device, model_kwargs=model_kwargs(args),
                              allow_unsafe_pickle=args.allow_unsafe_pickle)

    def weights_label(self, args) -> str:
        """Where the dense weights came from, for the JSON result (``--random-init`` said plainly)."""
        source = weights_source(args.model_name, args.dense_path, args.pretrained, args.pretrained_file,
                                args.random_init)
        return {"--random-init": RANDOM_INIT, "bundled": "bundled", "--pretrained": "pretrained (the library's)"}.get(
            source, f"{source} {args.dense_path or args.pretrained_file}")

    def masks_for(self, args, model: nn.Module, scope: str) -> dict:
        """The masks the validation pass read, or (a model the meta device cannot build) read now."""
        if self.blocks is None:
            self.blocks = block_names(args, model)
        return self.masks if self.masks is not None else self.read_masks(args, model, scope)

    def fashion_mnist_dir(self, args) -> str | None:
        """Fashion-MNIST for ``--fashion-mnist`` (bare: the system copy), and by default for the bundled models."""
        if getattr(args, "fashion_mnist", None) is not None:
            return args.fashion_mnist or data.FASHION_MNIST_DIR
        return data.FASHION_MNIST_DIR if self.spec.source == "bundled" else None

    def fashion_native(self, model: nn.Module) -> bool:
        """Whether the model takes Fashion-MNIST as stored (1 channel, 28x28, its mean/std): the bundled models
        and 1-channel ones; any other gets each image through its own transform (channels, size, mean/std)."""
        return self.spec.source == "bundled" or input_channels(model) == 1

    def prune_calibration(self, args, model):
        return self.recover_data(args, model)[0]

    def recover_data(self, args, dense):
        """(calibration batches, evaluation loader or None), never overlapping."""
        transform = self.spec.transform(dense)
        fashion = self.fashion_mnist_dir(args)
        adapted = None if self.fashion_native(dense) else transform    # Fashion-MNIST through the model's transform
        evaluation = None
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
            evaluation = self._eval_loader(args, dense, 256, args.eval_samples,
                                           skip=args.calib_samples if args.calib_source == "val" else 0)
        return calib, evaluation

    def _eval_loader(self, args, model, batch_size: int, samples: int, skip: int = 0):
        fashion, transform = self.fashion_mnist_dir(args), self.spec.transform(model)
        if args.eval_dir:
            return data.image_folder_loader(args.eval_dir, batch_size=batch_size, transform=transform,
                                            num_samples=samples)
        if fashion:
            return data.fashion_mnist_eval(fashion, samples or None, batch_size=batch_size,
                                           transform=None if self.fashion_native(model) else transform)
        return data.make_eval_loader(dataset_name=args.hf_dataset, batch_size=batch_size, transform=transform,
                                     eval_samples=samples or 50000, skip=skip)

    def eval_data(self, args, model):
        return self._eval_loader(args, model, args.batch_size, args.eval_samples)

    def score(self, model, evaluation, label: str, shown: bool, device):
        if evaluation is None:
            return None
        return evaluate_top1(model, evaluation, device, desc=" ".join(filter(None, ("top-1", label))) if shown
                             else None)

    # ------------------------------------------------------------------------- writing
    def save_recovered(self, args, output: Path, model, config, result, scores: dict) -> dict:
        save_recovered_checkpoint(path=output, model=model, args=args, blocks=self.blocks, history=result.history,
                                  before=_number(scores.get("pruned")), after=_number(scores.get("healed")),
                                  mask_density_value=mask_density(self.masks))
        if args.export:
            export_dense(model, self.masks, args.export, {"model_name": args.model_name, "mask_path": args.mask_path,
                                                          "history": result.history, "plan": result.plan.as_dict()})
        return {"output": str(output), "sidecar": f"{output}.json", "metrics": config.metrics_path,
                "plot": config.plot_path, "export": args.export, "dense_weights": self.weights_label(args),
                "top1_dense": scores.get("dense"), "top1_before": scores.get("pruned"),
                "top1_after": scores.get("healed"), "mask_density": mask_density(self.masks),
                "final_loss": result.history[-1]["loss"], "steps": result.steps,
                "heal_seconds": round(result.heal_seconds, 2), "images_per_second": round(result.images_per_second, 1),
                "plan": result.plan.summary()}

    def eval_summary(self, args, result: dict) -> str:
        files = result.get("files")
        return (f"top-1 {result['top1']:.2f}% ({args.checkpoint or 'the dense model'})"
                + (f"; diagnostics written to {files['diagnostics']}" if files else ""))

    def eval_report(self, args, dense, model, evaluation, device, main: bool, shown: bool) -> dict:
        result = {"model_name": args.model_name, "checkpoint": args.checkpoint,
                  "top1": self.score(model, evaluation, "", shown, device)}
        if dense is not None:
            result["dense_weights"] = self.weights_label(args)
        if args.diagnostics:
            result.update(diagnostics(args, self, dense, model, evaluation, device, main, shown))
        return result


def _number(value):
    return None if value is None or value != value else value      # not evaluated -> null


@contextlib.contextmanager
def naming(flag: str):
    """A checkpoint of another model (found when its weights are loaded) named by the flag that gave it."""
    try:
        yield
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(f"{flag} {error}") from None


def diagnostics_stem(args) -> str:
    return str(args.checkpoint or Path("outputs") / args.model_name.replace("/", "_"))


def diagnostics(args, kind: Images, dense, model, loader, device, main: bool = True, shown: bool = False) -> dict:
    """The paper's bound and per-block cosine, before (dense x masks, with --mask-path) and after; JSON and PNGs."""
    from starfish_fast.checkpoint import save_json_atomic
    from starfish_fast.diagnostics import plot_block_cosine, plot_kl_bound, representation_diagnostics

    blocks = kind.blocks or block_names(args, dense)
    kind.blocks = blocks
    before = None
    if args.mask_path:
        pruned = copy.deepcopy(dense)
        apply_masks(pruned, kind.masks_for(args, pruned, args.prune_scope))
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
