"""Mask makers: magnitude (unstructured), N:M (semi-structured) and structured masks over the
reference's prune scopes, in the reference's mask format.

    from starfish_fast.prune import magnitude_masks, nm_masks, structured_masks, sparsity_summary
    masks = magnitude_masks(model, 0.5, scope="qkv_out_mlp", per="global")  # {state_dict key: bool tensor}
    masks = nm_masks(model, n=2, m=4, scope="qkv")              # 2 kept of every 4 along the reduction dim
    masks = structured_masks(model, 0.5, scope="qk_mlp", kind="qk_mlp")  # whole MLP neurons and QK dims
    print(format_summary(sparsity_summary(masks)))              # per-layer and total sparsity
    torch.save(masks, "masks.pt")                               # loads in the reference's load_masks

    starfish-fast prune --model-name fashion_vit --method nm --output masks.safetensors   # the same from the shell

Every maker returns a mask (True = keep and train) for every weight of the scope, on the CPU,
and logs its summary. Importance is the weight magnitude unless ``score`` says otherwise: a
``score(key, weight) -> tensor`` of the weight's shape (larger = more important); structured
makers add the scores of a group's entries (L1 norm of a row for magnitude).

Conventions:
- sparsity is the fraction of weights removed, in ``[0, 1)``; the count pruned is
  ``round(sparsity * size)`` per layer (``per="layer"``) or over the whole scope (``"global"``).
- N:M groups run along the reduction dimension: the input features of a linear, and for a conv
  each output channel's ``in_channels/groups * kh * kw`` entries in memory order (the im2col
  GEMM's reduction). A weight whose reduction size is not a multiple of M is refused rather than
  letting groups straddle filters. transformers ``Conv1D`` weights (GPT-2), stored (in, out), are
  scored, grouped and split into rows as the linear they are; their masks keep the stored layout.
- structured ``mlp``: hidden neurons of each block (fc1 row and the fc2 column of the same neuron;
  fc1's bias is left alone: its neuron then feeds a zero fc2 column). ``qk``: head dimensions,
  the same count in every head, removing the q row and the k row of a (head, dim) pair inside the
  fused qkv weight (timm ``qkv.weight`` and torchvision ``in_proj_weight``, rows ``[q | k | v]``);
  v is untouched, so the qkv tensor's own sparsity is two thirds of the requested one.
  ``channel`` (MobileNetV1): whole output filters of every conv of the scope. The next layer's
  matching inputs are left alone: BatchNorm turns a zeroed channel into a constant, not a zero, so
  zeroing them would change what the network computes.
"""
from __future__ import annotations

import logging
from typing import Callable, Mapping

import torch
from torch import nn

from starfish_fast.masks import keep_largest
from starfish_fast.models import adapter_for, prunable_weights
from starfish_fast.models.scopes import is_hf_conv1d

log = logging.getLogger(__name__)

ScoreFn = Callable[[str, torch.Tensor], torch.Tensor]
STRUCTURED_KINDS = ("mlp", "qk", "qk_mlp", "channel")
VIT_FAMILIES = ("timm_vit", "torchvision_vit")
# fused q|k|v weight key suffix -> suffix of the attention module (which knows num_heads)
QKV_SUFFIXES = {".attn.qkv.weight": ".attn", ".self_attention.in_proj_weight": ".self_attention"}


def magnitude_score(key: str, weight: torch.Tensor) -> torch.Tensor:
    """Importance of each entry: its absolute value."""
    return weight.detach().abs().float()


# ----------------------------------------------------------------------------- checks and helpers
def check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1) (the fraction of weights removed), got {sparsity!r}")
    return float(sparsity)


def check_nm(n, m) -> None:
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int) \
            or not 1 <= n < m:
        raise ValueError(f"N:M needs integers 1 <= n < m, got n={n!r}, m={m!r}")


def check_sparsity_form(sparsity, n, m) -> float | None:
    """The sparsity to remove per row, or None for N:M (``ValueError`` on a mismatch)."""
    if (n is None) != (m is None):
        raise ValueError(f"N:M pruning needs both n and m (or neither), got n={n!r}, m={m!r}")
    if n is None:
        return check_sparsity(sparsity)
    check_nm(n, m)
    if sparsity is not None and abs(check_sparsity(sparsity) - (1 - n / m)) > 1e-9:
        raise ValueError(f"sparsity {sparsity!r} does not match {n}:{m}, which removes 1 - n/m = {1 - n / m:g}; "
                         f"pass sparsity=None (or {1 - n / m:g})")
    return None


def check_nm_shapes(weights: Mapping[str, torch.Tensor], n: int, m: int, scope: str) -> None:
    """Refuse weights whose reduction size is not a multiple of ``m`` (groups would straddle filters)."""
    misfits = [f"{key} {tuple(weight.shape)} (reduction size {weight[0].numel()})"
               for key, weight in weights.items() if weight[0].numel() % m]
    if misfits:
        raise ValueError(f"{n}:{m} sparsity needs the reduction size of every weight (in_features, or "
                         f"in_channels/groups*kh*kw for a conv) to be a multiple of m={m}; scope {scope!r} "
                         f"has {len(misfits)} that are not: {'; '.join(misfits[:5])}")


class ScopeWeights(dict):
    """``{key: weight}`` of a scope, each viewed (out, reduction...): transformers ``Conv1D`` weights, stored
    (in, out), are transposed views; ``transposed`` names them, so ``finish_masks`` turns their masks back."""

    def __init__(self, weights: Mapping[str, torch.Tensor], transposed: frozenset[str]):
        super().__init__({key: w.t() if key in transposed else w for key, w in weights.items()})
        self.transposed = transposed


def scope_weights(model: nn.Module, scope: str):
    """The adapter, the resolved scope name and the scope's ``ScopeWeights`` (``ValueError`` if empty)."""
    adapter = adapter_for(model)
    resolved = adapter.check_scope(scope)
    weights = prunable_weights(model, adapter.scope_predicate(resolved))
    if not weights:
        raise ValueError(f"prune scope {resolved!r} selects no weights of this {adapter.family} model")
    transposed = frozenset(f"{name}.weight" for name, module in model.named_modules()
                           if is_hf_conv1d(module) and f"{name}.weight" in weights)
    return adapter, resolved, ScopeWeights(weights, transposed)


def checked_scores(weights: Mapping[str, torch.Tensor], score: ScoreFn) -> dict[str, torch.Tensor]:
    scores = {}
    for key, weight in weights.items():
        value = score(key, weight)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(weight.shape):
            raise ValueError(f"score({key!r}) must return a tensor of the weight's shape {tuple(weight.shape)}, "
                             f"got {getattr(value, 'shape', type(value).__name__)}")
        value = value.detach().float()
        if not torch.isfinite(value).all():
            raise ValueError(f"score({key!r}) has non-finite values")
        scores[key] = value
    return scores


def finish_masks(masks: dict[str, torch.Tensor], title: str, transposed: frozenset[str] = frozenset()
            ) -> dict[str, torch.Tensor]:
    """Bool CPU masks in the weights' own layout (``transposed``: the ``ScopeWeights`` views to turn back)."""
    masks = {key: (mask.t() if key in transposed else mask).to("cpu", torch.bool).contiguous()
             for key, mask in masks.items()}
    summary = sparsity_summary(masks)
    log.info("%s: %d weights in %d tensors, sparsity %.4f", title, summary["total"], len(masks), summary["sparsity"])
    log.debug("%s", format_summary(summary))    # per layer; `starfish-fast prune` prints it
    return masks


# ----------------------------------------------------------------------------- unstructured
def magnitude_masks(model: nn.Module, sparsity: float, scope: str = "auto", per: str = "layer",
                    score: ScoreFn = magnitude_score) -> dict[str, torch.Tensor]:
    """Unstructured masks removing the lowest-scoring ``sparsity`` fraction of each layer
    (``per="layer"``) or of the whole scope at once (``per="global"``)."""
    sparsity = check_sparsity(sparsity)
    if per not in ("layer", "global"):
        raise ValueError(f"per must be 'layer' or 'global', got {per!r}")
    _, resolved, weights = scope_weights(model, scope)
    scores = checked_scores(weights, score)
    if per == "layer":
        masks = {key: magnitude_mask(value, sparsity) for key, value in scores.items()}
    else:
        masks = _threshold_masks(scores, sparsity)
    return finish_masks(masks, f"magnitude pruning, {per}, sparsity {sparsity:g}, scope {resolved}", weights.transposed)


def magnitude_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """One layer's bool keep-mask removing its lowest ``sparsity`` fraction of ``scores`` (exactly
    ``round(sparsity * size)``): what ``magnitude_masks(per="layer")`` does to each layer, for callers
    that hold one layer at a time (``models.hf_stream``)."""
    return _threshold_masks({"": scores}, sparsity)[""]


def _threshold_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over all of ``scores``; ties at the threshold are pruned in order until the
    count is exact. kthvalue needs no int64 index array, unlike topk or a sort: two float32 copies
    of the scores (5 GB for DeiT3-H's 629M prunable weights with per="global"); DeiT-B's 85M take
    10 s on two CPU cores."""
    total = sum(value.numel() for value in scores.values())
    n_prune = round(sparsity * total)
    if n_prune == 0:
        return {key: torch.ones_like(value, dtype=torch.bool) for key, value in scores.items()}
    threshold = torch.kthvalue(torch.cat([value.flatten() for value in scores.values()]), n_prune).values
    ties_to_prune = n_prune - sum(int((value < threshold).sum()) for value in scores.values())
    masks = {}
    for key, value in scores.items():
        keep = (value >= threshold).flatten()
        if ties_to_prune:
            ties = (value.flatten() == threshold).nonzero().squeeze(1)[:ties_to_prune]   # (<= ties_to_prune,)
            keep[ties] = False
            ties_to_prune -= ties.numel()
        masks[key] = keep.view(value.shape)
    return masks


# ----------------------------------------------------------------------------- N:M
def nm_masks(model: nn.Module, n: int = 2, m: int = 4, scope: str = "auto",
             score: ScoreFn = magnitude_score) -> dict[str, torch.Tensor]:
    """N:M masks: in every group of ``m`` consecutive entries along each weight's reduction
    dimension, exactly ``n`` (the highest-scoring) are kept."""
    check_nm(n, m)
    _, resolved, weights = scope_weights(model, scope)
    check_nm_shapes(weights, n, m, resolved)
    masks = {key: nm_mask(value, n, m) for key, value in checked_scores(weights, score).items()}
    return finish_masks(masks, f"{n}:{m} pruning, scope {resolved}", weights.transposed)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """One layer's N:M bool keep-mask; ``scores`` viewed (out, reduction...), the reduction a multiple of m."""
    groups = scores.reshape(scores.shape[0], -1, m)            # (out, reduction/m, m)
    return keep_largest(groups, m - n, dim=-1).view(scores.shape)


# ----------------------------------------------------------------------------- structured
def structured_masks(model: nn.Module, sparsity: float, scope: str = "auto", kind: str | None = None,
                     score: ScoreFn = magnitude_score) -> dict[str, torch.Tensor]:
    """Structured masks: whole MLP neurons (``mlp``), QK head dimensions (``qk``), both
    (``qk_mlp``), or conv output channels (``channel``: MobileNetV1 and any CNN); ``sparsity`` of each
    layer's groups is removed. Without ``kind``: ``channel`` for CNNs; for ViTs ``qk`` with the
    attention-only scopes (qk, qkv, qkv_out), ``qk_mlp`` with qk_mlp, ``mlp`` otherwise; for other
    models with timm ``Mlp`` blocks, ``mlp`` with the linear and mlp scopes.
    Weights of the scope that the kind does not touch get all-True masks."""
    sparsity = check_sparsity(sparsity)
    adapter, resolved, weights = scope_weights(model, scope)
    pairs = adapter.mlp_pairs(model)
    kind = kind if kind is not None else _default_kind(adapter.family, resolved, bool(pairs))
    if kind not in STRUCTURED_KINDS:
        raise ValueError(f"unknown structured kind {kind!r}; allowed: {', '.join(STRUCTURED_KINDS)}")
    allowed = {"mobilenetv1": ("channel",), "generic": ("mlp", "channel")}.get(adapter.family, ("mlp", "qk", "qk_mlp"))
    if kind not in allowed:
        raise ValueError(f"structured kind {kind!r} does not apply to {adapter.family} models; allowed: "
                         f"{', '.join(allowed)}")
    scores = checked_scores(weights, score)
    masks = {key: torch.ones_like(value, dtype=torch.bool) for key, value in scores.items()}
    if kind in ("mlp", "qk_mlp"):
        masks.update(_mlp_neuron_masks(pairs, scores, sparsity, resolved))
    if kind in ("qk", "qk_mlp"):
        masks.update(_qk_masks(model, scores, sparsity, resolved))
    if kind == "channel":
        masks.update(_channel_masks(model, scores, sparsity, resolved))
    return finish_masks(masks, f"structured {kind} pruning, sparsity {sparsity:g}, scope {resolved}",
                        weights.transposed)


def _default_kind(family: str, scope: str, has_mlp: bool) -> str:
    if family in ("mobilenetv1", "generic"):
        return "mlp" if family == "generic" and has_mlp and scope in ("linear", "mlp") else "channel"
    return {"qk": "qk", "qkv": "qk", "qkv_out": "qk", "qk_mlp": "qk_mlp"}.get(scope, "mlp")


def _mlp_neuron_masks(pairs, scores, sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    masks = {}
    for fc1_key, fc2_key in [(f"{fc1}.weight", f"{fc2}.weight") for fc1, fc2 in pairs if f"{fc1}.weight" in scores]:
        if fc2_key not in scores:
            raise ValueError(f"structured mlp pruning needs {fc2_key} in the scope beside {fc1_key}")
        neuron_scores = scores[fc1_key].sum(1) + scores[fc2_key].sum(0)   # (hidden,): fc1 row + fc2 column
        keep = keep_largest(neuron_scores, round(sparsity * neuron_scores.numel()))
        masks[fc1_key] = keep[:, None].expand_as(scores[fc1_key])          # (hidden, D)
        masks[fc2_key] = keep[None, :].expand_as(scores[fc2_key])          # (D, hidden)
    if not masks:
        raise ValueError(f"structured mlp pruning needs the MLP weights in the prune scope; {scope!r} has none "
                         f"(use mlp, qk_mlp or qkv_out_mlp)")
    return masks


def _qk_masks(model: nn.Module, scores, sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    masks = {}
    for key, value in scores.items():
        suffix = next((s for s in QKV_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue
        attention = model.get_submodule(key[:-len(suffix)] + QKV_SUFFIXES[suffix])
        heads = attention.num_heads
        inner = value.shape[0] // 3                   # rows [q | k | v], each heads * head_dim
        if value.shape[0] % 3 or inner % heads:
            raise ValueError(f"{key} {tuple(value.shape)}: rows are not [q | k | v] with {heads} equal heads")
        row_scores = value.sum(1)                                                 # (3 * inner,)
        pair_scores = (row_scores[:inner] + row_scores[inner:2 * inner]).view(heads, -1)  # (heads, head_dim)
        keep = keep_largest(pair_scores, round(sparsity * pair_scores.shape[1]), dim=1).flatten()  # (inner,)
        rows = torch.cat([keep, keep, torch.ones_like(keep)])                    # (3 * inner,): v kept
        masks[key] = rows[:, None].expand_as(value)
    if not masks:
        raise ValueError(f"structured qk pruning needs the fused qkv weights in the prune scope; {scope!r} has "
                         f"none (use qk, qkv, qkv_out, qk_mlp or qkv_out_mlp)")
    return masks


def _channel_masks(model: nn.Module, scores, sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    masks = {}
    for key, value in scores.items():
        if not isinstance(modules.get(key[:-len(".weight")]), nn.Conv2d):
            continue
        filter_scores = value.flatten(1).sum(1)                                   # (out_channels,)
        keep = keep_largest(filter_scores, round(sparsity * filter_scores.numel()))
        masks[key] = keep.view(-1, 1, 1, 1).expand_as(value)                     # whole filters
    if not masks:
        raise ValueError(f"structured channel pruning needs convs in the prune scope; {scope!r} has none "
                         f"(use conv_only, conv_fc, conv_dw or all)")
    return masks


# ----------------------------------------------------------------------------- summary
def sparsity_summary(masks: Mapping[str, torch.Tensor]) -> dict:
    """``{"layers": {key: {shape, total, pruned, sparsity}}, "total", "pruned", "sparsity"}``."""
    layers = {}
    for key, mask in masks.items():
        total = mask.numel()
        pruned = total - int(torch.count_nonzero(mask))
        layers[key] = {"shape": list(mask.shape), "total": total, "pruned": pruned,
                       "sparsity": pruned / total if total else 0.0}
    total = sum(layer["total"] for layer in layers.values())
    pruned = sum(layer["pruned"] for layer in layers.values())
    return {"layers": layers, "total": total, "pruned": pruned, "sparsity": pruned / total if total else 0.0}


def format_summary(summary: Mapping) -> str:
    width = max([len(key) for key in summary["layers"]] + [5])
    lines = [f"{key:<{width}}  {str(tuple(layer['shape'])):>20}  sparsity {layer['sparsity']:.4f}"
             for key, layer in summary["layers"].items()]
    lines.append(f"{'total':<{width}}  {summary['total']:>20,}  sparsity {summary['sparsity']:.4f}")
    return "\n".join(lines)
