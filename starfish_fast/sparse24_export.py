"""The 2:4 inference export: a copy of a model whose 2:4-masked linears run on the backend timed fastest here.

    from starfish_fast.sparse24_export import export_semi_structured
    sparse = export_semi_structured(model.cuda(), masks, torch.bfloat16, tokens=128 * 197, sidecar="m.2to4.json")
    sparse.sparse24_decision["reason"]          # the choice, its timings and why, also in the sidecar

Each chosen ``nn.Linear`` is replaced by a new module holding the packed weight (``SparseInferenceLinear``,
torch's 2:4 tensor) or the packed plan (``CachedInferenceLinear``, cuSPARSELt with its plan kept); the rest
of the copy is untouched. The choice is ``probe_sparse24.choose_semi_structured``'s (timings, then the rules).
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from starfish_fast.probe_sparse24 import DEFAULT_TOKENS, choose_semi_structured
from starfish_fast.rules import Decision
from starfish_fast.sparse24 import linear_children, restore_linears, two_four_linears
from starfish_fast.sparse24_backends import TorchPack, pack

log = logging.getLogger(__name__)


class SparseInferenceLinear(nn.Linear):
    """An ``nn.Linear`` holding a packed 2:4 weight: its output is made contiguous (the sparse kernels can
    return a transposed layout, which would push SDPA off its fused kernels after the qkv projection)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias).contiguous()


class CachedInferenceLinear(nn.Linear):
    """An ``nn.Linear`` whose forward runs its ``cached`` pack (``cusparselt.CachedSparseLinear``); the
    dense masked weight stays its parameter (state dict unchanged). Do not move it to another device."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cached(x.reshape(-1, x.shape[-1]).to(self.cached.dtype))             # (tokens, out)
        return y.view(*x.shape[:-1], -1)                                              # (..., out)


def save_decision(decision: Decision, path: str | os.PathLike) -> None:
    """The decision's record as JSON at ``path`` (written atomically): an export's sidecar."""
    from starfish_fast.checkpoint import save_json_atomic
    save_json_atomic(decision.record(), path)


def _inference_linear(linear: nn.Linear, mask: torch.Tensor, backend: str, dtype: torch.dtype) -> nn.Linear:
    """A new module in ``linear``'s place: its masked weight packed for ``backend`` in ``dtype``."""
    with torch.no_grad():
        masked = (linear.weight * mask.to(device=linear.weight.device, dtype=torch.bool)).contiguous()
        bias = None if linear.bias is None else linear.bias.to(dtype)
        packed = pack(backend, masked.to(dtype), bias)
    kind = SparseInferenceLinear if isinstance(packed, TorchPack) else CachedInferenceLinear
    swapped = kind(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    if isinstance(packed, TorchPack):
        swapped.weight, swapped.bias = nn.Parameter(packed.weight, requires_grad=False), linear.bias
    else:
        swapped.weight, swapped.bias, swapped.cached = linear.weight, linear.bias, packed
    return swapped


def export_semi_structured(model: nn.Module, masks: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
                           *, mode: str = "auto", tokens: int = DEFAULT_TOKENS,
                           candidates: Sequence[str] | None = None, measure: Callable | None = None,
                           sidecar: str | os.PathLike | None = None) -> nn.Module:
    """A copy of ``model`` (in ``dtype`` if given) whose 2:4-masked ``nn.Linear`` layers run on the backend
    ``choose_semi_structured`` measured fastest at ``tokens`` tokens (``mode="on"``: 2:4 wherever a backend
    takes the layer). The decision's record is the copy's ``sparse24_decision`` and, with ``sidecar``, a
    JSON file. Needs the model on a CUDA GPU; under ``on``, ``RuntimeError`` naming the reason when not a
    single linear can be converted."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise RuntimeError(f"export_semi_structured needs the model on a CUDA GPU (it is on {device}): "
                           f"2:4 sparse kernels are CUDA-only; use export_dense for a portable file")
    exported = copy.deepcopy(model).eval()
    restore_linears(exported)
    if dtype is not None:
        exported.to(dtype)
    compute_dtype = dtype or next(exported.parameters()).dtype
    decision = choose_semi_structured(exported, masks, device, compute_dtype, mode, tokens=tokens,
                                      candidates=candidates, measure=measure)
    chosen = {name for name in two_four_linears(exported, masks) if decision.choice.get(name, "dense") != "dense"}
    for parent, child_name, name, linear in list(linear_children(exported, nn.Linear)):
        if name in chosen:
            setattr(parent, child_name, _inference_linear(linear, masks[f"{name}.weight"], decision.choice[name],
                                                          compute_dtype))
    if mode == "on" and not decision.semi_structured:
        raise RuntimeError(f"no linear layer could hold 2:4 weights: {decision.reason}")
    exported.sparse24_decision = decision.record()
    if sidecar is not None:
        save_decision(decision, sidecar)
    log.info("2:4 export: %s", decision.reason)
    return exported
