"""The reference library's Python API, name for name, on top of the engine.

    from starfish_fast.compat import RecoveryConfig, starfish_recovery     # was: from recovery import ...
    history = starfish_recovery(pruned_model=pruned, dense_model=dense, kind="vit", block_names=blocks,
                                masks=masks, calib_batches=batches, device="cpu",
                                is_prunable_weight=is_prunable_weight("deit_tiny_patch16_224", "qkv_out_mlp"),
                                config=RecoveryConfig(epochs=10, lr=6e-4, min_lr=1e-6, lr_schedule="cosine",
                                                      weight_decay=0.0, grad_clip=0.0, store_dense_float16=True))

Everything here maps names and defaults onto the engine (``heal`` in exact mode,
the adapters, the mask and data modules); it holds no healing logic of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from starfish_fast.checkpoint import save_recovered_checkpoint
from starfish_fast.config import HealConfig
from starfish_fast.data import build_transform, cache_calibration_data, make_calibration_loader, make_eval_loader
from starfish_fast.engine import heal
from starfish_fast.evaluate import evaluate_top1
from starfish_fast.masks import apply_masks, load_masks, mask_density, model_nonzero_fraction, register_zero_freeze_hooks
from starfish_fast.models import (adapter_for, all_block_names, build_empty_model, default_prune_scope,
                                  enable_grad_checkpointing, force_mobilenet_str_runtime, forward_with_hooks,
                                  freeze_all, get_weight_key_and_tensor, infer_model_kind, is_prunable_weight,
                                  load_model)
from starfish_fast.objectives import block_cosine_loss


__all__ = [  # the reference library's public names
    "RecoveryConfig", "starfish_recovery", "extract_representations", "build_dense_targets", "LazyDenseTargets",
    "cosine_alignment_loss", "load_masks", "apply_masks", "register_zero_freeze_hooks", "freeze_all",
    "get_weight_key_and_tensor", "mask_density", "model_nonzero_fraction", "infer_model_kind", "build_empty_model",
    "load_model", "force_mobilenet_str_runtime", "all_block_names", "is_prunable_weight", "default_prune_scope",
    "enable_grad_checkpointing", "build_transform", "make_calibration_loader", "make_eval_loader",
    "cache_calibration_data", "evaluate_top1", "save_recovered_checkpoint",
]


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
    try:
        adapter = adapter_for(model)
    except ValueError:
        logits, reps = forward_with_hooks(model, images, block_names, kind)
    else:
        logits, reps = adapter.forward_blocks(model, images, block_names)
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
        teacher_store="recompute" if config.no_dense_cache else "memory",
        teacher_dtype="fp32" if teacher_fp32 else "fp16", device=str(device), progress=False)
    result = heal(pruned_model, dense_model, masks, list(calib_batches), heal_config, block_names=block_names,
                  predicate=is_prunable_weight)
    return result.history
