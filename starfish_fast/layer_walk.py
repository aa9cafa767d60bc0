"""A Hugging Face directory's decoder layers walked one at a time: each read from its shards, run over every batch's
hidden states, freed; the hidden states carried to the next layer. What needs the whole model's activations without
the whole model in memory: perplexity, and Wanda's input norms.

    from starfish_fast.layer_walk import streamed_input_norms, streamed_perplexity
    lm = StreamedLM.open("llama-7b/")
    streamed_perplexity(lm, eval_ids, seq_len=2048).ppl           # text.perplexity's number
    norms = streamed_input_norms(lm, lm.scope_weights(), calib)   # wanda.input_norms's

A layer's inputs and keyword arguments (position embeddings, attention mask) come from the model's own forward
stopped at layer 0 (``layer_inputs``); the last step of perplexity is the model's own forward again, its layers
replayed (the final norm and the LM head as the model applies them). The skeleton is left on the meta device.
``lm`` is a ``streaming.StreamedLM`` (streaming builds on this module), ``masks`` a ``streaming.BlockMasks``.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from starfish_fast.calibration import capture_inputs
from starfish_fast.prune.wanda import feature_sums
from starfish_fast.text import Perplexity, Scores, window_batches


def materialize(model: nn.Module, module: nn.Module, tensors: Mapping[str, torch.Tensor], device,
                skip: tuple[str, ...] = ()) -> None:
    """``module`` (part of ``model``, on the meta device) given ``tensors`` (assigned as they are); tensors that
    no checkpoint holds (non-persistent buffers: rotary tables) made by the model's own initialization. The
    submodules named in ``skip`` (and theirs) stay on the meta device."""
    module.load_state_dict(tensors, strict=False, assign=True)
    for name, sub in module.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        own = [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]
        if any(t.is_meta for t in own):
            sub.to_empty(device=device, recurse=False)
            model._init_weights(sub)          # transformers' per-module initializer (inv_freq from the config)


def materialize_outside(lm, device, dtype: torch.dtype, head: bool = True) -> nn.Module:
    """``lm``'s skeleton with its tensors outside the decoder layers read (the layers stay on meta); the output
    embedding too with ``head`` (read, or tied to the input embeddings where the checkpoint has none)."""
    model = lm.skeleton
    inside = tuple(block + "." for block in lm.blocks)
    name = next(name for name, module in model.named_modules() if module is model.get_output_embeddings())
    rest = {key: lm.weights.read(key).to(device, dtype) for key in lm.weights.keys()
            if not key.startswith(inside) and (head or not key.startswith(name + "."))}
    tied = head and f"{name}.weight" not in rest          # tied to the input embeddings: not in the checkpoint
    materialize(model, model, rest, device, skip=(*lm.blocks, *([name] if tied or not head else [])))
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    lm.weights.release()
    return model


def layer_inputs(model: nn.Module, first: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The hidden states entering ``first`` (decoder layer 0) for token ids ``batch`` and the keyword arguments every
    layer takes (position embeddings, attention mask), as the model's own forward builds them."""
    args, kwargs = capture_inputs(first, lambda: model.base_model(input_ids=batch, use_cache=False))
    hidden = args[0] if args else kwargs.pop("hidden_states")
    return hidden, {key: value for key, value in kwargs.items() if key != "hidden_states"}


@torch.no_grad()
def walk_layers(lm, batches: Iterable[torch.Tensor], device, dtype: torch.dtype,
                masks=None, watch: Callable[[str, nn.Module], list] | None = None
                ) -> tuple[list[list], bool]:
    """Token ``batches`` through ``lm``'s layers, one layer in memory at a time (its scope weights times ``masks``):
    ``watch(layer name, layer)`` may hook the layer while it runs (the handles it returns are removed after). The
    skeleton keeps its tensors outside the layers (the caller puts it back on meta). ([hidden, keywords] per batch
    after the last layer, whether the layers return tuples)."""
    model = materialize_outside(lm, device, dtype)
    carried = [list(layer_inputs(model, model.get_submodule(lm.blocks[0]), batch.to(device))) for batch in batches]
    as_tuple = False
    for name in lm.blocks:
        prefix = name + "."
        tensors = {key[len(prefix):]: lm.weights.read(key).to(device, dtype) for key in lm.weights.keys()
                   if key.startswith(prefix)}
        for key in (masks.keys if masks is not None else ()):
            if key.startswith(prefix):
                tensors[key[len(prefix):]].mul_(masks.read(key).to(device, dtype))
        layer = copy.deepcopy(model.get_submodule(name))                 # on meta: nothing copied
        materialize(model, layer, tensors, device)
        handles = watch(name, layer) if watch else []
        try:
            for item in carried:
                output = layer.eval()(item[0], **item[1])
                as_tuple = isinstance(output, (tuple, list))
                item[0] = output[0] if as_tuple else output
        finally:
            for handle in handles:
                handle.remove()
        del layer, tensors
        lm.weights.release()
    return carried, as_tuple


class _Replay(nn.Module):
    """A decoder layer's stand-in in the last forward: its input back, or (the last layer) the carried hidden
    states, shaped as the layer returns them (a tensor or a tuple)."""

    def __init__(self, layer: nn.Module, final: torch.Tensor | None, as_tuple: bool):
        super().__init__()
        self.final, self.as_tuple = final, as_tuple
        if hasattr(layer, "attention_type"):             # models that pick each layer's mask by it
            self.attention_type = layer.attention_type

    def forward(self, hidden, *args, **kwargs):
        out = hidden if self.final is None else self.final
        return (out,) if self.as_tuple else out


@torch.no_grad()
def streamed_perplexity(lm, ids: torch.Tensor, seq_len: int, masks=None,
                        stride: int | None = None, batch_size: int = 4, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> Perplexity:
    """``text.perplexity`` of ``lm`` (its scope weights times ``masks``) with one decoder layer in memory at a time."""
    model, device, batches = lm.skeleton, torch.device(device), window_batches(ids, seq_len, stride, batch_size)
    layers = {name: model.get_submodule(name) for name in lm.blocks}
    try:
        carried, as_tuple = walk_layers(lm, [batch for batch, _ in batches], device, dtype, masks)
        score = Scores()
        for (batch, chunk), (hidden, _) in zip(batches, carried):
            for name, layer in layers.items():
                model.set_submodule(name, _Replay(layer, hidden if name == lm.blocks[-1] else None, as_tuple))
            score.add(model(input_ids=batch.to(device), use_cache=False).logits, batch, chunk)       # (B, L, V)
    finally:
        for name, layer in layers.items():
            model.set_submodule(name, layer)
        model.to("meta")                                  # the skeleton holds nothing again
    return score.perplexity()


@torch.no_grad()
def streamed_input_norms(lm, keys: Iterable[str], batches: Iterable[torch.Tensor],
                         device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                         ) -> dict[str, torch.Tensor]:
    """``wanda.input_norms`` of the dense ``lm`` over token ``batches`` ({weight key: (in_features,) fp32 CPU}), one
    decoder layer in memory at a time; every key is a weight inside a decoder layer."""
    keys, sums = list(keys), {}

    def watch(name: str, layer: nn.Module) -> list:
        def hook(key):
            def add(module, args):
                total = feature_sums(module, args[0]).double()
                sums[key] = sums[key] + total if key in sums else total
            return add
        prefix = name + "."
        return [layer.get_submodule(key[len(prefix):].rpartition(".")[0]).register_forward_pre_hook(hook(key))
                for key in keys if key.startswith(prefix)]

    try:
        walk_layers(lm, batches, torch.device(device), dtype, watch=watch)
    finally:
        lm.skeleton.to("meta")
    missing = [key for key in keys if key not in sums]
    if missing:
        raise ValueError(f"no decoder layer of {lm.path} ran {missing[:3]}: Wanda's norms stream for layer weights "
                         f"only")
    return {key: sums[key].sqrt().float().cpu() for key in keys}
