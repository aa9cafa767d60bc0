"""Export a healed model for inference: dense-with-zeros safetensors, or 2:4 sparse linears on a GPU.

    from starfish_fast.export import export_dense, load_exported, export_semi_structured
    export_dense(model, masks, "healed.safetensors", {"model_name": "deit_base_patch16_224"})
    masks, metadata = load_exported("healed.safetensors", model)    # loads the weights into `model`
    sparse_model = export_semi_structured(model.cuda(), masks, dtype=torch.bfloat16)
    logits = sparse_model(images.cuda().bfloat16())                 # linears hold SparseSemiStructuredTensor weights

The safetensors file holds the full state dict (masked weights exactly zero), every mask as a bool
tensor named ``mask.<weight key>``, and metadata as JSON strings: the caller's entries plus
``format`` and ``mask_density``. Any safetensors reader can load the weights alone.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from typing import Mapping

import torch
from torch import nn

from starfish_fast.checkpoint import save_safetensors_atomic
from starfish_fast.masks import mask_density
from starfish_fast.sparse24 import choose_backend, restore_linears

log = logging.getLogger(__name__)

MASK_PREFIX = "mask."
EXPORT_FORMAT = "starfish_fast.dense_with_zeros.v1"
RESERVED_METADATA = ("format", "mask_density")


def _bool_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks as CPU bool tensors, checked against the model's state dict (name, shape, 0/1)."""
    state = model.state_dict()
    checked = {}
    for key, mask in masks.items():
        if key not in state:
            raise ValueError(f"mask {key!r} names no tensor of the model's state dict")
        if tuple(mask.shape) != tuple(state[key].shape):
            raise ValueError(f"mask {key!r} has shape {tuple(mask.shape)} but the weight has {tuple(state[key].shape)}")
        if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"mask {key!r} is not binary (0/1 or bool)")
        checked[key] = mask.detach().to("cpu", torch.bool)
    return checked


def export_dense(model: nn.Module, masks: Mapping[str, torch.Tensor], path: str | os.PathLike,
                 metadata: Mapping | None = None) -> None:
    """Write the state dict with masked weights zeroed, the masks and JSON metadata to a
    safetensors file (atomically). Masked positions that are not zero in the model are zeroed in
    the file, with a warning: a healed model should already have them at zero."""
    metadata = dict(metadata or {})
    clash = [key for key in RESERVED_METADATA if key in metadata]
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved by the export format")
    bool_masks = _bool_masks(model, masks)
    tensors = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    if any(key.startswith(MASK_PREFIX) for key in tensors):
        raise ValueError(f"the model has state-dict keys starting with {MASK_PREFIX!r}; they would clash with masks")
    for key, mask in bool_masks.items():
        stray = int(torch.count_nonzero(tensors[key][~mask]))
        if stray:
            log.warning("%s: %d masked weights were not zero; the export zeroes them", key, stray)
        tensors[key] = torch.where(mask, tensors[key], torch.zeros((), dtype=tensors[key].dtype))
        tensors[MASK_PREFIX + key] = mask
    header = {key: json.dumps(value, default=str) for key, value in metadata.items()}
    header["format"] = json.dumps(EXPORT_FORMAT)
    header["mask_density"] = json.dumps(mask_density(bool_masks))
    save_safetensors_atomic(tensors, path, metadata=header)


def load_exported(path: str | os.PathLike, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """Load an ``export_dense`` file into ``model`` (strictly); returns its bool masks and metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"file {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if json.loads(header.get("format", "null")) != EXPORT_FORMAT:
        raise ValueError(f"{path} is not a starfish_fast export (metadata format {header.get('format')!r}, "
                         f"expected {EXPORT_FORMAT!r})")
    tensors = load_file(str(path))
    masks = {key[len(MASK_PREFIX):]: value for key, value in tensors.items() if key.startswith(MASK_PREFIX)}
    model.load_state_dict({key: value for key, value in tensors.items() if not key.startswith(MASK_PREFIX)},
                          strict=True)
    metadata = {key: json.loads(value) for key, value in header.items()}
    return masks, metadata


def export_semi_structured(model: nn.Module, masks: Mapping[str, torch.Tensor],
                           dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of ``model`` (in ``dtype`` if given) whose ``nn.Linear`` layers with a 2:4 mask hold
    ``SparseSemiStructuredTensor`` weights; other layers stay dense (logged with the reason).
    Needs the model on a CUDA GPU with a 2:4 backend and fp16/bf16 weights; ``RuntimeError``
    naming the reason when not a single linear can be converted."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise RuntimeError(f"export_semi_structured needs the model on a CUDA GPU (it is on {device}): "
                           f"2:4 sparse kernels are CUDA-only; use export_dense for a portable file")
    exported = copy.deepcopy(model).eval()
    restore_linears(exported)
    if dtype is not None:
        exported.to(dtype)
    converted, kept_dense = [], {}
    for name, module in exported.named_modules():
        key = f"{name}.weight"
        # exact type: nn.MultiheadAttention's out_proj subclass is read by fused kernels, never called
        if type(module) is not nn.Linear or key not in masks:
            continue
        mask = masks[key].to(device=device, dtype=torch.bool)
        backend, reason = choose_backend(module.weight, mask)
        if backend is None:
            kept_dense[key] = reason
            continue
        with torch.no_grad():
            packed = backend.from_dense((module.weight * mask).contiguous())
        module.weight = nn.Parameter(packed, requires_grad=False)
        converted.append(key)
    if not converted:
        reasons = sorted(set(kept_dense.values())) or ["no nn.Linear weight has a mask"]
        raise RuntimeError(f"no linear layer could hold 2:4 weights: {'; '.join(reasons[:3])}")
    log.info("2:4 export: %d linears sparse, %d kept dense%s", len(converted), len(kept_dense),
             "".join(f"\n  {key}: {reason}" for key, reason in kept_dense.items()))
    return exported
