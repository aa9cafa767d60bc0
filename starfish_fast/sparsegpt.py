"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: massive language models can be accurately pruned in
one-shot"): each layer's pruned weights chosen and its kept weights updated so that its output on the
calibration set moves as little as possible (optimal brain surgeon steps through the inverse of the
Gram matrix of the layer's inputs). This module holds the algorithm and the update under given masks
(``HealConfig(warm_start="sparsegpt")``); the mask maker is ``starfish_fast.prune.sparsegpt_prune``.

    from starfish_fast.prune import sparsegpt_prune
    from starfish_fast.sparsegpt import sparsegpt_update
    masks = sparsegpt_prune(model, 0.5, calib)               # in place: masks chosen, kept weights updated
    masks = sparsegpt_prune(model, None, calib, n=2, m=4)    # 2:4
    report = sparsegpt_update(pruned, dense, masks, calib)   # masks given (any maker): the update alone

Order (the paper's sequential scheme). Blocks go in the adapter's order; all the scope's layers of a
block at once, on inputs from a forward of the model as it stands up to the end of that block: earlier
blocks already pruned and updated, this one still dense. Layers of the scope outside every block stay
dense until the blocks are done, then go on one whole forward.

One layer. W is viewed (out, reduction): a linear's (out, in), a conv's (out, c * kh * kw) over im2col
rows (each group of a grouped conv its own problem), transformers' ``Conv1D`` transposed, an
``nn.MultiheadAttention`` in-projection over its query (self-attention). H = X^T X over every calibration
row, damped by ``damp`` times its mean diagonal (an input that is always zero gets a diagonal of 1).
Columns go left to right in blocks of ``block_size``; at the start of a block (unstructured) or of each
group of m columns (N:M) the entries to prune are those of lowest w^2 / [H^-1]_jj^2, and each column's
pruning error is spread over the later columns through the upper Cholesky factor of H^-1. Unstructured
counts are exact: after column c, round(sparsity * rows * c) of the layer's entries are pruned (the
sparsity uniform over column blocks, free across rows). With fixed masks (``sparsegpt_update``) the same
sweep runs from the dense weights with the given entries pruned: on masks that ``sparsegpt_prune`` chose
from the same calibration batches it gives back its weights (tested).

Cost: per block one forward up to its end (about L / 2 + 1 whole forwards for L blocks), a Gram matrix
per layer in float64, and a column sweep of O(out * in * block_size) per layer.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from starfish_fast.calibration import evaluating, input_rows, layer_input_sums
from starfish_fast.data import as_batches
from starfish_fast.masks import keep_largest
from starfish_fast.models import adapter_for
from starfish_fast.models.scopes import is_hf_conv1d

log = logging.getLogger(__name__)


@dataclass
class _Layer:
    key: str                      # state_dict key of the weight
    path: str                     # module whose input is the layer's (an in-projection's attention)
    module: nn.Module
    groups: int                   # a grouped conv's groups, else 1

    def view(self, model: nn.Module) -> torch.Tensor:
        """The weight as (groups, out / groups, reduction), a view of ``model``'s parameter."""
        weight = model.get_parameter(self.key)
        if is_hf_conv1d(self.module):
            return weight.t().unsqueeze(0)                                      # stored (in, out)
        return weight.view(self.groups, weight.shape[0] // self.groups, -1)


def sweep_layers(model: nn.Module, keys) -> list[_Layer]:
    """The layers of weight ``keys`` (``ValueError`` naming one SparseGPT cannot take), before any work."""
    layers = []
    for key in keys:
        path = key.rpartition(".")[0]
        module = model.get_submodule(path)
        if isinstance(module, nn.Conv2d) and isinstance(module.padding, str) and module.padding != "valid":
            raise ValueError(f"SparseGPT: {key} is a conv with padding={module.padding!r}; it needs numeric "
                             f"padding (its inputs are unfolded)")
        if not isinstance(module, (nn.Linear, nn.Conv2d, nn.MultiheadAttention)) and not is_hf_conv1d(module):
            raise ValueError(f"SparseGPT: {key} belongs to a {type(module).__name__}; it takes nn.Linear, "
                             f"nn.Conv2d, transformers Conv1D and nn.MultiheadAttention weights")
        layers.append(_Layer(key, path, module, module.groups if isinstance(module, nn.Conv2d) else 1))
    return layers


def _stages(model: nn.Module, adapter, layers: list[_Layer]) -> list[tuple[str | None, list[_Layer]]]:
    """``(block, its layers)`` in block order, then ``(None, the layers outside every block)``."""
    stages, left = [], list(layers)
    for block in adapter.block_names(model):
        inside = [layer for layer in left if layer.key.startswith(block + ".")]
        left = [layer for layer in left if layer not in inside]
        if inside:
            stages.append((block, inside))
    return stages + ([(None, left)] if left else [])


def _grams(model: nn.Module, layers: list[_Layer], batches, device, block: str | None) -> dict[str, torch.Tensor]:
    """``{key: (groups, k, k) float64}``: X^T X of each layer's input rows over the batches, from forwards
    that stop when ``block`` returns (None: whole forwards)."""
    groups = {layer.key: (layer.module, layer.groups) for layer in layers}

    def gram(key, _module, x):
        module, count = groups[key]
        rows = input_rows(module, x).double()                                     # (N, groups * k)
        rows = rows.view(rows.shape[0], count, -1).transpose(0, 1)                # (groups, N, k)
        return rows.transpose(1, 2) @ rows                                        # (groups, k, k)

    return layer_input_sums(model, {layer.key: layer.path for layer in layers}, batches, gram, device, stop=block,
                            purpose="SparseGPT")


# ----------------------------------------------------------------------------- one layer
def _inverse_factor(gram: torch.Tensor, damp: float, key: str) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damping)^-1 = U^T U, float32, (groups, k, k)."""
    h = gram.clone()
    diagonal = h.diagonal(dim1=1, dim2=2)
    diagonal[diagonal == 0] = 1.0                      # an input that is always zero: its column on its own
    diagonal += damp * diagonal.mean(1, keepdim=True)
    factor, info = torch.linalg.cholesky_ex(h)
    if info.any():
        raise ValueError(f"SparseGPT: the Gram matrix of {key}'s inputs is not positive definite with damp={damp:g}; "
                         f"pass a larger damp (say 0.1)")
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True).float()


def _sweep(weight: torch.Tensor, factor: torch.Tensor, keep: torch.Tensor | None, rule, block_size: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The pruned and updated weight (groups, rows, k) float32 and its keep mask. ``keep`` None: chosen by
    ``rule`` (a sparsity, or ``(n, m)``); given: the entries it prunes are pruned."""
    w = weight.float().clone()                                                  # (G, R, K)
    groups, rows, columns = w.shape
    chosen = keep is None
    keep = torch.ones_like(w, dtype=torch.bool) if chosen else keep.clone()
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block, u = w[:, :, start:end].clone(), factor[:, start:end, start:end]  # (G, R, b), (G, b, b)
        scale = u.diagonal(dim1=1, dim2=2).unsqueeze(1)                          # (G, 1, b)
        if chosen and not isinstance(rule, tuple):
            count = round(rule * groups * rows * end) - round(rule * groups * rows * start)
            keep[:, :, start:end] = keep_largest((block / scale).pow(2), count)
        errors = torch.zeros_like(block)
        for i in range(end - start):
            if chosen and isinstance(rule, tuple) and i % rule[1] == 0:
                n, m = rule
                scores = (block[:, :, i:i + m] / scale[:, :, i:i + m]).pow(2)  # (G, R, m)
                keep[:, :, start + i:start + i + m] = keep_largest(scores, m - n, dim=-1)
            column = block[:, :, i]                                              # (G, R)
            kept = column * keep[:, :, start + i]
            error = (column - kept) / scale[:, :, i]                             # (G, R)
            block[:, :, i:] -= error.unsqueeze(2) * u[:, i:i + 1, i:]            # (G, R, b - i)
            block[:, :, i] = kept
            errors[:, :, i] = error
        w[:, :, start:end] = block
        w[:, :, end:] -= errors @ factor[:, start:end, end:]                     # (G, R, K - end)
    return w * keep, keep


def _output_error(delta: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor) -> float:
    """||delta X^T||^2 / ||W X^T||^2 over the calibration rows, from the Gram matrix H = X^T X."""
    delta, weight = delta.double(), weight.double()
    energy = float(((weight @ gram) * weight).sum())
    return float(((delta @ gram) * delta).sum()) / energy if energy > 0 else 0.0


# ----------------------------------------------------------------------------- the whole model
def sweep_model(model: nn.Module, layers: list[_Layer], batches, *, rule=None,
                keeps: Mapping[str, torch.Tensor] | None = None, dense: nn.Module | None = None, block_size: int,
                damp: float, device) -> tuple[dict, list[dict]]:
    """The sequential sweep (module docstring) in place: masks chosen by ``rule`` (a sparsity or ``(n, m)``)
    or given as ``keeps`` (each (groups, rows, k)), from ``dense``'s weights when given; the keep masks
    (groups, rows, k) and each layer's output errors."""
    adapter = adapter_for(model)
    out, report = {}, []
    with torch.no_grad(), evaluating(model, device) as target:
        if dense is not None:                                   # every layer starts from its dense weights
            for layer in layers:
                layer.view(model).copy_(layer.view(dense).to(target))
        for block, stage in _stages(model, adapter, layers):
            grams = _grams(model, stage, batches, target, block)
            for layer in stage:
                view, gram = layer.view(model), grams.pop(layer.key)
                given = None if keeps is None else keeps[layer.key].to(target).view(view.shape)
                factor = _inverse_factor(gram, damp, layer.key)
                new, keep = _sweep(view, factor, given, rule, block_size)
                report.append({"name": layer.key, "error_before": _output_error(view * ~keep, view, gram),
                               "error_after": _output_error(view - new, view, gram)})
                view.copy_(new)
                out[layer.key] = keep
            log.debug("SparseGPT %s: %s", block or "outside the blocks", ", ".join(
                f"{item['name']} {item['error_before']:.3g} -> {item['error_after']:.3g}"
                for item in report[-len(stage):]))
    return out, report


def check_sweep(block_size, damp) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer (columns swept per lazy update), got {block_size!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:
        raise ValueError(f"damp must be a number in (0, 1) (the fraction of the mean diagonal added), got {damp!r}")


def sparsegpt_update(pruned: nn.Module, dense: nn.Module, masks: Mapping[str, torch.Tensor], calib, *,
                     block_size: int = 128, damp: float = 0.01, batch_size: int = 32,
                     device: str | torch.device | None = None) -> dict:
    """SparseGPT's update under fixed ``masks`` (``{weight key: bool or 0/1}``, any maker's): in place in
    ``pruned``, every masked layer's weights recomputed from ``dense``'s (same architecture) so that its
    output on the calibration set stays close (module docstring); masked entries exactly zero. Returns
    ``{"layers": [{"name", "error_before", "error_after"}]}``: each layer's relative output error
    ||(W - W') X^T||^2 / ||W X^T||^2 on its calibration inputs with the masks simply applied and after the
    update."""
    check_sweep(block_size, damp)
    layers = sweep_layers(pruned, masks)
    keeps = {}
    for layer in layers:
        view = layer.view(pruned)
        mask = masks[layer.key]
        if tuple(mask.shape) != tuple(pruned.get_parameter(layer.key).shape):
            raise ValueError(f"mask {layer.key} has shape {tuple(mask.shape)}, its weight "
                             f"{tuple(pruned.get_parameter(layer.key).shape)}")
        keeps[layer.key] = (mask.t() if is_hf_conv1d(layer.module) else mask).bool().reshape(view.shape)
    _, report = sweep_model(pruned, layers, as_batches(calib, batch_size), keeps=keeps, dense=dense,
                            block_size=block_size, damp=damp, device=device)
    log.info("SparseGPT update of %d layers: output error %.4g -> %.4g (mean)", len(report),
             sum(item["error_before"] for item in report) / max(len(report), 1),
             sum(item["error_after"] for item in report) / max(len(report), 1))
    return {"layers": report}
