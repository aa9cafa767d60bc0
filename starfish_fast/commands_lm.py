"""What ``prune``, ``recover`` and ``eval`` do for a Hugging Face causal language model, and which
commands a parsed command line runs (``run_command``: this module's for a language model, else
``starfish_fast.commands``' image ones).

    from starfish_fast import cli
    cli.main(["prune", "--model-name", "llama_dir", "--method", "wanda", "--sparsity", "0.5",
              "--calib-text", "docs/", "--output", "masks.pt"])
    cli.main(["recover", "--model-name", "llama_dir", "--mask-path", "masks.pt", "--calib-text", "docs/",
              "--eval-text", "held_out/", "--output-path", "outputs/healed"])     # a Hugging Face directory
    cli.main(["eval", "--model-name", "outputs/healed", "--eval-text", "held_out/"])   # perplexity, JSON

A language model is what ``models.hf`` reads (a model directory, a ``.gguf`` file, a packaged name,
``hf/<hub id>`` from the local cache) whose architecture is a causal LM. Its commands run in the same
two parts as the image ones. First the validation pass, before any model is loaded or anything
written: no image flag given (nor a text flag to an image model), the values, the outputs, the
weights files (keys and shapes against the architecture built on the meta device), the masks, the
sequence length against the model's context, then the text itself, read and tokenized now (missing
paths, calibration and evaluation text sharing a file, too little text for the sequences asked, a
dataset that cannot be read offline): every failure one line naming the flag. Then the work.
Calibration text becomes ``--calib-sequences`` distinct windows of ``--seq-len`` tokens drawn with
``--seed``; evaluation is the strided perplexity of ``text.perplexity``. ``recover`` writes a
Hugging Face checkpoint directory (``checkpoint.save_pretrained_with_masks``: pruned weights zero in
place, the tokenizer, ``masks.safetensors``) that every command takes as ``--model-name``,
``--dense-path`` or ``--checkpoint``, and its ``masks.safetensors`` as ``--mask-path``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from starfish_fast import commands
from starfish_fast.checkpoint import (MASKS_FILE, check_input_file, check_output_dir, check_output_path, error_line,
                                      read_state_dict, save_json_atomic, save_pretrained_with_masks,
                                      state_dict_mismatch, weight_shapes)
from starfish_fast.commands import Checked, block_names, check_device, check_masks, print_json
from starfish_fast.config import HealConfig
from starfish_fast.data import as_batches
from starfish_fast.masks import apply_masks, mask_density
from starfish_fast.models import CheckpointMismatchError, ModelSpec, adapter_for, load_dense, model_spec
from starfish_fast.models.hf import build_hf_model, is_causal_lm, load_hf_model, load_hf_tokenizer, resolve_source
from starfish_fast.models.hf_shards import ShardedCheckpoint, expected_shapes, is_sharded_directory
from starfish_fast.models.registry import weights_source
from starfish_fast.plan import resolve_device
from starfish_fast.streaming import (BlockMasks, HFShardSource, StreamedLM, block_masks, check_joint_fits, heal_streaming,
                                     stream_prune)
from starfish_fast.text import (HF_TEXT_DATASETS, MAX_CHARS, check_disjoint, hf_text_data, perplexity,
                                read_documents, sample_sequences, token_stream)

log = logging.getLogger("starfish_fast")
LM_COMMANDS = ("prune", "recover", "eval")
LM_METHODS = ("magnitude", "nm", "wanda", "sparsegpt")
LM_CALIBRATED = ("wanda", "sparsegpt")
TEXT_FLAGS = ("calib_text", "calib_sequences", "seq_len", "eval_text", "eval_tokens", "stride")
CALIB_HINT = "give its text with --calib-text PATH... (or --hf-dataset wikitext2|c4) and --calib-sequences"
# image flags -> what a language model takes instead
IMAGE_FLAGS = {"fashion_mnist": CALIB_HINT, "calib_dir": CALIB_HINT, "calib_samples": CALIB_HINT,
               "calib_source": CALIB_HINT, "shuffle_buffer": CALIB_HINT,
               "eval_dir": "give --eval-text PATH...", "eval_samples": "give --eval-text PATH... (--eval-tokens N)",
               "export": "its --output-path directory already holds the weights, pruned ones zero in place",
               "pretrained_file": "its own files are its weights (others: --dense-path)",
               "model_kwargs": "its architecture is its config.json", "diagnostics": "eval reports its perplexity",
               "kind": "use --method magnitude, nm, wanda or sparsegpt",
               "score": "use --method magnitude, nm, wanda or sparsegpt",
               "levels": "use --method magnitude, nm, wanda or sparsegpt",
               "gradual_steps": "use --method magnitude, nm, wanda or sparsegpt"}
DEFAULT_SEQ_LEN = 512
DEFAULT_SEQUENCES = 128
EVAL_BATCH = 4                 # windows per forward pass: (4, T, vocabulary) logits stay small
LM_OUTPUT = "outputs/healed"
RANDOM_INIT = commands.RANDOM_INIT.replace("accuracies", "perplexities")


@dataclass
class LanguageModel:
    """A causal LM of ``--model-name`` and what the validation pass found for the work after it."""
    spec: ModelSpec
    skeleton: nn.Module                          # the architecture on the meta device
    blocks: list[str] | None = None
    masks: dict | None = None                    # --mask-path, validated against the skeleton
    tokenizer: object = None
    seq_len: int = DEFAULT_SEQ_LEN
    calib: torch.Tensor | None = None            # (sequences, seq_len) token ids
    eval_ids: torch.Tensor | None = None         # (N,) the evaluation token stream
    text: dict = field(default_factory=dict)     # where the text came from, for the JSON result

    def checked(self) -> Checked:
        return Checked(self.spec, {}, self.skeleton, self.blocks)


# ----------------------------------------------------------------------------- which commands run
def run_command(args: argparse.Namespace, defaults: dict) -> int:
    """Run ``args.command``: this module's version for a language model, else the image one; ``defaults``
    (each flag's) tell which flags were given, so that an image flag given to a language model, or a
    text flag to an image model, is one line."""
    lm = language_model(args) if args.command in LM_COMMANDS else None
    if lm is None:
        text = _changed(args, defaults, TEXT_FLAGS)
        if text or getattr(args, "hf_dataset", None) in HF_TEXT_DATASETS:
            flag = text[0] if text else f"--hf-dataset {args.hf_dataset}"
            raise ValueError(f"{flag} is for language models; {args.model_name} is an image model (images come "
                             f"from --fashion-mnist, --calib-dir, --eval-dir or --hf-dataset)")
        return getattr(commands, f"run_{args.command}")(args)
    image = _changed(args, defaults, IMAGE_FLAGS)
    if image:
        raise ValueError(f"{image[0]} is for image models; {args.model_name} is a language model: "
                         f"{IMAGE_FLAGS[image[0][2:].replace('-', '_')]}")
    hf_dataset = getattr(args, "hf_dataset", None)
    if hf_dataset != defaults.get("hf_dataset") and hf_dataset not in HF_TEXT_DATASETS:
        raise ValueError(f"--hf-dataset {hf_dataset}: a language model reads {' or '.join(HF_TEXT_DATASETS)} "
                         f"(or local text: --calib-text, --eval-text)")
    return {"prune": run_prune, "recover": run_recover, "eval": run_eval}[args.command](args, lm, defaults)


def _changed(args, defaults: dict, dests) -> list[str]:
    """The flags among ``dests`` given a value other than their default."""
    return ["--" + dest.replace("_", "-") for dest in dests
            if dest in defaults and getattr(args, dest) != defaults[dest]]


def language_model(args) -> LanguageModel | None:
    """``--model-name`` as a causal LM (its architecture on the meta device), or None for any other model."""
    try:
        spec = model_spec(args.model_name)
    except ValueError as error:
        raise ValueError(f"--model-name: {error}{_name_hint(args.model_name)}") from None
    if spec.source != "hf":
        return None
    skeleton = _skeleton(spec.arch, "--model-name")
    return LanguageModel(spec, skeleton) if is_causal_lm(skeleton) else None


def _name_hint(name: str) -> str:
    """What a name with a slash that names no model may have meant: a model directory or a hub id."""
    if "/" not in name or name.startswith(("timm/", "torchvision/")):
        return ""
    try:
        resolve_source(name)
    except ValueError as error:
        return f"; as a Hugging Face model: {error}"
    return f"; a Hugging Face hub id is given as hf/{name} (read from the local cache)"


def _skeleton(name: str, flag: str) -> nn.Module:
    try:
        with torch.device("meta"):
            return build_hf_model(name)
    except ValueError as error:                    # models.hf's one line: missing files, offline hub
        raise ValueError(f"{flag} {error}") from None
    except Exception as error:  # transformers' own complaint about the config or the architecture
        raise ValueError(f"{flag} {name}: cannot build the model from its config ({error_line(error)})") from None


# ----------------------------------------------------------------------------- the validation pass
def _check_model(args, lm: LanguageModel, weights: bool) -> None:
    """``--blocks``, the weights files given (kind, keys and shapes), and with ``weights`` that one
    source of dense weights applies."""
    lm.blocks = block_names(args, lm.skeleton)
    if is_sharded_directory(lm.spec.arch):
        try:
            ShardedCheckpoint.open(lm.spec.arch)        # its index names shards that are there (headers only)
        except ValueError as error:
            raise ValueError(f"--model-name {error}") from None
    for name in ("dense_path", "checkpoint"):
        if getattr(args, name, None):
            _check_fits(args, lm, getattr(args, name), "--" + name.replace("_", "-"))
    if weights:
        weights_source(args.model_name, args.dense_path, args.pretrained, None, args.random_init)


def _check_fits(args, lm: LanguageModel, path: str, flag: str) -> None:
    """``path`` (a Hugging Face directory, or a weights file such as the one inside it) holds weights of
    ``--model-name``'s architecture: the same keys and shapes, a tied LM head saved once or not."""
    if Path(path).is_dir():
        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"{flag} {path}: a directory without config.json; give a Hugging Face model "
                             f"directory (recover's output) or a weights file")
        found = {key: tuple(value.shape) for key, value in _skeleton(path, flag).state_dict().items()}
    else:
        check_input_file(path, flag, "weights", args.allow_unsafe_pickle)
        found = weight_shapes(path, args.allow_unsafe_pickle)
    problem = state_dict_mismatch(expected_shapes(lm.skeleton, found), found)
    if problem:
        raise CheckpointMismatchError(f"{flag} {path} does not fit {args.model_name}: {problem}")


def _check_seq_len(args, lm: LanguageModel) -> None:
    context = getattr(lm.skeleton.config, "max_position_embeddings", None)
    if args.seq_len is None:
        lm.seq_len = min(DEFAULT_SEQ_LEN, context or DEFAULT_SEQ_LEN)
        return
    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2 tokens, got {args.seq_len}")
    if context and args.seq_len > context:
        raise ValueError(f"--seq-len {args.seq_len}: above {args.model_name}'s context of {context} tokens "
                         f"(max_position_embeddings in its config)")
    lm.seq_len = args.seq_len


def _check_eval_values(args, lm: LanguageModel) -> None:
    if args.eval_tokens is not None and args.eval_tokens < 2:
        raise ValueError(f"--eval-tokens must be at least 2, got {args.eval_tokens}")
    if args.stride is not None and not 0 < args.stride <= lm.seq_len:
        raise ValueError(f"--stride must be in [1, --seq-len {lm.seq_len}], got {args.stride}")


def _check_text(args, lm: LanguageModel, calibration: bool, evaluation: str) -> None:
    """The text the command reads (``evaluation``: "none", "optional" or "required"), from local files or
    ``--hf-dataset``, read and tokenized now."""
    calib_paths = getattr(args, "calib_text", None)
    eval_paths = getattr(args, "eval_text", None) if evaluation != "none" else None
    dataset = args.hf_dataset if args.hf_dataset in HF_TEXT_DATASETS else None
    local = "--calib-text" if calib_paths else "--eval-text" if eval_paths else None
    if dataset and local:
        raise ValueError(f"--hf-dataset {dataset} and {local}: give one source of text")
    if calibration and not (calib_paths or dataset):
        raise ValueError(f"{args.model_name} is a language model: {CALIB_HINT}")
    if evaluation == "required" and not (eval_paths or dataset):
        raise ValueError(f"{args.model_name} is a language model: give the text to evaluate on with --eval-text "
                         f"PATH... (or --hf-dataset wikitext2|c4)")
    sequences = 0 if not calibration else DEFAULT_SEQUENCES if args.calib_sequences is None else args.calib_sequences
    if calibration and sequences <= 0:
        raise ValueError(f"--calib-sequences must be positive, got {args.calib_sequences}")
    lm.tokenizer = _tokenizer(args, lm)
    if dataset:
        try:
            lm.calib, lm.eval_ids = hf_text_data(lm.tokenizer, dataset, sequences=sequences, seq_len=lm.seq_len,
                                                 seed=getattr(args, "seed", 0),
                                                 eval_tokens=getattr(args, "eval_tokens", None),
                                                 evaluation=evaluation != "none")
        except ValueError as error:
            raise ValueError(f"--hf-dataset {dataset}: {error}") from None
        lm.text = {"hf_dataset": dataset}
    else:
        _local_text(args, lm, calib_paths if calibration else None, eval_paths, sequences)
    if lm.calib is not None:
        lm.text.update(calib_sequences=sequences, seq_len=lm.seq_len, seed=args.seed)
    if lm.eval_ids is not None:
        if lm.eval_ids.numel() < 2:
            raise ValueError(f"--eval-text: {lm.eval_ids.numel()} token(s) of text; perplexity needs at least 2")
        lm.text.update(eval_tokens=lm.eval_ids.numel(), stride=args.stride or lm.seq_len)


def _local_text(args, lm: LanguageModel, calib_paths, eval_paths, sequences: int) -> None:
    documents = {flag: _documents(paths, flag) for flag, paths in (("--calib-text", calib_paths),
                                                                   ("--eval-text", eval_paths)) if paths}
    if len(documents) == 2:
        try:
            check_disjoint(documents["--calib-text"], documents["--eval-text"])
        except ValueError as error:
            raise ValueError(f"--eval-text: {error}") from None
    if "--calib-text" in documents:
        try:
            lm.calib = sample_sequences(token_stream(lm.tokenizer, documents["--calib-text"]), sequences,
                                        lm.seq_len, args.seed)
        except ValueError as error:
            raise ValueError(f"--calib-text (--calib-sequences {sequences}, --seq-len {lm.seq_len}): {error}") \
                from None
        lm.text["calib_text"] = list(calib_paths)
    if "--eval-text" in documents:
        ids = token_stream(lm.tokenizer, documents["--eval-text"])
        lm.eval_ids = ids[:args.eval_tokens] if args.eval_tokens else ids
        lm.text["eval_text"] = list(eval_paths)


def _documents(paths, flag: str):
    try:
        return read_documents(paths, MAX_CHARS)
    except ValueError as error:
        raise ValueError(f"{flag} {error}") from None


def _tokenizer(args, lm: LanguageModel):
    try:
        return load_hf_tokenizer(lm.spec.arch)
    except ValueError as error:
        raise ValueError(f"--model-name {error}") from None


def _eval_source_needed(args) -> None:
    """--eval-tokens and --stride mean nothing without text to evaluate on."""
    if not (args.eval_text or args.hf_dataset in HF_TEXT_DATASETS):
        for flag, value in (("--eval-tokens", args.eval_tokens), ("--stride", args.stride)):
            if value is not None:
                raise ValueError(f"{flag}: no evaluation text (--eval-text PATH... or --hf-dataset wikitext2|c4)")


# ----------------------------------------------------------------------------- loading
def load_lm(args, lm: LanguageModel, device, path: str | None = None, flag: str = "--dense-path") -> nn.Module:
    """The model of ``--model-name`` in eval mode on ``device``: its own weights, ``--random-init``'s, or
    those of ``path`` (a Hugging Face directory or a weights file, checked by ``_check_fits``)."""
    path = path if path is not None else args.dense_path
    if path is None and args.random_init:
        return load_dense(args.model_name, device=device, random_init=True)
    if path is None:
        return load_hf_model(lm.spec.arch, device=device)
    if Path(path).is_dir():
        return load_hf_model(path, device=device)
    model = build_hf_model(lm.spec.arch)
    missing, _ = model.load_state_dict(read_state_dict(path, args.allow_unsafe_pickle, flag), strict=False)
    log.debug("%s: %d tied weights taken from their twins: %s", path, len(missing), missing)
    return model.to(device=device, dtype=torch.float32).eval()


def weights_label(args) -> str:
    source = weights_source(args.model_name, args.dense_path, args.pretrained, None, args.random_init)
    return {"--random-init": RANDOM_INIT, "--dense-path": f"--dense-path {args.dense_path}"}.get(
        source, f"{args.model_name} (its own weights)")


@contextlib.contextmanager
def library_bars(shown: bool):
    """transformers' own progress bars (loading and writing weights) follow ``--no-progress``."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not shown:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not shown:
            hf_logging.enable_progress_bar()


def _perplexity(model, lm: LanguageModel, args, device, label: str, shown: bool, batch_size: int = EVAL_BATCH):
    result = perplexity(model, lm.eval_ids, lm.seq_len, stride=args.stride, batch_size=batch_size, device=device,
                        desc=f"perplexity {label}" if shown else None)
    log.info("perplexity %s: %.3f (%d tokens)", label, result.ppl, result.tokens)
    return result


# ----------------------------------------------------------------------------- prune
def _check_prune(args, lm: LanguageModel):
    from starfish_fast.prune.makers import _check_nm_shapes, _scope_weights, check_nm

    if args.method not in LM_METHODS:
        raise ValueError(f"--method {args.method} is for image models; a language model takes "
                         f"{', '.join(LM_METHODS)}")
    commands.check_prune_values(args)
    _check_model(args, lm, weights=True)
    scope = commands._prune_scope(args, lm.skeleton)
    if args.method == "nm" or (args.method in LM_CALIBRATED and args.sparsity is None):
        check_nm(args.n, args.m)
        try:
            _check_nm_shapes(_scope_weights(lm.skeleton, scope)[2], args.n, args.m, scope)
        except ValueError as error:
            raise ValueError(f"--m {args.m}: {error}") from None
    _check_seq_len(args, lm)
    calibration = args.method in LM_CALIBRATED
    if calibration and args.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if not calibration:
        unused = (("--calib-text", args.calib_text), ("--calib-sequences", args.calib_sequences),
                  ("--seq-len", args.seq_len), ("--hf-dataset", args.hf_dataset in HF_TEXT_DATASETS or None))
        for flag in [flag for flag, value in unused if value is not None]:
            raise ValueError(f"{flag}: only --method wanda or sparsegpt reads calibration text")
    if calibration:
        _check_text(args, lm, calibration=True, evaluation="none")
    try:
        device = resolve_device(args.device) if calibration else "cpu"
    except ValueError as error:
        raise ValueError(f"--device: {error}") from None
    return scope, device


def streams(args, lm: LanguageModel) -> bool:
    """Whether ``prune`` reads the model one tensor at a time (``streaming.stream_prune``): magnitude per layer
    or N:M masks of a model directory's own safetensors weights."""
    return (args.method == "nm" or (args.method == "magnitude" and args.per == "layer")) and \
        args.dense_path is None and not args.random_init and is_sharded_directory(lm.spec.arch)


def run_prune(args, lm: LanguageModel, defaults: dict) -> int:
    scope, device = _check_prune(args, lm)
    if streams(args, lm):
        streamed = StreamedLM.open(lm.spec.arch)      # headers only: a missing shard is one line, nothing read
        summary = stream_prune(streamed, args.output, args.method, args.sparsity, args.n, args.m, scope,
                               {"model_name": args.model_name, "method": args.method, "prune_scope": scope})
        return commands.report_masks(args, summary, scope, weights_label(args))
    model = load_lm(args, lm, device)
    masks = commands.make_masks(args, model, scope, device, lambda: lm.calib)
    return commands.write_masks(args, masks, scope, weights_label(args),
                                **({"calibration": lm.text} if lm.calib is not None else {}))


# ----------------------------------------------------------------------------- recover
def _check_output(output: Path) -> None:
    """recover's output: a directory that can be created or replaced (only an empty one or an earlier
    healed checkpoint is replaced), its sidecar files writable."""
    if output.suffix in (*commands.MASK_SUFFIXES, ".json"):
        raise ValueError(f"--output-path {output}: a language model's healed checkpoint is a directory (a Hugging "
                         f"Face checkpoint); give a directory path such as {LM_OUTPUT}")
    check_output_dir(output, "--output-path")
    if output.is_dir() and any(output.iterdir()) and not (output / MASKS_FILE).is_file():
        raise ValueError(f"--output-path {output}: a directory that is not a healed checkpoint (no {MASKS_FILE}) "
                         f"and would be replaced; give a new or empty directory")
    for suffix in commands.RECOVER_SIDECARS:
        check_output_path(f"{output}{suffix}", "--output-path")


def _check_recover(args, lm: LanguageModel, defaults: dict):
    output = Path(LM_OUTPUT if args.output_path == defaults["output_path"] else args.output_path)
    config = commands.recover_config(args, output)
    _check_output(output)
    _check_model(args, lm, weights=True)
    _check_seq_len(args, lm)
    _check_eval_values(args, lm)
    _eval_source_needed(args)
    if not streams_recover(args, lm, config):
        lm.masks = check_masks(args, lm.checked(), config.scope)
    _check_text(args, lm, calibration=True, evaluation="optional")
    device, group = check_device(config)
    if is_sharded_directory(lm.spec.arch) and config.order == "joint":
        check_joint_fits(StreamedLM.open(lm.spec.arch), device, config.scope)
    return output, config, device, group is None or group.main


def streams_recover(args, lm: LanguageModel, config) -> bool:
    """Whether ``recover`` heals block by block from the directory's shards (``streaming.heal_streaming``): order
    sequential on a model directory's own safetensors. Its masks are then checked from the mask file's header
    (``lm.masks`` holds the ``streaming.BlockMasks``), nothing read."""
    if not (config.order == "sequential" and args.dense_path is None and not args.random_init
            and is_sharded_directory(lm.spec.arch)):
        return False
    streamed = StreamedLM.open(lm.spec.arch)
    check_input_file(args.mask_path, "--mask-path", "masks", args.allow_unsafe_pickle)
    lm.masks = block_masks(streamed, config.scope, mask_path=args.mask_path,
                           allow_unsafe_pickle=args.allow_unsafe_pickle)
    return True


def _recover_streaming(args, lm: LanguageModel, output: Path, config, shown: bool) -> int:
    """recover without the whole model in memory: each block read, healed and written as its own shard."""
    if lm.eval_ids is not None:
        log.warning("--eval-text: perplexity needs the whole model; not measured in a streamed run (run `eval` on "
                    "%s where it fits)", output)
    source = HFShardSource(StreamedLM.open(lm.spec.arch), lm.masks, output,
                           metadata={"model_name": json.dumps(args.model_name), "mask_path": json.dumps(args.mask_path),
                                     "objective": json.dumps(config.objective)})
    with commands.output_directory(output.parent), library_bars(shown):
        result = heal_streaming(source, as_batches(lm.calib, config.batch_size), config)
    report = {"output": str(output), "sidecar": f"{output}.json", "metrics": config.metrics_path,
              "model_name": args.model_name, "mask_path": args.mask_path, "order": "sequential (streamed)", **lm.text,
              "objective": config.objective, "final_loss": result.history[-1]["loss"], "steps": result.steps,
              "heal_seconds": round(result.heal_seconds, 2), "peak_weights_held": source.peak_held,
              "plan": result.plan.summary()}
    save_json_atomic({**report, "history": result.history, "config": dataclasses.asdict(config),
                      "plan": result.plan.as_dict()}, f"{output}.json")
    Path(config.checkpoint_path).unlink(missing_ok=True)
    print_json(report)
    return 0


def run_recover(args, lm: LanguageModel, defaults: dict) -> int:
    from starfish_fast.engine import heal

    output, config, device, main = _check_recover(args, lm, defaults)
    shown = config.progress and main
    if isinstance(lm.masks, BlockMasks):                 # streamed: see streams_recover
        return _recover_streaming(args, lm, output, config, shown)
    with commands.output_directory(output.parent), library_bars(shown):
        dense = load_lm(args, lm, device)
        pruned = copy.deepcopy(dense)
        predicate = adapter_for(pruned, lm.blocks).scope_predicate(config.scope)
        apply_masks(pruned, lm.masks)
        ppl = {}
        if lm.eval_ids is not None:
            ppl["dense"] = _perplexity(dense, lm, args, device, "dense", shown)
            ppl["pruned"] = _perplexity(pruned, lm, args, device, "pruned", shown)
        result = heal(pruned, dense, lm.masks, lm.calib, config, block_names=lm.blocks, predicate=predicate)
        if lm.eval_ids is not None:
            ppl["healed"] = _perplexity(pruned, lm, args, device, "healed", shown)
        if not main:                                     # under torchrun rank 0 alone writes and reports
            return 0
        report = {"output": str(output), "sidecar": f"{output}.json", "metrics": config.metrics_path,
                  "plot": config.plot_path, "model_name": args.model_name, "dense_weights": weights_label(args),
                  "mask_path": args.mask_path, "perplexity": {k: v.ppl for k, v in ppl.items()} or None,
                  **lm.text, "mask_density": mask_density(lm.masks), "objective": config.objective,
                  "final_loss": result.history[-1]["loss"], "steps": result.steps,
                  "heal_seconds": round(result.heal_seconds, 2),
                  "tokens_per_second": round(result.images_per_second * lm.seq_len, 1), "plan": result.plan.summary()}
        save_pretrained_with_masks(pruned, output, lm.masks, lm.tokenizer,
                                   {key: report[key] for key in ("model_name", "mask_path", "objective", "perplexity")})
        save_json_atomic({**report, "blocks": lm.blocks, "history": result.history,
                          "config": dataclasses.asdict(config), "plan": result.plan.as_dict()}, f"{output}.json")
        Path(config.checkpoint_path).unlink(missing_ok=True)   # the run is whole: its resume checkpoint is spent
    print_json(report)
    return 0


# ----------------------------------------------------------------------------- eval
def _check_eval(args, lm: LanguageModel, defaults: dict):
    batch_size = args.batch_size if args.batch_size != defaults["batch_size"] else EVAL_BATCH
    if batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    _check_model(args, lm, weights=bool(args.mask_path) or not args.checkpoint)
    _check_seq_len(args, lm)
    _check_eval_values(args, lm)
    if args.mask_path:
        lm.masks = check_masks(args, lm.checked(), args.prune_scope)
    _check_text(args, lm, calibration=False, evaluation="required")
    device, group = check_device(HealConfig(device=args.device))
    return batch_size, device, group is None or group.main


def run_eval(args, lm: LanguageModel, defaults: dict) -> int:
    batch_size, device, main = _check_eval(args, lm, defaults)
    shown = main and not args.no_progress
    with library_bars(shown):
        dense = load_lm(args, lm, device) if (args.mask_path or not args.checkpoint) else None
        model = load_lm(args, lm, device, args.checkpoint, "--checkpoint") if args.checkpoint else dense
    measured = _perplexity(model, lm, args, device, "model", shown, batch_size)
    result = {"model_name": args.model_name, "checkpoint": args.checkpoint, "perplexity": measured.ppl,
              "nll": measured.nll, "tokens_scored": measured.tokens, "seq_len": lm.seq_len, **lm.text}
    if dense is not None:
        result["dense_weights"] = weights_label(args)
    if args.mask_path:
        pruned = copy.deepcopy(dense)
        apply_masks(pruned, lm.masks)
        result.update(mask_path=args.mask_path, mask_density=mask_density(lm.masks),
                      pruned_perplexity=_perplexity(pruned, lm, args, device, "pruned", shown, batch_size).ppl)
    if main:
        print_json(result)
    return 0
