"""The text modality of the commands: Hugging Face causal language models.

    from starfish_fast import cli
    cli.main(["prune", "--model-name", "llama_dir", "--method", "wanda", "--sparsity", "0.5",
              "--calib-text", "docs/", "--output", "masks.pt"])
    cli.main(["recover", "--model-name", "llama_dir", "--mask-path", "masks.pt", "--calib-text", "docs/",
              "--eval-text", "held_out/", "--output-path", "outputs/healed"])     # a Hugging Face directory
    cli.main(["eval", "--model-name", "outputs/healed", "--eval-text", "held_out/"])   # perplexity, JSON

A language model is what ``models.hf`` reads (a model directory, a ``.gguf`` file, a packaged name,
``hf/<hub id>`` from the local cache) whose architecture is a causal LM. ``Text`` is its modality for
the one command path of ``starfish_fast.commands``: what it checks before any model is loaded or
anything written (the weights files, keys and shapes against the architecture built on the meta
device; the masks; the sequence length against the model's context; then the text itself, read and
tokenized now: calibration and evaluation text sharing a file, too little text for the sequences
asked, a dataset that cannot be read offline), how it reads data (``--calib-sequences`` distinct
windows of ``--seq-len`` tokens drawn with ``--seed``), its metric (the strided perplexity of
``text.perplexity``, lower is better) and how it saves (``checkpoint.save_pretrained_with_masks``: a
Hugging Face directory, pruned weights zero in place, the tokenizer, ``masks.safetensors``, which
every command takes as ``--model-name``, ``--dense-path``, ``--checkpoint`` or ``--mask-path``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path

import torch
from torch import nn

from starfish_fast.checkpoint import (MASKS_FILE, check_input_file, check_output_dir, check_output_path, error_line,
                                      file_kind, read_state_dict, save_json_atomic, save_pretrained_with_masks,
                                      state_dict_mismatch, weight_shapes)
from starfish_fast.checks import CALIB_HINT, TEXT
from starfish_fast.data import as_batches
from starfish_fast.masks import apply_masks, mask_density
from starfish_fast.modality import Modality, block_names, output_directory, print_json, prune_scope
from starfish_fast.models import CheckpointMismatchError, ModelSpec, load_dense
from starfish_fast.models.hf import build_hf_model, is_causal_lm, load_hf_model, load_hf_tokenizer, resolve_source
from starfish_fast.models.hf_shards import ShardedCheckpoint, expected_shapes, is_sharded_directory
from starfish_fast.models.registry import weights_source
from starfish_fast.packed_masks import packed_shapes, unpack
from starfish_fast.layer_walk import streamed_perplexity
from starfish_fast.streaming import (BlockMasks, HFShardSource, StreamedLM, block_masks, check_joint_fits, heal_streaming,
                                     stream_prune)
from starfish_fast.text import (HF_TEXT_DATASETS, MAX_CHARS, check_disjoint, hf_text_data, perplexity,
                                read_documents, sample_sequences, token_stream)

log = logging.getLogger("starfish_fast")
LM_METHODS = ("magnitude", "nm", "wanda", "sparsegpt")
LM_CALIBRATED = ("wanda", "sparsegpt")
DEFAULT_SEQ_LEN = 512
DEFAULT_SEQUENCES = 128
EVAL_BATCH = 4                 # windows per forward pass: (4, T, vocabulary) logits stay small
LM_OUTPUT = "outputs/healed"
RECOVER_SIDECARS = (".json", ".metrics.jsonl", ".loss.png", ".resume")
RANDOM_INIT = "random (--random-init: untrained weights, seeded; a dry run, its perplexities mean nothing)"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")


def language_model(spec: ModelSpec) -> "Text | None":
    """The text modality for ``spec`` (a Hugging Face model) if its architecture is a causal LM."""
    skeleton = _skeleton(spec.arch, "--model-name")
    return Text(spec, skeleton) if is_causal_lm(skeleton) else None


def name_hint(name: str) -> str:
    """What a name with a slash that names no model may have meant: a model directory or a hub id."""
    if "/" not in name or name.startswith(("timm/", "torchvision/")):
        return ""
    try:
        resolve_source(name)
    except ValueError as error:
        return f"; as a Hugging Face model: {error}"
    return f"; a Hugging Face hub id is given as hf/{name} (read from the local cache)"


class Text(Modality):
    name, metric, higher_is_better, item = TEXT, "perplexity", False, "sequences"

    def __init__(self, spec, skeleton):
        super().__init__(spec, skeleton)
        self.tokenizer = None
        self.seq_len = DEFAULT_SEQ_LEN
        self.calib: torch.Tensor | None = None           # (sequences, seq_len) token ids
        self.eval_ids: torch.Tensor | None = None        # (N,) the evaluation token stream
        self.text: dict = {}                             # where the text came from, for the JSON result
        self.stride = self.eval_batch = None
        self.last_score = None                           # the last perplexity measured (its nll, tokens)

    def resolve_defaults(self, args, flags: dict) -> None:
        if args.command == "eval" and args.batch_size is None:
            args.batch_size = EVAL_BATCH
        if args.command == "recover" and args.output_path == flags["output_path"].default:
            args.output_path = LM_OUTPUT

    def foreign_flags(self, args, flags: dict) -> list[str]:
        lines = super().foreign_flags(args, flags)
        if getattr(args, "hf_dataset", None) not in (None, *HF_TEXT_DATASETS):
            lines.append(f"--hf-dataset {args.hf_dataset}: a language model reads {' or '.join(HF_TEXT_DATASETS)} "
                         f"(or local text: --calib-text, --eval-text)")
        if args.command == "prune" and args.method not in LM_METHODS:
            lines.append(f"--method {args.method} is for image models; a language model takes "
                         f"{', '.join(LM_METHODS)}")
        return lines

    # ------------------------------------------------------------------------- the validation pass
    def check(self, args, mistakes, command: str, scope: str | None = None) -> None:
        """Everything ``command`` reads, against the model, but the text (``read_inputs``)."""
        calibration = command == "recover" or (command == "prune" and args.method in LM_CALIBRATED)
        if command == "recover":
            with mistakes.check():
                check_recover_output(Path(args.output_path))
        seen = len(mistakes.lines)
        with mistakes.check():
            self.check_model(args, weights=command != "eval" or bool(args.mask_path) or not args.checkpoint)
        with mistakes.check():
            self.check_seq_len(args)
        model_ok = len(mistakes.lines) == seen
        with mistakes.check():
            self.check_eval_values(args, command)
        if command == "prune" and model_ok:
            with mistakes.check():
                self.check_prune(args, calibration)
        if command == "recover" and not args.mask_path and not self.streams_recover(args, command):
            mistakes.lines.append(f"--mask-path is required: masks come from a mask file, or from the zeros of a "
                                  f"pruned model directory (--model-name) healed with --order sequential against its "
                                  f"dense directory (--dense-path DIR)")
        elif (getattr(args, "mask_path", None) or command == "recover") and model_ok:
            with mistakes.check():
                self.masks = self.streamed_masks(args, scope) if self.streams_recover(args, command) else \
                    self.read_masks(args, scope)

    def read_inputs(self, args, mistakes, command: str) -> None:
        """The text, read and tokenized now: the heavy part of the validation, once the rest is right."""
        calibration = command == "recover" or (command == "prune" and args.method in LM_CALIBRATED)
        if calibration or command in ("recover", "eval"):
            with mistakes.check():
                self.check_text(args, calibration, {"eval": "required", "recover": "optional"}.get(command, "none"))

    def check_model(self, args, weights: bool) -> None:
        """``--blocks``, the weights files given (kind, keys and shapes), one source of dense weights; a model
        directory's index names shards that are there (headers only)."""
        self.blocks = block_names(args, self.skeleton)
        if is_sharded_directory(self.spec.arch):
            try:
                ShardedCheckpoint.open(self.spec.arch)
            except ValueError as error:
                raise ValueError(f"--model-name {error}") from None
        for name in ("dense_path", "checkpoint"):
            if getattr(args, name, None):
                _check_fits(args, self, getattr(args, name), "--" + name.replace("_", "-"))
        if weights:
            weights_source(args.model_name, args.dense_path, args.pretrained, None, args.random_init)

    def check_seq_len(self, args) -> None:
        context = getattr(self.skeleton.config, "max_position_embeddings", None)
        if args.seq_len is None:
            self.seq_len = min(DEFAULT_SEQ_LEN, context or DEFAULT_SEQ_LEN)
        elif context and args.seq_len > context:
            raise ValueError(f"--seq-len {args.seq_len}: above {args.model_name}'s context of {context} tokens "
                             f"(max_position_embeddings in its config)")
        else:
            self.seq_len = args.seq_len

    def check_eval_values(self, args, command: str) -> None:
        if command == "eval":
            self.eval_batch = args.batch_size
        stride = getattr(args, "stride", None)
        if stride is not None and stride > self.seq_len:
            raise ValueError(f"--stride must be in [1, --seq-len {self.seq_len}], got {stride}")
        self.stride = stride
        if command == "recover" and not (args.eval_text or args.hf_dataset in HF_TEXT_DATASETS):
            for flag, value in (("--eval-tokens", args.eval_tokens), ("--stride", args.stride)):
                if value is not None:
                    raise ValueError(f"{flag}: no evaluation text (--eval-text PATH... or --hf-dataset wikitext2|c4)")

    def check_prune(self, args, calibration: bool) -> None:
        from starfish_fast.prune.makers import check_nm_shapes, scope_weights

        scope = prune_scope(args, self.skeleton)
        if args.method == "nm" or (args.method in LM_CALIBRATED and args.sparsity is None):
            try:
                check_nm_shapes(scope_weights(self.skeleton, scope)[2], args.n, args.m, scope)
            except ValueError as error:
                raise ValueError(f"--m {args.m}: {error}") from None
        if not calibration:
            unused = (("--calib-text", args.calib_text), ("--calib-sequences", args.calib_sequences),
                      ("--seq-len", args.seq_len), ("--hf-dataset", args.hf_dataset in HF_TEXT_DATASETS or None))
            for flag in [flag for flag, value in unused if value is not None]:
                raise ValueError(f"{flag}: only --method wanda or sparsegpt reads calibration text")

    def read_masks(self, args, scope: str | None) -> dict:
        """``--mask-path`` for this model (a mask file or a healed directory's ``masks.safetensors``)."""
        from starfish_fast.models import adapter_for
        from starfish_fast.masks import load_masks

        if file_kind(args.mask_path, args.allow_unsafe_pickle) == "export":
            raise ValueError(f"--mask-path {args.mask_path} is an image model's weights export (recover --export), "
                             f"not masks of a language model; give the file `starfish-fast prune` wrote or recover's "
                             f"output directory")
        check_input_file(args.mask_path, "--mask-path", "masks", args.allow_unsafe_pickle)
        try:
            predicate = adapter_for(self.skeleton, self.blocks).scope_predicate(scope or args.prune_scope)
        except ValueError as error:
            raise ValueError(f"--prune-scope: {error}") from None
        try:
            return load_masks(args.mask_path, self.skeleton, predicate, allow_unsafe_pickle=args.allow_unsafe_pickle)
        except ValueError as error:
            raise ValueError(f"--mask-path {error}") from None

    def check_text(self, args, calibration: bool, evaluation: str) -> None:
        """The text the command reads (``evaluation``: "none", "optional" or "required"), from local files or
        ``--hf-dataset``, read and tokenized now."""
        calib_paths = getattr(args, "calib_text", None) if calibration else None
        eval_paths = getattr(args, "eval_text", None) if evaluation != "none" else None
        dataset = args.hf_dataset if args.hf_dataset in HF_TEXT_DATASETS else None
        local = "--calib-text" if calib_paths else "--eval-text" if eval_paths else None
        if dataset and local:
            raise ValueError(f"--hf-dataset {dataset} and {local}: give one source of text")
        if calibration and not (calib_paths or dataset):
            raise ValueError(f"{args.model_name} is a language model: {CALIB_HINT}")
        if evaluation == "required" and not (eval_paths or dataset):
            raise ValueError(f"{args.model_name} is a language model: give the text to evaluate on with "
                             f"--eval-text PATH... (or --hf-dataset wikitext2|c4)")
        sequences = (args.calib_sequences or DEFAULT_SEQUENCES) if calibration else 0
        self.tokenizer = tokenizer_of(args, self.spec)
        log.info("reading and tokenizing the text (%s)", dataset or " and ".join(
            f"{len(paths)} path(s) of {flag}" for flag, paths in (("--calib-text", calib_paths),
                                                                  ("--eval-text", eval_paths)) if paths))
        if dataset:
            try:
                self.calib, self.eval_ids = hf_text_data(self.tokenizer, dataset, sequences=sequences,
                                                         seq_len=self.seq_len, seed=args.seed,
                                                         eval_tokens=getattr(args, "eval_tokens", None),
                                                         evaluation=evaluation != "none")
            except ValueError as error:
                raise ValueError(f"--hf-dataset {dataset}: {error}") from None
            self.text = {"hf_dataset": dataset}
        else:
            self._local_text(args, calib_paths, eval_paths, sequences)
        if self.calib is not None:
            self.text.update(calib_sequences=sequences, seq_len=self.seq_len, seed=args.seed)
        if self.eval_ids is not None:
            if self.eval_ids.numel() < 2:
                raise ValueError(f"--eval-text: {self.eval_ids.numel()} token(s) of text; perplexity needs at least 2")
            self.text.update(eval_tokens=self.eval_ids.numel(), stride=self.stride or self.seq_len)

    def _local_text(self, args, calib_paths, eval_paths, sequences: int) -> None:
        documents = {flag: _documents(paths, flag) for flag, paths in (("--calib-text", calib_paths),
                                                                       ("--eval-text", eval_paths)) if paths}
        if len(documents) == 2:
            try:
                check_disjoint(documents["--calib-text"], documents["--eval-text"])
            except ValueError as error:
                raise ValueError(f"--eval-text: {error}") from None
        if "--calib-text" in documents:
            try:
                self.calib = sample_sequences(token_stream(self.tokenizer, documents["--calib-text"]), sequences,
                                              self.seq_len, args.seed)
            except ValueError as error:
                raise ValueError(f"--calib-text (--calib-sequences {sequences}, --seq-len {self.seq_len}): "
                                 f"{error}") from None
            self.text["calib_text"] = list(calib_paths)
        if "--eval-text" in documents:
            ids = token_stream(self.tokenizer, documents["--eval-text"])
            self.eval_ids = ids[:args.eval_tokens] if args.eval_tokens else ids
            self.text["eval_text"] = list(eval_paths)

    # ------------------------------------------------------------------------- loading, data, metric
    def load_dense(self, args, device, path: str | None = None, flag: str = "--dense-path") -> nn.Module:
        return load_lm(args, self, device, path, flag)

    def load_checkpoint(self, args, device) -> nn.Module:
        return load_lm(args, self, device, args.checkpoint, "--checkpoint")

    def weights_label(self, args) -> str:
        source = weights_source(args.model_name, args.dense_path, args.pretrained, None, args.random_init)
        return {"--random-init": RANDOM_INIT, "--dense-path": f"--dense-path {args.dense_path}"}.get(
            source, f"{args.model_name} (its own weights)")

    def quiet(self, shown: bool):
        return library_bars(shown)

    def calibration_count(self, args) -> int:
        return self.calib.shape[0]

    def masks_for(self, args, model, scope: str) -> dict:
        return self.masks

    # ------------------------------------------------------------------------- never the whole model in memory
    def streams_prune(self, args) -> bool:
        """Whether ``prune`` reads the model one tensor at a time (``streaming.stream_prune``): magnitude per layer,
        N:M or Wanda masks (its norms one decoder layer at a time) of a model directory's own safetensors weights."""
        return (args.method in ("nm", "wanda") or (args.method == "magnitude" and args.per == "layer")) and \
            args.dense_path is None and not args.random_init and is_sharded_directory(self.spec.arch)

    def stream_prune(self, args, scope: str, device) -> dict:
        streamed = StreamedLM.open(self.spec.arch)      # headers only: a missing shard is one line, nothing read
        calib = as_batches(self.calib, args.batch_size) if args.method in LM_CALIBRATED else None
        return stream_prune(streamed, args.output, args.method, args.sparsity, args.n, args.m, scope,
                            {"model_name": args.model_name, "method": args.method, "prune_scope": scope},
                            calib=calib, device=device)

    def streams_recover(self, args, command: str) -> bool:
        """Whether ``recover`` heals block by block from the directory's shards (``streaming.heal_streaming``):
        order sequential on a model directory's own safetensors (the dense twin: its own, or --dense-path's
        directory)."""
        return command == "recover" and args.order == "sequential" and not args.random_init and \
            is_sharded_directory(self.spec.arch) and (args.dense_path is None or is_sharded_directory(args.dense_path))

    def streamed_masks(self, args, scope: str | None) -> BlockMasks:
        """The mask file checked from its header against the shards, or the non-zeros of --model-name's weights
        against --dense-path's shapes (``streaming.BlockMasks``), nothing read."""
        scope = scope or args.prune_scope
        if args.mask_path is None:
            if args.dense_path is None:
                raise ValueError("--mask-path: not given, and no --dense-path DIR to heal --model-name's pruned "
                                 "weights towards (its masks are then its non-zeros)")
            return block_masks(StreamedLM.open(args.dense_path, "--dense-path"), scope,
                               pruned=StreamedLM.open(self.spec.arch))
        check_input_file(args.mask_path, "--mask-path", "masks", args.allow_unsafe_pickle)
        return block_masks(StreamedLM.open(self.spec.arch), scope, mask_path=args.mask_path,
                           allow_unsafe_pickle=args.allow_unsafe_pickle)

    def check_joint(self, config, device) -> None:
        """A model directory healed jointly must fit the device: the estimate against the free memory; a streamed
        run has no whole model for a finish phase."""
        if self.streamed and config.finish not in ("auto", "none"):
            raise ValueError(f"--finish {config.finish}: a streamed run holds one block at a time and has no whole "
                             f"model for a last whole-model phase; use --finish none (or auto)")
        if is_sharded_directory(self.spec.arch) and config.order == "joint":
            check_joint_fits(StreamedLM.open(self.spec.arch), device, config.scope)

    @property
    def streamed(self) -> bool:
        return isinstance(self.masks, BlockMasks)

    def recover_streamed(self, args, output: Path, config, shown: bool, device) -> tuple:
        """recover without the whole model in memory: each block read, healed and written as its own shard; the
        perplexities one decoder layer at a time (``streaming.streamed_perplexity``). (HealResult, scores)."""
        lm = StreamedLM.open(self.spec.arch)
        dense = StreamedLM.open(args.dense_path, "--dense-path") if args.dense_path else None
        source = HFShardSource(lm, self.masks, output, dense=dense, device=device,
                               metadata={"model_name": json.dumps(args.model_name),
                                         "mask_path": json.dumps(args.mask_path),
                                         "objective": json.dumps(config.objective)})
        with output_directory(output.parent), self.quiet(shown):
            scores = {"dense": self.streamed_score(dense or lm, None, "dense", device),
                      "pruned": self.streamed_score(lm, self.masks, "pruned", device)}
            result = heal_streaming(source, as_batches(self.calib, config.batch_size), config)
            scores["healed"] = self.streamed_score(StreamedLM.open(output), None, "healed", device)
        report = {"output": str(output), "sidecar": f"{output}.json", "metrics": config.metrics_path,
                  "model_name": args.model_name, "mask_path": args.mask_path, "dense_path": args.dense_path,
                  "order": "sequential (streamed)", **self.text, "objective": config.objective,
                  "perplexity": {k: v for k, v in scores.items() if v is not None} or None,
                  "final_loss": result.history[-1]["loss"], "steps": result.steps,
                  "heal_seconds": round(result.heal_seconds, 2), "peak_weights_held": source.peak_held,
                  "plan": result.plan.summary()}
        save_json_atomic({**report, "history": result.history, "config": dataclasses.asdict(config),
                          "plan": result.plan.as_dict()}, f"{output}.json")
        Path(config.checkpoint_path).unlink(missing_ok=True)
        print_json(report)
        return result, scores

    def streamed_score(self, lm: StreamedLM, masks: BlockMasks | None, label: str, device) -> float | None:
        """``score`` of a model directory read one decoder layer at a time."""
        if self.eval_ids is None:
            return None
        result = streamed_perplexity(lm, self.eval_ids, self.seq_len, masks, stride=self.stride,
                                     batch_size=self.eval_batch or EVAL_BATCH, device=device)
        log.info("perplexity %s: %.3f (%d tokens, one decoder layer at a time)", label, result.ppl, result.tokens)
        return result.ppl

    def prune_calibration(self, args, model):
        return self.calib

    def recover_data(self, args, dense):
        return self.calib, self.eval_ids

    def eval_data(self, args, model):
        return self.eval_ids

    def score(self, model, evaluation, label: str, shown: bool, device) -> float | None:
        if evaluation is None:
            return None
        result = perplexity(model, evaluation, self.seq_len, stride=self.stride, batch_size=self.eval_batch or
                            EVAL_BATCH, device=device, desc=f"perplexity {label}" if shown else None)
        log.info("perplexity %s: %.3f (%d tokens)", label, result.ppl, result.tokens)
        self.last_score = result
        return result.ppl

    def eval_summary(self, args, result: dict) -> str:
        return _eval_summary(args, result)

    def needs_dense(self, args) -> bool:
        return bool(args.mask_path) or not args.checkpoint

    def calibrated(self, args) -> bool:
        return args.method in LM_CALIBRATED

    def prune_extra(self) -> dict:
        return {"calibration": self.text} if self.calib is not None else {}

    activation_words = "activations of every decoder layer"

    def activation_bytes(self, model: nn.Module, config) -> int:
        """Activations kept for the backward of every decoder layer, fp32: Korthikanti et al. (2022)'s
        34·s·b·h + 5·a·s²·b bytes a layer at 16 bits, doubled (no gradient checkpointing assumed)."""
        cfg, s, b = model.config, self.seq_len, config.batch_size
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 0)
        layer = 34 * s * b * hidden + 5 * heads * s * s * b
        return 2 * layer * len(self.blocks or ())

    # ------------------------------------------------------------------------- writing and reporting
    def save_recovered(self, args, output: Path, model, config, result, scores: dict) -> dict:
        report = {"output": str(output), "sidecar": f"{output}.json", "metrics": config.metrics_path,
                  "plot": config.plot_path, "model_name": args.model_name, "dense_weights": self.weights_label(args),
                  "mask_path": args.mask_path, "perplexity": {k: v for k, v in scores.items() if v is not None} or None,
                  **self.text, "mask_density": mask_density(self.masks), "objective": config.objective,
                  "finish": result.plan.finish,
                  "final_loss": result.history[-1]["loss"], "steps": result.steps,
                  "heal_seconds": round(result.heal_seconds, 2),
                  "sequences_per_second": round(result.images_per_second, 3),
                  "tokens_per_second": round(result.images_per_second * self.seq_len, 1),
                  "plan": result.plan.summary()}
        save_pretrained_with_masks(model, output, self.masks, self.tokenizer,
                                   {key: report[key] for key in ("model_name", "mask_path", "objective", "perplexity")})
        save_json_atomic({**report, "blocks": self.blocks, "history": result.history,
                          "config": dataclasses.asdict(config), "plan": result.plan.as_dict()}, f"{output}.json")
        return report

    def eval_report(self, args, dense, model, evaluation, device, main: bool, shown: bool) -> dict:
        ppl = self.score(model, evaluation, "model", shown, device)
        measured = self.last_score
        result = {"model_name": args.model_name, "checkpoint": args.checkpoint, "perplexity": ppl,
                  "nll": measured.nll, "tokens_scored": measured.tokens, "seq_len": self.seq_len, **self.text}
        evaluated = args.checkpoint or args.model_name
        sparsity = healed_sparsity(evaluated)
        if sparsity is not None:
            result.update(weights=f"healed: {evaluated} (recover's output, its {MASKS_FILE})", sparsity=sparsity)
        if dense is not None and not (sparsity is not None and not args.checkpoint):
            result["dense_weights"] = self.weights_label(args)
        if args.mask_path:
            pruned = model if dense is None else _masked_copy(dense, self.masks)
            result.update(mask_path=args.mask_path, mask_density=mask_density(self.masks),
                          pruned_perplexity=self.score(pruned, evaluation, "pruned", shown, device))
        return result


def _eval_summary(args, result: dict) -> str:
    what = result.get("weights") or args.checkpoint or result.get("dense_weights", args.model_name)
    line = f"perplexity {result['perplexity']:.2f} on {result['tokens_scored']} tokens: {what}"
    if result.get("sparsity") is not None:
        line += f", sparsity {result['sparsity']:.0%}"
    if result.get("pruned_perplexity") is not None:
        line += f"; pruned (dense x --mask-path): {result['pruned_perplexity']:.2f}"
    return line


def _masked_copy(model: nn.Module, masks: dict) -> nn.Module:
    import copy

    pruned = copy.deepcopy(model)
    apply_masks(pruned, masks)
    return pruned


def healed_sparsity(path) -> float | None:
    """The share of masked weights zero in a healed directory (from its ``masks.safetensors``), else None."""
    masks_path = Path(path) / MASKS_FILE
    if not masks_path.is_file():
        return None
    from safetensors import safe_open

    zeros = total = 0
    with safe_open(str(masks_path), framework="pt") as f:      # one mask at a time (a 7B model's: 6.5 GB as bool)
        shapes = packed_shapes(f.metadata())                    # bit-packed files (checkpoint.save_masks)
        for key in f.keys():
            mask = f.get_tensor(key) if shapes is None else unpack(f.get_tensor(key), shapes[key])
            zeros, total = zeros + int((mask == 0).sum()), total + mask.numel()
    return zeros / max(total, 1)


def check_recover_output(output: Path) -> None:
    """recover's output: a directory that can be created or replaced (only an empty one or an earlier
    healed checkpoint is replaced), its sidecar files writable."""
    if output.suffix in (".pt", ".pth", ".safetensors", ".json"):
        raise ValueError(f"--output-path {output}: a language model's healed checkpoint is a directory (a Hugging "
                         f"Face checkpoint); give a directory path such as {LM_OUTPUT}")
    check_output_dir(output, "--output-path")
    if output.is_dir() and any(output.iterdir()) and not (output / MASKS_FILE).is_file():
        raise ValueError(f"--output-path {output}: a directory that is not a healed checkpoint (no {MASKS_FILE}) "
                         f"and would be replaced; give a new or empty directory")
    for suffix in RECOVER_SIDECARS:
        check_output_path(f"{output}{suffix}", "--output-path")


def tokenizer_of(args, spec: ModelSpec):
    """The model's tokenizer; a model directory without one is told so, and how to give it one."""
    source, gguf = resolve_source(spec.arch)
    directory = Path(source)
    if gguf is None and directory.is_dir() and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"--model-name {args.model_name}: no tokenizer files in {directory} (tokenizer.json, "
                         f"tokenizer_config.json, ...); save one beside the model (tokenizer.save_pretrained("
                         f"'{directory}'), as recover does) or copy the original model's tokenizer files there")
    try:
        return load_hf_tokenizer(spec.arch)
    except ValueError as error:
        raise ValueError(f"--model-name {error}") from None


def load_lm(args, lm: Text, device, path: str | None = None, flag: str = "--dense-path") -> nn.Module:
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


def _skeleton(name: str, flag: str) -> nn.Module:
    try:
        with torch.device("meta"):
            return build_hf_model(name)
    except ValueError as error:                    # models.hf's one line: missing files, offline hub
        raise ValueError(f"{flag} {error}") from None
    except Exception as error:  # transformers' own complaint about the config or the architecture
        raise ValueError(f"{flag} {name}: cannot build the model from its config ({error_line(error)})") from None


def _check_fits(args, lm: Text, path: str, flag: str) -> None:
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


def _documents(paths, flag: str):
    try:
        return read_documents(paths, MAX_CHARS)
    except ValueError as error:
        raise ValueError(f"{flag} {error}") from None


@contextlib.contextmanager
def library_bars(shown: bool):
    """transformers' own progress bars follow ``--no-progress``: loading and writing weights (its switch) and
    the GGUF conversion (a bare tqdm of its own, given ``disable`` here)."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf
    from transformers.utils import logging as hf_logging

    was, bar = hf_logging.is_progress_bar_enabled(), gguf.tqdm
    if not shown:
        hf_logging.disable_progress_bar()
        gguf.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf.tqdm = bar
        if was and not shown:
            hf_logging.enable_progress_bar()
