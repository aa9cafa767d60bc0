"""2:4 semi-structured linear layers for healing, and the checks that decide where they can run.

    from starfish_fast.sparse24 import SemiStructuredLinear, convert_linears, semi_structured_supported
    layer = SemiStructuredLinear.from_linear(model.blocks[0].mlp.fc1, mask)  # shares weight and bias
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)          # x @ pack(W * mask).T on sparse tensor cores where the GPU supports it
    names = convert_linears(model, masks)     # swap every nn.Linear whose mask is 2:4, in place
    ok, reason = semi_structured_supported(layer.weight, layer.mask, torch.bfloat16)
    sparse_model = export_semi_structured(model.cuda(), masks, dtype=torch.bfloat16)   # for inference

The mask is fixed and the weights change every step, so the forward packs the current masked
weight with ``SparseSemiStructuredTensor.from_dense`` on every call and multiplies with the
sparse kernel. Only ``x @ W.T`` maps onto 2:4 hardware with a row-wise mask: ``dX = dY @ W``
would need ``W.T`` to be 2:4 too (a transposable mask), so the backward is dense, with the weight
gradient masked so pruned weights stay exactly zero.

Where the sparse kernel cannot serve (CPU tensors, a GPU without a 2:4 backend, dtypes other than
fp16/bf16, shapes the backend refuses, a mask that is not 2:4) the layer computes the dense masked
product ``F.linear(x, W * mask, b)`` and warns once per reason. Backends: cuSPARSELt where torch
has it (sm80 and newer; what ``to_sparse_semi_structured`` itself prefers), else CUTLASS, whose
kernels torch builds for sm8x only. Whether the sparse forward is faster depends on the GPU and
the shapes: ``benchmark_layer`` measures it, and the engine swaps layers only where it wins.
"""
from __future__ import annotations

import copy
import functools
import logging
import statistics
import warnings
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

SPARSE_DTYPES = (torch.float16, torch.bfloat16)
# Used when a torch version does not publish its backend's minimum shapes: generous multiples that
# both backends accept for fp16/bf16 (CUTLASS 32x64, cuSPARSELt 16x16 in torch 2.14).
CONSERVATIVE_MIN_SHAPE = (64, 64)
_WARNED_REASONS: set[str] = set()


def is_two_four(mask: torch.Tensor) -> bool:
    """True when a 2-D mask keeps at most 2 of every 4 consecutive entries along its rows (the
    layout 2:4 kernels take; fewer kept is fine, the packed format stores the zeros)."""
    if mask.dim() != 2 or mask.shape[1] % 4:
        return False
    kept_per_group = (mask != 0).reshape(mask.shape[0], -1, 4).sum(-1)    # (rows, cols / 4)
    return bool((kept_per_group <= 2).all())


def _min_shape(backend, dtype: torch.dtype) -> tuple[int, int]:
    config = getattr(backend, "_DTYPE_SHAPE_CONSTRAINTS", {}).get(dtype)
    rows = getattr(config, "sparse_min_rows", None)
    cols = getattr(config, "sparse_min_cols", None)
    return (rows, cols) if rows and cols else CONSERVATIVE_MIN_SHAPE


def _device_backend(device: torch.device):
    """The 2:4 tensor subclass this GPU can use, or None and why."""
    if torch.version.hip:
        return None, "ROCm build: only the CUDA 2:4 backends are wired here"
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if major >= 8 and torch.backends.cusparselt.is_available():
        return torch.sparse.SparseSemiStructuredTensorCUSPARSELT, ""
    if major == 8:
        return torch.sparse.SparseSemiStructuredTensorCUTLASS, ""
    return None, (f"GPU {name} (sm{major}{minor}) has no 2:4 backend: torch's CUTLASS kernels need sm8x "
                  f"and cuSPARSELt is {'not available' if major >= 8 else 'for sm80+ only'}")


@functools.lru_cache(maxsize=None)
def _probe(device: torch.device, dtype: torch.dtype, backend) -> str:
    """Run one small sparse product against its dense twin; '' if it works, else why not.
    Catches what capability checks cannot see (a cuSPARSELt build that fails on this GPU)."""
    rows, cols = _min_shape(backend, dtype)
    pattern = torch.tensor([1.0, 0.0, 1.0, 0.0], device=device, dtype=dtype)
    weight = torch.randn(rows, cols, device=device, dtype=dtype) * pattern.repeat(cols // 4)  # (rows, cols), 2:4
    x = torch.randn(8, cols, device=device, dtype=dtype)                                       # (8, cols)
    try:
        sparse = F.linear(x, backend.from_dense(weight))
    except Exception as error:  # any failure inside torch's backend means: use the dense path
        return f"{backend.__name__} failed on this GPU ({type(error).__name__}: {str(error).splitlines()[0]})"
    if not torch.allclose(sparse, F.linear(x, weight), rtol=2e-2, atol=2e-2):
        return f"{backend.__name__} gave wrong results on this GPU"
    return ""


def choose_backend(weight: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype | None = None):
    """``(backend class, "")`` when ``weight`` (computed in ``dtype``) can run as 2:4 with ``mask``,
    else ``(None, reason)``."""
    dtype = dtype or weight.dtype
    shape = tuple(weight.shape)
    if tuple(mask.shape) != shape:
        return None, f"mask shape {tuple(mask.shape)} differs from weight shape {shape}"
    if not is_two_four(mask):
        return None, f"mask of the {shape} weight is not 2:4 (at most 2 kept in every 4 along a row)"
    if not weight.is_cuda:
        return None, f"{weight.device.type} tensors: 2:4 semi-structured sparsity needs a CUDA GPU"
    if dtype not in SPARSE_DTYPES:
        return None, f"dtype {dtype}: the 2:4 kernels take float16 or bfloat16 (use bf16 autocast)"
    backend, reason = _device_backend(weight.device)
    if backend is None:
        return None, reason
    rows, cols = _min_shape(backend, dtype)
    if shape[0] % rows or shape[1] % cols:
        return None, (f"weight shape {shape} is not a multiple of ({rows}, {cols}), the smallest tile "
                      f"{backend.__name__} takes for {dtype}")
    reason = _probe(weight.device, dtype, backend)
    return (None, reason) if reason else (backend, "")


def semi_structured_supported(weight: torch.Tensor, mask: torch.Tensor,
                              dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """``(True, "")`` when the sparse forward can run for this weight and mask in ``dtype``
    (default: the weight's), else ``(False, reason)``."""
    backend, reason = choose_backend(weight, mask, dtype)
    return backend is not None, reason


def _warn_fallback(reason: str) -> None:
    if reason not in _WARNED_REASONS:
        _WARNED_REASONS.add(reason)
        warnings.warn(f"2:4 sparse layer uses the dense masked path: {reason}", RuntimeWarning, stacklevel=4)


class _SemiStructuredMatmul(torch.autograd.Function):
    """y = x @ pack(W * mask).T + b with a dense backward (masked weight gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, dtype, backend):
        x2d = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()          # (tokens, in)
        masked = (weight * mask).to(dtype).contiguous()                   # (out, in), exactly 2:4
        # the sparse kernels may return (tokens, out) with a non-unit last-dim stride; made contiguous so that
        # q/k/v split from it keep the stride-1 last dim SDPA's fused kernels need
        y = F.linear(x2d, backend.from_dense(masked), None if bias is None else bias.to(dtype)).contiguous()
        ctx.save_for_backward(x2d, masked, mask)
        ctx.input_shape, ctx.input_dtype, ctx.weight_dtype = x.shape, x.dtype, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], -1)                                  # (..., out)

    @staticmethod
    def backward(ctx, grad_y):
        x2d, masked, mask = ctx.saved_tensors
        grad_2d = grad_y.reshape(-1, grad_y.shape[-1]).to(masked.dtype)  # (tokens, out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_2d @ masked).view(ctx.input_shape).to(ctx.input_dtype)      # (..., in)
        if ctx.needs_input_grad[1]:
            grad_w = (grad_2d.t() @ x2d).mul_(mask).to(ctx.weight_dtype)               # (out, in), zero where pruned
        if ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0).to(ctx.bias_dtype)                                 # (out,)
        return grad_x, grad_w, grad_b, None, None, None


# Kept out of torch.compile graphs: whether Dynamo can trace the sparse tensor subclass being built
# inside an autograd.Function is unverified (no GPU here), so a compiled step runs this one call
# eagerly (a graph break) and compiles the rest.
@torch.compiler.disable
def _sparse_linear(x, weight, bias, mask, dtype, backend):
    with torch.autocast(x.device.type, enabled=False):   # the Function casts to `dtype` itself
        return _SemiStructuredMatmul.apply(x, weight, bias, mask, dtype, backend)


class SemiStructuredLinear(nn.Module):
    """A linear layer with a fixed 2:4 mask whose forward runs on sparse tensor cores where it can.

    Holds the same ``weight`` and ``bias`` parameters as the ``nn.Linear`` it replaces (state-dict
    keys unchanged; the mask is a non-persistent buffer). Weights at masked positions are zeroed
    on construction and receive zero gradient, so they stay exactly zero."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, mask: torch.Tensor):
        super().__init__()
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        self.register_buffer("mask", mask.detach().to(weight.device, torch.bool), persistent=False)
        with torch.no_grad():
            self.weight.mul_(self.mask)
        self._backends: dict[tuple[torch.device, torch.dtype], object] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor) -> "SemiStructuredLinear":
        return cls(linear.weight, linear.bias, mask)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the same parameters."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def backend_for(self, device: torch.device, dtype: torch.dtype):
        """The 2:4 backend for inputs on ``device`` computing in ``dtype`` (None: dense fallback),
        chosen once; the engine calls it before compiling so compiled code only reads the cache."""
        key = (torch.device(device), dtype)
        if key not in self._backends:
            backend, reason = choose_backend(self.weight, self.mask, dtype)
            if backend is None:
                _warn_fallback(reason)
            self._backends[key] = backend
        return self._backends[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autocasting = torch.is_autocast_enabled(x.device.type)
        if not autocasting and x.dtype != self.weight.dtype:
            return F.linear(x, self.weight * self.mask, self.bias)      # mismatched dtypes: torch's own error
        dtype = torch.get_autocast_dtype(x.device.type) if autocasting else self.weight.dtype
        backend = self.backend_for(x.device, dtype)
        if backend is None:
            return F.linear(x, self.weight * self.mask, self.bias)      # autograd masks grad_W by itself
        return _sparse_linear(x, self.weight, self.bias, self.mask, dtype, backend)


def _linear_children(model: nn.Module, kind: type):
    """``(parent, child name, full name, module)`` for every submodule of exactly type ``kind``.
    Exact type: nn.MultiheadAttention's out_proj (a Linear subclass) is read by fused attention
    kernels through its weight, never called, so it cannot be swapped."""
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if type(child) is kind:
                yield parent, child_name, f"{parent_name}.{child_name}" if parent_name else child_name, child


def convert_linears(model: nn.Module, masks: Mapping[str, torch.Tensor],
                    compute_dtype: torch.dtype | None = None) -> list[str]:
    """Replace, in place, every ``nn.Linear`` whose ``<name>.weight`` mask is 2:4 by a
    ``SemiStructuredLinear`` sharing its parameters; the names of the replaced modules. With
    ``compute_dtype`` each layer's backend is chosen now (checks, probes and the fallback warning
    stay out of a later compiled forward)."""
    replaced = []
    for parent, child_name, name, linear in list(_linear_children(model, nn.Linear)):
        mask = masks.get(f"{name}.weight")
        if mask is not None and is_two_four(mask):
            layer = SemiStructuredLinear.from_linear(linear, mask)
            if compute_dtype is not None:
                layer.backend_for(layer.weight.device, compute_dtype)
            setattr(parent, child_name, layer)
            replaced.append(name)
    return replaced


def restore_linears(model: nn.Module) -> list[str]:
    """Replace, in place, every ``SemiStructuredLinear`` by an ``nn.Linear`` with its parameters."""
    restored = []
    for parent, child_name, name, layer in list(_linear_children(model, SemiStructuredLinear)):
        setattr(parent, child_name, layer.to_linear())
        restored.append(name)
    return restored


# ----------------------------------------------------------------------------- measuring
def cuda_median_ms(fn: Callable[[], object], iters: int = 20, warmup: int = 5) -> float:
    """Median wall time of ``fn()`` on the current CUDA stream, in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def benchmark_layer(out_features: int, in_features: int, tokens: int, dtype: torch.dtype = torch.bfloat16,
                    backward: bool = True, iters: int = 20, device: str | torch.device = "cuda") -> dict:
    """Median ms of one healing-style call (bf16 autocast over fp32 weights, pack included) of the
    dense masked linear and of ``SemiStructuredLinear``, on random weights with a 2:4 mask.
    ``RuntimeError`` naming the reason where the sparse path cannot run."""
    device = torch.device(device)
    linear = nn.Linear(in_features, out_features, device=device)
    mask = torch.tensor([True, True, False, False], device=device).repeat(out_features, in_features // 4)
    layer = SemiStructuredLinear.from_linear(linear, mask)
    backend, reason = choose_backend(layer.weight, layer.mask, dtype)
    if backend is None:
        raise RuntimeError(f"the 2:4 path cannot run here: {reason}")
    x = torch.randn(tokens, in_features, device=device, requires_grad=backward)      # (tokens, in)
    grad_y = torch.randn(tokens, out_features, device=device, dtype=dtype)           # (tokens, out)

    def step(forward):
        def run():
            with torch.autocast(device.type, dtype=dtype):
                y = forward(x)
            if backward:
                y.backward(grad_y)
        return run

    dense_ms = cuda_median_ms(step(lambda inputs: F.linear(inputs, layer.weight * layer.mask, layer.bias)), iters)
    sparse_ms = cuda_median_ms(step(layer), iters)
    return {"backend": backend.__name__, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
            "speedup": dense_ms / sparse_ms}


# ----------------------------------------------------------------------------- inference export
class SparseInferenceLinear(nn.Linear):
    """An ``nn.Linear`` holding a packed 2:4 weight: its output is made contiguous (the sparse kernels can
    return a transposed layout, which would push SDPA off its fused kernels after the qkv projection)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias).contiguous()


def export_semi_structured(model: nn.Module, masks: Mapping[str, torch.Tensor],
                           dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of ``model`` (in ``dtype`` if given) whose ``nn.Linear`` layers with a 2:4 mask hold
    ``SparseSemiStructuredTensor`` weights; other layers stay dense (logged with the reason).
    Needs the model on a CUDA GPU with a 2:4 backend and fp16/bf16 weights; ``RuntimeError``
    naming the reason when not a single linear can be converted."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise RuntimeError(f"export_semi_structured needs the model on a CUDA GPU (it is on {device}): "
                           f"2:4 sparse kernels are CUDA-only; use export_dense for a portable file")
    exported = copy.deepcopy(model).eval()
    restore_linears(exported)
    if dtype is not None:
        exported.to(dtype)
    converted, kept_dense = [], {}
    for name, module in exported.named_modules():
        key = f"{name}.weight"
        # exact type: nn.MultiheadAttention's out_proj subclass is read by fused kernels, never called
        if type(module) is not nn.Linear or key not in masks:
            continue
        mask = masks[key].to(device=device, dtype=torch.bool)
        backend, reason = choose_backend(module.weight, mask)
        if backend is None:
            kept_dense[key] = reason
            continue
        with torch.no_grad():
            packed = backend.from_dense((module.weight * mask).contiguous())
        module.weight = nn.Parameter(packed, requires_grad=False)
        module.__class__ = SparseInferenceLinear
        converted.append(key)
    if not converted:
        reasons = sorted(set(kept_dense.values())) or ["no nn.Linear weight has a mask"]
        raise RuntimeError(f"no linear layer could hold 2:4 weights: {'; '.join(reasons[:3])}")
    log.info("2:4 export: %d linears sparse, %d kept dense%s", len(converted), len(kept_dense),
             "".join(f"\n  {key}: {reason}" for key, reason in kept_dense.items()))
    return exported
