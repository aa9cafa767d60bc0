"""Closed-form compensation of structured pruning (the CORP family): the layer consuming pruned units is
refitted by ridge regression on calibration activations so that its output matches the dense model's.

    from starfish_fast.compensation import compensate
    from starfish_fast.prune import structured_masks
    masks = structured_masks(pruned, 0.5, kind="mlp")          # pruned: a copy of dense
    report = compensate(pruned, dense, masks, calib)           # pruned refitted in place
    for layer in report["layers"]:
        print(layer["name"], layer["kind"], layer["units"], layer["error_before"], layer["error_after"])

Units and the layer refitted:
- MLP neurons (the adapter's fc1/fc2 pairs; a neuron is pruned when its fc1 row is masked): fc2, over
  the pruned model's hidden activations at the kept neurons (a pruned neuron's activation is the
  constant act(b1), so its fc2 column is left out and set to zero: the bias absorbs it).
- QK head dims (fused qkv of timm ``Attention`` / torchvision ``MultiheadAttention``; a pair is pruned
  when its q and k rows are masked): the logits change, and the layer after the attention is the output
  projection, refitted from the pruned attention's proj input to the dense proj output.
- conv output channels (whole filters masked): the next non-depthwise ``nn.Conv2d`` in module order
  whose ``in_channels`` is the pruned conv's ``out_channels`` (depthwise convs and BatchNorm between
  them skipped over: BatchNorm turns a zeroed channel into a constant, which the refit absorbs), over its
  unfolded input; a pruned conv without such a consumer is skipped and reported.

Fit: per output row, over its kept inputs (the layer's own mask: d of them) and a ones column for the
bias (when the layer has one), solve ``(A^T A + lam * I) w = A^T t + lam * w0`` with ``lam = ridge *
tr(A^T A) / d`` and w0 the row's current weights, the bias unregularised, in float64 on ``device``, from
Gram matrices accumulated batch by batch: activations are never all held. The ridge pulls towards the
current weights, not towards zero, so a refit never raises the layer's calibration error (the current
weights are a candidate with no penalty, once left-out fc2 columns are zero, as structured masks make
them; towards zero, 1e-3 raised a tiny ViT's QK proj error from 0.95% to 1.09%); ridge=0 is plain
least squares either way.
Rows sharing one mask pattern share one solve; a row whose weight row is entirely masked is left as it
is. Layers go in module order and each fit sees the already compensated layers before it (sequential,
as CORP). Each fit costs one forward of both models up to the layer over the calibration set.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from starfish_fast.compaction import ATTENTION_LAYERS, unsupported_attention
from starfish_fast.data import as_batches
from starfish_fast.masks import apply_masks
from starfish_fast.models import adapter_for
from starfish_fast.calibration import capture, evaluating, input_rows, out_proj_as_module

log = logging.getLogger(__name__)

CHUNK_ROWS = 8192        # activation rows per float64 Gram update (bounds the float64 copy of a batch)


@dataclass
class _Refit:
    name: str                            # module path of the consuming layer (nn.Linear or nn.Conv2d)
    kind: str                            # mlp | qk | channel
    units: int                           # pruned units feeding it
    drop: torch.Tensor | None = None     # (in,) bool: inputs left out of the fit (pruned MLP neurons)
    attention: str | None = None         # torchvision attention whose out_proj must run as a module


def compensate(pruned: nn.Module, dense: nn.Module, masks: Mapping[str, torch.Tensor], calib, *,
               ridge: float = 1e-3, batch_size: int = 32, device: str | torch.device | None = None) -> dict:
    """Refit the layers consuming the units that ``masks`` prune (module docstring), in place in
    ``pruned`` (the masks are applied first; masked weights stay exactly zero). ``calib``: what
    ``data.as_batches`` takes. Both models run without gradients in eval mode on ``device`` (default:
    the pruned model's); modes and devices are restored. Returns ``{"layers": [{name, kind, units,
    error_before, error_after}], "skipped": [{name, reason}]}``, errors being ``||pred - target|| /
    ||target||`` of the layer's output on the calibration data."""
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    if not isinstance(masks, Mapping) or not masks:
        raise ValueError("masks must be a non-empty dict of weight name -> 0/1 or bool tensor")
    masks = {key: value.detach().cpu().bool() for key, value in masks.items()}
    refits, skipped = _find_refits(pruned, masks)
    batches = as_batches(calib, batch_size)
    layers = []
    with evaluating(pruned, device) as target, evaluating(dense, target):
        apply_masks(pruned, masks)
        for refit in refits:
            layers.append(_refit_layer(pruned, dense, refit, masks, batches, float(ridge), target))
    for item in skipped:
        log.warning("compensation skips %s: %s", item["name"], item["reason"])
    return {"layers": layers, "skipped": skipped}


# ----------------------------------------------------------------------------- which layers
def _find_refits(model: nn.Module, masks: dict[str, torch.Tensor]) -> tuple[list[_Refit], list[dict]]:
    """The consuming layers to refit, in module order (one entry per layer), and the skipped ones."""
    adapter = adapter_for(model)
    channel, skipped = _channel_refits(model, masks)
    merged: dict[str, _Refit] = {}
    for refit in _mlp_refits(model, adapter, masks) + _qk_refits(model, adapter, masks, skipped) + channel:
        if refit.name in merged:
            merged[refit.name].units += refit.units             # a conv consuming several pruned convs
        else:
            merged[refit.name] = refit
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(merged.values(), key=lambda refit: order[refit.name]), skipped


def _mlp_refits(model: nn.Module, adapter, masks) -> list[_Refit]:
    refits = []
    for fc1, fc2 in adapter.mlp_pairs(model):
        mask = masks.get(f"{fc1}.weight")
        dropped = ~mask.any(1) if mask is not None else None                     # (hidden,)
        if dropped is not None and dropped.any():
            refits.append(_Refit(fc2, "mlp", int(dropped.sum()), drop=dropped))
    return refits


def _qk_refits(model: nn.Module, adapter, masks, skipped: list[dict]) -> list[_Refit]:
    if adapter.family not in ATTENTION_LAYERS:
        return []
    attention_name, weight_name, _ = ATTENTION_LAYERS[adapter.family]
    refits = []
    for block in adapter.block_names(model):
        path = f"{block}.{attention_name}"
        mask = masks.get(f"{path}.{weight_name}")
        if mask is None:
            continue
        alive = mask.any(1)                                                        # (3 * inner,)
        inner = alive.numel() // 3
        pairs = int((~alive[:inner] & ~alive[inner:2 * inner]).sum())
        attention = model.get_submodule(path)
        torchvision = isinstance(attention, nn.MultiheadAttention)
        reason = unsupported_attention(attention) if torchvision else None
        if pairs and reason:
            skipped.append({"name": path, "reason": f"its out_proj cannot be captured ({reason})"})
        elif pairs:
            refits.append(_Refit(f"{path}.out_proj" if torchvision else f"{path}.proj", "qk", pairs,
                                 attention=path if torchvision else None))
    return refits


def _channel_refits(model: nn.Module, masks) -> tuple[list[_Refit], list[dict]]:
    convs = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    refits, skipped = [], []
    for position, (name, conv) in enumerate(convs):
        mask = masks.get(f"{name}.weight")
        units = int((~mask.flatten(1).any(1)).sum()) if mask is not None else 0
        if not units:
            continue
        consumer = next(((n, c) for n, c in convs[position + 1:] if c.in_channels == conv.out_channels
                         and not (c.groups > 1 and c.groups == c.in_channels)), None)     # depthwise: skipped
        reason = _unsupported_consumer(consumer, conv.out_channels)
        if reason:
            skipped.append({"name": name, "reason": reason})
        else:
            refits.append(_Refit(consumer[0], "channel", units))
    return refits, skipped


def _unsupported_consumer(consumer, channels: int) -> str | None:
    if consumer is None:
        return f"no later non-depthwise conv takes its {channels} channels"
    name, conv = consumer
    if type(conv) is not nn.Conv2d:
        return f"its consumer {name} is a {type(conv).__name__} (its forward may not be a plain convolution)"
    if conv.groups > 1:
        return f"its consumer {name} is a grouped conv"
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        return f"its consumer {name} pads with {conv.padding!r}/{conv.padding_mode}, which unfold cannot"
    return None


# ----------------------------------------------------------------------------- one layer
@torch.no_grad()
def _refit_layer(pruned: nn.Module, dense: nn.Module, refit: _Refit, masks, batches, ridge: float,
                 device: torch.device) -> dict:
    layer = pruned.get_submodule(refit.name)
    gram, cross, energy = _statistics(pruned, dense, refit, layer, batches, device)
    out = layer.weight.shape[0]
    bias = layer.bias.detach().double()[:, None] if layer.bias is not None else \
        torch.zeros(out, 1, dtype=torch.float64, device=device)
    current = torch.cat([layer.weight.detach().reshape(out, -1).double(), bias], 1)     # (out, in + 1)
    mask = masks.get(f"{refit.name}.weight")
    allowed = mask.reshape(out, -1).to(device) if mask is not None else \
        torch.ones(current[:, :-1].shape, dtype=torch.bool, device=device)                # (out, in)
    if refit.drop is not None:
        allowed = allowed & ~refit.drop.to(device)[None, :]                            # (out, in)
    fitted = _ridge_solve(gram, cross, allowed, current, layer.bias is not None, ridge)
    layer.weight.copy_(fitted[:, :-1].reshape(layer.weight.shape))
    if layer.bias is not None:
        layer.bias.copy_(fitted[:, -1])
    report = {"name": refit.name, "kind": refit.kind, "units": refit.units,
              "error_before": _relative_error(current, gram, cross, energy),
              "error_after": _relative_error(fitted, gram, cross, energy)}
    log.info("compensated %s (%s, %d units): relative error %.4g -> %.4g", refit.name, refit.kind, refit.units,
             report["error_before"], report["error_after"])
    return report


def _statistics(pruned, dense, refit: _Refit, layer: nn.Module, batches, device):
    """``A^T A`` (in + 1, in + 1) and ``A^T T`` (in + 1, out) of the pruned model's layer input A (with a
    ones column) and the dense model's layer output T, and ``||T||^2``, float64 over the batches."""
    size, out = layer.weight[0].numel() + 1, layer.weight.shape[0]
    gram = torch.zeros(size, size, dtype=torch.float64, device=device)
    cross = torch.zeros(size, out, dtype=torch.float64, device=device)
    energy = torch.zeros((), dtype=torch.float64, device=device)
    attention = [refit.attention] if refit.attention else []
    with out_proj_as_module(pruned, attention), out_proj_as_module(dense, attention):
        for images in batches:
            images = images.to(device)
            inputs = input_rows(layer, capture(pruned, refit.name, images, output=False))    # (R, in)
            targets = capture(dense, refit.name, images, output=True)
            targets = targets.flatten(2).transpose(1, 2) if isinstance(layer, nn.Conv2d) else targets
            targets = targets.reshape(-1, out)                                                  # (R, out)
            if targets.shape[0] != inputs.shape[0]:
                raise RuntimeError(f"{refit.name}: {inputs.shape[0]} input rows for {targets.shape[0]} output rows")
            for a, t in zip(inputs.split(CHUNK_ROWS), targets.split(CHUNK_ROWS)):
                a = torch.cat([a.double(), a.new_ones(a.shape[0], 1, dtype=torch.float64)], 1)  # (r, in + 1)
                t = t.double()                                                                # (r, out)
                gram += a.T @ a
                cross += a.T @ t
                energy += t.pow(2).sum()
    return gram, cross, energy


# ----------------------------------------------------------------------------- the ridge solve
def _ridge_solve(gram: torch.Tensor, cross: torch.Tensor, allowed: torch.Tensor, current: torch.Tensor, bias: bool,
                 ridge: float) -> torch.Tensor:
    """``current`` (out, in + 1) with every row that has allowed inputs refitted over them (and the bias
    column when ``bias``); one solve per distinct pattern of ``allowed`` (out, in)."""
    fitted = current.clone()
    patterns, inverse = torch.unique(allowed, dim=0, return_inverse=True)
    for index, pattern in enumerate(patterns):
        inputs = pattern.nonzero().flatten()                                         # (k,)
        if not inputs.numel():
            continue                                  # the weight row is masked: left as it is
        rows = (inverse == index).nonzero().flatten()
        columns = torch.cat([inputs, inputs.new_tensor([gram.shape[0] - 1])]) if bias else inputs
        system = gram[columns][:, columns]                                           # (k [+ 1], k [+ 1])
        rhs = cross[columns][:, rows]                                                # (k [+ 1], rows)
        diagonal = system.diagonal()[:inputs.numel()]
        strength = ridge * diagonal.sum() / inputs.numel()
        diagonal += strength                                                         # the bias unregularised
        rhs[:inputs.numel()] += strength * current[rows][:, inputs].T                # toward the current weights
        fitted[rows] = 0
        fitted[rows[:, None], columns] = _solve(system, rhs).T
    return fitted


def _solve(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    try:
        return torch.linalg.solve(system, rhs)
    except torch.linalg.LinAlgError:
        log.warning("singular normal equations (constant or repeated inputs with ridge=0): least-norm solution")
        return torch.linalg.pinv(system, hermitian=True) @ rhs


def _relative_error(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, energy: torch.Tensor) -> float:
    """``||A W^T - T|| / ||T||`` from the Gram statistics, for augmented rows ``weight`` (out, in + 1)."""
    squared = ((weight @ gram) * weight).sum() - 2 * (weight * cross.T).sum() + energy
    return float(squared.clamp_min(0).sqrt() / energy.sqrt().clamp_min(1e-30))
