"""Masked linear layer: ``y = x @ (weight * mask).T + bias`` with the mask fused into the GEMMs.

    import torch
    from starfish_fast.kernels import masked_linear, MaskedLinear
    x, w = torch.randn(2, 5, 64), torch.randn(32, 64, requires_grad=True)
    mask = torch.rand(32, 64) > 0.5
    y = masked_linear(x, w, mask)                        # (2, 5, 32); kernel=True: the Triton op
    y.sum().backward()                                   # w.grad is zero wherever mask is
    layer = MaskedLinear.from_linear(torch.nn.Linear(64, 32), mask)   # drop-in for nn.Linear

Three Triton GEMMs, all with fp32 accumulation:

- forward ``y = x @ (W*M).T + b``: the mask is multiplied into each weight tile as
  it is loaded, so no masked copy of the weight is ever written;
- ``dx = dy @ (W*M)``: same operand fusion;
- ``dW = (dy.T @ x) * M``: the mask is applied in the epilogue, on the fp32
  accumulator, before the only store (no separate pass over the gradient).
  ``dbias = dy.sum(0)`` is one torch reduction (fp32 accumulation).

Block skipping. The mask is summarised as a tile-occupancy map (one byte per
32x32 tile: is any entry non-zero?), pooled to the kernels' tile sizes (on a GPU
in 16-bit: 128 output features x 32 inputs for the forward, 32 x 128 for dx; 32 x 32
in the interpreter). Each forward output tile gets the list of its non-zero
K-blocks and each dx output tile the list of its non-zero N-blocks; the GEMM loops
run over those lists only (no branch inside the loop). A skipped block saves its
weight and mask loads and its MMA, so work shrinks in proportion to the zero
blocks: with half of the output rows (neurons) masked in contiguous groups, the
forward, dx and dW each do about half of the dense work. dW skips whole output
tiles (stored as zeros without reading dy or x). Unstructured masks (random 50%)
almost never zero a whole tile, so they gain nothing and pay the mask loads plus
building the map (one pass over the mask; ``MaskedLinear`` builds it once).

Measured (H200, bf16, DeiT-B fc1 at 25,216 tokens, forward + backward;
bench/results/gpu_check_h200_2026-12-04): 179 TFLOP/s against 442 for cuBLAS on the
masked dense weight with a random 50% mask (0.41x), 262 against 459 with half the
rows pruned (0.57x, even though this kernel skips half the work): plain tl.dot tiles
are far from cuBLAS on Hopper, so ``kernels="auto"`` never picks this kernel; it is
kept, tested and timed for the GPUs and masks where it may yet win. Half-row masks
are better served by compaction (narrower dense weights, ``compaction.py``).

Portability: plain ``tl.dot`` with software pipelining only (no TMA descriptors, no
warp specialisation, no Hopper-only features in the code; on H100 the compiler may
still lower ``tl.dot`` to wgmma, which is its choice). Every autotune config's shared
memory estimate is below 96 KB, so all of them fit an A10 (sm86, 99 KB per
block); configs above the running device's limit are pruned anyway.
fp32 inputs use IEEE fp32 products unless ``torch.backends.cuda.matmul.allow_tf32``
is set (then TF32, like cuBLAS).
"""
from __future__ import annotations

import logging
import math
import os
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._dispatch import HAVE_TRITON, INTERPRET, choose, empty, launching, shared_memory_limit

log = logging.getLogger(__name__)

OCC_TILE = 32            # granularity of the mask occupancy map (rows x cols of the weight)
# STARFISH_TRITON_ONE_CONFIG=1 (read at import, like TRITON_INTERPRET): each kernel keeps its first
# autotune config, so a correctness run compiles one variant instead of timing five
ONE_CONFIG = os.environ.get("STARFISH_TRITON_ONE_CONFIG", "0") == "1"
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- reference
def masked_linear_reference(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch: ``F.linear(x, weight * mask, bias)``; autograd masks dW through the product."""
    return F.linear(x, weight * mask.to(weight.dtype), bias)


# --------------------------------------------------------------------------- mask layout
class _Tiles(NamedTuple):
    fwd_n: int    # forward: output-feature tile; the K loop runs over blocks of fwd_k
    fwd_k: int
    dx_k: int     # dx: input-feature tile; the N loop runs over blocks of dx_n
    dx_n: int


class MaskLayout(NamedTuple):
    """Where a mask's non-zero tiles are: what the kernels need to skip the zero ones (:func:`mask_layout`)."""
    tiles: _Tiles
    occ: torch.Tensor        # (ceil(N/32), ceil(K/32)) uint8: any non-zero in the 32x32 tile
    fwd_count: torch.Tensor  # (ceil(N/fwd_n),) int32: non-zero K-blocks per output tile
    fwd_index: torch.Tensor  # (ceil(N/fwd_n), ceil(K/fwd_k)) int32: those K-blocks first, ascending
    dx_count: torch.Tensor   # (ceil(K/dx_k),) int32
    dx_index: torch.Tensor   # (ceil(K/dx_k), ceil(N/dx_n)) int32
    occupancy: int           # live 32x32 tiles in eighths (0..8): part of the autotune key, since the
                             # best tile shape differs between a dense-ish mask and one half of whose rows are dead


def _tiles_for(dtype: torch.dtype) -> _Tiles:
    if INTERPRET:  # small tiles keep the CPU interpreter fast and make small test shapes span several tiles
        return _Tiles(32, 32, 32, 32)
    if dtype == torch.float32:  # 4-byte operands: narrower tiles to stay within sm86 shared memory
        return _Tiles(64, 32, 64, 32)
    return _Tiles(128, 32, 128, 32)


def _pool(occ: torch.Tensor, fr: int, fc: int) -> torch.Tensor:
    """Max-pool a (R, C) 0/1 map by (fr, fc), padding the ragged edge with zeros."""
    r, c = occ.shape
    rr, cc = -(-r // fr) * fr, -(-c // fc) * fc
    occ = F.pad(occ, (0, cc - c, 0, rr - r))
    return occ.reshape(rr // fr, fr, cc // fc, fc).amax(dim=(1, 3))


def _block_lists(occ: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, B) 0/1 -> per row: count of non-zero blocks and their indices first (ascending).

    A stable argsort instead of ``nonzero`` keeps it on the device without a host sync.
    """
    count = occ.sum(dim=1, dtype=torch.int32)                                           # (T,)
    index = torch.argsort((occ == 0).to(torch.int8), dim=1, stable=True).to(torch.int32)  # (T, B)
    return count.contiguous(), index.contiguous()


def mask_occupancy(mask: torch.Tensor) -> torch.Tensor:
    """(N, K) mask -> (ceil(N/32), ceil(K/32)) uint8, 1 where the 32x32 tile has a non-zero."""
    return _pool((mask != 0).to(torch.uint8), OCC_TILE, OCC_TILE).contiguous()


def mask_layout(mask: torch.Tensor, dtype: torch.dtype) -> MaskLayout:
    """Block lists for the kernels' tile sizes at ``dtype`` (one pass over the mask, one host sync for
    ``occupancy``: build it once per mask, as ``MaskedLinear`` does)."""
    tiles = _tiles_for(dtype)
    occ = mask_occupancy(mask)                                                       # (nN32, nK32)
    f = _pool(occ, tiles.fwd_n // OCC_TILE, tiles.fwd_k // OCC_TILE)                 # (nN, nK)
    fwd_count, fwd_index = _block_lists(f)
    d = _pool(occ, tiles.dx_n // OCC_TILE, tiles.dx_k // OCC_TILE).t()               # (nK, nN)
    dx_count, dx_index = _block_lists(d)
    occupancy = round(8 * float(occ.float().mean())) if occ.numel() else 0       # one host sync per layout
    return MaskLayout(tiles, occ, fwd_count, fwd_index, dx_count, dx_index, occupancy)


# --------------------------------------------------------------------------- kernels
if HAVE_TRITON:
    import triton
    import triton.language as tl

    def _cfg(num_warps, num_stages, **kw):
        return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)

    if INTERPRET:
        _FWD_CONFIGS = [_cfg(4, 1, BLOCK_M=32, GROUP_M=4)]
        _DW_CONFIGS = [_cfg(4, 1, BLOCK_WN=32, BLOCK_WK=32, BLOCK_T=32)]
    else:
        # Shared memory per stage (16-bit, N/K tiles 128x32): BLOCK_M*64 B of x + 128*32*3 B of
        # weight+mask; every config stays under 96 KB so that all fit an A10.
        _FWD_CONFIGS = [
            _cfg(8, 4, BLOCK_M=128, GROUP_M=8),
            _cfg(4, 3, BLOCK_M=128, GROUP_M=8),
            _cfg(4, 4, BLOCK_M=64, GROUP_M=8),
            _cfg(8, 3, BLOCK_M=256, GROUP_M=8),
            _cfg(4, 5, BLOCK_M=64, GROUP_M=8),
        ]
        _DW_CONFIGS = [
            _cfg(8, 4, BLOCK_WN=128, BLOCK_WK=128, BLOCK_T=32),
            _cfg(4, 4, BLOCK_WN=64, BLOCK_WK=128, BLOCK_T=32),
            _cfg(4, 4, BLOCK_WN=128, BLOCK_WK=64, BLOCK_T=32),
            _cfg(4, 3, BLOCK_WN=64, BLOCK_WK=64, BLOCK_T=64),
            _cfg(8, 3, BLOCK_WN=128, BLOCK_WK=128, BLOCK_T=64),
        ]
        if ONE_CONFIG:    # correctness checks on a short device lease: no autotuning, the first config
            _FWD_CONFIGS, _DW_CONFIGS = _FWD_CONFIGS[:1], _DW_CONFIGS[:1]

    def _smem_gemm(cfg, a_rows, b_cols, k_step, elem, mask_bytes):
        """Pipelined operand bytes: stages x (A tile + B tile + mask tile)."""
        return cfg.num_stages * (a_rows * k_step * elem + b_cols * k_step * (elem + mask_bytes))

    def _make_prune(tile_key, step_key):
        """Drop configs whose pipelined tiles exceed the device's (and an A10's) shared memory."""
        def prune(configs, named_args, **kwargs):
            args = {**named_args, **kwargs}   # the tile sizes arrive as keyword arguments
            w = args["w_ptr"]
            elem, mbytes = w.element_size(), args["m_ptr"].element_size()
            tile, step = args[tile_key], args[step_key]

            def smem(c):
                return _smem_gemm(c, c.kwargs["BLOCK_M"], tile, step, elem, mbytes)
            limit = min(shared_memory_limit(w.device) if w.is_cuda else 99 * 1024, 96 * 1024)
            return [c for c in configs if smem(c) <= limit] or [min(configs, key=smem)]
        return prune

    _prune_fwd = _make_prune("BLOCK_N", "BLOCK_K")   # forward: weight tile BLOCK_N wide, K step BLOCK_K
    _prune_dx = _make_prune("BLOCK_K", "BLOCK_N")    # dx: weight tile BLOCK_K wide, N step BLOCK_N

    def _prune_dw(configs, named_args, **kwargs):
        x = named_args["x_ptr"]    # positional, unlike the tile sizes
        elem = x.element_size()
        limit = min(shared_memory_limit(x.device) if x.is_cuda else 99 * 1024, 96 * 1024)

        def smem(c):
            return _smem_gemm(c, c.kwargs["BLOCK_WN"], c.kwargs["BLOCK_WK"], c.kwargs["BLOCK_T"], elem, 0)
        kept = [c for c in configs if smem(c) <= limit]
        return kept or [min(configs, key=smem)]

    @triton.jit
    def _grouped_pid(pid, num_a, num_b, GROUP: tl.constexpr):
        """Swizzle program ids so that GROUP consecutive programs share B tiles in L2."""
        width = GROUP * num_b
        group = pid // width
        first = group * GROUP
        size = tl.minimum(num_a - first, GROUP)
        pid_a = first + (pid % width) % size
        pid_b = (pid % width) // size
        return pid_a, pid_b

    @triton.autotune(configs=_FWD_CONFIGS, key=["M_BUCKET", "N", "K", "OCCUPANCY"],
                     prune_configs_by={"early_config_prune": _prune_fwd})
    @triton.jit
    def _masked_linear_fwd_kernel(
        x_ptr, w_ptr, m_ptr, b_ptr, y_ptr, count_ptr, index_ptr,
        M, N, K, M_BUCKET, OCCUPANCY, n_kblocks,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_mn, stride_mk, stride_ym, stride_yn,
        HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """y[m, n] = sum_k x[m, k] * (w * mask)[n, k] + b[n], over the non-zero K-blocks of tile n."""
        pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)          # (BM,) rows of x
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                          # (BN,) output features
        arange_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        n_live = tl.load(count_ptr + pid_n)
        for i in range(0, n_live):
            kb = tl.load(index_ptr + pid_n * n_kblocks + i)
            offs_k = kb * BLOCK_K + arange_k                                      # (BK,)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)     # (BM, BK)
            wmask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
            w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                        mask=wmask, other=0.0)                                    # (BK, BN) = W^T tile
            mk = tl.load(m_ptr + offs_n[None, :] * stride_mn + offs_k[:, None] * stride_mk,
                         mask=wmask, other=0)                                     # (BK, BN)
            w = w * mk.to(w.dtype)
            acc = tl.dot(x, w, acc, input_precision=PREC)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                 acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    @triton.autotune(configs=_FWD_CONFIGS, key=["M_BUCKET", "N", "K", "OCCUPANCY"],
                     prune_configs_by={"early_config_prune": _prune_dx})
    @triton.jit
    def _masked_linear_dx_kernel(
        dy_ptr, w_ptr, m_ptr, dx_ptr, count_ptr, index_ptr,
        M, N, K, M_BUCKET, OCCUPANCY, n_nblocks,
        stride_dym, stride_dyn, stride_wn, stride_wk, stride_mn, stride_mk, stride_dxm, stride_dxk,
        PREC: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """dx[m, k] = sum_n dy[m, n] * (w * mask)[n, k], over the non-zero N-blocks of tile k.

        Here BLOCK_K is the output tile along K and BLOCK_N the reduction step.
        """
        pid_m, pid_k = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)          # (BM,)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)                          # (BK,) input features
        arange_n = tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        n_live = tl.load(count_ptr + pid_k)
        for i in range(0, n_live):
            nb = tl.load(index_ptr + pid_k * n_nblocks + i)
            offs_n = nb * BLOCK_N + arange_n                                      # (BN,)
            dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                         mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)    # (BM, BN)
            wmask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                        mask=wmask, other=0.0)                                    # (BN, BK)
            mk = tl.load(m_ptr + offs_n[:, None] * stride_mn + offs_k[None, :] * stride_mk,
                         mask=wmask, other=0)                                     # (BN, BK)
            w = w * mk.to(w.dtype)
            acc = tl.dot(dy.to(w.dtype), w, acc, input_precision=PREC)
        tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
                 acc.to(dx_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))

    @triton.autotune(configs=_DW_CONFIGS, key=["M_BUCKET", "N", "K", "OCCUPANCY"],
                     prune_configs_by={"early_config_prune": _prune_dw})
    @triton.jit
    def _masked_linear_dw_kernel(
        dy_ptr, x_ptr, m_ptr, dw_ptr, occ_ptr,
        M, N, K, M_BUCKET, OCCUPANCY, occ_rows, occ_cols,
        stride_dym, stride_dyn, stride_xm, stride_xk, stride_mn, stride_mk, stride_dwn, stride_dwk,
        PREC: tl.constexpr, OCC: tl.constexpr,
        BLOCK_WN: tl.constexpr, BLOCK_WK: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """dW[n, k] = mask[n, k] * sum_t dy[t, n] * x[t, k]; tiles with an all-zero mask store zeros."""
        pid = tl.program_id(0)
        num_k = tl.cdiv(K, BLOCK_WK)
        pid_n = pid // num_k
        pid_k = pid % num_k
        offs_n = pid_n * BLOCK_WN + tl.arange(0, BLOCK_WN)                        # (BWN,) output features
        offs_k = pid_k * BLOCK_WK + tl.arange(0, BLOCK_WK)                        # (BWK,) input features
        # occupancy of this tile: max over its (BWN/OCC, BWK/OCC) cells of the 32x32 map
        on = pid_n * (BLOCK_WN // OCC) + tl.arange(0, BLOCK_WN // OCC)
        ok = pid_k * (BLOCK_WK // OCC) + tl.arange(0, BLOCK_WK // OCC)
        occ = tl.load(occ_ptr + on[:, None] * occ_cols + ok[None, :],
                      mask=(on[:, None] < occ_rows) & (ok[None, :] < occ_cols), other=0)
        live = tl.max(tl.max(occ, axis=1), axis=0) != 0
        # a dead tile runs zero iterations: no dy/x traffic, no MMA, and stores zeros
        n_iter = tl.where(live, tl.cdiv(M, BLOCK_T), 0)
        arange_t = tl.arange(0, BLOCK_T)
        acc = tl.zeros((BLOCK_WN, BLOCK_WK), dtype=tl.float32)
        for i in range(0, n_iter):
            offs_t = (i * BLOCK_T + arange_t).to(tl.int64)                        # (BT,) token rows
            dyt = tl.load(dy_ptr + offs_t[None, :] * stride_dym + offs_n[:, None] * stride_dyn,
                          mask=(offs_t[None, :] < M) & (offs_n[:, None] < N), other=0.0)    # (BWN, BT) = dy^T
            x = tl.load(x_ptr + offs_t[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=(offs_t[:, None] < M) & (offs_k[None, :] < K), other=0.0)      # (BT, BWK)
            acc = tl.dot(dyt.to(x.dtype), x, acc, input_precision=PREC)
        wmask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        mk = tl.load(m_ptr + offs_n[:, None] * stride_mn + offs_k[None, :] * stride_mk, mask=wmask, other=0)
        acc = acc * mk.to(tl.float32)          # the mask epilogue: on the accumulator, before the only store
        tl.store(dw_ptr + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk,
                 acc.to(dw_ptr.dtype.element_ty), mask=wmask)


def _precision(dtype: torch.dtype):
    if dtype != torch.float32:
        return None  # 16-bit operands: tensor-core products, fp32 accumulation
    return "tf32" if (torch.backends.cuda.matmul.allow_tf32 and not INTERPRET) else "ieee"


def _mask_arg(mask: torch.Tensor) -> torch.Tensor:
    # bool pointers load as i1 on some triton versions; uint8 is the same bytes and always works
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _bucket(m: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(m, 1))))


def _fwd(x2: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias, layout: MaskLayout) -> torch.Tensor:
    M, K = x2.shape
    N = weight.shape[0]
    t = layout.tiles
    y = empty((M, N), device=x2.device, dtype=x2.dtype)                    # (M, N)
    m = _mask_arg(mask)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _masked_linear_fwd_kernel[grid](
        x2, weight, m, bias if bias is not None else y, y, layout.fwd_count, layout.fwd_index,
        M, N, K, _bucket(M), layout.occupancy, layout.fwd_index.shape[1],
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), m.stride(0), m.stride(1),
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, PREC=_precision(x2.dtype), BLOCK_N=t.fwd_n, BLOCK_K=t.fwd_k)
    return y


def _dx(dy2: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, count: torch.Tensor, index: torch.Tensor,
        occupancy: int, dtype) -> torch.Tensor:
    M, N = dy2.shape
    K = weight.shape[1]
    t = _tiles_for(dy2.dtype)
    dx = empty((M, K), device=dy2.device, dtype=dtype)                     # (M, K)
    m = _mask_arg(mask)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)
    _masked_linear_dx_kernel[grid](
        dy2, weight, m, dx, count, index,
        M, N, K, _bucket(M), occupancy, index.shape[1],
        dy2.stride(0), dy2.stride(1), weight.stride(0), weight.stride(1), m.stride(0), m.stride(1),
        dx.stride(0), dx.stride(1),
        PREC=_precision(weight.dtype), BLOCK_N=t.dx_n, BLOCK_K=t.dx_k)
    return dx


def _dw(dy2: torch.Tensor, x2: torch.Tensor, mask: torch.Tensor, occ: torch.Tensor, occupancy: int, dtype) -> torch.Tensor:
    M, N = dy2.shape
    K = x2.shape[1]
    dw = empty((N, K), device=x2.device, dtype=dtype)                      # (N, K)
    m = _mask_arg(mask)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_WN"]) * triton.cdiv(K, meta["BLOCK_WK"]),)
    _masked_linear_dw_kernel[grid](
        dy2, x2, m, dw, occ,
        M, N, K, _bucket(M), occupancy, occ.shape[0], occ.shape[1],
        dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1), m.stride(0), m.stride(1),
        dw.stride(0), dw.stride(1),
        PREC=_precision(x2.dtype), OCC=OCC_TILE)
    return dw


# --------------------------------------------------------------------------- custom ops
def _on_triton(x: torch.Tensor) -> bool:
    return HAVE_TRITON and (x.is_cuda or INTERPRET)


@torch.library.custom_op("starfish_fast::masked_linear", mutates_args=())
def _masked_linear_op(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor],
                      occ: torch.Tensor, fwd_count: torch.Tensor, fwd_index: torch.Tensor, dx_count: torch.Tensor,
                      dx_index: torch.Tensor, occupancy: int) -> torch.Tensor:
    """(M, K) x -> (M, N): the Triton forward (CUDA; CPU in the interpreter), else plain torch. The
    layout tensors are a :func:`mask_layout` of ``mask`` for ``x.dtype``."""
    if not _on_triton(x):
        return F.linear(x, weight * mask.to(weight.dtype), bias)
    layout = MaskLayout(_tiles_for(x.dtype), occ, fwd_count, fwd_index, dx_count, dx_index, occupancy)
    with launching("masked_linear forward", x=tuple(x.shape), weight=tuple(weight.shape), dtype=x.dtype):
        return _fwd(x, weight, mask, bias, layout)                                  # (M, N)


@_masked_linear_op.register_fake
def _(x, weight, mask, bias, occ, fwd_count, fwd_index, dx_count, dx_index, occupancy):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("starfish_fast::masked_linear_backward", mutates_args=())
def _masked_linear_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                               occ: torch.Tensor, dx_count: torch.Tensor, dx_index: torch.Tensor, occupancy: int,
                               need_dx: bool, need_dw: bool) -> list[torch.Tensor]:
    """[dx (M, K), dW (N, K) masked] for dy (M, N); a gradient not needed is an empty tensor."""
    dy = dy if dy.dtype == x.dtype else dy.to(x.dtype)
    nothing = x.new_empty(0)
    if not _on_triton(x):
        masked = weight * mask.to(weight.dtype)
        return [dy @ masked if need_dx else nothing, (dy.t() @ x) * mask.to(x.dtype) if need_dw else nothing]
    with launching("masked_linear backward", dy=tuple(dy.shape), weight=tuple(weight.shape), dtype=dy.dtype):
        return [_dx(dy, weight, mask, dx_count, dx_index, occupancy, x.dtype) if need_dx else nothing,
                _dw(dy, x, mask, occ, occupancy, weight.dtype) if need_dw else nothing]


@_masked_linear_backward_op.register_fake
def _(dy, x, weight, mask, occ, dx_count, dx_index, occupancy, need_dx, need_dw):
    return [x.new_empty(x.shape if need_dx else (0,)), weight.new_empty(weight.shape if need_dw else (0,))]


def _setup_context(ctx, inputs, output):
    x, weight, mask, bias, occ, _, _, dx_count, dx_index, occupancy = inputs
    ctx.save_for_backward(x, weight, mask, occ, dx_count, dx_index)
    ctx.occupancy, ctx.bias_dtype = occupancy, None if bias is None else bias.dtype


def _backward(ctx, dy):
    x, weight, mask, occ, dx_count, dx_index = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
    dx, dw = torch.ops.starfish_fast.masked_linear_backward(dy, x, weight, mask, occ, dx_count, dx_index,
                                                           ctx.occupancy, need_dx, need_dw)
    db = dy.sum(dim=0, dtype=torch.float32).to(ctx.bias_dtype) if need_db else None    # (N,) fp32 accumulation
    return (dx if need_dx else None, dw if need_dw else None, None, db) + (None,) * 6


_masked_linear_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function and module
def _check(x, weight, mask, bias):
    if weight.dim() != 2 or mask.shape != weight.shape:
        raise ValueError(f"weight must be 2-D and mask the same shape; got {tuple(weight.shape)} and "
                         f"{tuple(mask.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {weight.shape[1]}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias shape {tuple(bias.shape)} != ({weight.shape[0]},)")


def _kernel_ok(x, weight, mask, bias) -> bool:
    return (x.dtype in _SUPPORTED and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)
            and x.numel() > 0 and weight.numel() > 0 and x.device == weight.device == mask.device)


def _autocast(x, weight, bias):
    """Mirror F.linear under autocast: cast the operands to the autocast dtype (the casts stay in the graph)."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(dev)
    return x.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None


def masked_linear(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None,
                  *, layout: MaskLayout | None = None, kernel: bool | str | None = None) -> torch.Tensor:
    """``x @ (weight * mask).T + bias`` for ``x`` of shape (..., K).

    ``kernel``: True / "triton" the Triton op, False / "torch" plain torch, None / "auto" the dispatch
    table's choice (``kernels/_dispatch.py``: torch on every device so far -- on an H200 cuBLAS on masked
    weights ran 2.5x faster at DeiT-B's fc1, bench/results/gpu_check_h200_2026-12-04). Dtypes the kernel
    does not take (fp64) run plain torch. ``layout``: a cached :func:`mask_layout` of ``mask`` (built
    per call when None or made for other tiles).
    """
    _check(x, weight, mask, bias)
    if choose("masked_linear", x.device, kernel):
        x, weight, bias = _autocast(x, weight, bias)
        if _kernel_ok(x, weight, mask, bias):
            if layout is None or layout.tiles != _tiles_for(x.dtype):
                layout = mask_layout(mask, x.dtype)
            y = _masked_linear_op(x.reshape(-1, x.shape[-1]), weight, mask, bias, layout.occ, layout.fwd_count,
                                  layout.fwd_index, layout.dx_count, layout.dx_index, layout.occupancy)
            return y.view(*x.shape[:-1], weight.shape[0])
        log.debug("masked_linear: unsupported inputs for the kernel (%s, %s); using torch", x.dtype, weight.dtype)
    return masked_linear_reference(x, weight, mask, bias)


class MaskedLinear(nn.Linear):
    """``nn.Linear`` whose weight is multiplied by a fixed binary ``mask`` in every product.

    It subclasses ``nn.Linear`` so ``isinstance`` checks, ``in_features``/``out_features`` and
    the state-dict keys (``weight``, ``bias``) stay those of the layer it replaces. The mask
    is a non-persistent buffer: the state dict stays loadable into a plain ``nn.Linear``
    (masks are saved by ``starfish_fast.masks``), while ``.to()``/``.cuda()`` move it along.
    ``kernel`` (attribute): as :func:`masked_linear`'s; the engine sets it from its plan. The mask's
    layout for the compute dtype is built once (``prepare``), so a compiled forward reads only buffers.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mask: torch.Tensor | None = None,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if mask is None:
            mask = torch.ones(out_features, in_features, dtype=torch.bool, device=self.weight.device)
        self.register_buffer("mask", self._checked_mask(mask), persistent=False)
        self.kernel: bool | str | None = None
        self.layout: MaskLayout | None = None

    def _checked_mask(self, mask: torch.Tensor) -> torch.Tensor:
        if tuple(mask.shape) != tuple(self.weight.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(self.weight.shape)}")
        return mask.detach().to(self.weight.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor) -> "MaskedLinear":
        """Wrap ``linear``, sharing its weight/bias Parameters (optimizer references stay valid)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.register_buffer("mask", layer._checked_mask(mask), persistent=False)
        layer.kernel, layer.layout = None, None
        return layer

    def prepare(self, dtype: torch.dtype) -> "MaskedLinear":
        """Build the mask's layout for inputs of ``dtype`` (call again after changing the mask)."""
        self.layout = mask_layout(self.mask, dtype)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_linear(x, self.weight, self.mask, self.bias, layout=self.layout, kernel=self.kernel)

    def extra_repr(self) -> str:
        density = float((self.mask != 0).float().mean()) if self.mask.numel() else 0.0
        return f"{super().extra_repr()}, density={density:.3f}"
