"""The ``starfish-fast`` command line (also ``python -m starfish_fast``).

    starfish-fast demo                                   # bundled Fashion-MNIST ViT: prune 75%, heal, report
    starfish-fast prune --model-name fashion_vit --method magnitude --sparsity 0.75 --output masks.pt
    starfish-fast recover --model-name fashion_vit --mask-path masks.pt --calib-source train --eval-samples 10000
    starfish-fast eval --model-name fashion_vit --checkpoint outputs/recovered.pt --diagnostics --mask-path masks.pt
    starfish-fast blocks --model-name resnet18           # the blocks and prune scopes any model would heal with

Nothing heavy is imported before the arguments are parsed (``--help`` answers at once): the commands
live in ``starfish_fast.commands``. The healing flags are ``HealConfig``'s fields (help, allowed values
and defaults from ``starfish_fast.config``). A user's mistake is one line on stderr and exit code 2,
before any work and with nothing written (``--debug`` shows the traceback); Ctrl-C exits 130.
"""
from __future__ import annotations

import argparse
import logging
import sys

from starfish_fast import __version__
from starfish_fast.config import config_fields, flag_name

REFERENCE_FLAGS_NOTE = "the reference starfish.py's flags and defaults, plus local data and the engine's settings"
MODEL_HELP = ("the reference's (vit_b_16, vit_l_16, deit_{tiny,small,base}_patch16_224, "
              "deit3_{base,large}_patch16_224, deit3_huge_patch14_224, mobilenetv1_100), the bundled "
              "fashion_vit, fashion_cnn and fashion_resnet, or any timm or torchvision classifier "
              "(timm/NAME or torchvision/NAME to choose)")
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written; a default worth showing appended to its flag's help."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or action.default is None or action.default is False or action.default == [] \
                or action.default == argparse.SUPPRESS or "default" in text:
            return text
        return text + " (default: %(default)s)"


# ----------------------------------------------------------------------------- shared flags
def add_config_flags(parser: argparse.ArgumentParser, defaults: dict | None = None, skip: tuple = ()) -> None:
    """One flag per ``HealConfig`` field (help, choices and default from the field)."""
    group = parser.add_argument_group("healing (HealConfig: every key is in the README)")
    for item in config_fields():
        if item.name in skip:
            continue
        default = (defaults or {}).get(item.name, item.default)
        options = dict(dest=item.name, default=default, help=item.metadata["help"])
        if isinstance(item.default, bool):
            options["action"] = "store_true"
        else:
            options["type"] = type(item.default) if isinstance(item.default, (int, float)) else str
            if item.metadata["choices"]:
                options["choices"] = item.metadata["choices"]
        group.add_argument(flag_name(item), **options)


def add_model_flags(parser: argparse.ArgumentParser, dense: bool = True) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model-name", required=True, metavar="NAME", help=MODEL_HELP)
    group.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                       help="arguments of timm.create_model / torchvision get_model, e.g. num_classes=10 in_chans=1")
    group.add_argument("--blocks", default=None, metavar="REGEX",
                       help="the blocks to align: module names matching REGEX (default: found in the model; "
                            "`starfish-fast blocks` lists them)")
    if dense:
        group.add_argument("--dense-path", default=None,
                           help="dense checkpoint (state dict or {'state_dict': ...}; .pt or .safetensors); "
                                "not needed for the bundled models")
        group.add_argument("--pretrained", action="store_true",
                           help="the library's pretrained weights (timm / torchvision; offline from their caches)")
        group.add_argument("--pretrained-file", default=None, metavar="FILE",
                           help="timm weights from a local file (timm's pretrained_cfg_overlay=dict(file=...))")
    group.add_argument("--allow-unsafe-pickle", action="store_true",
                       help="load pickled files with weights_only=False (only files you trust: it can run code)")


def add_data_flags(parser: argparse.ArgumentParser, calibration: bool = True, evaluation: bool = True) -> None:
    from_disk = "/usr/share/datasets/fashion-mnist"
    group = parser.add_argument_group("local data (instead of Hugging Face streaming)")
    group.add_argument("--fashion-mnist", metavar="DIR", nargs="?", const=from_disk, default=None,
                       help=f"Fashion-MNIST IDX files (the bundled models' data, their default: {from_disk})")
    if calibration:
        group.add_argument("--calib-dir", metavar="DIR", default=None,
                           help="calibration images: a folder of image files at any depth, unlabeled")
    if evaluation:
        group.add_argument("--eval-dir", metavar="DIR", default=None,
                           help="labeled evaluation images: an ImageFolder tree (one folder per class)")


def add_calibration_flags(parser: argparse.ArgumentParser, samples: int, source: str) -> None:
    parser.add_argument("--calib-samples", type=int, default=samples, help="unlabeled calibration images")
    parser.add_argument("--calib-source", choices=("test", "train", "val"), default=source,
                        help="split the calibration images come from; evaluation never sees them")
    parser.add_argument("--hf-dataset", default="ILSVRC/imagenet-1k", help="Hugging Face dataset (streamed)")
    parser.add_argument("--shuffle-buffer", type=int, default=5000, help="Hugging Face streaming shuffle buffer")
    parser.add_argument("--seed", type=int, default=0, help="calibration sampling seed")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")


# ----------------------------------------------------------------------------- commands
def build_recover_parser(subparsers) -> None:
    parser = subparsers.add_parser("recover", help="heal a pruned model (the reference's starfish.py)",
                                   description=f"Heal a pruned model with STARFISH: {REFERENCE_FLAGS_NOTE}.",
                                   formatter_class=_Formatter)
    add_model_flags(parser)
    parser.add_argument("--mask-path", required=True, help="mask file: dict weight name -> 0/1 tensor (.pt or "
                                                           ".safetensors)")
    parser.add_argument("--output-path", default="outputs/recovered.pt",
                        help="the healed checkpoint; also writes <output>.json, .metrics.jsonl and .loss.png")
    parser.add_argument("--export", default=None, metavar="PATH.safetensors",
                        help="also write the healed weights (masked zeros), the masks and metadata as safetensors")
    add_calibration_flags(parser, samples=5000, source="test")
    parser.add_argument("--eval-samples", type=int, default=0, help="images for top-1 before and after (0: none)")
    parser.add_argument("--store-dense-float32", action="store_true", help="the reference's flag: --teacher-dtype fp32")
    parser.add_argument("--no-dense-cache", action="store_true", help="the reference's flag: --teacher-store recompute")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_data_flags(parser)
    add_config_flags(parser, defaults={"mode": "exact"})
    _common(parser)


def build_eval_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="top-1 of a checkpoint, optionally with diagnostics",
                                   description="Top-1 accuracy of a dense or healed checkpoint; with --diagnostics "
                                               "also KL(dense || model), the paper's representation bounds on it "
                                               "and the per-block cosine to the dense model, with PNG plots.",
                                   formatter_class=_Formatter)
    add_model_flags(parser)
    parser.add_argument("--checkpoint", default=None, help="checkpoint to evaluate (default: the dense model)")
    parser.add_argument("--eval-samples", type=int, default=0, help="images to evaluate (0: the whole split)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hf-dataset", default="ILSVRC/imagenet-1k", help="Hugging Face dataset (streamed)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    group = parser.add_argument_group("diagnostics (the paper's Theorem 1)")
    group.add_argument("--diagnostics", action="store_true", help="KL, its bounds and per-block cosine; writes "
                                                                  "<checkpoint>.diagnostics.json and PNG plots")
    group.add_argument("--mask-path", default=None, help="masks: adds the pruned model (dense weights x masks)")
    group.add_argument("--prune-scope", default="auto", help="the masks' scope (auto: the model's default)")
    add_data_flags(parser, calibration=False)
    _common(parser)


def build_demo_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="prune the bundled Fashion-MNIST ViT 75%% and heal it",
                                   description="Load the bundled Fashion-MNIST ViT, prune 75% of its qkv, proj and "
                                               "MLP weights by magnitude, heal with STARFISH on unlabeled train "
                                               "images, and report dense / pruned / healed test top-1.",
                                   formatter_class=_Formatter)
    parser.add_argument("--fashion-mnist", metavar="DIR", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--sparsity", type=float, default=0.75, help="fraction of the weights pruned")
    parser.add_argument("--calib-samples", type=int, default=1000, help="unlabeled train images")
    parser.add_argument("--eval-samples", type=int, default=0, help="test images (0: the whole 10k split)")
    parser.add_argument("--output-dir", default="outputs/demo", help="loss curve, metrics, healed weights, summary")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_flags(parser, skip=("scope",))
    _common(parser)


def build_prune_parser(subparsers) -> None:
    parser = subparsers.add_parser("prune", help="make a mask file (magnitude, N:M, structured, Wanda, "
                                                 "representation)",
                                   description="Make a pruning mask file in the reference format (.pt) or as "
                                               "safetensors. wanda and representation read calibration images "
                                               "(the data flags, as recover's).", formatter_class=_Formatter)
    add_model_flags(parser)
    parser.add_argument("--method", choices=("magnitude", "nm", "structured", "wanda", "representation"),
                        default="magnitude", help="wanda: |W| times the input feature's norm, per output row (with "
                                                  "--n/--m: N:M); representation: block sparsities from the "
                                                  "measured damage to each block's output")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="fraction of weights removed, in [0, 1) (N:M fixes it: 1 - n/m)")
    parser.add_argument("--per", choices=("layer", "global"), default="layer", help="magnitude: threshold scope")
    parser.add_argument("--n", type=int, default=2, help="N:M: weights kept per group")
    parser.add_argument("--m", type=int, default=4, help="N:M: group size along the reduction dimension")
    parser.add_argument("--kind", choices=("mlp", "qk", "qk_mlp", "channel"), default=None,
                        help="structured: what to remove (default: from the model and scope)")
    parser.add_argument("--prune-scope", default="auto", help="which weights (auto: the model's default)")
    parser.add_argument("--output", required=True, help="mask file: .pt/.pth (the reference's format) or .safetensors")
    group = parser.add_argument_group("calibration (wanda, representation)")
    group.add_argument("--score", choices=("wanda", "magnitude"), default="wanda",
                       help="representation: the scores within each layer")
    group.add_argument("--levels", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.9],
                       help="representation: the sparsities at which each block's damage is measured")
    group.add_argument("--gradual-steps", type=int, default=0,
                       help="representation: reach the sparsity in this many prune-then-heal steps (0: one shot)")
    group.add_argument("--batch-size", type=int, default=32, help="calibration images per forward pass")
    group.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    add_calibration_flags(group, samples=1000, source="train")
    add_data_flags(parser, evaluation=False)
    parser.set_defaults(eval_samples=0, eval_dir=None)
    _common(parser)


def build_blocks_parser(subparsers) -> None:
    parser = subparsers.add_parser("blocks", help="list a model's blocks and prune scopes",
                                   description="The blocks STARFISH would align for a model (and how they were "
                                               "found), its prune scopes and the weights in each.",
                                   formatter_class=_Formatter)
    add_model_flags(parser, dense=False)
    _common(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="starfish-fast", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Heal pruned networks with STARFISH: train the surviving weights so that every block's "
                    "output aligns with the dense model's.",
        epilog="examples:\n" + "\n".join(line.strip() for line in __doc__.splitlines() if "starfish-fast " in line
                                          and line.startswith("    ")))
    parser.add_argument("--version", action="version", version=f"starfish-fast {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for build in (build_demo_parser, build_recover_parser, build_eval_parser, build_prune_parser, build_blocks_parser):
        build(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: "
                                                                                       "%(message)s")
    try:
        from starfish_fast import commands

        return getattr(commands, f"run_{args.command}")(args)
    except KeyboardInterrupt:
        print(f"starfish-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"starfish-fast {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        from starfish_fast.kernels import KernelError

        if args.debug or not isinstance(error, KernelError):
            raise
        print(f"starfish-fast {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
