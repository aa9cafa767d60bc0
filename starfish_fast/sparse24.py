"""2:4 semi-structured linears for healing and inference, used only where measured faster than dense.

    from starfish_fast.sparse24 import choose_semi_structured, convert_linears, export_semi_structured
    decision = choose_semi_structured(model, masks, "cuda", torch.bfloat16, "auto", tokens=128 * 197,
                                      purpose="heal")      # times each backend per linear shape, here
    decision.choice          # {"blocks.0.mlp.fc1": "cached_cusparselt", "blocks.0.attn.proj": "dense", ...}
    decision.reason, decision.record()                    # one line for the plan; timings for a sidecar
    convert_linears(model, masks, torch.bfloat16, choice=decision.choice)   # swap the chosen ones, in place
    sparse = export_semi_structured(model.cuda(), masks, torch.bfloat16, tokens=128 * 197, sidecar="m.2to4.json")

Backends (``BACKENDS``): ``torch_cusparselt`` (torch's ``SparseSemiStructuredTensorCUSPARSELT``, sm80+),
``torch_cutlass`` (torch's CUTLASS kernels, sm8x only) and ``cached_cusparselt`` (``starfish_fast.cusparselt``:
cuSPARSELt with its plan kept, optional extra ``starfish_fast[sparse24]``). ``choose_semi_structured`` times
dense and every backend this GPU has on each distinct linear shape and keeps the fastest; a 2:4 backend must
beat dense by ``MARGIN`` (ties go to dense). ``"on"`` keeps the fastest 2:4 backend and warns once, with the
measured ratio, where it is slower than dense; ``"off"`` times nothing.

Healing: the mask is fixed and the weights change every step, so the forward packs the current masked weight
on every call (in place for ``cached_cusparselt``) and multiplies on the sparse kernel. Only ``x @ W.T`` maps
onto 2:4 hardware with a row-wise mask (``dX = dY @ W`` would need a transposable mask), so the backward is
dense, with the weight gradient masked so pruned weights stay exactly zero. Where no backend serves (CPU,
dtype, shape, mask) a layer computes the dense masked product and warns once per reason.

Measured (H200, torch 2.11, cuSPARSELt 0.8.0, bf16, DeiT-B linears at 25,216 tokens): torch's cuSPARSELt
path 0.5-1.2 ms per linear against 0.05-0.21 ms dense (3-14x slower: its plan is built on every call), a whole
2:4 DeiT-B forward at batch 128 0.37x of dense; CUTLASS refuses sm90. ``cached_cusparselt`` is unmeasured
until the next GPU run (``bench/gpu_check_sparse24.py``). A100/A10 figures are published ones only (README).
"""
from __future__ import annotations

import copy
import functools
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from starfish_fast import cusparselt
from starfish_fast.checkpoint import error_line
from starfish_fast.timing import cuda_median_ms

log = logging.getLogger(__name__)

SPARSE_DTYPES = (torch.float16, torch.bfloat16)
BACKENDS = ("torch_cusparselt", "torch_cutlass", "cached_cusparselt")
DEFAULT_ORDER = ("torch_cusparselt", "torch_cutlass")   # unmeasured "on" (convert_linears without a choice)
MODES, PURPOSES = ("auto", "on", "off"), ("inference", "heal")
# A 2:4 backend must be this much faster than dense to be chosen: below it a "win" is within the spread of
# repeated medians (unmeasured as yet: bench/gpu_check_sparse24.py times dense twice to measure that spread).
MARGIN = 0.03
DEFAULT_TOKENS = 128 * 197               # DeiT-B at batch 128
# Used when a torch version does not publish its backend's minimum shapes: generous multiples that
# both backends accept for fp16/bf16 (CUTLASS 32x64, cuSPARSELt 16x16 in torch 2.14).
CONSERVATIVE_MIN_SHAPE = (64, 64)
_WARNED: set[str] = set()


def is_two_four(mask: torch.Tensor) -> bool:
    """True when a 2-D mask keeps at most 2 of every 4 consecutive entries along its rows (the
    layout 2:4 kernels take; fewer kept is fine, the packed format stores the zeros)."""
    if mask.dim() != 2 or mask.shape[1] % 4:
        return False
    kept_per_group = (mask != 0).reshape(mask.shape[0], -1, 4).sum(-1)    # (rows, cols / 4)
    return bool((kept_per_group <= 2).all())


def _warn_once(message: str, key: str | None = None, stacklevel: int = 3) -> None:
    if (key or message) not in _WARNED:
        _WARNED.add(key or message)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


# ----------------------------------------------------------------------------- backends
class _TorchPack:
    """A weight packed by one of torch's 2:4 tensor subclasses; packing again makes a new one."""

    def __init__(self, cls, weight: torch.Tensor, bias: torch.Tensor | None):
        self.cls = cls
        self.repack(weight, bias)

    def repack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = self.cls.from_dense(weight), bias

    def __call__(self, x2d: torch.Tensor) -> torch.Tensor:
        # the sparse kernels may return (tokens, out) with a non-unit last-dim stride; made contiguous so
        # that q/k/v split from it keep the stride-1 last dim SDPA's fused kernels need
        return F.linear(x2d, self.weight, self.bias).contiguous()


PACKERS: dict[str, Callable] = {
    "torch_cusparselt": functools.partial(_TorchPack, torch.sparse.SparseSemiStructuredTensorCUSPARSELT),
    "torch_cutlass": functools.partial(_TorchPack, torch.sparse.SparseSemiStructuredTensorCUTLASS),
    "cached_cusparselt": cusparselt.CachedSparseLinear,
}
_TORCH_CLASSES = {"torch_cusparselt": torch.sparse.SparseSemiStructuredTensorCUSPARSELT,
                  "torch_cutlass": torch.sparse.SparseSemiStructuredTensorCUTLASS}


def pack(name: str, weight: torch.Tensor, bias: torch.Tensor | None = None, previous=None):
    """``weight`` (out, in; exactly 2:4, in the compute dtype) packed for backend ``name``: a callable
    ``x2d (tokens, in) -> (tokens, out)``. ``previous`` (the same layer's last pack) is packed again in place."""
    if previous is not None:
        previous.repack(weight, bias)
        return previous
    return PACKERS[name](weight, bias)


def _min_shape(name: str, dtype: torch.dtype) -> tuple[int, int]:
    config = getattr(_TORCH_CLASSES[name], "_DTYPE_SHAPE_CONSTRAINTS", {}).get(dtype)
    rows, cols = getattr(config, "sparse_min_rows", None), getattr(config, "sparse_min_cols", None)
    return (rows, cols) if rows and cols else CONSERVATIVE_MIN_SHAPE


def shape_reason(name: str, shape: Sequence[int], dtype: torch.dtype) -> str:
    """Why backend ``name`` cannot take a weight of ``shape`` (out, in) in ``dtype`` ('' if it can)."""
    if name == "cached_cusparselt":
        return cusparselt.unsupported(tuple(shape), dtype)
    rows, cols = _min_shape(name, dtype)
    if shape[0] % rows or shape[1] % cols:
        return f"weight shape {tuple(shape)} is not a multiple of ({rows}, {cols}), the smallest tile {name} takes"
    return ""


def backend_reason(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Why backend ``name`` cannot run on ``device`` in ``dtype`` ('' if it can: checked, then probed once)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"{device.type} tensors: 2:4 semi-structured sparsity needs a CUDA GPU"
    if dtype not in SPARSE_DTYPES:
        return f"dtype {dtype}: the 2:4 kernels take float16 or bfloat16 (use bf16 autocast)"
    if torch.version.hip:
        return "ROCm build: only the CUDA 2:4 backends are wired here"
    major, minor = torch.cuda.get_device_capability(device)
    gpu = f"GPU {torch.cuda.get_device_name(device)} (sm{major}{minor})"
    if name == "torch_cutlass" and major != 8:
        return f"{gpu}: torch's CUTLASS 2:4 kernels are built for sm8x only"
    if name != "torch_cutlass" and major < 8:
        return f"{gpu}: cuSPARSELt needs sm80 or newer"
    if name == "torch_cusparselt" and not torch.backends.cusparselt.is_available():
        return "this torch build has no cuSPARSELt"
    if name == "cached_cusparselt":
        try:
            cusparselt.require()
        except cusparselt.MissingExtraError as error:
            return str(error)
    return _probe(device, dtype, name)


@functools.lru_cache(maxsize=None)
def _probe(device: torch.device, dtype: torch.dtype, name: str) -> str:
    """Run one small sparse product against its dense twin; '' if it works, else why not.
    Catches what capability checks cannot see (a library build that fails on this GPU)."""
    rows, cols = (64, 64) if name == "cached_cusparselt" else _min_shape(name, dtype)
    pattern = torch.tensor([1.0, 0.0, 1.0, 0.0], device=device, dtype=dtype)
    weight = torch.randn(rows, cols, device=device, dtype=dtype) * pattern.repeat(cols // 4)  # (rows, cols), 2:4
    x = torch.randn(8, cols, device=device, dtype=dtype)                                       # (8, cols)
    try:
        sparse = pack(name, weight)(x)
    except Exception as error:  # any failure inside a backend means: use another one, or dense
        return f"{name} failed on this GPU ({error_line(error)})"
    if not torch.allclose(sparse, F.linear(x, weight), rtol=2e-2, atol=2e-2):
        return f"{name} gave wrong results on this GPU"
    return ""


def choose_backend(weight: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype | None = None,
                   name: str | None = None) -> tuple[str | None, str]:
    """``(backend name, "")`` when ``weight`` (computed in ``dtype``) can run as 2:4 with ``mask`` on
    backend ``name`` (default: the first of ``DEFAULT_ORDER`` that can), else ``(None, reason)``."""
    dtype = dtype or weight.dtype
    shape = tuple(weight.shape)
    if tuple(mask.shape) != shape:
        return None, f"mask shape {tuple(mask.shape)} differs from weight shape {shape}"
    if not is_two_four(mask):
        return None, f"mask of the {shape} weight is not 2:4 (at most 2 kept in every 4 along a row)"
    reasons = []
    for candidate in [name] if name else DEFAULT_ORDER:
        reason = backend_reason(candidate, weight.device, dtype) or shape_reason(candidate, shape, dtype)
        if not reason:
            return candidate, ""
        reasons.append(reason)
    return None, reasons[0]


def semi_structured_supported(weight: torch.Tensor, mask: torch.Tensor,
                              dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """``(True, "")`` when the sparse forward can run for this weight and mask in ``dtype``
    (default: the weight's), else ``(False, reason)``."""
    backend, reason = choose_backend(weight, mask, dtype)
    return backend is not None, reason


# ----------------------------------------------------------------------------- healing layer
class _SemiStructuredMatmul(torch.autograd.Function):
    """y = x @ pack(W * mask).T + b with a dense backward (masked weight gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, dtype, layer):
        x2d = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()          # (tokens, in)
        masked = (weight * mask).to(dtype).contiguous()                   # (out, in), exactly 2:4
        y = layer.packed(dtype, masked, None if bias is None else bias.to(dtype))(x2d)   # (tokens, out)
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


# Kept out of torch.compile graphs: whether Dynamo can trace the packing inside an autograd.Function is
# unverified (no GPU here), so a compiled step runs this one call eagerly (a graph break).
@torch.compiler.disable
def _sparse_linear(x, weight, bias, mask, dtype, layer):
    with torch.autocast(x.device.type, enabled=False):   # the Function casts to `dtype` itself
        return _SemiStructuredMatmul.apply(x, weight, bias, mask, dtype, layer)


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
                _warn_once(f"2:4 sparse layer uses the dense masked path: {reason}", stacklevel=4)
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
        if self.backend_for(x.device, dtype) is None:
            return F.linear(x, self.weight * self.mask, self.bias)      # autograd masks grad_W by itself
        return _sparse_linear(x, self.weight, self.bias, self.mask, dtype, self)


def _linear_children(model: nn.Module, kind: type):
    """``(parent, child name, full name, module)`` for every submodule of exactly type ``kind``.
    Exact type: nn.MultiheadAttention's out_proj (a Linear subclass) is read by fused attention
    kernels through its weight, never called, so it cannot be swapped."""
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if type(child) is kind:
                yield parent, child_name, f"{parent_name}.{child_name}" if parent_name else child_name, child


def two_four_linears(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, nn.Linear]:
    """Every swappable ``nn.Linear`` whose ``<name>.weight`` mask is 2:4, by module name."""
    return {name: linear for _, _, name, linear in _linear_children(model, nn.Linear)
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
    for parent, child_name, name, linear in list(_linear_children(model, nn.Linear)):
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
    for parent, child_name, name, layer in list(_linear_children(model, SemiStructuredLinear)):
        setattr(parent, child_name, layer.to_linear())
        restored.append(name)
    return restored


# ----------------------------------------------------------------------------- measuring
def _pattern_mask(shape: Sequence[int], device) -> torch.Tensor:
    return torch.tensor([True, True, False, False], device=device).repeat(shape[0], shape[1] // 4)  # (out, in)


def layer_step(name: str, shape: Sequence[int], *, tokens: int, dtype: torch.dtype, device, purpose: str,
               bias: bool = True) -> Callable[[], object]:
    """One call of a linear of ``shape`` (out, in) at ``tokens`` tokens on backend ``name`` ("dense" or a 2:4
    one), on random weights with a 2:4 mask. ``inference``: the forward with the weight packed once, in
    ``dtype``. ``heal``: the healing step under ``dtype`` autocast over fp32 weights (packing every call,
    dense backward) against the dense masked ``F.linear`` forward and backward; ``heal_forward``: its forward
    alone."""
    device = torch.device(device)
    mask = _pattern_mask(shape, device)
    if purpose == "inference":
        weight = torch.randn(*shape, device=device, dtype=dtype) * mask                   # (out, in), 2:4
        b = torch.randn(shape[0], device=device, dtype=dtype) if bias else None
        x = torch.randn(tokens, shape[1], device=device, dtype=dtype)                     # (tokens, in)
        if name == "dense":
            return functools.partial(F.linear, x, weight, b)
        return functools.partial(pack(name, weight, b), x)
    linear = nn.Linear(shape[1], shape[0], bias=bias, device=device)
    if name == "dense":
        forward = lambda inputs: F.linear(inputs, linear.weight * mask, linear.bias)  # noqa: E731
    else:
        forward = SemiStructuredLinear.from_linear(linear, mask, name)
        if forward.backend_for(device, dtype) is None:
            raise RuntimeError(f"the 2:4 path {name} cannot run here")
    x = torch.randn(tokens, shape[1], device=device, requires_grad=purpose == "heal")  # (tokens, in)
    if purpose == "heal_forward":
        @torch.no_grad()
        def forward_only():
            with torch.autocast(device.type, dtype=dtype):
                return forward(x)
        return forward_only
    grad_y = torch.randn(tokens, shape[0], device=device, dtype=dtype)                 # (tokens, out)

    def step():
        with torch.autocast(device.type, dtype=dtype):
            y = forward(x)
        y.backward(grad_y)
    return step


def block_step_timer(model: nn.Module, block: str, inputs: tuple[tuple, dict], masks: Mapping[str, torch.Tensor],
                     device, dtype: torch.dtype, timer: Callable[[Callable[[], object]], float] = cuda_median_ms
                     ) -> Callable[[Mapping[str, str]], float]:
    """``measure_step(choice) -> ms`` for ``choose_semi_structured``: the forward and backward of a copy of
    ``model``'s ``block`` on ``device``, its 2:4 linears on the backends ``choice`` gives them (module names of
    the whole model), on ``inputs`` (the block's captured ``(args, kwargs)``) under ``dtype`` autocast. Only
    the blocks hold swappable linears and the rest of a healing step is the same either way, so with
    identical blocks the whole step is faster exactly when the block is."""
    device, prefix = torch.device(device), block + "."
    local = lambda mapping: {k[len(prefix):]: v for k, v in mapping.items() if k.startswith(prefix)}  # noqa: E731
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v                                # noqa: E731
    args, kwargs = tuple(move(a) for a in inputs[0]), {k: move(v) for k, v in inputs[1].items()}

    def measure(choice: Mapping[str, str]) -> float:
        copied = copy.deepcopy(model.get_submodule(block)).to(device).requires_grad_(True)
        convert_linears(copied, local(masks), compute_dtype=dtype, choice=local(choice))

        def step():
            with torch.autocast(device.type, dtype=dtype):
                out = copied(*args, **kwargs)
            (out[0] if isinstance(out, tuple) else out).float().square().mean().backward()
        return timer(step)
    return measure


def measure_layer(name: str, shape: Sequence[int], *, tokens: int, dtype: torch.dtype, device, purpose: str,
                  bias: bool = True, timer: Callable | None = None) -> float:
    """Median milliseconds of ``layer_step`` (CUDA events unless ``timer(fn) -> ms`` is given)."""
    step = layer_step(name, shape, tokens=tokens, dtype=dtype, device=device, purpose=purpose, bias=bias)
    return (timer or cuda_median_ms)(step)


def benchmark_layer(out_features: int, in_features: int, tokens: int, dtype: torch.dtype = torch.bfloat16,
                    backward: bool = True, iters: int = 20, device: str | torch.device = "cuda",
                    backend: str | None = None) -> dict:
    """Median ms of one healing-style call (bf16 autocast over fp32 weights, pack included) of the dense
    masked linear and of ``SemiStructuredLinear`` on ``backend`` (default: the default one), on random
    weights with a 2:4 mask. ``RuntimeError`` naming the reason where the sparse path cannot run."""
    device = torch.device(device)
    weight = torch.empty(out_features, in_features, device=device)
    backend, reason = choose_backend(weight, _pattern_mask(weight.shape, device), dtype, backend)
    if backend is None:
        raise RuntimeError(f"the 2:4 path cannot run here: {reason}")
    timer = functools.partial(cuda_median_ms, iters=iters)
    purpose = "heal" if backward else "heal_forward"
    times = {name: measure_layer(name, weight.shape, tokens=tokens, dtype=dtype, device=device, purpose=purpose,
                                 timer=timer) for name in ("dense", backend)}
    return {"backend": backend, "purpose": purpose, "dense_ms": times["dense"], "sparse_ms": times[backend],
            "speedup": times["dense"] / times[backend]}


# ----------------------------------------------------------------------------- the measured choice
@dataclass(frozen=True)
class Decision:
    """Which backend each 2:4-masked linear uses ("dense" or one of ``BACKENDS``), the timings behind it
    (``shapes``: per distinct weight shape, its layers, milliseconds per candidate, refusals, choice) and
    why, in one line. ``record()`` is what the plan's reasons and an export's sidecar keep."""

    mode: str
    purpose: str
    choice: dict[str, str]
    reason: str
    shapes: dict[str, dict] = field(default_factory=dict)
    context: dict = field(default_factory=dict)

    @property
    def semi_structured(self) -> bool:
        return any(backend != "dense" for backend in self.choice.values())

    def record(self) -> dict:
        return {"mode": self.mode, "purpose": self.purpose, "reason": self.reason, "choice": dict(self.choice),
                "shapes": self.shapes, **self.context}


def _pick(ms: Mapping[str, float], mode: str, margin: float) -> str:
    """The fastest 2:4 backend; under ``auto`` only if it beats dense by ``margin`` (ties go to dense)."""
    sparse = {name: value for name, value in ms.items() if name != "dense"}
    if not sparse:
        return "dense"
    best = min(sparse, key=sparse.get)
    return best if mode == "on" or sparse[best] * (1 + margin) < ms["dense"] else "dense"


def _context(device: torch.device, dtype: torch.dtype, tokens: int, margin: float) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else None
    return {"device": str(device), "gpu": gpu, "dtype": str(dtype).replace("torch.", ""), "tokens": tokens,
            "margin": margin, "torch": torch.__version__, "library": cusparselt.library_info()}


def choose_semi_structured(model: nn.Module, masks: Mapping[str, torch.Tensor], device, compute_dtype: torch.dtype,
                           mode: str = "auto", *, tokens: int = DEFAULT_TOKENS, purpose: str = "inference",
                           candidates: Sequence[str] | None = None, measure: Callable | None = None,
                           measure_step: Callable[[Mapping[str, str]], float] | None = None,
                           margin: float = MARGIN) -> Decision:
    """Decide, by timing on ``device``, which 2:4-masked linears of ``model`` run on which backend.

    Each distinct weight shape is timed once at ``tokens`` tokens: dense and every backend of ``candidates``
    (default: each of ``BACKENDS`` this device has) that takes the shape. ``measure(name, shape, *, tokens,
    dtype, device, purpose, bias) -> ms`` replaces the timing (tests inject it; default ``measure_layer``).
    ``purpose="heal"`` times the healing step (packing every step, dense backward); ``measure_step(choice)
    -> ms``, when given, then times the step with the choice against all dense, and ``auto`` keeps the
    choice only if that step is faster (per-layer timings miss attention, norms and activations; the plan
    passes ``block_step_timer``'s block step)."""
    if mode not in MODES or purpose not in PURPOSES:
        raise ValueError(f"semi_structured={mode!r}, purpose={purpose!r}: choose a mode of {', '.join(MODES)} "
                         f"and a purpose of {', '.join(PURPOSES)}")
    device = torch.device(device)
    layers = two_four_linears(model, masks)
    context = _context(device, compute_dtype, tokens, margin)
    dense = {name: "dense" for name in layers}
    if mode == "off" or not layers:
        return Decision(mode, purpose, dense, "off: requested" if mode == "off" else
                        f"{mode}: no swappable nn.Linear has a 2:4 mask", {}, context)
    if candidates is None:
        unavailable = {name: backend_reason(name, device, compute_dtype) for name in BACKENDS}
        context["unavailable"] = {name: why for name, why in unavailable.items() if why}
        candidates = [name for name in BACKENDS if not unavailable[name]]
    if not candidates:
        why = "; ".join(sorted(set(context["unavailable"].values())))
        if mode == "on":
            _warn_once(f"semi_structured='on': no 2:4 backend can run here, dense masked path used ({why})")
        return Decision(mode, purpose, dense, f"{mode}: dense, no 2:4 backend here ({why})", {}, context)
    shapes = _time_shapes(layers, candidates, measure or measure_layer, mode, margin,
                          dict(tokens=tokens, dtype=compute_dtype, device=device, purpose=purpose))
    choice = {name: shapes[_shape_key(linear)]["choice"] for name, linear in layers.items()}
    return _conclude(Decision(mode, purpose, choice, "", shapes, context), measure_step, margin)


def _shape_key(linear: nn.Linear) -> str:
    return f"{linear.out_features}x{linear.in_features}{'' if linear.bias is not None else ' nobias'}"


def _time_shapes(layers: Mapping[str, nn.Linear], candidates: Sequence[str], measure: Callable, mode: str,
                 margin: float, setting: dict) -> dict[str, dict]:
    shapes: dict[str, dict] = {}
    for name, linear in layers.items():
        key = _shape_key(linear)
        if key in shapes:
            shapes[key]["layers"].append(name)
            continue
        shape, bias = (linear.out_features, linear.in_features), linear.bias is not None
        ms, errors = {"dense": measure("dense", shape, bias=bias, **setting)}, {}
        for backend in candidates:
            why = shape_reason(backend, shape, setting["dtype"])
            try:
                if why:
                    raise ValueError(why)
                ms[backend] = measure(backend, shape, bias=bias, **setting)
            except Exception as error:  # a backend that refuses or fails is recorded, and not chosen
                errors[backend] = why or error_line(error)
        pick = _pick(ms, mode, margin)
        shapes[key] = {"layers": [name], "ms": ms, "errors": errors, "choice": pick,
                       "speedup": ms["dense"] / ms[pick]}
        if "cached_cusparselt" in ms:          # the alg id / split-k its timing picked, per token count
            shapes[key]["cusparselt_configs"] = [{"tokens": k[3], "dtype": str(k[4]), **v} for k, v in
                                                 cusparselt.TUNED.items() if tuple(k[1:3]) == shape]
    return shapes


def _best_ratio(entry: dict) -> str:
    sparse = [ms for name, ms in entry["ms"].items() if name != "dense"]
    return f"{entry['ms']['dense'] / min(sparse):.2f}x" if sparse else "none ran"


def _conclude(decision: Decision, measure_step, margin: float) -> Decision:
    """The reason line, the whole-step check and the forced-but-slower warning."""
    sparse = {key: entry for key, entry in decision.shapes.items() if entry["choice"] != "dense"}
    count = sum(len(entry["layers"]) for entry in sparse.values())
    summary = ", ".join(f"{key} {entry['choice']} {entry['speedup']:.2f}x" for key, entry in sparse.items())
    best = ", ".join(f"{key} {_best_ratio(entry)}" for key, entry in decision.shapes.items())
    choice, context = dict(decision.choice), dict(decision.context)
    if decision.mode == "auto":
        reason = (f"auto: 2:4 on {count} of {len(choice)} linears, measured faster than dense ({summary})" if count
                  else f"auto: dense, no 2:4 backend beat dense by {margin:.0%} (best 2:4 speedup: {best})")
    else:
        reason = f"on: 2:4 on {count} of {len(choice)} linears ({summary})" if count else \
                 "on: dense, no 2:4 backend could take these shapes"
        slower = {key: e for key, e in sparse.items() if e["speedup"] < 1}
        if slower:
            ratios = ", ".join(f"{key} {e['choice']} {e['speedup']:.2f}x of dense" for key, e in slower.items())
            _warn_once(f"semi_structured='on': 2:4 is slower than dense on this GPU for {ratios}; kept as requested",
                       key=f"slower:{sorted(slower)}")
    if measure_step is not None and count:
        step = {"chosen": measure_step(choice), "dense": measure_step({name: "dense" for name in choice})}
        context["step_ms"] = step
        if decision.mode == "auto" and step["chosen"] * (1 + margin) >= step["dense"]:
            choice = {name: "dense" for name in choice}
            reason = (f"auto: dense, the step with 2:4 ({step['chosen']:.2f} ms) was not faster than "
                      f"dense ({step['dense']:.2f} ms)")
    return Decision(decision.mode, decision.purpose, choice, reason, decision.shapes, context)


def save_decision(decision: Decision, path: str | os.PathLike) -> None:
    """The decision's record as JSON at ``path`` (written atomically): an export's sidecar."""
    from starfish_fast.checkpoint import save_json_atomic
    save_json_atomic(decision.record(), path)


# ----------------------------------------------------------------------------- inference export
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
    linears = two_four_linears(exported, masks)
    for name, backend in decision.choice.items():
        if backend == "dense":
            continue
        module = linears[name]
        with torch.no_grad():
            masked = (module.weight * masks[f"{name}.weight"].to(device=device, dtype=torch.bool)).contiguous()
            bias = None if module.bias is None else module.bias.to(compute_dtype)
            packed = pack(backend, masked.to(compute_dtype), bias)
        if isinstance(packed, _TorchPack):
            module.weight = nn.Parameter(packed.weight, requires_grad=False)
            module.__class__ = SparseInferenceLinear
        else:
            module.cached = packed
            module.__class__ = CachedInferenceLinear
    if mode == "on" and not decision.semi_structured:
        raise RuntimeError(f"no linear layer could hold 2:4 weights: {decision.reason}")
    exported.sparse24_decision = decision.record()
    if sidecar is not None:
        save_decision(decision, sidecar)
    log.info("2:4 export: %s", decision.reason)
    return exported
