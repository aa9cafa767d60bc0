"""Hugging Face directories never whole in memory: checks before any weights are read, the streaming
prune, and ``HFShardSource``, the blocks of a sharded checkpoint one at a time for sequential healing.

    from starfish_fast.streaming import HFShardSource, StreamedLM, block_masks, stream_prune
    lm = StreamedLM.open("llama_dir")                      # config + safetensors headers; one line if not a model
    summary = stream_prune(lm, "masks.safetensors", "magnitude", sparsity=0.5)   # one tensor at a time
    masks = block_masks(lm, mask_path="masks.safetensors")   # or pruned=StreamedLM.open("pruned_dir"): its zeros
    source = HFShardSource(lm, masks, "healed_dir")        # the BlockSource of starfish_fast.sequential
    hidden, extra = source.stem(token_ids)                 # what enters block 0
    student, dense, block_mask = source.open(0)            # block 0 in the compute dtype, masks applied
    ...                                                    # train the student's masked weights
    source.close(0, student); ...; source.finish()         # block 0 written as its own shard; index, config

The model is built on the meta device (its config only). Its parts outside the decoder layers (the
embeddings, the rotary tables) are read once for the stem; a block's weights are read by
``safetensors.safe_open``, tensor by tensor, when the block opens, in the checkpoint's dtype, and cast
to the compute dtype only then. A healed block is cast back and written at once as one shard of the
output (``model-000NN-of-000MM.safetensors``, one per block and one for the rest), so the output is a
sharded checkpoint with its index, config and bit-packed ``masks.safetensors`` that transformers
loads as is. ``held`` counts the weights the source holds: at most one block's student and dense twin.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from starfish_fast.checkpoint import (check_output_path, error_line, save_masks,
                                      save_safetensors_atomic, state_dict_mismatch)
from starfish_fast.config import HealConfig
from starfish_fast.masks import check_mask_shapes
from starfish_fast.models import adapter_for, prunable_weights
from starfish_fast.models.hf import build_hf_model, decoder_layer_names
from starfish_fast.models.hf_shards import MaskFile, ShardedCheckpoint, ShardWriter, expected_shapes
from starfish_fast.models.scopes import is_hf_conv1d
from starfish_fast.packed_masks import pack, packed_header
from starfish_fast.prune.makers import check_nm, check_sparsity, magnitude_mask, nm_mask, sparsity_summary
from starfish_fast.prune.wanda import layer_keep
from starfish_fast.rules import joint_bytes
from starfish_fast.layer_walk import layer_inputs, materialize, materialize_outside, streamed_input_norms
from starfish_fast.sequential import BlockSource, heal_sequential
from starfish_fast.teacher import host_available_bytes

log = logging.getLogger(__name__)
STREAM_METHODS = ("magnitude", "nm", "wanda")


# ----------------------------------------------------------------------------- the checks, before any weights
@dataclass
class StreamedLM:
    """A Hugging Face directory checked against its own config: the architecture on the meta device, its
    decoder layers and the checkpoint (headers read, no weights)."""
    path: str
    skeleton: nn.Module
    blocks: list[str]
    weights: ShardedCheckpoint

    @classmethod
    def open(cls, path: str | os.PathLike, flag: str = "--model-name") -> "StreamedLM":
        """One ``ValueError`` line naming ``flag`` when ``path`` is not a model directory, its index names
        missing shards, or its tensors do not fit its config."""
        try:
            weights = ShardedCheckpoint.open(path)
        except ValueError as error:
            raise ValueError(f"{flag} {error}") from None
        try:
            with torch.device("meta"):
                skeleton = build_hf_model(str(path), task="causal-lm")
        except ValueError as error:
            raise ValueError(f"{flag} {error}") from None
        except Exception as error:  # transformers' own complaint about the config or the architecture
            raise ValueError(f"{flag} {path}: cannot build the model from its config ({error_line(error)})") from None
        found = weights.shapes()
        problem = state_dict_mismatch(expected_shapes(skeleton, found), found)
        if problem:
            raise ValueError(f"{flag} {path}: its safetensors do not fit its config.json: {problem}")
        return cls(str(path), skeleton, decoder_layer_names(skeleton), weights)

    def scope_weights(self, scope: str = "auto") -> dict[str, tuple[int, ...]]:
        """key -> shape of the weights of the prune scope (on the meta skeleton)."""
        adapter = adapter_for(self.skeleton, self.blocks)
        selected = prunable_weights(self.skeleton, adapter.scope_predicate(scope))
        if not selected:
            raise ValueError(f"prune scope {scope!r} selects no weights of {self.path}")
        return {key: tuple(value.shape) for key, value in selected.items()}

    def transposed(self) -> frozenset[str]:
        """The weights stored (in, out): transformers ``Conv1D`` (GPT-2), pruned as the linears they are."""
        return frozenset(f"{name}.weight" for name, module in self.skeleton.named_modules() if is_hf_conv1d(module))


def available_memory(device: str | torch.device) -> int:
    """Bytes free now on ``device``: the GPU's free memory, or the host's MemAvailable."""
    device = torch.device(device)
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else host_available_bytes()


def check_joint_fits(lm: StreamedLM, device: str | torch.device, scope: str = "auto",
                     flag: str = "--order joint") -> None:
    """A one-line ``ValueError`` when a joint run of ``lm`` exceeds the free memory of ``device``: the plan's
    estimate (``rules.joint_bytes``: fp32 student and dense weights, a gradient and two Adam moments per
    trained weight), teacher targets and activations not even counted."""
    trained = sum(math.prod(shape) for shape in lm.scope_weights(scope).values())
    needed, free = joint_bytes(4 * lm.weights.numel(), trained, 0), available_memory(device)
    if needed > free:
        raise ValueError(f"{flag}: {lm.path} needs about {needed / 2**30:.1f} GiB for a joint run (fp32 weights, "
                         f"dense twin, gradients, Adam moments) and {device} has {free / 2**30:.1f} GiB free; "
                         f"use --order sequential")


# ----------------------------------------------------------------------------- masks, per block
class BlockMasks:
    """The bool masks of the scope's weights, read one at a time: from a mask file, or as the non-zeros of a
    pruned checkpoint (the form Wanda, SparseGPT and llm-compressor write)."""

    def __init__(self, keys: Mapping[str, tuple], mask_file: MaskFile | None = None,
                 pruned: ShardedCheckpoint | None = None):
        self.keys, self.mask_file, self.pruned = dict(keys), mask_file, pruned

    def read(self, key: str) -> torch.Tensor:
        return self.mask_file.read(key) if self.mask_file is not None else self.pruned.read(key) != 0


def block_masks(lm: StreamedLM, scope: str = "auto", mask_path: str | None = None, pruned: StreamedLM | None = None,
                flag: str = "--mask-path", allow_unsafe_pickle: bool = False) -> BlockMasks:
    """The scope's masks of ``lm`` from ``mask_path`` (keys and shapes checked from its header) or from the
    zeros of ``pruned`` (a checkpoint of the same architecture); nothing is read yet."""
    expected = lm.scope_weights(scope)
    if mask_path is not None:
        mask_file = MaskFile(mask_path, flag, allow_unsafe_pickle)
        check_mask_shapes(mask_file.shapes(), expected, f"{flag} {mask_path}")
        return BlockMasks(expected, mask_file=mask_file)
    if pruned is None:
        raise ValueError("masks come from a mask file (--mask-path) or a pruned checkpoint's zeros")
    problem = state_dict_mismatch(expected, {key: pruned.weights.shape(key) for key in expected
                                             if key in pruned.weights.weight_map})
    if problem:
        raise ValueError(f"--model-name {pruned.path}: its weights do not fit {lm.path}: {problem}")
    return BlockMasks(expected, pruned=pruned.weights)


# ----------------------------------------------------------------------------- streaming prune
def stream_prune(lm: StreamedLM, output: str | os.PathLike, method: str, sparsity: float | None = None,
                 n: int | None = 2, m: int | None = 4, scope: str = "auto", metadata: Mapping[str, str] | None = None,
                 calib: Sequence[torch.Tensor] | None = None, device: str | torch.device = "cpu") -> dict:
    """Magnitude (per layer), N:M or Wanda masks of the scope, one weight read at a time (Wanda's input norms one
    decoder layer at a time over the token batches ``calib``: ``layer_walk.streamed_input_norms``; N:M with ``n``,
    ``m`` and ``sparsity`` None, as ``wanda_masks``); written to ``output`` (``.safetensors``: bit-packed; else the
    reference's torch dict of bool tensors). Returns ``sparsity_summary``'s dict."""
    if method not in STREAM_METHODS:
        raise ValueError(f"streaming prune takes {', '.join(STREAM_METHODS)}, not {method!r}")
    if method == "magnitude" or (method == "wanda" and sparsity is not None):
        sparsity, n, m = check_sparsity(sparsity), None, None
    else:
        check_nm(n, m)
    check_output_path(output, "--output")
    transposed, layers, masks, keys = lm.transposed(), {}, {}, list(lm.scope_weights(scope))
    if method == "wanda":
        if not calib:
            raise ValueError("wanda reads calibration token batches (calib=)")
        norms = streamed_input_norms(lm, keys, calib, device)
    for key in keys:
        scores = lm.weights.read(key).abs().float()
        scores = scores.t() if key in transposed else scores                     # (out, in)
        if method == "wanda":
            scores = scores * norms[key]
        mask = nm_mask(scores, n, m) if n is not None else magnitude_mask(scores, sparsity) if method == "magnitude" \
            else layer_keep(scores, scores.shape[0] * round(sparsity * scores[0].numel()), per_row=True)
        mask = mask.t().contiguous() if key in transposed else mask
        layers.update(sparsity_summary({key: mask})["layers"])
        masks[key] = pack(mask) if str(output).endswith(".safetensors") else mask
        lm.weights.release()                    # the shard's mapped pages go with each tensor
    total, pruned = sum(layer["total"] for layer in layers.values()), sum(layer["pruned"] for layer in layers.values())
    summary = {"layers": layers, "total": total, "pruned": pruned, "sparsity": pruned / total if total else 0.0}
    header = {**(metadata or {}), "sparsity": f"{summary['sparsity']:.6f}"}
    if str(output).endswith(".safetensors"):
        shapes = {key: tuple(layer["shape"]) for key, layer in layers.items()}
        save_safetensors_atomic(masks, output, packed_header(shapes, header))
    else:
        save_masks(masks, output, header)
    log.info("streaming %s prune of %s: %d weights in %d tensors, sparsity %.4f", method, lm.path, total,
             len(layers), summary["sparsity"])
    return summary


# ----------------------------------------------------------------------------- the block source
class HFShardSource(BlockSource):
    """The decoder layers of a sharded Hugging Face checkpoint as a ``BlockSource``: ``open(i)`` reads block i
    (student weights times masks, and the dense twin: the same tensors, or ``dense``'s), ``close(i)`` writes it
    as shard i of ``output`` and frees it, ``finish()`` writes the rest, the index, config and masks."""

    def __init__(self, lm: StreamedLM, masks: BlockMasks, output: str | os.PathLike, dense: StreamedLM | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 metadata: Mapping[str, str] | None = None):
        self.lm, self.masks, self.dense, self.metadata = lm, masks, dense or lm, metadata
        self.device, self.dtype, self.output = torch.device(device), dtype, Path(output)
        prefixes = [block + "." for block in lm.blocks]
        self.block_keys = [[key for key in lm.weights.keys() if key.startswith(prefix)] for prefix in prefixes]
        in_blocks = {key for keys in self.block_keys for key in keys}
        self.rest_keys = [key for key in lm.weights.keys() if key not in in_blocks]
        self.held: dict[int, int] = {}           # open block -> weights held (student + dense)
        self.peak_held, self.closed = 0, set()
        self.mask_shapes: dict[str, tuple] = {}
        self._block_masks: dict[int, dict[str, torch.Tensor]] = {}
        self._stem_model = None
        self.writer = ShardWriter(self.output, len(lm.blocks) + 1)

    def __len__(self) -> int:
        return len(self.lm.blocks)

    def name(self, i: int) -> str:
        return self.lm.blocks[i]

    def _stem(self) -> nn.Module:
        """The model with its parts outside the decoder layers read (the output embedding left on meta)."""
        if self._stem_model is None:
            self._stem_model = materialize_outside(self.lm, self.device, self.dtype, head=False).eval()
        return self._stem_model

    def stem_done(self) -> None:
        """The embeddings and norms read for the stem go back to the meta device (0.5 GB in fp32 at 7B)."""
        if self._stem_model is not None:
            self._stem_model.to("meta")
            self._stem_model = None

    @torch.no_grad()
    def stem(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The hidden states entering block 0 for token ids ``batch`` (B, T) and the keyword arguments every
        block takes (position embeddings, attention mask), as the model's own forward builds them."""
        model = self._stem()
        return layer_inputs(model, model.get_submodule(self.lm.blocks[0]), batch.to(self.device))

    def run(self, block: nn.Module, hidden: torch.Tensor, extra: Mapping) -> torch.Tensor:
        """One decoder layer's forward; its hidden states whether it returns a tensor or a tuple."""
        output = block(hidden, **extra)
        return output[0] if isinstance(output, (tuple, list)) else output

    def _block(self, i: int, tensors: Mapping[str, torch.Tensor], trainable) -> nn.Module:
        block = copy.deepcopy(self.lm.skeleton.get_submodule(self.lm.blocks[i]))    # on meta: nothing copied
        materialize(self.lm.skeleton, block, tensors, self.device)
        for name, parameter in block.named_parameters():
            parameter.requires_grad_(name in trainable)
        return block.eval()

    def open(self, i: int) -> tuple[nn.Module, nn.Module, dict[str, torch.Tensor]]:
        """(student block i with its masked weights zeroed, its dense twin, its bool masks keyed by the
        block's own parameter names), in the compute dtype on the compute device; only the student's masked
        weights require gradients."""
        prefix = self.lm.blocks[i] + "."
        local = {key: key[len(prefix):] for key in self.block_keys[i]}
        masks = {local[key]: self.masks.read(key) for key in self.block_keys[i] if key in self.masks.keys}
        dense = {local[key]: self.dense.weights.read(key).to(self.device, self.dtype) for key in self.block_keys[i]}
        if self.dense is self.lm:
            student = {name: value.clone() for name, value in dense.items()}
        else:
            student = {local[key]: self.lm.weights.read(key).to(self.device, self.dtype) for key in self.block_keys[i]}
        for name, mask in masks.items():
            student[name].mul_(mask.to(self.device, self.dtype))
        self._block_masks[i] = masks
        self.held[i] = sum(t.numel() for t in (*student.values(), *dense.values()))
        self.peak_held = max(self.peak_held, sum(self.held.values()))
        self.lm.weights.release()
        self.dense.weights.release()
        # bool masks: a quarter of float ones (808 MB at 7B), the optimizer converts them a chunk at a time
        masks = {name: mask.to(self.device) for name, mask in masks.items()}
        return self._block(i, student, masks), self._block(i, dense, ()), masks

    @torch.no_grad()
    def close(self, i: int, student: nn.Module) -> None:
        """Block i is healed: its tensors, cast back to the checkpoint's dtypes (masked entries exactly zero), are
        written as shard i of the output; its masks are kept bit-packed for the mask file."""
        prefix, masks = self.lm.blocks[i] + ".", self._block_masks.pop(i)
        state = student.state_dict()
        tensors, packed = {}, {}
        for key in self.block_keys[i]:
            name = key[len(prefix):]
            value = state[name].detach().to("cpu", self.lm.weights.dtype(key)) if name in state \
                else self.lm.weights.read(key)
            if name in masks:
                value = torch.where(masks[name].cpu(), value, torch.zeros((), dtype=value.dtype))
                packed[key], self.mask_shapes[key] = pack(masks[name].cpu()), tuple(value.shape)
            tensors[key] = value
        self.writer.stash_masks(i, packed)       # on disk until finish: 25 MB a block at 7B would pile up here
        self.writer.write(i, tensors)
        self.held.pop(i, None)
        self.closed.add(i)
        self.lm.weights.release()

    def finish(self) -> None:
        """The tensors outside the blocks (as the checkpoint holds them) as the last shard, then the index, the
        config and tokenizer files, and the masks; the output directory appears whole."""
        unhealed = sorted(set(range(len(self))) - self.closed)
        if unhealed:
            raise RuntimeError(f"blocks {unhealed[:5]} of {self.lm.path} were never closed: the output would lack them")
        self.writer.write(len(self), {key: self.lm.weights.read(key) for key in self.rest_keys})
        self.lm.weights.release()
        self.writer.finish(self.lm.path, self.mask_shapes, self.metadata)
        log.info("healed checkpoint written to %s (%d shards)", self.output, len(self) + 1)

    def abort(self) -> None:
        """Nothing of the output is left (a failed run)."""
        self.writer.abort()


# ----------------------------------------------------------------------------- healing
def heal_streaming(source: HFShardSource, batches, config: HealConfig):
    """Heal ``source``'s blocks one after the other (``sequential.heal_sequential``; ``config.order`` is taken as
    sequential), the plan made on the meta skeleton; the output directory appears only when every block healed
    (a failure leaves nothing). Returns the ``HealResult``."""
    from starfish_fast.plan import resolve_plan

    config = dataclasses.replace(config, order="sequential", teacher_store=_stream_store(source, batches, config))
    plan = resolve_plan(config, source.lm.skeleton, calib=batches, block_names=source.lm.blocks)
    if plan.finish != "none":
        raise ValueError(f"finish={plan.finish!r}: a streamed run holds one block at a time, never the whole model a "
                         f"last whole-model phase trains; use finish='none'")
    try:
        return heal_sequential(source, batches, config, plan)
    except BaseException:
        source.abort()
        raise


def _stream_store(source: HFShardSource, batches, config: HealConfig) -> str:
    """Where the sequential streams live (the plan's own estimate runs a forward the meta skeleton cannot): on the
    compute device when its three streams (inputs, targets, carried outputs: tokens x hidden x 4 bytes each) take
    at most half its free memory, else in a memory-mapped file."""
    if config.teacher_store != "auto":
        return config.teacher_store
    tokens = sum(batch.numel() for batch in batches)
    needed = 3 * tokens * source.lm.skeleton.config.hidden_size * 4
    from starfish_fast.plan import resolve_device

    return "device" if needed <= available_memory(resolve_device(config.device)) // 2 else "disk"
