"""Model adapters: one registry that knows, per architecture family, the blocks,
the prunable weights of each prune scope, and how to run a forward pass that
returns every block's output without hooks.

    from starfish_fast.models import adapter_for, build_empty_model
    model = build_empty_model("deit_tiny_patch16_224")
    adapter = adapter_for(model)                                # TimmViTAdapter
    logits, reps = adapter.forward_blocks(model, images, adapter.block_names(model))
    # logits (B, 1000); reps: one (B, 197, 192) tensor per block

Families: timm ``VisionTransformer`` (any config: DeiT, DeiT3, ViT, the bundled
Fashion-MNIST model), torchvision ``VisionTransformer`` (vit_b_16 / vit_l_16),
and timm ``mobilenetv1_100`` (an ``EfficientNet`` with depthwise-separable blocks).
An explicit block loop replaces forward hooks: hooks graph-break under
``torch.compile``. Block lists that are not a family's own blocks fall back to
hooks (eager), as the reference does for every model.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

TORCHVISION_MODELS = ("vit_b_16", "vit_l_16")
TIMM_VIT_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
                   "deit3_base_patch16_224", "deit3_large_patch16_224", "deit3_huge_patch14_224")
MOBILENET_MODELS = ("mobilenetv1_100",)
MOBILENET_STAGE_LAYOUT = (1, 2, 2, 6, 2)
# (fc1, fc2) module paths of the MLP inside one block, per adapter family.
MLP_LAYERS = {"timm_vit": ("mlp.fc1", "mlp.fc2"), "torchvision_vit": ("mlp.0", "mlp.3")}
VIT_SCOPES = ("qkv", "qkv_out", "qkv_out_mlp", "mlp", "qk", "qk_mlp")
MOBILENET_SCOPES = ("conv_only", "fc_only", "conv_fc", "conv_dw", "all")

WeightPredicate = Callable[[str, nn.Module], bool]


def get_weight_key_and_tensor(name: str, module: nn.Module):
    """``nn.Linear``/``nn.Conv2d`` -> ``name.weight``; ``nn.MultiheadAttention`` (and its QK-compacted
    stand-in) -> ``name.in_proj_weight``."""
    prefix = f"{name}." if name else ""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return prefix + "weight", module.weight
    if isinstance(getattr(module, "in_proj_weight", None), nn.Parameter):
        return prefix + "in_proj_weight", module.in_proj_weight
    return None, None


# ----------------------------------------------------------------------------- scopes
def _timm_vit_roles(scope: str) -> tuple[str, ...]:
    attention = (r"\.attn\.qkv$",)
    attention_out = attention + (r"\.attn\.proj$",)
    mlp = (r"\.mlp\.fc1$", r"\.mlp\.fc2$")
    return {"qkv": attention, "qk": attention, "qkv_out": attention_out, "qkv_out_mlp": attention_out + mlp,
            "mlp": mlp, "qk_mlp": attention + mlp}[scope]


def _torchvision_vit_roles(scope: str) -> tuple[str, ...]:
    attention = (r"\.self_attention$",)          # the MultiheadAttention module: its in_proj_weight
    attention_out = attention + (r"\.self_attention\.out_proj$",)
    mlp = (r"\.mlp\.0$", r"\.mlp\.3$")            # MLPBlock = Linear, GELU, Dropout, Linear, Dropout
    return {"qkv": attention, "qk": attention, "qkv_out": attention_out, "qkv_out_mlp": attention_out + mlp,
            "mlp": mlp, "qk_mlp": attention + mlp}[scope]


def _mobilenet_predicate(scope: str) -> WeightPredicate:
    def is_conv(module, depthwise_too: bool) -> bool:
        return isinstance(module, nn.Conv2d) and (depthwise_too or module.groups == 1)

    def predicate(name: str, module: nn.Module) -> bool:
        if scope == "conv_only":
            return is_conv(module, depthwise_too=False)
        if scope == "fc_only":
            return isinstance(module, nn.Linear)
        if scope == "conv_fc":
            return is_conv(module, depthwise_too=False) or isinstance(module, nn.Linear)
        if scope == "conv_dw":
            return is_conv(module, depthwise_too=True)
        return is_conv(module, depthwise_too=True) or isinstance(module, nn.Linear)  # "all"

    return predicate


def _pattern_predicate(patterns: Sequence[str]) -> WeightPredicate:
    compiled = [re.compile(p) for p in patterns]

    def predicate(name: str, module: nn.Module) -> bool:
        key, _ = get_weight_key_and_tensor(name, module)
        return key is not None and any(p.search(name) for p in compiled)

    return predicate


# ----------------------------------------------------------------------------- adapters
class ModelAdapter:
    """What the engine needs to know about one architecture family."""

    family: str = "generic"
    kind: str = "vit"                       # "vit": per-token cosine; "mobilenet": per-image cosine
    rows: str = "token"                     # cosine rows of a block output: token (B*T rows) or sample (B rows)
    scopes: tuple[str, ...] = ()
    default_scope: str = ""

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def block_names(self, model: nn.Module) -> list[str]:
        raise NotImplementedError

    def scope_predicate(self, scope: str) -> WeightPredicate:
        raise NotImplementedError

    def _embed(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _blocks(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def _head(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def blocks_by_name(self, model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
        return [model.get_submodule(name) for name in names]

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
            return forward_with_hooks(model, images, block_names, self.kind)
        wanted = {position[name] for name in block_names}
        last = len(own) - 1 if need_logits or not wanted else max(wanted)
        checkpointing = bool(getattr(model, "grad_checkpointing", False)) and torch.is_grad_enabled()
        outputs: dict[int, torch.Tensor] = {}
        x = self._embed(model, images)
        for i, block in enumerate(self._blocks(model)[:last + 1]):
            x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
            if i in wanted:
                outputs[i] = x
        logits = self._head(model, x) if need_logits else None
        return logits, [outputs[position[name]] for name in block_names]


class TimmViTAdapter(ModelAdapter):
    family, kind, scopes, default_scope = "timm_vit", "vit", VIT_SCOPES, "qkv_out_mlp"

    def matches(self, model):
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def block_names(self, model):
        return [f"blocks.{i}" for i in range(len(model.blocks))]

    def scope_predicate(self, scope):
        return _pattern_predicate(_timm_vit_roles(self.check_scope(scope)))

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
    family, kind, scopes, default_scope = "torchvision_vit", "vit", VIT_SCOPES, "qkv_out_mlp"

    def matches(self, model):
        from torchvision.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def block_names(self, model):
        return [f"encoder.layers.{name}" for name, _ in model.encoder.layers.named_children()]

    def scope_predicate(self, scope):
        return _pattern_predicate(_torchvision_vit_roles(self.check_scope(scope)))

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
    family, kind, scopes, default_scope = "mobilenetv1", "mobilenet", MOBILENET_SCOPES, "conv_fc"
    rows = "sample"

    def matches(self, model):
        from timm.models.efficientnet import EfficientNet

        return isinstance(model, EfficientNet) and all(
            type(block).__name__ == "DepthwiseSeparableConv" for stage in model.blocks for block in stage)

    def block_names(self, model):
        return [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]

    def scope_predicate(self, scope):
        return _mobilenet_predicate(self.check_scope(scope))

    def _embed(self, model, images):
        return model.bn1(model.conv_stem(images))

    def _blocks(self, model):
        return [block for stage in model.blocks for block in stage]

    def _head(self, model, x):
        return model.forward_head(model.bn2(model.conv_head(x)))


ADAPTERS: tuple[ModelAdapter, ...] = (TimmViTAdapter(), TorchvisionViTAdapter(), MobileNetV1Adapter())


def adapter_for(model: nn.Module) -> ModelAdapter:
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise ValueError(f"unsupported model class {type(model).__name__}; supported: timm VisionTransformer, "
                     f"torchvision VisionTransformer, timm mobilenetv1 (EfficientNet with depthwise-separable blocks)")


def _block_output(output, kind: str, batch_size: int) -> torch.Tensor:
    """A tuple output takes its first element; a sequence-first (T, B, D) output is made batch-first."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if kind == "vit" and output.dim() == 3 and output.shape[0] != batch_size and output.shape[1] == batch_size:
        output = output.transpose(0, 1)
    return output


def forward_with_hooks(model: nn.Module, images: torch.Tensor, block_names: Sequence[str],
                       kind: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and block outputs captured with forward hooks (eager; the reference's way)."""
    modules = dict(model.named_modules())
    missing = [name for name in block_names if name not in modules]
    if missing:
        raise ValueError(f"block names not found in the model: {missing[:5]}")
    captured: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_hook(
        lambda _module, _inputs, output, name=name: captured.__setitem__(
            name, _block_output(output, kind, images.shape[0])))
        for name in block_names]
    try:
        logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    return logits, [captured[name] for name in block_names]


# ----------------------------------------------------------------------------- names and building
def infer_model_kind(model_name: str) -> str:
    """``"vit"`` or ``"mobilenet"``; ``ValueError`` for an unsupported name."""
    from starfish_fast.bundled import BUNDLED_MODEL_NAME

    if model_name in TORCHVISION_MODELS or model_name in TIMM_VIT_MODELS or model_name == BUNDLED_MODEL_NAME:
        return "vit"
    if model_name in MOBILENET_MODELS:
        return "mobilenet"
    raise ValueError(f"unsupported model name {model_name!r}; supported: "
                     f"{', '.join(supported_model_names())}")


def supported_model_names() -> list[str]:
    from starfish_fast.bundled import BUNDLED_MODEL_NAME

    return [*TORCHVISION_MODELS, *TIMM_VIT_MODELS, *MOBILENET_MODELS, BUNDLED_MODEL_NAME]


def build_empty_model(model_name: str) -> nn.Module:
    """The architecture with random weights (timm ``pretrained=False, num_classes=1000``; torchvision ``weights=None``)."""
    infer_model_kind(model_name)
    from starfish_fast.bundled import BUNDLED_MODEL_NAME, build_bundled_model

    if model_name == BUNDLED_MODEL_NAME:
        return build_bundled_model()
    if model_name in TORCHVISION_MODELS:
        import torchvision

        return getattr(torchvision.models, model_name)(weights=None)
    import timm

    return timm.create_model(model_name, pretrained=False, num_classes=1000)


def all_block_names(model_name: str, model: nn.Module) -> list[str]:
    """Every block of the model: ``blocks.{i}``, ``encoder.layers.encoder_layer_{i}`` or ``blocks.{stage}.{idx}``."""
    infer_model_kind(model_name)
    return adapter_for(model).block_names(model)


def default_prune_scope(model_name: str) -> str:
    return "conv_fc" if infer_model_kind(model_name) == "mobilenet" else "qkv_out_mlp"


def is_prunable_weight(model_name: str, prune_scope: str) -> WeightPredicate:
    """Predicate ``(module_name, module) -> bool`` selecting the weights a scope masks and trains."""
    kind = infer_model_kind(model_name)
    if prune_scope == "auto":
        prune_scope = default_prune_scope(model_name)
    if kind == "mobilenet":
        return MobileNetV1Adapter().scope_predicate(prune_scope)
    if model_name in TORCHVISION_MODELS:
        return TorchvisionViTAdapter().scope_predicate(prune_scope)
    return TimmViTAdapter().scope_predicate(prune_scope)


def prunable_weights(model: nn.Module, predicate: WeightPredicate) -> dict[str, nn.Parameter]:
    """``{state_dict key: parameter}`` of every weight the predicate selects, in module order."""
    selected = {}
    for name, module in model.named_modules():
        if predicate(name, module):
            key, tensor = get_weight_key_and_tensor(name, module)
            if key is not None:
                selected[key] = tensor
    return selected


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` (e.g. ``blocks.0.mlp.fc1``) by ``module``."""
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)


def freeze_all(model: nn.Module) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def enable_grad_checkpointing(model: nn.Module) -> bool:
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
        return True
    return False


def force_mobilenet_str_runtime(model: nn.Module) -> None:
    """Replace every activation module named ``act`` that is ReLU6 with ReLU, in place (STR checkpoints use ReLU)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name == "act" and isinstance(child, nn.ReLU6):
                setattr(module, child_name, nn.ReLU(inplace=child.inplace))


def _str_to_timm_mobilenet(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an STR-format MobileNetV1 state dict onto timm ``mobilenetv1_100`` keys."""
    converted = {}
    stage_of = [(s, i) for s, count in enumerate(MOBILENET_STAGE_LAYOUT) for i in range(count)]
    parts = {"0": "conv_dw", "1": "bn1", "3": "conv_pw", "4": "bn2"}
    for key, value in state.items():
        match = re.fullmatch(r"model\.(\d+)\.(\d+)\.(.+)", key)
        if key.startswith("fc."):
            name = key[len("fc."):]
            converted[f"classifier.{name}"] = value.flatten(1) if name == "weight" and value.dim() == 4 else value
        elif match and match.group(1) == "0":
            part = {"0": "conv_stem", "1": "bn1"}.get(match.group(2))
            if part is None:
                raise ValueError(f"STR checkpoint: unexpected stem key {key!r}")
            converted[f"{part}.{match.group(3)}"] = value
        elif match:
            block = int(match.group(1))
            if not 1 <= block <= len(stage_of) or match.group(2) not in parts:
                raise ValueError(f"STR checkpoint: unexpected key {key!r}")
            stage, index = stage_of[block - 1]
            converted[f"blocks.{stage}.{index}.{parts[match.group(2)]}.{match.group(3)}"] = value
        else:
            raise ValueError(f"STR checkpoint: unexpected key {key!r}")
    if "classifier.bias" not in converted:
        converted["classifier.bias"] = torch.zeros_like(model.classifier.bias)
    return converted


class CheckpointMismatchError(ValueError, RuntimeError):
    """A checkpoint whose keys or shapes differ from the model's. A ``RuntimeError`` like torch's strict
    ``load_state_dict`` error (what reference callers catch), and a ``ValueError`` like our other bad inputs."""


def load_model(model_name: str, checkpoint_path: str | os.PathLike, device: str | torch.device,
               allow_unsafe_pickle: bool = False) -> nn.Module:
    """Build ``model_name``, load a plain state dict or ``{"state_dict": ...}`` strictly, move to
    ``device``, eval mode. ``mobilenetv1_100`` also accepts STR-format checkpoints (then ReLU6 -> ReLU)."""
    from starfish_fast.checkpoint import load_tensor_file

    model = build_empty_model(model_name)
    state = load_tensor_file(checkpoint_path, allow_unsafe_pickle=allow_unsafe_pickle)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{checkpoint_path}: expected a state dict (str -> tensor) or {{'state_dict': ...}}")
    is_str_format = model_name in MOBILENET_MODELS and any(key.startswith("model.") for key in state)
    if is_str_format:
        state = _str_to_timm_mobilenet(state, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointMismatchError(f"{checkpoint_path} does not fit {model_name}: {error}") from None
    if is_str_format:
        force_mobilenet_str_runtime(model)
    return model.to(device).eval()
