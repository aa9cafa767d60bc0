"""A 2:4 linear on cuSPARSELt that keeps its plan: descriptors, plan and workspace made once per layer and
token count, the algorithm (alg id, split-k) timed once per shape, then one library call per forward.

    from starfish_fast.cusparselt import CachedSparseLinear, library_info, require
    require()                                          # MissingExtraError, one line, without the extra
    layer = CachedSparseLinear(weight * mask, bias)    # (out, in) fp16/bf16 on CUDA, at most 2 of every 4 kept
    y = layer(x)                                       # x (tokens, in) -> (tokens, out) on the current stream
    layer.repack(new_weight * mask, new_bias)          # healing: compressed again into the same buffers
    library_info()                                     # binding, loaded libcusparseLt (version, path)

Why: torch's 2:4 op (torch 2.11) builds and destroys its descriptors and plan on every call (pytorch
issue 153825). On an H200 (torch 2.11, cuSPARSELt 0.8.0, bf16) that put every DeiT-B linear at
25,216 tokens at 0.5-1.2 ms whatever its shape, against 0.05-0.21 ms dense.

Binding: nvmath-python's ``nvmath.bindings.cusparseLt`` (optional extra ``starfish_fast[sparse24]``; a
5.2 MiB wheel, where CuPy's binding comes in a 66-130 MiB wheel). It loads libcusparseLt through
cuda-pathfinder, which returns the copy already in the process first: torch loads the
``nvidia-cusparselt-cu13`` its wheel pins (0.8.0 for torch 2.11, 0.8.1 for 2.14) when it is imported, so
torch and this path share one library; ``library_info`` records which.

Layout (the one torch uses with a fused transpose, so that the compressed weight is byte-for-byte
``torch._cslt_compress``'s): A = the weight (out, in), row-major, structured; B = x (tokens, in),
row-major, used transposed; D = y.T (out, tokens) in column order, i.e. y (tokens, out) row-major; the
bias is the epilogue's (one value per row of D), read from a buffer this layer owns. fp32 accumulation.

Graph capture: a forward allocates only its output (torch's allocator) and makes one library call with
``data_ptr()``s on ``torch.cuda.current_stream()``; plans (and the timing that picks their algorithm)
are made on the first call with each token count, so run every token count once before capturing.

Measured: nothing yet. This module was written without a GPU; ``bench/gpu_check_sparse24.py`` checks it
against dense (bf16, fp16, odd token counts), against ``torch._cslt_compress``, under graph replay,
and times it.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import weakref
from typing import Callable

import torch
import torch.nn.functional as F

from starfish_fast import timing
from starfish_fast.checkpoint import error_line

log = logging.getLogger(__name__)

EXTRA = "pip install 'starfish_fast[sparse24]'"
# torch's cuSPARSELt constraints for fp16/bf16 (torch/sparse/semi_structured.py): the sparse operand in
# multiples of 16 both ways, the dense one of 8: tokens are padded up to a multiple of 8.
MIN_TILE, TOKEN_MULTIPLE, ALIGNMENT = 16, 8, 16
MAX_ALG_IDS = 64                      # a bound on the timed configs per shape (tuning time)
SPLIT_KS = (2, 4)                     # tried on the best alg id besides the library's default split-k
_ALPHA, _BETA = ctypes.c_float(1.0), ctypes.c_float(0.0)        # host scalars for fp32 compute
# C enum values of library_types.h and cusparse.h (a stable ABI; nvmath's enums hold the same numbers)
CUDA_R_16F, CUDA_R_16BF = 2, 14
ORDER_COL, ORDER_ROW = 1, 2
NON_TRANSPOSE, TRANSPOSE = 0, 1
_HANDLES: dict[int, int] = {}         # device index -> cusparseLtHandle_t*, for the process' life
_STREAMS: dict[int, ctypes.Array] = {}
TUNED: dict[tuple, dict] = {}         # (device, out, in, tokens, dtype, bias) -> chosen config and timings


class MissingExtraError(ImportError):
    """The optional extra (nvmath-python) is not installed."""


def require():
    """``nvmath.bindings.cusparseLt``, or ``MissingExtraError`` saying how to install it."""
    try:
        from nvmath.bindings import cusparseLt
    except ImportError as error:
        raise MissingExtraError(f"the cached-plan 2:4 path needs nvmath-python ({EXTRA}); "
                                f"torch's 2:4 kernels are used without it ({error})") from None
    return cusparseLt


def library_info() -> dict:
    """The binding and the libcusparseLt it loaded (runtime version and path); ``error`` says why a
    field is missing (no extra, no driver). torch's build-time cuSPARSELt version beside it."""
    info = {"binding": None, "cusparselt": None, "path": None,
            "torch_cusparselt_build": torch.backends.cusparselt.version()}
    try:
        lib = require()
        import nvmath
        from cuda.pathfinder import load_nvidia_dynamic_lib

        info["binding"] = f"nvmath-python {nvmath.__version__}"
        info["path"] = load_nvidia_dynamic_lib("cusparseLt").abs_path
        info["cusparselt"] = ".".join(str(lib.get_property(part)) for part in nvmath.LibraryPropertyType)
    except Exception as error:  # a missing piece is recorded, never fatal: the caller falls back
        info["error"] = error_line(error)
    return info


def unsupported(shape: tuple[int, int], dtype: torch.dtype) -> str:
    """Why a weight of ``shape`` (out, in) computing in ``dtype`` cannot run here ('' if it can)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype}: the cached-plan 2:4 path takes float16 or bfloat16"
    if shape[0] % MIN_TILE or shape[1] % MIN_TILE:
        return f"weight shape {tuple(shape)}: cuSPARSELt needs both dimensions multiples of {MIN_TILE}"
    return ""


def _handle(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _HANDLES:
        with torch.cuda.device(index):        # a handle belongs to the device current at its creation
            _HANDLES[index] = require().init()
    return _HANDLES[index]


def _current_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _capturing() -> bool:
    return torch.cuda.is_current_stream_capturing()


def _device_reason(tensor: torch.Tensor) -> str:
    return "" if tensor.is_cuda else f"{tensor.device.type} tensors: cuSPARSELt needs CUDA"


def _streams(device: torch.device) -> int:
    """Address of a one-element cudaStream_t array holding torch's current stream."""
    stream = _current_stream(device)
    if stream not in _STREAMS:
        _STREAMS[stream] = (ctypes.c_void_p * 1)(stream)
    return ctypes.addressof(_STREAMS[stream])


def _set(setter, handle: int, target: int, attribute, value: ctypes._SimpleCData) -> None:
    setter(handle, target, attribute, ctypes.addressof(value), ctypes.sizeof(value))


def _get_int(lib, handle: int, alg: int, attribute) -> int:
    value = ctypes.c_int32()
    lib.matmul_alg_get_attribute(handle, alg, attribute, ctypes.addressof(value), ctypes.sizeof(value))
    return value.value


def _destroy(owned: list) -> None:
    for destroy, pointer in reversed(owned):
        destroy(pointer)


class _Plan:
    """Every cuSPARSELt object of y (tokens, out) = x (tokens, in) @ A.T for one token count and one
    config. They live and die together: the library may keep pointers from the plan to the matmul
    descriptor and from that to the matrix descriptors."""

    def __init__(self, handle: int, shape: tuple[int, int], tokens: int, dtype: torch.dtype, bias_ptr: int,
                 config: tuple[int, int, int], device: torch.device):
        lib = self.lib = require()
        (out_f, in_f), cuda_type = shape, CUDA_R_16F if dtype == torch.float16 else CUDA_R_16BF
        self.handle, self.config, owned = handle, config, []
        weakref.finalize(self, _destroy, owned)         # also frees what exists if a call below raises

        def own(destroy, pointer: int) -> int:
            owned.append((destroy, pointer))
            return pointer

        sparse = own(lib.mat_descriptor_destroy, lib.structured_descriptor_init(
            handle, out_f, in_f, in_f, ALIGNMENT, cuda_type, ORDER_ROW, lib.Sparsity.SPARSITY_50_PERCENT))
        dense = own(lib.mat_descriptor_destroy,                               # x (tokens, in), used transposed
                    lib.dense_descriptor_init(handle, tokens, in_f, in_f, ALIGNMENT, cuda_type, ORDER_ROW))
        out = own(lib.mat_descriptor_destroy,                                 # y.T (out, tokens), column order
                  lib.dense_descriptor_init(handle, out_f, tokens, out_f, ALIGNMENT, cuda_type, ORDER_COL))
        self.matmul = own(lib.matmul_descriptor_destroy, lib.matmul_descriptor_init(
            handle, NON_TRANSPOSE, TRANSPOSE, sparse, dense, out, out, lib.ComputeType.COMPUTE_32F))
        if bias_ptr:
            _set(lib.matmul_desc_set_attribute, handle, self.matmul, lib.MatmulDescAttribute.BIAS_POINTER,
                 ctypes.c_void_p(bias_ptr))
        self.alg = own(lib.matmul_alg_selection_destroy,
                       lib.matmul_alg_selection_init(handle, self.matmul, lib.MatmulAlg.DEFAULT))
        alg_id, split_k, split_k_mode = config
        attribute = lib.MatmulAlgAttribute
        _set(lib.matmul_alg_set_attribute, handle, self.alg, attribute.CONFIG_ID, ctypes.c_int32(alg_id))
        if split_k != 1:
            _set(lib.matmul_alg_set_attribute, handle, self.alg, attribute.SPLIT_K, ctypes.c_int32(split_k))
            if split_k_mode > 0:
                _set(lib.matmul_alg_set_attribute, handle, self.alg, attribute.SPLIT_K_MODE,
                     ctypes.c_int32(split_k_mode))
        self.plan = own(lib.matmul_plan_destroy, lib.matmul_plan_init(handle, self.matmul, self.alg))
        try:
            self.max_alg_id = _get_int(lib, handle, self.alg, attribute.CONFIG_MAX_ID)
        except Exception:  # read-only attribute; if this library refuses it, only alg id 0 is timed
            self.max_alg_id = 0
        size = lib.matmul_get_workspace(handle, self.plan)
        self.workspace = torch.empty(max(size, ALIGNMENT), dtype=torch.uint8, device=device)

    def run(self, packed: torch.Tensor, x: torch.Tensor, y: torch.Tensor, search: bool = False) -> None:
        call = self.lib.matmul_search if search else self.lib.matmul
        call(self.handle, self.plan, ctypes.addressof(_ALPHA), packed.data_ptr(), x.data_ptr(),
             ctypes.addressof(_BETA), y.data_ptr(), y.data_ptr(), self.workspace.data_ptr(), _streams(x.device), 1)

    def searched_config(self) -> tuple[int, int, int]:
        """The config ``run(search=True)`` left in the algorithm selection."""
        attribute = self.lib.MatmulAlgAttribute
        return tuple(_get_int(self.lib, self.handle, self.alg, a)
                     for a in (attribute.CONFIG_ID, attribute.SPLIT_K, attribute.SPLIT_K_MODE))


class CachedSparseLinear:
    """``y = x @ W.T + b`` for a fixed 2:4 weight shape, with W compressed once (again on ``repack``)
    and one plan per token count, its config picked by timing the first time a shape is seen.

    ``timer(fn) -> ms`` times the candidate configs (default: CUDA-event median of ``fn()``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                 timer: Callable[[Callable[[], object]], float] | None = None):
        dtype = dtype or weight.dtype
        reason = unsupported(tuple(weight.shape), dtype) or _device_reason(weight)
        if reason:
            raise ValueError(reason)
        lib = self.lib = require()
        self.device, self.dtype, self.shape, self.timer = weight.device, dtype, tuple(weight.shape), timer
        self.handle = _handle(self.device)
        out_f, in_f = self.shape
        self._sparse = lib.structured_descriptor_init(self.handle, out_f, in_f, in_f, ALIGNMENT,
                                                      CUDA_R_16F if dtype == torch.float16 else CUDA_R_16BF,
                                                      ORDER_ROW, lib.Sparsity.SPARSITY_50_PERCENT)
        weakref.finalize(self, lib.mat_descriptor_destroy, self._sparse)
        size, scratch = lib.sp_mma_compressed_size2(self.handle, self._sparse)
        self.packed = torch.empty(size, dtype=torch.uint8, device=self.device)                  # values + metadata
        self._scratch = torch.empty(max(scratch, ALIGNMENT), dtype=torch.uint8, device=self.device)
        self.bias = None if bias is None else torch.empty(out_f, dtype=dtype, device=self.device)   # (out,)
        self.plans: dict[int, _Plan] = {}
        self.repack(weight, bias)

    def repack(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Compress ``weight`` (out, in; at most 2 non-zeros in every 4 along a row: the compression keeps
        two per group) into the same buffer, and copy ``bias``; plans stay valid."""
        dense = weight.detach().to(self.dtype).contiguous()                                    # (out, in)
        if tuple(dense.shape) != self.shape or dense.device != self.device:
            raise ValueError(f"weight {tuple(dense.shape)} on {dense.device}: this layer packs {self.shape} "
                             f"on {self.device}")
        self.lib.sp_mma_compress2(self.handle, self._sparse, 1, NON_TRANSPOSE, dense.data_ptr(),
                                  self.packed.data_ptr(), self._scratch.data_ptr(), _current_stream(self.device))
        if (bias is None) != (self.bias is None):
            raise ValueError(f"bias {'missing' if bias is None else 'given'}: this layer was made "
                             f"{'with' if self.bias is not None else 'without'} one")
        if self.bias is not None:
            self.bias.copy_(bias.detach())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (tokens, in) in the layer's dtype on its device -> y (tokens, out), contiguous."""
        if x.dim() != 2 or x.shape[1] != self.shape[1] or x.dtype != self.dtype or x.device != self.device:
            raise ValueError(f"input {tuple(x.shape)} {x.dtype} on {x.device}: the {self.shape} 2:4 weight takes "
                             f"(tokens, {self.shape[1]}) {self.dtype} on {self.device}")
        tokens = x.shape[0]
        padded = -(-tokens // TOKEN_MULTIPLE) * TOKEN_MULTIPLE
        if padded != tokens:
            x = F.pad(x, (0, 0, 0, padded - tokens))                        # (padded, in): fresh, aligned
        elif not x.is_contiguous() or x.data_ptr() % ALIGNMENT:
            x = x.clone(memory_format=torch.contiguous_format)              # (tokens, in)
        y = torch.empty(padded, self.shape[0], dtype=self.dtype, device=self.device)   # (padded, out)
        plan = self.plans.get(padded) or self._plan(padded, x, y)
        plan.run(self.packed, x, y)
        return y[:tokens]

    def _plan(self, tokens: int, x: torch.Tensor, y: torch.Tensor) -> _Plan:
        if _capturing():
            raise RuntimeError(f"no cuSPARSELt plan yet for {tokens} tokens of the {self.shape} weight: run each "
                               f"token count once before capturing a CUDA graph (planning times kernels)")
        key = (self.device, *self.shape, tokens, self.dtype, self.bias is not None)
        if key not in TUNED:
            TUNED[key] = self._tune(tokens, x, y)
        self.plans[tokens] = self._new_plan(tokens, TUNED[key]["config"])
        return self.plans[tokens]

    def _new_plan(self, tokens: int, config) -> _Plan:
        bias_ptr = 0 if self.bias is None else self.bias.data_ptr()
        return _Plan(self.handle, self.shape, tokens, self.dtype, bias_ptr, tuple(config), self.device)

    def _tune(self, tokens: int, x: torch.Tensor, y: torch.Tensor) -> dict:
        """Time every alg id (library default split-k), the library's own search pick, and split-k 2 and 4
        on the best id; keep the fastest. xformers times alg ids itself too: the search is often poor."""
        timer = self.timer or functools.partial(timing.cuda_median_ms, iters=10, warmup=3)
        times, errors = {}, {}

        def attempt(config) -> _Plan | None:
            if config in times or config in errors:
                return None
            try:
                plan = self._new_plan(tokens, config)
                times[config] = timer(lambda: plan.run(self.packed, x, y))
                return plan
            except Exception as error:  # a config this library/GPU refuses is skipped, and recorded
                errors[config] = error_line(error)
                return None

        first = attempt((0, 1, -1))
        for alg_id in range(1, min(first.max_alg_id if first else 0, MAX_ALG_IDS) + 1):
            attempt((alg_id, 1, -1))
        try:
            probe = self._new_plan(tokens, (0, 1, -1))
            probe.run(self.packed, x, y, search=True)
            attempt(probe.searched_config())
        except Exception as error:  # the library's search is one candidate among others
            errors["search"] = error_line(error)
        if not times:
            raise RuntimeError(f"cuSPARSELt ran no config for the {self.shape} weight at {tokens} tokens: "
                               f"{next(iter(errors.values()), 'no config')}")
        best = min(times, key=times.get)
        for split_k in SPLIT_KS:
            attempt((best[0], split_k, -1))
        best = min(times, key=times.get)
        log.info("cuSPARSELt %s x %d tokens %s: config %s %.4f ms (%d tried)", self.shape, tokens, self.dtype,
                 best, times[best], len(times))
        return {"config": list(best), "ms": times[best], "tried": {str(k): v for k, v in times.items()},
                "errors": {str(k): v for k, v in errors.items()}}
