"""The 2:4 linear as a torch custom op: ``y = x @ (W * mask).T + b`` on a 2:4 backend's packed weight, with a
dense backward whose weight gradient is masked (pruned weights stay exactly zero).

    from starfish_fast.kernels import sparse24_linear, sparse24_linear_reference
    y = sparse24_linear(x2d, weight, mask, bias)              # (tokens, out): plain torch, as the reference
    y = sparse24_linear(x2d, weight, mask, bias, layer=key)   # the packed product of a registered layer

A backend's pack is stateful and per layer (torch's 2:4 tensor built from this step's weight, or cuSPARSELt
with its plan kept), so the op takes a layer key: ``register_layer(layer)`` returns one for any object with
``packed(dtype, masked, bias) -> callable(x2d)`` (``sparse24.SemiStructuredLinear``), held weakly; key 0
runs the plain-torch product (the CPU implementation, and a layer no backend serves). The operands arrive
in the compute dtype (the caller casts under autocast; the casts stay in the graph). As a custom op with
a fake implementation and its autograd registered, ``torch.compile`` traces a block holding 2:4 layers as
one graph, the op opaque inside it.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

_LAYERS: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_KEYS = itertools.count(1)


def sparse24_linear_reference(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                              bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch: ``x @ (weight * mask).T + bias``."""
    return F.linear(x, weight * mask.to(weight.dtype), bias)


def register_layer(layer) -> int:
    """A key (> 0) under which the op finds ``layer.packed(dtype, masked, bias)``; the layer is held weakly."""
    key = next(_KEYS)
    _LAYERS[key] = layer
    return key


@torch.library.custom_op("starfish_fast::sparse24_linear", mutates_args=())
def _sparse24_linear_op(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor],
                        layer: int) -> torch.Tensor:
    """(tokens, in) x -> (tokens, out): layer 0 plain torch, else the registered layer's packed product."""
    if layer == 0:
        return sparse24_linear_reference(x, weight, mask, bias)
    masked = (weight * mask.to(weight.dtype)).contiguous()                         # (out, in), exactly 2:4
    with torch.autocast(x.device.type, enabled=False):     # the operands are in the compute dtype already
        return _LAYERS[layer].packed(x.dtype, masked, bias)(x.contiguous())       # (tokens, out)


@_sparse24_linear_op.register_fake
def _(x, weight, mask, bias, layer):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, mask, bias, _ = inputs
    ctx.save_for_backward(x, weight, mask)


def _backward(ctx, dy):
    """Dense: only ``x @ W.T`` maps onto 2:4 hardware with a row-wise mask (``dX = dY @ W`` would need a
    transposable mask)."""
    x, weight, mask = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
    dx = dy @ (weight * mask.to(weight.dtype)) if need_dx else None                # (tokens, in)
    dw = (dy.t() @ x) * mask.to(x.dtype) if need_dw else None                      # (out, in), zero where pruned
    db = dy.sum(0) if need_db else None                                            # (out,)
    return dx, dw, None, db, None


_sparse24_linear_op.register_autograd(_backward, setup_context=_setup_context)


def sparse24_linear(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None,
                    *, layer: int = 0) -> torch.Tensor:
    """``x @ (weight * mask).T + bias`` for ``x`` of shape (..., in) through the op (``layer``: a key from
    ``register_layer``; 0: plain torch)."""
    if tuple(mask.shape) != tuple(weight.shape) or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x (..., {x.shape[-1]}), weight {tuple(weight.shape)} and mask {tuple(mask.shape)} do "
                         f"not fit: the mask must match the weight, x's last dim its columns")
    y = _sparse24_linear_op(x.reshape(-1, x.shape[-1]), weight, mask, bias, layer)
    return y.view(*x.shape[:-1], weight.shape[0])
