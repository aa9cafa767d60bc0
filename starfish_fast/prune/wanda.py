"""Wanda (Sun et al. 2023, "A simple and effective pruning approach for LLMs"): the score of weight
W[i, j] is ``|W[i, j]| * ||X_j||_2``, X_j being input feature j of the layer over every calibration
token; the lowest scores of each output row are removed.

    from starfish_fast.prune import wanda_masks
    masks = wanda_masks(model, 0.5, calib)                  # calib: (N, C, H, W), or batches (data.as_batches)
    masks = wanda_masks(model, None, calib, n=2, m=4)       # 2:4, groups as nm_masks makes them

Input features. ``nn.Linear``: the last dim of its input (every other dim is a token). The fused
in-projection of ``nn.MultiheadAttention``: the query's last dim, the same whether the module is
batch-first or not. ``nn.Conv2d``: the reduction index (c, kh, kw) of a filter takes the norm of
input channel c over every image and spatial position, the same for every (kh, kw) (the common
convention: the exact per-tap norm would be that of the im2col column, whose borders see padding);
in a grouped or depthwise conv, c is the filter's channel within its group.
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from starfish_fast.data import as_batches
from starfish_fast.calibration import evaluating, layer_input_sums
from starfish_fast.masks import keep_largest
from starfish_fast.prune.makers import (ScoreFn, check_nm_shapes, check_sparsity_form, checked_scores, finish_masks,
                                        nm_masks, scope_weights)

log = logging.getLogger(__name__)


def feature_sums(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Sum of squares of each input feature of ``module`` over every token / position of ``x``."""
    x = x.detach().float().pow(2)
    if isinstance(module, nn.Conv2d):
        return x.movedim(-3, 0).reshape(x.shape[-3], -1).sum(1)            # (C,): images and positions
    return x.reshape(-1, x.shape[-1]).sum(0)                                # (in,): every token


def wanda_input_norms(model: nn.Module, keys: Iterable[str], calib, *, batch_size: int = 32,
                      device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """``{weight key: (in_features,) fp32 CPU}``: the L2 norm of each input feature (channel for a conv)
    of the key's layer over every calibration token, from forward pre-hooks during one no-grad pass of
    the model in eval mode on ``device`` (its mode and device restored)."""
    return input_norms(model, keys, as_batches(calib, batch_size), device)


@torch.no_grad()
def input_norms(model: nn.Module, keys: Iterable[str], batches: list[torch.Tensor],
                device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """``wanda_input_norms`` over batches already made by ``as_batches`` (a list of 3-D batches would
    read as single images there a second time)."""
    layers = {key: key.rpartition(".")[0] for key in keys}
    with evaluating(model, device) as target:
        sums = layer_input_sums(model, layers, batches, lambda _key, module, x: feature_sums(module, x).double(),
                                target, purpose="Wanda")
    return {key: value.sqrt().float().cpu() for key, value in sums.items()}


def wanda_score(norms: dict[str, torch.Tensor]) -> ScoreFn:
    """The ``score(key, weight)`` of the mask makers: ``|W| * ||X_j||`` with ``norms`` from
    ``wanda_input_norms``."""
    def score(key: str, weight: torch.Tensor) -> torch.Tensor:
        norm = norms[key].to(weight.device)                                 # (in,)
        if weight.dim() == 4:           # conv (out, in/groups, kh, kw): channel c of the filter's group
            out, per_group = weight.shape[:2]
            groups = norm.numel() // per_group
            norm = norm.view(groups, per_group).repeat_interleave(out // groups, 0)[:, :, None, None]
        return weight.detach().abs().float() * norm
    return score


def layer_keep(scores: torch.Tensor, n_prune: int, per_row: bool) -> torch.Tensor:
    """Keep-mask of one layer removing exactly ``n_prune`` lowest scores, over the whole tensor or per
    output row (each row loses ``n_prune // rows``, the first ``n_prune % rows`` rows one more)."""
    if not per_row:
        return keep_largest(scores, n_prune)
    rows = scores.reshape(scores.shape[0], -1)                               # (out, reduction)
    base, extra = divmod(n_prune, rows.shape[0])
    keep = keep_largest(rows, base, dim=1)
    if extra:
        keep[:extra] = keep_largest(rows[:extra], base + 1, dim=1)
    return keep.view(scores.shape)


def wanda_masks(model: nn.Module, sparsity: float | None, calib, scope: str = "auto", n: int | None = None,
                m: int | None = None, *, batch_size: int = 32,
                device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Wanda masks: in each output row of each layer of the scope, exactly ``round(sparsity *
    row_length)`` lowest ``|W| * ||X_j||`` removed; with ``n``, ``m``: exactly n kept in every group of m
    along the reduction dim (``sparsity`` then None or 1 - n/m). ``calib``: what ``data.as_batches``
    takes; the model runs once over it without gradients in eval mode on ``device`` (default: the
    model's), its mode and device restored. Bool CPU masks for every weight of the scope."""
    sparsity = check_sparsity_form(sparsity, n, m)
    _, resolved, weights = scope_weights(model, scope)
    if n is not None:
        check_nm_shapes(weights, n, m, resolved)        # before the calibration pass, not after
    score = wanda_score(wanda_input_norms(model, weights, calib, batch_size=batch_size, device=device))
    if n is not None:
        log.info("Wanda scores for %d:%d pruning", n, m)
        return nm_masks(model, n, m, resolved, score=score)
    masks = {key: layer_keep(value, value.shape[0] * round(sparsity * value[0].numel()), per_row=True)
             for key, value in checked_scores(weights, score).items()}
    return finish_masks(masks, f"Wanda pruning, sparsity {sparsity:g} per output row, scope {resolved}",
                        weights.transposed)
