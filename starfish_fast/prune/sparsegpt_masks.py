"""SparseGPT's masks (the algorithm, its order and its cost: ``starfish_fast.sparsegpt``): chosen column
block by column block while the kept weights are updated, which ``sparsegpt_prune`` leaves in the model.

    from starfish_fast.prune import sparsegpt_prune
    masks = sparsegpt_prune(model, 0.5, calib)               # in place: masks chosen, kept weights updated
    masks = sparsegpt_prune(model, None, calib, n=2, m=4)    # 2:4
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from starfish_fast.data import as_batches
from starfish_fast.prune.makers import check_nm_shapes, check_sparsity_form, finish_masks, scope_weights
from starfish_fast.sparsegpt import check_sweep, sweep_layers, sweep_model

log = logging.getLogger(__name__)


def sparsegpt_prune(model: nn.Module, sparsity: float | None, calib, scope: str = "auto", n: int | None = None,
                    m: int | None = None, *, block_size: int = 128, damp: float = 0.01, batch_size: int = 32,
                    device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Prune ``model`` in place with SparseGPT (module docstring): ``sparsity`` of every layer of the scope
    (exactly ``round(sparsity * numel)``), or ``n`` kept in every ``m`` along the reduction (``sparsity``
    then None or 1 - n/m); the kept weights updated, the pruned ones exactly zero. ``calib``: what
    ``data.as_batches`` takes. Runs without gradients in eval mode on ``device`` (default: the model's),
    mode and device restored. Returns bool CPU masks (True = keep) for every weight of the scope."""
    sparsity = check_sparsity_form(sparsity, n, m)
    check_sweep(block_size, damp)
    _, resolved, weights = scope_weights(model, scope)
    if n is not None:
        check_nm_shapes(weights, n, m, resolved)
        block_size = max(m, block_size // m * m)               # groups of m never straddle two blocks
    layers = sweep_layers(model, weights)
    rule = (n, m) if n is not None else sparsity
    keeps, report = sweep_model(model, layers, as_batches(calib, batch_size), rule=rule, block_size=block_size,
                                damp=damp, device=device)
    masks = {layer.key: keeps[layer.key].reshape(weights[layer.key].shape) for layer in layers}
    form = f"{n}:{m}" if n is not None else f"sparsity {sparsity:g}"
    log.info("SparseGPT output error over %d layers: mean %.4g", len(report),
             sum(item["error_after"] for item in report) / len(report))
    return finish_masks(masks, f"SparseGPT pruning, {form}, scope {resolved}", weights.transposed)
