"""Mask files: load, validate, apply, and keep pruned weights at zero.

    from starfish_fast.masks import load_masks, apply_masks
    masks = load_masks("masks.pt", model, is_prunable_weight("deit_tiny_patch16_224", "qkv_out_mlp"))
    apply_masks(model, masks)          # masked weights are now exactly zero

A mask file is a ``dict[str, Tensor]`` (``torch.save`` or safetensors) keyed by
``state_dict`` weight names, each a bool or 0/1 tensor of the weight's shape
(1 = keep and train, 0 = zero and freeze). Keys outside the scope are ignored. The ``.safetensors`` files
starfish_fast writes hold them bit-packed (``packed_masks``); they load as bool tensors.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import nn

from starfish_fast.checkpoint import key_examples, load_tensor_file
from starfish_fast.models import WeightPredicate, prunable_weights


def check_mask_shapes(found: Mapping[str, tuple], expected: Mapping[str, tuple], source: str) -> None:
    """The masks' keys and shapes (``found``; from a file's header where the tensors stay on disk) cover the
    scope's weights (``expected``)."""
    if not any(key in found for key in expected):
        raise ValueError(f"{source}: no mask key matches the prune scope; expected keys like "
                         f"{key_examples(expected)}; found keys like {key_examples(found)}")
    missing = [key for key in expected if key not in found]
    if missing:
        raise ValueError(f"{source}: {len(missing)} prunable weights of the scope have no mask: "
                         f"{key_examples(missing)}")
    for key, shape in expected.items():
        if tuple(found[key]) != tuple(shape):
            raise ValueError(f"{source}: mask {key!r} has shape {tuple(found[key])} but the weight has shape "
                             f"{tuple(shape)}")


def validate_masks(raw, model: nn.Module, is_trainable_weight: WeightPredicate,
                   source: str = "masks") -> dict[str, torch.Tensor]:
    """Check a mask mapping against the model's prunable weights; float32 0/1 CPU masks for the scope."""
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"{source}: expected a non-empty dict of weight name -> tensor, got "
                         f"{type(raw).__name__}{' (empty)' if isinstance(raw, Mapping) else ''}")
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{source}: expected str -> tensor entries, found {key!r}: {type(value).__name__}")
    expected = prunable_weights(model, is_trainable_weight)
    check_mask_shapes({key: tuple(value.shape) for key, value in raw.items()},
                      {key: tuple(weight.shape) for key, weight in expected.items()}, source)
    masks = {}
    for key in expected:
        value = raw[key].detach().cpu()
        if value.dtype != torch.bool:
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"{source}: mask {key!r} has non-finite values (NaN or inf)")
            if not ((value == 0) | (value == 1)).all():
                bad = value[(value != 0) & (value != 1)].flatten()[:3].tolist()
                raise ValueError(f"{source}: mask {key!r} is not binary (values such as {bad}); allowed: 0/1 or bool")
        masks[key] = value.to(torch.float32)
    return masks


def load_masks(path: str | os.PathLike, model: nn.Module, is_trainable_weight: WeightPredicate,
               *, allow_unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load and validate a mask file; masks come back float32 0/1 on the CPU (``ValueError`` on a bad file)."""
    raw = load_tensor_file(path, allow_unsafe_pickle=allow_unsafe_pickle)
    return validate_masks(raw, model, is_trainable_weight, source=str(path))


def _weights_by_key(model: nn.Module, keys) -> dict[str, torch.Tensor]:
    state = dict(model.named_parameters())
    missing = [key for key in keys if key not in state]
    if missing:
        raise ValueError(f"mask keys not found among the model's parameters: {key_examples(missing)}")
    return {key: state[key] for key in keys}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Multiply each masked weight by its mask, in place."""
    for key, weight in _weights_by_key(model, masks).items():
        weight.mul_(masks[key].to(device=weight.device, dtype=weight.dtype))


def register_zero_freeze_hooks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> list:
    """Gradient hooks that multiply each masked weight's gradient by its mask."""
    handles = []
    for key, weight in _weights_by_key(model, masks).items():
        mask = masks[key].to(device=weight.device, dtype=weight.dtype)
        handles.append(weight.register_hook(lambda grad, mask=mask: grad * mask))
    return handles


def mask_density(masks: Mapping[str, torch.Tensor]) -> float:
    """Kept fraction over all mask entries."""
    kept = sum(float(mask.float().sum()) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    return kept / total if total else float("nan")


def model_nonzero_fraction(model: nn.Module) -> float:
    """Non-zero fraction over all parameters of the model."""
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    return nonzero / total if total else float("nan")


def keep_largest(scores: torch.Tensor, n_prune: int, dim: int | None = None) -> torch.Tensor:
    """Bool keep-mask removing exactly the ``n_prune`` lowest scores along ``dim`` (or overall)."""
    values = scores.flatten() if dim is None else scores
    axis = -1 if dim is None else dim
    keep = torch.ones_like(values, dtype=torch.bool)
    if n_prune:
        keep.scatter_(axis, torch.topk(values, n_prune, dim=axis, largest=False, sorted=False).indices, False)
    return keep.view(scores.shape)
