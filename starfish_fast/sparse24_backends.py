"""2:4 backends: which one can run a weight here, and packing a weight for it.

    from starfish_fast.sparse24_backends import backend_reason, choose_backend, pack
    backend_reason("torch_cusparselt", torch.device("cuda"), torch.bfloat16)   # '' where it runs, else why not
    backend, why = choose_backend(weight, mask, torch.bfloat16)                # the first of DEFAULT_ORDER that can
    y = pack(backend, masked_weight, bias)(x2d)                                 # (tokens, out)

Backends (``BACKENDS``): ``torch_cusparselt`` (torch's ``SparseSemiStructuredTensorCUSPARSELT``, sm80+),
``torch_cutlass`` (torch's CUTLASS kernels, sm8x only) and ``cached_cusparselt`` (``starfish_fast.cusparselt``:
cuSPARSELt with its plan kept, optional extra ``starfish_fast[sparse24]``). Only ``x @ W.T`` maps onto 2:4
hardware with a row-wise mask. Which backend a layer uses is the plan's (``rules.decide_two_four``, from the
probe's timings); a layer none serves computes the dense masked product (``sparse24.SemiStructuredLinear``).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from starfish_fast import cusparselt
from starfish_fast.checkpoint import error_line

SPARSE_DTYPES = (torch.float16, torch.bfloat16)
BACKENDS = ("torch_cusparselt", "torch_cutlass", "cached_cusparselt")
DEFAULT_ORDER = ("torch_cusparselt", "torch_cutlass")   # unmeasured "on" (convert_linears without a choice)
# Used when a torch version does not publish its backend's minimum shapes: generous multiples that
# both backends accept for fp16/bf16 (CUTLASS 32x64, cuSPARSELt 16x16 in torch 2.14).
CONSERVATIVE_MIN_SHAPE = (64, 64)


def is_two_four(mask: torch.Tensor) -> bool:
    """True when a 2-D mask keeps at most 2 of every 4 consecutive entries along its rows (the
    layout 2:4 kernels take; fewer kept is fine, the packed format stores the zeros)."""
    if mask.dim() != 2 or mask.shape[1] % 4:
        return False
    kept_per_group = (mask != 0).reshape(mask.shape[0], -1, 4).sum(-1)    # (rows, cols / 4)
    return bool((kept_per_group <= 2).all())


# ----------------------------------------------------------------------------- backends
class TorchPack:
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
    "torch_cusparselt": functools.partial(TorchPack, torch.sparse.SparseSemiStructuredTensorCUSPARSELT),
    "torch_cutlass": functools.partial(TorchPack, torch.sparse.SparseSemiStructuredTensorCUTLASS),
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
