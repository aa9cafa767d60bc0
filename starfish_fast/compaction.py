"""Structured-mask compaction: heal on smaller dense MLP weights when whole hidden neurons are pruned.

    plan = mlp_compaction_plan(model, masks)              # {} when no neuron is fully pruned
    student, student_masks = compact_model(model, masks, plan)
    ... heal student ...
    expand_into(model, student, plan)                     # write the result back into the full shapes

A hidden neuron j of an MLP (fc1 row j, fc2 column j) whose fc1 row *and* fc2 column
are both masked contributes nothing to the block output: its fc2 column is zero, so
``act(x W1[j] + b1[j]) * W2[:, j] = 0`` whatever the frozen bias b1[j] is, and its
masked weights get no gradient and no Adam moments. Dropping such neurons from fc1's
rows and fc2's columns gives the same block outputs, losses and kept-weight updates
with (1 - sparsity) of the MLP FLOPs, then the kept weights are written back. Only
neurons pruned on both sides are dropped; the others stay, masked as usual.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from starfish_fast.models import MLP_LAYERS, adapter_for, set_submodule

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class MlpCompaction:
    fc1: str                     # module path of fc1, e.g. "blocks.3.mlp.fc1"
    fc2: str
    kept: torch.Tensor           # (H',) indices of the hidden neurons that stay
    hidden: int                  # H, the full hidden width


def mlp_compaction_plan(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[MlpCompaction]:
    """Blocks whose MLP has neurons pruned in both fc1 (row) and fc2 (column)."""
    adapter = adapter_for(model)
    if adapter.family not in MLP_LAYERS:
        return []
    fc1_name, fc2_name = MLP_LAYERS[adapter.family]
    plan = []
    for block in adapter.block_names(model):
        fc1, fc2 = f"{block}.{fc1_name}", f"{block}.{fc2_name}"
        fc1_mask, fc2_mask = masks.get(f"{fc1}.weight"), masks.get(f"{fc2}.weight")
        if fc1_mask is None or fc2_mask is None:
            continue
        alive = fc1_mask.bool().any(dim=1) | fc2_mask.bool().any(dim=0)           # (H,)
        if not alive.all():
            plan.append(MlpCompaction(fc1, fc2, alive.nonzero().flatten(), alive.numel()))
    return plan


def _sliced_linear(linear: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    weight = linear.weight.detach()
    weight = weight[rows] if rows is not None else weight                          # (H', D) for fc1
    weight = weight[:, cols] if cols is not None else weight                       # (D, H') for fc2
    bias = linear.bias
    if bias is not None and rows is not None:
        bias = bias[rows]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias.detach())
    out.weight.requires_grad_(linear.weight.requires_grad)
    if bias is not None:
        out.bias.requires_grad_(linear.bias.requires_grad)
    return out


def compact_model(model: nn.Module, masks: dict[str, torch.Tensor], plan: list[MlpCompaction]
                  ) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy of ``model`` with the planned MLPs narrowed, and the masks sliced to match."""
    compact = copy.deepcopy(model)
    compact_masks = dict(masks)
    for item in plan:
        kept = item.kept.to(model.get_submodule(item.fc1).weight.device)
        set_submodule(compact, item.fc1, _sliced_linear(model.get_submodule(item.fc1), kept, None))
        set_submodule(compact, item.fc2, _sliced_linear(model.get_submodule(item.fc2), None, kept))
        compact_masks[f"{item.fc1}.weight"] = masks[f"{item.fc1}.weight"][item.kept]
        compact_masks[f"{item.fc2}.weight"] = masks[f"{item.fc2}.weight"][:, item.kept]
    removed = sum(item.hidden - item.kept.numel() for item in plan)
    log.info("compacted %d MLPs: %d of %d hidden neurons removed", len(plan), removed,
             sum(item.hidden for item in plan))
    return compact, compact_masks


@torch.no_grad()
def expand_into(model: nn.Module, compact: nn.Module, plan: list[MlpCompaction]) -> None:
    """Copy every parameter and buffer of ``compact`` back into ``model`` (full shapes)."""
    narrowed = {f"{item.fc1}.weight": (item, "rows") for item in plan}
    narrowed.update({f"{item.fc2}.weight": (item, "cols") for item in plan})
    narrowed.update({f"{item.fc1}.bias": (item, "rows") for item in plan})
    full = dict(model.named_parameters()) | dict(model.named_buffers())
    for key, value in list(compact.named_parameters()) + list(compact.named_buffers()):
        target, value = full[key], value.to(full[key].device)
        if key not in narrowed:
            target.copy_(value)
            continue
        item, side = narrowed[key]
        kept = item.kept.to(target.device)
        if side == "rows":
            target.index_copy_(0, kept, value)
        else:
            target.index_copy_(1, kept, value)
