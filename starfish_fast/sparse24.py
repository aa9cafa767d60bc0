"""2:4 layers in a model for healing: ``SemiStructuredLinear`` and the swaps that put it in and take it out.

    from starfish_fast.sparse24 import convert_linears, restore_linears
    convert_linears(model, masks, torch.bfloat16, choice=plan.semi_structured_choice)   # in place
    ...                                                                                  # heal
    restore_linears(model)                                       # plain nn.Linear again, same parameters

The layer runs ``torch.ops.starfish_fast.sparse24_linear`` (``kernels/sparse24_linear.py``): on its backend's
packed weight where one serves (the mask is fixed and the weights change every step, so the forward packs the
current masked weight on every call, in place for ``cached_cusparselt``), else the dense masked product, with
one warning per reason. The backward is dense with the weight gradient masked, so pruned weights stay exactly
zero. Which backend a layer gets is the plan's (``rules.decide_two_four`` on the probe's timings,
``probe_sparse24``); which backends can run here and packing: ``sparse24_backends``; the inference export:
``sparse24_export``.

Measured (H200, torch 2.11, cuSPARSELt 0.8.0, bf16, DeiT-B linears at 25,216 tokens): torch's cuSPARSELt
path 0.5-1.2 ms per linear against 0.05-0.21 ms dense (3-14x slower: its plan is built on every call), a whole
2:4 DeiT-B forward at batch 128 0.37x of dense; CUTLASS refuses sm90
(bench/results/gpu_check_h200_2026-12-04/sparse24_probe.jsonl). ``cached_cusparselt`` is unmeasured until the
next GPU run (``bench/gpu_check_sparse24.py``).
"""
from __future__ import annotations

import importlib
import warnings
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from starfish_fast.kernels import register_layer, sparse24_linear
# the backends' names most callers want with the layer (tests patch choose_backend here: the layer's lookup)
from starfish_fast.sparse24_backends import (BACKENDS, PACKERS, backend_reason, choose_backend,  # noqa: F401
                                             is_two_four, pack, semi_structured_supported)

_WARNED: set[str] = set()


def warn_once(message: str, key: str | None = None, stacklevel: int = 3) -> None:
    """A ``RuntimeWarning`` the first time ``key`` (default: the message) is seen in this process."""
    if (key or message) not in _WARNED:
        _WARNED.add(key or message)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


class SemiStructuredLinear(nn.Module):
    """A linear layer with a fixed 2:4 mask whose forward runs on sparse tensor cores where it can.

    Holds the same ``weight`` and ``bias`` parameters as the ``nn.Linear`` it replaces (state-dict keys
    unchanged; the mask is a non-persistent buffer). Weights at masked positions are zeroed on construction
    and receive zero gradient, so they stay exactly zero. ``backend`` names the 2:4 backend to use (default:
    the first of ``DEFAULT_ORDER`` this GPU has)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, mask: torch.Tensor,
                 backend: str | None = None):
        super().__init__()
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        self.backend = backend
        self.register_buffer("mask", mask.detach().to(weight.device, torch.bool), persistent=False)
        with torch.no_grad():
            self.weight.mul_(self.mask)
        self._backends: dict[tuple[torch.device, torch.dtype], str | None] = {}
        self._packs: dict[tuple[torch.device, torch.dtype], object] = {}
        self._key = register_layer(self)

    def __setstate__(self, state):
        """A copy (deepcopy, pickle) gets its own key and packs: a pack holds one layer's weight."""
        super().__setstate__(state)
        self._packs, self._key = {}, register_layer(self)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor, backend: str | None = None) -> "SemiStructuredLinear":
        return cls(linear.weight, linear.bias, mask, backend)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the same parameters."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"backend={self.backend}")

    def backend_for(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """The 2:4 backend for inputs on ``device`` computing in ``dtype`` (None: dense fallback),
        chosen once; the engine calls it before compiling so compiled code only reads the cache."""
        key = (torch.device(device), dtype)
        if key not in self._backends:
            backend, reason = choose_backend(self.weight, self.mask, dtype, self.backend)
            if backend is None:
                warn_once(f"2:4 sparse layer uses the dense masked path: {reason}", stacklevel=4)
            self._backends[key] = backend
        return self._backends[key]

    def packed(self, dtype: torch.dtype, masked: torch.Tensor, bias: torch.Tensor | None):
        """This step's masked weight packed for the chosen backend (in place where the backend allows)."""
        key = (masked.device, dtype)
        self._packs[key] = pack(self._backends[key], masked, bias, self._packs.get(key))
        return self._packs[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autocasting = torch.is_autocast_enabled(x.device.type)
        if not autocasting and x.dtype != self.weight.dtype:
            return F.linear(x, self.weight * self.mask, self.bias)      # mismatched dtypes: torch's own error
        dtype = torch.get_autocast_dtype(x.device.type) if autocasting else self.weight.dtype
        layer = 0 if self.backend_for(x.device, dtype) is None else self._key      # 0: the dense masked product
        bias = None if self.bias is None else self.bias.to(dtype)
        return sparse24_linear(x.to(dtype), self.weight.to(dtype), self.mask, bias, layer=layer)


def linear_children(model: nn.Module, kind: type):
    """``(parent, child name, full name, module)`` for every submodule of exactly type ``kind``.
    Exact type: nn.MultiheadAttention's out_proj (a Linear subclass) is read by fused attention
    kernels through its weight, never called, so it cannot be swapped."""
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if type(child) is kind:
                yield parent, child_name, f"{parent_name}.{child_name}" if parent_name else child_name, child


def two_four_linears(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, nn.Linear]:
    """Every swappable ``nn.Linear`` whose ``<name>.weight`` mask is 2:4, by module name."""
    return {name: linear for _, _, name, linear in linear_children(model, nn.Linear)
            if f"{name}.weight" in masks and is_two_four(masks[f"{name}.weight"])}


def convert_linears(model: nn.Module, masks: Mapping[str, torch.Tensor], compute_dtype: torch.dtype | None = None,
                    choice: Mapping[str, str] | None = None) -> list[str]:
    """Replace, in place, each ``nn.Linear`` whose ``<name>.weight`` mask is 2:4 by a ``SemiStructuredLinear``
    sharing its parameters; the names of the replaced modules. With ``choice`` (a ``Decision.choice``) only
    the layers it gives a 2:4 backend, on that backend; without, every 2:4 layer on the default backend.
    With ``compute_dtype`` each layer's backend is checked now (checks, probes and the fallback warning stay
    out of a later compiled forward)."""
    replaced = []
    linears = two_four_linears(model, masks)
    for parent, child_name, name, linear in list(linear_children(model, nn.Linear)):
        backend = None if choice is None else choice.get(name, "dense")
        if name not in linears or backend == "dense":
            continue
        layer = SemiStructuredLinear.from_linear(linear, masks[f"{name}.weight"], backend)
        if compute_dtype is not None:
            layer.backend_for(layer.weight.device, compute_dtype)
        setattr(parent, child_name, layer)
        replaced.append(name)
    return replaced


def restore_linears(model: nn.Module) -> list[str]:
    """Replace, in place, every ``SemiStructuredLinear`` by an ``nn.Linear`` with its parameters."""
    restored = []
    for parent, child_name, name, layer in list(linear_children(model, SemiStructuredLinear)):
        setattr(parent, child_name, layer.to_linear())
        restored.append(name)
    return restored


def shape_key(linear: nn.Linear) -> str:
    """A linear's weight shape as the 2:4 timings key it: ``"out x in"``, `` nobias`` without a bias."""
    return f"{linear.out_features}x{linear.in_features}{'' if linear.bias is not None else ' nobias'}"


# Names that lived here before the 2:4 code was split (0.3): still importable from here, with a warning.
_MOVED = {"choose_semi_structured": "probe_sparse24", "layer_step": "probe_sparse24", "measure_layer": "probe_sparse24",
          "benchmark_layer": "probe_sparse24", "block_step_timer": "probe_sparse24", "DEFAULT_TOKENS": "probe_sparse24",
          "Decision": "rules", "MARGIN": "rules", "export_semi_structured": "sparse24_export",
          "save_decision": "sparse24_export", "SparseInferenceLinear": "sparse24_export",
          "CachedInferenceLinear": "sparse24_export"}


def __getattr__(name: str):
    if name in _MOVED:
        home = f"starfish_fast.{_MOVED[name]}"
        warnings.warn(f"starfish_fast.sparse24.{name} moved to {home}.{name}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(home), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
