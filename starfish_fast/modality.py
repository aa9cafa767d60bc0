"""What the commands need to know about a model's modality, and the helpers both modalities share.

    kind = commands.modality_for(args)          # Images (commands_images) or Text (commands_lm), from the model
    kind.check(args, mistakes, command)         # the second validation pass: files against the model, data
    dense = kind.load_dense(args, device)
    calib, evaluation = kind.recover_data(args, dense)
    kind.score(model, evaluation, "pruned", shown)   # top-1 (%) or perplexity

``starfish_fast.commands`` runs each command once for every model; a ``Modality`` holds what differs
between images and text: what to check (weights files, masks, the data), how to read data, which
metric (top-1, higher is better; perplexity, lower is better) and how to save a healed model (the
reference's checkpoint file; a Hugging Face directory). The instance is the run's: it keeps what the
validation pass found (the architecture on the meta device, the blocks, the masks) for the work.
"""
from __future__ import annotations

import ast
import contextlib
import json
import re
from pathlib import Path

from torch import nn

from starfish_fast.checks import IMAGES, TEXT
from starfish_fast.config import CALIBRATED_METHODS, HealConfig
from starfish_fast.models import ModelSpec, adapter_for
from starfish_fast.probe import process_device

NOUNS = {IMAGES: "an image model", TEXT: "a language model"}
FOR = {IMAGES: "image models", TEXT: "language models"}


class Modality:
    """Images or text: the base keeps the shared state and checks; subclasses fill in the rest."""
    name: str = IMAGES
    metric: str = "top1"                   # the JSON key of the score
    higher_is_better: bool = True
    item: str = "images"                   # what a calibration sample is, in words

    def __init__(self, spec: ModelSpec, skeleton: nn.Module | None = None):
        self.spec, self.skeleton = spec, skeleton
        self.blocks: list[str] | None = None
        self.masks: dict | None = None

    # --- flags: the other modality's are refused from their metadata
    def foreign_flags(self, args, flags: dict) -> list[str]:
        """One line per flag given that belongs to the other modality."""
        lines = []
        for dest, flag in flags.items():
            if flag.modality and flag.modality != self.name and getattr(args, dest) != flag.default:
                lines.append(f"{flag.option} is for {FOR[flag.modality]}; {args.model_name} is {NOUNS[self.name]}"
                             + (f": {flag.instead}" if flag.instead else self.data_hint))
        return lines

    data_hint = ""

    def resolve_defaults(self, args, flags: dict) -> None:
        """The defaults that differ by modality (a flag left at None or its shared default)."""

    # --- what every subclass provides
    def check(self, args, mistakes, command: str, scope: str | None = None) -> None:
        """The second validation pass of ``command``: every mistake into ``mistakes`` (checks.Mistakes)."""
        raise NotImplementedError

    def read_inputs(self, args, mistakes, command: str) -> None:
        """The heavy part of the validation (reading the data now), run once every other check passed."""

    def score(self, model, evaluation, label: str, shown: bool, device) -> float | None:
        """The metric of ``model`` on ``evaluation`` (None: nothing to evaluate on)."""
        raise NotImplementedError

    def eval_summary(self, args, result: dict) -> str:
        raise NotImplementedError

    # --- never the whole model in memory (Hugging Face directories: commands_lm.Text)
    streamed = False                       # recover heals from the checkpoint's shards, block by block

    def streams_prune(self, args) -> bool:
        return False

    def check_joint(self, config, device) -> None:
        """Refuse a joint run that cannot fit the device (where the model's size is known without loading it)."""

    # --- defaults the image modality keeps and the text one overrides
    activation_words = "activations not counted"

    def activation_bytes(self, model: nn.Module, config: HealConfig) -> int:
        return 0

    def quiet(self, shown: bool):
        """Silences the libraries' own progress bars unless ``shown``."""
        return contextlib.nullcontext()

    def calibration_count(self, args) -> int:
        return args.calib_samples

    def needs_dense(self, args) -> bool:
        """Whether ``eval`` loads the dense model (besides ``--checkpoint``)."""
        return args.diagnostics or not args.checkpoint

    def calibrated(self, args) -> bool:
        """Whether ``prune --method`` reads calibration data."""
        return args.method in CALIBRATED_METHODS

    def prune_extra(self) -> dict:
        return {}


# ----------------------------------------------------------------------------- shared helpers
def model_kwargs(args) -> dict:
    """``--model-kwargs KEY=VALUE ...`` as a dict (values as Python literals, else strings)."""
    values = {}
    for item in getattr(args, "model_kwargs", None) or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-kwargs {item!r}: expected KEY=VALUE, e.g. num_classes=10")
        try:
            values[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            values[key] = raw
    return values


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


def prune_scope(args, model) -> str:
    adapter = adapter_for(model, block_names(args, model) if args.blocks else None)
    try:
        return adapter.check_scope(args.prune_scope)
    except ValueError as error:
        raise ValueError(f"--prune-scope: {error}") from None


def check_device(config: HealConfig):
    """``(device, process group or None)`` for ``--device`` (and torchrun); a bad one names the flag."""
    try:
        return process_device(config)
    except ValueError as error:
        raise ValueError(f"--device: {error}") from None


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


def print_json(result: dict) -> None:
    print(json.dumps(result, indent=2, default=str))
