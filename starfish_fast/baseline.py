"""The reference library's recovery loop, written plainly from its documented semantics: the
independent check for ``compat.starfish_recovery`` and the baseline of ``bench/bench_heal.py``.

    from starfish_fast.baseline import reference_recovery
    history, step_seconds = reference_recovery(pruned, dense, "vit", block_names, masks, batches,
                                               predicate, config, device="cpu")

It does what the reference does, in the reference's way: forward hooks for block
outputs, fp32 eager, a fp16 teacher cache in ordinary (non-pinned) CPU memory copied
to the device every step, gradient-masking hooks, non-foreach Adam/AdamW, per-step
``CosineAnnealingLR``, masks re-applied after every step, ``loss.item()`` every step.
It shares no code with the engine on purpose.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _capture(model: nn.Module, batch: torch.Tensor, block_names: Sequence[str]) -> dict[str, torch.Tensor]:
    outputs, handles = {}, []
    named = dict(model.named_modules())
    for name in block_names:
        def hook(_module, _inputs, out, name=name):
            out = out[0] if isinstance(out, tuple) else out
            outputs[name] = out
        handles.append(named[name].register_forward_hook(hook))
    try:
        model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _loss(reps, targets, block_names, kind) -> torch.Tensor:
    per_block = []
    for name in block_names:
        s, t = reps[name], targets[name].to(reps[name].dtype)
        if kind == "vit":
            s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])        # (B*T, D)
        else:
            s, t = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)          # (B, C*H*W)
        cos = (F.normalize(s, dim=1, eps=1e-12) * F.normalize(t, dim=1, eps=1e-12)).sum(1)
        per_block.append((1 - cos).mean())
    return torch.stack(per_block).mean()


def _weight_of(name: str, module: nn.Module):
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return module.weight
    if isinstance(module, nn.MultiheadAttention):
        return module.in_proj_weight
    return None


def reference_recovery(pruned: nn.Module, dense: nn.Module, kind: str, block_names: Sequence[str],
                       masks: dict[str, torch.Tensor], calib_batches: Sequence[torch.Tensor], is_prunable,
                       config, device: str | torch.device = "cpu") -> tuple[list[dict[str, float]], list[float]]:
    """(per-epoch history, wall seconds of every step). ``config`` has the ``RecoveryConfig`` fields."""
    device = torch.device(device)
    pruned.to(device)
    dense.to(device).eval()
    with torch.no_grad():
        targets = [{k: v.to("cpu", torch.float16) for k, v in _capture(dense, b.to(device), block_names).items()}
                   for b in calib_batches]
    for p in pruned.parameters():
        p.requires_grad_(False)
    params = []
    for name, module in pruned.named_modules():
        weight = _weight_of(name, module) if is_prunable(name, module) else None
        if weight is not None:
            weight.requires_grad_(True)
            params.append(weight)
    state = dict(pruned.named_parameters())
    device_masks = {key: mask.to(device, torch.float32) for key, mask in masks.items() if key in state}
    with torch.no_grad():
        for key, mask in device_masks.items():
            state[key].mul_(mask)
    for key, mask in device_masks.items():
        state[key].register_hook(lambda g, m=mask: g * m)
    if config.weight_decay == 0:
        optimizer = torch.optim.Adam(params, lr=config.lr, foreach=False)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, foreach=False)
    total = config.epochs * len(calib_batches)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=config.min_lr) \
        if config.lr_schedule == "cosine" else None
    pruned.train()
    history, step_seconds = [], []
    for epoch in range(config.epochs):
        losses = []
        for batch, target in zip(calib_batches, targets):
            start = time.perf_counter()
            target = {k: v.to(device) for k, v in target.items()}          # the per-step host-to-device copy
            reps = _capture(pruned, batch.to(device), block_names)
            loss = _loss(reps, target, block_names, kind)
            optimizer.zero_grad()
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            with torch.no_grad():
                for key, mask in device_masks.items():
                    state[key].mul_(mask)
            losses.append(loss.item())                                      # the per-step host sync
            step_seconds.append(time.perf_counter() - start)
        history.append({"epoch": float(epoch + 1), "loss": sum(losses) / len(losses)})
    pruned.eval()
    return history, step_seconds
