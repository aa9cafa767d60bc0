"""The reference library's Python API, name for name, on top of the engine: change the import, keep the script.

    import copy, torch
    from starfish_fast.compat import (RecoveryConfig, all_block_names, build_empty_model, is_prunable_weight,
                                      starfish_recovery)             # was: from recovery import ... (reference)
    from starfish_fast.prune import magnitude_masks
    dense = build_empty_model("deit_tiny_patch16_224")
    pruned = copy.deepcopy(dense)
    masks = magnitude_masks(pruned, 0.5, scope="qkv_out_mlp")         # or load_masks(path, pruned, predicate)
    history = starfish_recovery(pruned_model=pruned, dense_model=dense, kind="vit",
                                block_names=all_block_names("deit_tiny_patch16_224", pruned), masks=masks,
                                calib_batches=[torch.randn(4, 3, 224, 224)], device="cpu",
                                is_prunable_weight=is_prunable_weight("deit_tiny_patch16_224", "qkv_out_mlp"),
                                config=RecoveryConfig(epochs=1, lr=6e-4, min_lr=1e-6, lr_schedule="cosine",
                                                      weight_decay=0.0, grad_clip=0.0, store_dense_float16=True))
    # history == [{"epoch": 1.0, "loss": ...}]

Everything here maps names and defaults onto the library (``heal`` in exact mode, the model
adapters, the mask, checkpoint and data modules); it holds no healing logic of its own. Loading
stays safe: ``torch_load``/``load_checkpoint_into_model`` unpickle only with ``allow_unsafe_pickle=True``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from starfish_fast.checkpoint import extract_state_dict, load_tensor_file, save_recovered_checkpoint
from starfish_fast.config import HealConfig
from starfish_fast.data import (HFImageStream, build_transform, cache_calibration_data, make_calibration_loader,
                                make_eval_loader, make_hf_loader)
from starfish_fast.engine import heal
from starfish_fast.evaluate import evaluate_top1
from starfish_fast.masks import apply_masks, load_masks, mask_density, model_nonzero_fraction, register_zero_freeze_hooks
from starfish_fast.models import (MOBILENET_MODEL, MOBILENET_SCOPES, SUPPORTED_VIT_MODELS, VIT_SCOPES, adapter_for,
                                  all_block_names, build_empty_model, default_prune_scope, enable_grad_checkpointing,
                                  force_mobilenet_str_runtime, forward_with_hooks, freeze_all,
                                  get_weight_key_and_tensor, infer_model_kind, is_prunable_weight, load_model)
from starfish_fast.models.scopes import mobilenet_predicate, timm_vit_predicate, torchvision_vit_predicate
from starfish_fast.objectives import block_cosine_loss


__all__ = [  # the reference library's public names
    "RecoveryConfig", "starfish_recovery", "extract_representations", "build_dense_targets", "LazyDenseTargets",
    "cosine_alignment_loss", "load_masks", "apply_masks", "register_zero_freeze_hooks", "freeze_all",
    "get_weight_key_and_tensor", "mask_density", "model_nonzero_fraction", "infer_model_kind", "build_empty_model",
    "load_model", "force_mobilenet_str_runtime", "all_block_names", "is_prunable_weight", "default_prune_scope",
    "enable_grad_checkpointing", "build_transform", "make_calibration_loader", "make_eval_loader", "make_hf_loader",
    "HFImageStream", "cache_calibration_data", "evaluate_top1", "save_recovered_checkpoint",
    "forward_vit_with_tokens", "forward_cnn_with_activations", "normalize_vit_block_output", "flatten_activation",
    "flatten_for_cosine", "is_prunable_vit", "is_prunable_mobilenet", "torch_load", "extract_state_dict",
    "load_checkpoint_into_model",
    "SUPPORTED_VIT_MODELS", "MOBILENET_MODEL", "VIT_PRUNE_SCOPES", "MOBILENET_PRUNE_SCOPES", "STATE_DICT_KEY",
]

VIT_PRUNE_SCOPES = VIT_SCOPES
MOBILENET_PRUNE_SCOPES = MOBILENET_SCOPES
STATE_DICT_KEY = "state_dict"


@dataclass
class RecoveryConfig:
    epochs: int
    lr: float
    min_lr: float
    lr_schedule: str
    weight_decay: float
    grad_clip: float
    store_dense_float16: bool
    no_dense_cache: bool = False


def _per(kind: str) -> str:
    if kind not in ("vit", "mobilenet"):
        raise ValueError(f"unknown model kind {kind!r}; allowed: vit, mobilenet")
    return "token" if kind == "vit" else "sample"


def extract_representations(model: nn.Module, *, kind: str, block_names: Sequence[str],
                            images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward pass: logits and each block's output (batch-first)."""
    _per(kind)
    logits, reps = adapter_for(model, block_names).forward_blocks(model, images, block_names)
    return logits, dict(zip(block_names, reps))


def _teacher(dense_model: nn.Module, kind: str, block_names: Sequence[str], images: torch.Tensor):
    _, reps = extract_representations(dense_model, kind=kind, block_names=block_names, images=images)
    return reps


@torch.no_grad()
def build_dense_targets(dense_model: nn.Module, *, kind: str, block_names: Sequence[str],
                        calib_batches: Sequence[torch.Tensor], device, store_float16: bool = True) -> list[dict]:
    """Teacher block outputs for every batch, on the CPU, fp16 unless told otherwise."""
    dense_model.eval()
    dtype = torch.float16 if store_float16 else torch.float32
    return [{name: rep.to("cpu", dtype) for name, rep in
             _teacher(dense_model, kind, block_names, batch.to(device)).items()} for batch in calib_batches]


class LazyDenseTargets:
    """The same targets, recomputed on access (no cache)."""

    def __init__(self, dense_model: nn.Module, *, kind: str, block_names: Sequence[str],
                 calib_batches: Sequence[torch.Tensor], device):
        self.dense_model, self.kind, self.block_names = dense_model, kind, list(block_names)
        self.calib_batches, self.device = calib_batches, device

    def __len__(self) -> int:
        return len(self.calib_batches)

    @torch.no_grad()
    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.dense_model.eval()
        return _teacher(self.dense_model, self.kind, self.block_names, self.calib_batches[index].to(self.device))


def cosine_alignment_loss(pruned_reps: Mapping[str, torch.Tensor], dense_reps: Mapping[str, torch.Tensor],
                          block_names: Sequence[str]) -> torch.Tensor:
    """Mean over blocks of mean over rows of 1 - cos; per token for (B, T, D), per image otherwise."""
    return block_cosine_loss([pruned_reps[name] for name in block_names], [dense_reps[name] for name in block_names])


def starfish_recovery(*, pruned_model: nn.Module, dense_model: nn.Module, kind: str, block_names: Sequence[str],
                      masks: Mapping[str, torch.Tensor], calib_batches: Sequence[torch.Tensor], device,
                      is_prunable_weight, config: RecoveryConfig) -> list[dict[str, float]]:
    """Run recovery in place (exact mode); one ``{"epoch", "loss"}`` per epoch; model left in eval mode."""
    if config.epochs <= 0:
        raise ValueError(f"epochs must be positive, got {config.epochs}")
    if not calib_batches:
        raise ValueError("calib_batches is empty")
    teacher_fp32 = config.no_dense_cache or not config.store_dense_float16
    heal_config = HealConfig(
        epochs=config.epochs, lr=config.lr, min_lr=config.min_lr, lr_schedule=config.lr_schedule,
        weight_decay=config.weight_decay, grad_clip=config.grad_clip, mode="exact", cosine_per=_per(kind),
        finish="none",                                        # the reference trains with its one objective
        teacher_store="recompute" if config.no_dense_cache else "device",
        teacher_dtype="fp32" if teacher_fp32 else "fp16", device=str(device), progress=False)
    result = heal(pruned_model, dense_model, masks, list(calib_batches), heal_config, block_names=block_names,
                  predicate=is_prunable_weight)
    return result.history


# ----------------------------------------------------------------------------- block outputs (forward hooks)
def normalize_vit_block_output(output, *, batch_size: int) -> torch.Tensor:
    """A ViT block's output as ``(B, T, D)``: a tuple's first element; ``(T, B, D)`` is transposed."""
    if isinstance(output, tuple):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"ViT block output is a {type(output).__name__}, expected a tensor")
    if output.dim() != 3:
        raise ValueError(f"ViT block output must be 3-D (B, T, D), got shape {tuple(output.shape)}")
    if output.shape[0] == batch_size:
        return output
    if output.shape[1] == batch_size:
        return output.transpose(0, 1)                                   # (T, B, D) -> (B, T, D)
    raise ValueError(f"no dimension of ViT block output {tuple(output.shape)} matches the batch size {batch_size}")


def flatten_activation(activation: torch.Tensor) -> torch.Tensor:
    """A CNN activation ``(B, C, H, W)`` as ``(B, C*H*W)``."""
    if activation.dim() != 4:
        raise ValueError(f"CNN activation must be 4-D (B, C, H, W), got shape {tuple(activation.shape)}")
    return activation.flatten(1)                                        # (B, C*H*W)


def flatten_for_cosine(tensor: torch.Tensor) -> torch.Tensor:
    """The rows the STARFISH cosine compares: 2-D as is, ``(B, T, D)`` per token, ``(B, C, H, W)`` per image."""
    if tensor.dim() == 2:
        return tensor
    if tensor.dim() == 3:
        return tensor.reshape(-1, tensor.shape[-1])                     # (B*T, D)
    if tensor.dim() == 4:
        return tensor.flatten(1)                                        # (B, C*H*W)
    raise ValueError(f"cannot flatten a {tensor.dim()}-D tensor {tuple(tensor.shape)} for the cosine; "
                     f"expected 2-D, 3-D (B, T, D) or 4-D (B, C, H, W)")


def _hooked_outputs(model: nn.Module, block_names: Sequence[str], images: torch.Tensor):
    """Logits and each named block's output as produced (a tuple's first element), by forward hooks."""
    try:
        # kind "generic" keeps the outputs as produced; the caller applies the ViT/CNN rules (and their errors)
        return forward_with_hooks(model, images, block_names)
    except KeyError as error:                   # forward_with_hooks: a hooked block that never ran
        if not error.args or error.args[0] not in block_names:
            raise
        raise RuntimeError(f"block {error.args[0]!r} produced no output in the forward pass") from None


def forward_vit_with_tokens(model: nn.Module, block_names: Sequence[str],
                            images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and ``{block name: (B, T, D)}`` by forward hooks (``ValueError`` for an unknown name)."""
    logits, outputs = _hooked_outputs(model, block_names, images)
    return logits, {name: normalize_vit_block_output(output, batch_size=images.shape[0])
                    for name, output in zip(block_names, outputs)}


def forward_cnn_with_activations(model: nn.Module, block_names: Sequence[str],
                                 images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and ``{block name: (B, C*H*W)}`` by forward hooks (``ValueError`` for an unknown name)."""
    logits, outputs = _hooked_outputs(model, block_names, images)
    return logits, {name: flatten_activation(output) for name, output in zip(block_names, outputs)}


# ----------------------------------------------------------------------------- scope predicates
def _check_scope(prune_scope: str, allowed: Sequence[str]) -> None:
    if prune_scope not in allowed:
        raise ValueError(f"unknown prune scope {prune_scope!r}; allowed: {', '.join(allowed)}")


def is_prunable_vit(name: str, module: nn.Module, prune_scope: str) -> bool:
    """Whether a timm or torchvision ViT module's weight is masked and trained in ``prune_scope``."""
    _check_scope(prune_scope, VIT_PRUNE_SCOPES)
    return timm_vit_predicate(prune_scope)(name, module) or torchvision_vit_predicate(prune_scope)(name, module)


def is_prunable_mobilenet(name: str, module: nn.Module, prune_scope: str) -> bool:
    """Whether a MobileNetV1 module's weight is masked and trained in ``prune_scope``."""
    _check_scope(prune_scope, MOBILENET_PRUNE_SCOPES)
    return mobilenet_predicate(prune_scope)(name, module)


# ----------------------------------------------------------------------------- loading
def _to_device(obj, device: torch.device):
    """Tensors and modules in ``obj`` (nested mappings, lists, tuples) moved to ``device``."""
    if isinstance(obj, (torch.Tensor, nn.Module)):
        return obj.to(device)
    if isinstance(obj, Mapping):
        moved = copy.copy(obj)                  # keeps the type and an OrderedDict state dict's _metadata
        for key, value in obj.items():
            moved[key] = _to_device(value, device)
        return moved
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(value, device) for value in obj)
    return obj


def torch_load(path, map_location="cpu", *, allow_unsafe_pickle: bool = False):
    """A ``torch.save`` (or safetensors) file, on ``map_location`` (a device). Safe by default
    (``weights_only=True``); ``allow_unsafe_pickle=True`` unpickles, as the reference does: trusted files only."""
    if not isinstance(map_location, (str, torch.device)) and map_location is not None:
        raise ValueError(f"map_location must be a device (str or torch.device), got {type(map_location).__name__}")
    loaded = load_tensor_file(path, allow_unsafe_pickle=allow_unsafe_pickle)    # on the CPU
    device = torch.device(map_location or "cpu")
    return loaded if device.type == "cpu" else _to_device(loaded, device)


def load_checkpoint_into_model(model: nn.Module, path, *, strict: bool = True,
                               allow_unsafe_pickle: bool = False) -> nn.Module:
    """``model`` with the checkpoint's state dict loaded (plain or ``{"state_dict": ...}``); a pickled
    module (only loaded with ``allow_unsafe_pickle=True``) is returned as is."""
    checkpoint = torch_load(path, allow_unsafe_pickle=allow_unsafe_pickle)
    state = extract_state_dict(checkpoint)
    if state is None:
        return checkpoint
    model.load_state_dict(state, strict=strict)
    return model
