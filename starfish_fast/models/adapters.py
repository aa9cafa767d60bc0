"""Model adapters: per architecture family, the blocks, the prune scopes and a forward pass that returns
every block's output without hooks inside compiled code.

    from starfish_fast.models import adapter_for      # models/registry.py: a model's adapter
    adapter = adapter_for(model)                  # TimmViTAdapter, ..., or GenericAdapter for any classifier
    logits, reps = adapter.forward_blocks(model, images, adapter.block_names(model))
    # logits (B, num_classes); reps: one tensor per block, (B, T, D), (B, C, H, W) or (B, H, W, C)

Known families keep an explicit block loop (timm ``VisionTransformer``, torchvision
``VisionTransformer``, timm MobileNetV1). Any other classifier gets ``GenericAdapter``: blocks from
timm's ``group_matcher`` where the model has one (what timm uses for layer-wise decay), else the
repeated residual units (children of a ``Sequential``/``ModuleList`` sharing one class); outputs
captured by giving each block a thin subclass of its own class whose ``__call__`` hands the output
to a sink around the (possibly compiled) ``_call_impl``: same module, same state-dict keys, no hook
inside compiled code, logits from the model's own forward. Block lists that are not a family's own
fall back to forward hooks (eager), as the reference does for every model.
"""
from __future__ import annotations

import contextlib
import re
from collections import Counter
from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from starfish_fast.models import scopes

# (fc1, fc2) module paths of the MLP inside one block, per adapter family.
MLP_LAYERS = {"timm_vit": ("mlp.fc1", "mlp.fc2"), "torchvision_vit": ("mlp.0", "mlp.3")}


class ModelAdapter:
    """What the engine needs to know about one architecture family."""

    family: str = "generic"
    cosine_per: str = "token"               # cosine rows: token (B*T rows), sample (B rows), shape (by the dims)
    sequence_first: bool = False            # hooked block outputs may come (T, B, D) (the reference's ViT rule)
    train_student: bool = True              # the student heals in train mode (the reference's: BatchNorm updates)
    next_token_labels: bool = False         # objectives needing labels take the next input tokens (causal LMs)
    item: str = "img"                       # one calibration example in progress output (seq for a causal LM)
    scopes: tuple[str, ...] = ()
    default_scope: str = ""

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def block_names(self, model: nn.Module) -> list[str]:
        raise NotImplementedError

    def scope_predicate(self, scope: str) -> scopes.WeightPredicate:
        raise NotImplementedError

    def blocks_by_name(self, model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
        return [model.get_submodule(name) for name in names]

    def mlp_pairs(self, model: nn.Module) -> list[tuple[str, str]]:
        """(fc1, fc2) module paths of the MLPs whose hidden neurons can be dropped together."""
        if self.family not in MLP_LAYERS:
            return []
        fc1, fc2 = MLP_LAYERS[self.family]
        return [(f"{block}.{fc1}", f"{block}.{fc2}") for block in self.block_names(model)]

    def prepared(self, model: nn.Module, names: Sequence[str]):
        """A context in which ``forward_blocks`` on ``model`` is ready for ``names`` (nothing to do for the
        explicit loops)."""
        return contextlib.nullcontext()

    def check_scope(self, scope: str) -> str:
        if scope == "auto":
            return self.default_scope
        if scope not in self.scopes:
            raise ValueError(f"unknown prune scope {scope!r} for {self.family} models; allowed: "
                             f"{', '.join(self.scopes)} (or auto = {self.default_scope})")
        return scope

    def forward_blocks(self, model: nn.Module, images: torch.Tensor, block_names: Sequence[str],
                       need_logits: bool = True) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Logits and the outputs of ``block_names`` (in the order given), by an explicit block loop.
        Blocks after the last requested one are skipped when ``need_logits`` is False."""
        own = self.block_names(model)
        position = {name: i for i, name in enumerate(own)}
        if any(name not in position for name in block_names):
            return forward_with_hooks(model, images, block_names, self.sequence_first)
        wanted = {position[name] for name in block_names}
        last = len(own) - 1 if need_logits or not wanted else max(wanted)
        checkpointing = bool(getattr(model, "grad_checkpointing", False)) and torch.is_grad_enabled()
        outputs: dict[int, torch.Tensor] = {}
        x = self._embed(model, images)
        if torch.is_grad_enabled() and not x.requires_grad:
            # the first block then sees an input like the others' (needing grad): identical blocks share one
            # compiled graph instead of two (the gradient it adds is the first block's input projection's)
            x.requires_grad_()
        for i, block in enumerate(self._blocks(model)[:last + 1]):
            x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
            if i in wanted:
                outputs[i] = x
        logits = self._head(model, x) if need_logits else None
        return logits, [outputs[position[name]] for name in block_names]


class TimmViTAdapter(ModelAdapter):
    family, scopes, default_scope, sequence_first = "timm_vit", scopes.VIT_SCOPES, "qkv_out_mlp", True

    def matches(self, model):
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def block_names(self, model):
        return [f"blocks.{i}" for i in range(len(model.blocks))]

    def scope_predicate(self, scope):
        return scopes.timm_vit_predicate(self.check_scope(scope))

    def _embed(self, model, images):
        x = model.patch_embed(images)          # (B, N, D) (or (B, H, W, D) with dynamic size)
        x = model._pos_embed(x)                # (B, T, D): prefix tokens + patches
        x = model.patch_drop(x)
        return model.norm_pre(x)

    def _blocks(self, model):
        return list(model.blocks)

    def _head(self, model, x):
        return model.forward_head(model.norm(x))   # (B, num_classes)


class TorchvisionViTAdapter(ModelAdapter):
    family, scopes, default_scope, sequence_first = "torchvision_vit", scopes.VIT_SCOPES, "qkv_out_mlp", True

    def matches(self, model):
        from torchvision.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def block_names(self, model):
        return [f"encoder.layers.{name}" for name, _ in model.encoder.layers.named_children()]

    def scope_predicate(self, scope):
        return scopes.torchvision_vit_predicate(self.check_scope(scope))

    def _embed(self, model, images):
        x = model._process_input(images)                          # (B, N, D)
        cls = model.class_token.expand(x.shape[0], -1, -1)        # (B, 1, D)
        x = torch.cat([cls, x], dim=1)                            # (B, T, D)
        return model.encoder.dropout(x + model.encoder.pos_embedding)

    def _blocks(self, model):
        return list(model.encoder.layers)

    def _head(self, model, x):
        return model.heads(model.encoder.ln(x)[:, 0])


class MobileNetV1Adapter(ModelAdapter):
    family, scopes, default_scope, cosine_per = "mobilenetv1", scopes.MOBILENET_SCOPES, "conv_fc", "sample"

    def matches(self, model):
        from timm.models.efficientnet import EfficientNet

        return isinstance(model, EfficientNet) and all(
            type(block).__name__ == "DepthwiseSeparableConv" for stage in model.blocks for block in stage)

    def block_names(self, model):
        return [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]

    def scope_predicate(self, scope):
        return scopes.mobilenet_predicate(self.check_scope(scope))

    def _embed(self, model, images):
        return model.bn1(model.conv_stem(images))

    def _blocks(self, model):
        return [block for stage in model.blocks for block in stage]

    def _head(self, model, x):
        return model.forward_head(model.bn2(model.conv_head(x)))


class GenericAdapter(ModelAdapter):
    """Any classifier ``nn.Module``: blocks from its own structure (or ``block_names``), outputs captured
    by per-block capture classes, logits from the model's own forward."""

    family, scopes = "generic", scopes.GENERIC_SCOPES

    def __init__(self, model: nn.Module, block_names: Sequence[str] | None = None):
        self.blocks = list(block_names) if block_names is not None else discover_blocks(model)
        if not self.blocks:
            raise ValueError(f"found no blocks in {type(model).__name__}: pass `block_names`; `starfish-fast blocks` "
                             f"lists candidates")
        # channels-last maps (timm Swin) are compared per position, like tokens; otherwise by the
        # output's shape: (B, T, D) per token, (B, C, H, W) per image
        self.cosine_per = "token" if getattr(model, "output_fmt", "NCHW") == "NHWC" else "shape"
        self.default_scope = scopes.generic_default_scope(model, self.blocks)
        self.model_ref = model

    def matches(self, model):
        return True

    def block_names(self, model):
        return list(self.blocks)

    def scope_predicate(self, scope):
        return scopes.generic_predicate(self.model_ref, self.blocks, self.check_scope(scope))

    def mlp_pairs(self, model):
        """timm ``Mlp`` modules (fc1 -> act -> fc2, no norm in between) inside the blocks: a hidden neuron
        pruned in fc1's row and fc2's column contributes nothing, whatever the activation does to 0."""
        pairs = []
        for name, module in model.named_modules():
            if type(module).__name__ == "Mlp" and any(name.startswith(b + ".") for b in self.blocks) and \
                    isinstance(getattr(module, "fc1", None), nn.Linear) and isinstance(module.fc2, nn.Linear) and \
                    isinstance(getattr(module, "norm", nn.Identity()), nn.Identity):
                pairs.append((f"{name}.fc1", f"{name}.fc2"))
        return pairs

    @contextlib.contextmanager
    def prepared(self, model, names):
        """Each named block given its capture class for the duration (a compiled block keeps one class)."""
        blocks = self.blocks_by_name(model, names)
        originals = [type(block) for block in blocks]
        for block in blocks:
            block.__class__ = _capture_class(type(block))
        try:
            yield
        finally:
            for block, original in zip(blocks, originals):
                block.__class__ = original

    def forward_blocks(self, model, images, block_names, need_logits=True):
        modules = dict(model.named_modules())
        missing = [name for name in block_names if name not in modules]
        if missing:
            raise ValueError(f"block names not found in the model: {missing[:5]}")
        outputs: dict[str, torch.Tensor] = {}
        blocks = [modules[name] for name in block_names]
        ready = all(getattr(type(b), "_starfish_base", None) is not None for b in blocks)
        with (contextlib.nullcontext() if ready else self.prepared(model, block_names)):
            for name, block in zip(block_names, blocks):
                block._starfish_sink = lambda output, name=name: outputs.__setitem__(
                    name, block_output(output, images.shape[0]))
            try:
                logits = self._run(model, images, need_logits)
            finally:
                for block in blocks:
                    block._starfish_sink = None
        missing = [name for name in block_names if name not in outputs]
        if missing:
            raise RuntimeError(f"blocks {missing[:5]} produced no output in the model's forward")
        return (logits if need_logits else None), [outputs[name] for name in block_names]

    def _run(self, model: nn.Module, inputs: torch.Tensor, need_logits: bool) -> torch.Tensor | None:
        """The model's own forward on ``inputs``: its logits (the capture classes see the blocks)."""
        return model(inputs)


_CAPTURE_CLASSES: dict[type, type] = {}


def _capture_class(base: type) -> type:
    """A subclass of ``base`` whose ``__call__`` hands the output to ``self._starfish_sink`` (outside the
    compiled ``_call_impl``). Created once per class; assigning ``__class__`` keeps the module's state."""
    if getattr(base, "_starfish_base", None) is not None:
        return base
    if base not in _CAPTURE_CLASSES:
        def __call__(self, *args, **kwargs):
            output = base.__call__(self, *args, **kwargs)
            sink = self.__dict__.get("_starfish_sink")
            if sink is not None:
                sink(output)
            return output
        _CAPTURE_CLASSES[base] = type(base.__name__, (base,), {"__call__": __call__, "_starfish_base": base,
                                                               "__module__": base.__module__})
    return _CAPTURE_CLASSES[base]


def discover_blocks(model: nn.Module) -> list[str]:
    """Block module names from timm's ``group_matcher`` (its per-block patterns; downsample and norm
    groups, which timm marks with fixed group ids, left out), else the repeated residual units."""
    names = [name for name, _ in model.named_modules() if name]
    patterns = _group_matcher_patterns(model)
    if patterns:
        top = _outermost([n for n in names if any(p.match(n) for p in patterns)])
        if top:
            return top
    return _repeated_units(model)


def _group_matcher_patterns(model: nn.Module) -> list[re.Pattern]:
    try:
        groups = model.group_matcher(coarse=False)["blocks"]
    except (AttributeError, KeyError, NotImplementedError, TypeError):
        return []
    if isinstance(groups, str):
        groups = [(groups, None)]
    return [re.compile(pattern) for pattern, fixed_id in groups if fixed_id is None]


def _repeated_units(model: nn.Module) -> list[str]:
    """Children of ``Sequential``/``ModuleList`` containers that are composite modules sharing the
    container's most common class (at least two), outermost only: torchvision's ResNet ``layer1.0``,
    MobileNetV3's ``features.1`` ..."""
    containers = (nn.Sequential, nn.ModuleList)
    units = []
    for name, module in model.named_modules():
        if not isinstance(module, containers):
            continue
        children = [(child_name, child) for child_name, child in module.named_children()
                    if not isinstance(child, containers) and any(True for _ in child.children())]
        counts = Counter(type(child) for _, child in children)
        if counts and counts.most_common(1)[0][1] >= 2:
            common = counts.most_common(1)[0][0]
            units += [f"{name}.{child_name}" if name else child_name for child_name, child in children
                      if type(child) is common]
    return _outermost(units)


def _outermost(names: list[str]) -> list[str]:
    """``names`` without those nested inside another of them, in order."""
    return [n for n in names if not any(n.startswith(m + ".") for m in names if m != n)]


def block_output(output, batch_size: int, sequence_first: bool = False) -> torch.Tensor:
    """A tuple output takes its first element; with ``sequence_first`` a (T, B, D) output is made batch-first."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if sequence_first and output.dim() == 3 and output.shape[0] != batch_size and output.shape[1] == batch_size:
        output = output.transpose(0, 1)
    return output


def forward_with_hooks(model: nn.Module, images: torch.Tensor, block_names: Sequence[str],
                       sequence_first: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and block outputs captured with forward hooks (eager; the reference's way)."""
    modules = dict(model.named_modules())
    missing = [name for name in block_names if name not in modules]
    if missing:
        raise ValueError(f"block names not found in the model: {missing[:5]}")
    captured: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_hook(
        lambda _module, _inputs, output, name=name: captured.__setitem__(
            name, block_output(output, images.shape[0], sequence_first)))
        for name in block_names]
    try:
        logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    return logits, [captured[name] for name in block_names]


ADAPTERS: tuple[ModelAdapter, ...] = (TimmViTAdapter(), TorchvisionViTAdapter(), MobileNetV1Adapter())


# ----------------------------------------------------------------------------- module utilities
def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` (e.g. ``blocks.0.mlp.fc1``) by ``module``."""
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)


def freeze_all(model: nn.Module) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def enable_grad_checkpointing(model: nn.Module) -> bool:
    """Recompute block activations in the backward where the model supports it (timm's
    ``set_grad_checkpointing``, transformers' ``gradient_checkpointing_enable``); False where it does not."""
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
        return True
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return True
    return False
