"""Representation-guided sparsity: per-block sparsities allocated from the damage that pruning each
block does to its own output, measured on the calibration set (the paper's suggestion of "using this
representation mismatch as a criterion for pruning itself").

    from starfish_fast.prune import representation_masks
    masks = representation_masks(model, 0.5, calib)                         # Wanda scores within layers
    masks = representation_masks(model, 0.5, calib, score="magnitude", levels=(0.3, 0.6, 0.8))
    masks = representation_masks(model, 0.5, calib, gradual_steps=3, dense=dense)   # prune, heal, repeat

Damage. For block b and level s, only b's weights are pruned at s (each layer by its own scores) and
D_b(s) is the mean 1 - cos between b's output and the unpruned output, rows as the STARFISH loss
(tokens of (B, T, D), images of (B, C, H, W)); D_b(0) = 0. Only b changes, so b's input is the unpruned
one: it is captured once per batch in a forward up to b, and b alone runs once per level.

Allocation. Each D_b is the piecewise-linear interpolation of its measured points, replaced by its
lower convex hull; the block sparsities s_b in [0, max(levels)] minimising sum_b D_b(s_b) subject to
sum_b n_b s_b = sparsity * sum_b n_b (n_b: the block's weights) are then exact for the hulls: hull
segments are filled in increasing order of damage per pruned weight (slope / n_b), segments of equal
cost in proportion to their size (identical blocks get identical sparsities). Weights of the scope
outside every block keep the overall sparsity. Layers take their block's sparsity; the rounding
residual goes to the layers with the largest fractional counts (ties in module order), so exactly
round(sparsity * N) weights of the scope are pruned. Within a layer: Wanda per output row, magnitude
over the layer.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Mapping, Sequence

import torch
from torch import nn

from starfish_fast.config import HealConfig
from starfish_fast.data import as_batches
from starfish_fast.masks import apply_masks
from starfish_fast.models.adapters import block_output
from starfish_fast.objectives import block_cosine_loss
from starfish_fast.calibration import cloned, evaluating
from starfish_fast.prune.makers import check_sparsity, checked_scores, finish_masks, magnitude_score, scope_weights
from starfish_fast.prune.wanda import input_norms, layer_keep, wanda_score

log = logging.getLogger(__name__)

SCORES = ("wanda", "magnitude")


def representation_masks(model: nn.Module, sparsity: float, calib, scope: str = "auto", *,
                         levels: Sequence[float] = (0.25, 0.5, 0.75, 0.9), score: str = "wanda",
                         batch_size: int = 32, device: str | torch.device | None = None, gradual_steps: int = 0,
                         heal_config: HealConfig | None = None, dense: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Bool CPU masks for every weight of the scope, exactly ``round(sparsity * N)`` pruned, with
    per-block sparsities allocated from the representation damage (module docstring); the allocation is
    logged. ``score``: wanda (per output row) or magnitude (per layer) within each layer. The model runs
    without gradients in eval mode on ``device`` (default: its own); mode and device are restored.

    Cost: one pass for the Wanda norms, then per block and batch a forward up to the block and
    ``len(levels)`` runs of the block alone: about ``1 + L / 2 + len(levels)`` full forwards over the
    calibration set for L blocks (a model without an explicit block loop runs whole: ``1 + L + len(levels)``).

    ``gradual_steps=k > 0``: k prune-then-heal steps at ``sparsity * i / k``, each re-measuring the
    damage (and the Wanda norms) on the healed model against its own block outputs; masks only grow.
    Needs ``dense`` (the healing teacher); ``heal_config`` defaults to ``HealConfig(epochs=2,
    progress=False)``, and runs on this scope, device and the calibration batches made here. The model is
    then pruned and healed in place (``starfish_fast.heal``'s effects included)."""
    sparsity = check_sparsity(sparsity)
    levels = _check_levels(levels, sparsity)
    _check_options(score, gradual_steps, dense)
    adapter, resolved, weights = scope_weights(model, scope)
    batches = as_batches(calib, batch_size)
    title = f"representation pruning ({score} within layers), sparsity {sparsity:g}, scope {resolved}"
    if not gradual_steps:
        with evaluating(model, device):
            masks = _allocation_step(model, adapter, resolved, batches, sparsity, levels, score, None)
        return finish_masks(masks, title, weights.transposed)
    from starfish_fast.engine import heal            # the engine is heavy: only gradual pruning needs it

    config = _heal_config(heal_config, resolved, device or next(model.parameters()).device)
    masks = None
    for step in range(1, gradual_steps + 1):
        with evaluating(model, device):
            masks = _allocation_step(model, adapter, resolved, batches, sparsity * step / gradual_steps, levels,
                                     score, masks)
        apply_masks(model, masks)
        heal(model, dense, masks, batches, config)
    return finish_masks(masks, f"{title}, {gradual_steps} prune-and-heal steps", weights.transposed)


def _check_levels(levels, sparsity: float) -> tuple[float, ...]:
    values = tuple(levels) if isinstance(levels, (list, tuple)) else ()
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1 for v in values) \
            or len(set(values)) != len(values):
        raise ValueError(f"levels must be distinct numbers in (0, 1) (block sparsities to measure), got {levels!r}")
    if sparsity > max(values):
        raise ValueError(f"sparsity {sparsity:g} exceeds the largest level {max(values):g}: no block may be pruned "
                         f"beyond max(levels); add a level >= {sparsity:g}")
    return tuple(sorted(float(v) for v in values))


def _check_options(score: str, gradual_steps, dense) -> None:
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; allowed: {', '.join(SCORES)}")
    if isinstance(gradual_steps, bool) or not isinstance(gradual_steps, int) or gradual_steps < 0:
        raise ValueError(f"gradual_steps must be an integer >= 0 (0: one shot), got {gradual_steps!r}")
    if gradual_steps and dense is None:
        raise ValueError("gradual_steps > 0 heals between steps and needs dense=<the dense model>")


def _heal_config(config: HealConfig | None, scope: str, device: torch.device) -> HealConfig:
    config = config if config is not None else HealConfig(epochs=2, progress=False)
    if config.scope not in ("auto", scope):
        raise ValueError(f"heal_config.scope={config.scope!r} differs from the prune scope {scope!r}; allowed: "
                         f"auto or {scope}")
    return dataclasses.replace(config, scope=scope, device=config.device or str(device))


# ----------------------------------------------------------------------------- one allocation step
def _allocation_step(model: nn.Module, adapter, scope: str, batches: list[torch.Tensor], target: float,
                     levels: tuple[float, ...], score: str, pruned: Mapping[str, torch.Tensor] | None
                     ) -> dict[str, torch.Tensor]:
    """Masks at ``target`` with damage-allocated block sparsities, containing ``pruned`` (None: none)."""
    _, _, weights = scope_weights(model, scope)
    scores = checked_scores(weights, wanda_score(input_norms(model, weights, batches)) if score == "wanda"
                     else magnitude_score)
    sizes = {key: weight.numel() for key, weight in weights.items()}
    done = dict.fromkeys(weights, 0)
    if pruned is not None:
        for key, value in scores.items():
            value[~pruned[key].to(value.device)] = -math.inf          # already pruned go first: none regrows
            done[key] = int((~pruned[key]).sum())
    per_row = score == "wanda"
    groups = {block: [key for key in weights if key.startswith(block + ".")] for block in adapter.block_names(model)}
    groups = {block: keys for block, keys in groups.items() if keys}
    curves, block_sizes = {}, {}
    for block, keys in groups.items():
        block_sizes[block] = sum(sizes[key] for key in keys)
        floor = sum(done[key] for key in keys) / block_sizes[block]
        points = [level for level in levels if level > floor]
        level_masks = [{key: layer_keep(scores[key], max(round(level * sizes[key]), done[key]), per_row)
                        for key in keys} for level in points]
        curves[block] = ([floor, *points], [0.0, *_block_damage(model, adapter, block, level_masks, batches)])
        log.debug("%s: damage %s", block, ", ".join(f"{x:.3f}: {y:.4g}" for x, y in zip(*curves[block])))
    allocated = allocate_sparsities(curves, block_sizes, target * sum(block_sizes.values()))
    targets = {key: target * sizes[key] for key in weights}            # outside every block: the target
    for block, keys in groups.items():
        targets.update({key: allocated[block] * sizes[key] for key in keys})
    counts = _round_counts(targets, round(target * sum(sizes.values())), done, sizes)
    log.info("representation allocation at sparsity %g: %s", target,
             ", ".join(f"{block} {value:.3f}" for block, value in allocated.items()))
    return {key: layer_keep(scores[key], counts[key], per_row) for key in weights}


@torch.no_grad()
def _block_damage(model: nn.Module, adapter, block: str, level_masks: list[dict[str, torch.Tensor]],
                  batches: list[torch.Tensor]) -> list[float]:
    """Mean 1 - cos between ``block``'s output with each of ``level_masks`` on its weights and its output
    as the model stands; the block runs alone on the input captured in a forward up to it."""
    if not level_masks:
        return []
    params = dict(model.named_parameters())
    originals = {key: params[key].detach().clone() for key in level_masks[0]}
    module, device = model.get_submodule(block), next(model.parameters()).device
    sums, seen, captured = [0.0] * len(level_masks), 0, {}
    try:
        for images in batches:
            images = images.to(device)
            handle = module.register_forward_pre_hook(
                lambda _module, args, kwargs: captured.update(inputs=cloned((args, kwargs))), with_kwargs=True)
            try:
                _, (reference,) = adapter.forward_blocks(model, images, [block], need_logits=False)
            finally:
                handle.remove()
            for i, masks in enumerate(level_masks):
                for key, original in originals.items():
                    params[key].copy_(original * masks[key])
                args, kwargs = cloned(captured["inputs"])           # a block may write into its input
                output = block_output(module(*args, **kwargs), images.shape[0], adapter.sequence_first)
                loss = block_cosine_loss([output.float()], [reference.float()], per=adapter.cosine_per)
                sums[i] += images.shape[0] * float(loss)
            seen += images.shape[0]
    finally:
        for key, original in originals.items():
            params[key].copy_(original)
    return [total / seen for total in sums]


# ----------------------------------------------------------------------------- allocation and rounding
def _lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Lower convex hull of points sorted by x (monotone chain)."""
    hull: list[tuple[float, float]] = []
    for x, y in points:
        while len(hull) >= 2 and (hull[-1][0] - hull[-2][0]) * (y - hull[-2][1]) \
                - (hull[-1][1] - hull[-2][1]) * (x - hull[-2][0]) <= 0:
            hull.pop()
        hull.append((x, y))
    return hull


def allocate_sparsities(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], sizes: Mapping[str, int],
                        budget: float) -> dict[str, float]:
    """Block sparsities minimising the summed damage with ``sum_b sizes[b] * s_b = budget`` weights pruned.

    ``curves[b] = (xs, ys)``: sparsities (ascending, the first one the block's floor) and the damage there.
    Each curve is replaced by its lower convex hull, whose segments are then filled in increasing order of
    damage per pruned weight (slope / size), ties in proportion to their size: the exact optimum of the
    convexified problem. A budget beyond the curves' ends leaves every block at its last point."""
    allocated = {block: float(xs[0]) for block, (xs, _) in curves.items()}
    segments = []                                  # (damage per pruned weight, block order, x0, block, width)
    for order, (block, (xs, ys)) in enumerate(curves.items()):
        hull = _lower_hull(list(zip(map(float, xs), map(float, ys))))
        segments += [((y1 - y0) / (x1 - x0) / sizes[block], order, x0, block, x1 - x0)
                     for (x0, y0), (x1, y1) in zip(hull, hull[1:])]
    segments.sort()
    remaining = budget - sum(sizes[block] * value for block, value in allocated.items())
    start = 0
    while remaining > 0 and start < len(segments):
        end = start + 1
        while end < len(segments) and math.isclose(segments[end][0], segments[start][0], rel_tol=1e-9, abs_tol=0.0):
            end += 1
        tied = segments[start:end]
        capacity = sum(sizes[block] * width for _, _, _, block, width in tied)
        share = min(1.0, remaining / capacity)
        for _, _, _, block, width in tied:
            allocated[block] += share * width
        remaining -= share * capacity
        start = end
    return allocated


def _round_counts(targets: Mapping[str, float], total: int, low: Mapping[str, int], high: Mapping[str, int]
                  ) -> dict[str, int]:
    """Integer counts near ``targets`` summing to ``total`` within ``[low, high]``: floors, then the residual
    one by one to the largest fractional parts (taken back from the smallest), ties in order."""
    counts = {key: min(max(math.floor(value), low[key]), high[key]) for key, value in targets.items()}
    while (residual := total - sum(counts.values())) != 0:
        step = 1 if residual > 0 else -1
        order = sorted(counts, key=lambda key: -step * (targets[key] - counts[key]))     # stable: ties in order
        eligible = [key for key in order if low[key] <= counts[key] + step <= high[key]]
        if not eligible:
            raise RuntimeError(f"cannot prune exactly {total} weights within the per-layer bounds")
        for key in eligible[:abs(residual)]:
            counts[key] += step
    return counts
