"""STARFISH multi-block cosine loss in a fixed number of launches, with a memory-light backward.

    import torch
    from starfish_fast.kernels import multi_block_cosine_loss
    students = [torch.randn(2, 197, 64, requires_grad=True) for _ in range(3)]   # (B, T, D) per block
    teachers = [torch.randn(2, 197, 64) for _ in range(3)]
    loss = multi_block_cosine_loss(students, teachers, per="token")             # fp32 scalar
    loss.backward()

Loss: for each block l, rows r of S_l and T_l (the teacher cast to the student's
dtype first, as the reference does), with ``n(v) = max(||v||, 1e-12)`` as in
``F.normalize``:  ``loss = mean_l mean_r (1 - <s/n(s), t/n(t)>)``.
Rows: ``per="token"`` flattens to ``(-1, D_last)`` (a (B, T, D) output gives B*T
rows), ``per="sample"`` to ``(B, -1)``, ``per="shape"`` picks token for 3-D and
sample otherwise (``_rows`` below; ``"auto"``, its former name, is still accepted).

How (per (student dtype, teacher dtype) group, normally one: forward = 2 kernels + one
tiny sum, backward = 1 kernel, whatever the number of blocks):
- ``_cos_stats``: one pass over S and T, fp32 sums ``s.s``, ``t.t``, ``s.t`` per row
  (long rows are split across programs to keep the GPU full);
- ``_cos_finalize``: per row, the loss term and two gradient coefficients
  ``A = -w / (n(s) n(t))`` and ``C = w <s^,t^> / n(s)^2`` (0 where ``||s|| < eps``, as
  the clamp in F.normalize passes no gradient there), with ``w = 1 / (L * R_l)``;
  partial sums of the loss per program (summed by one tiny torch reduction: no
  atomics, deterministic);
- backward ``_cos_grad``: ``dL/ds = grad_out * (A * t + C * s)``, one pass reading S, T
  and writing the gradient in the student dtype.
Each program finds its block with one load from a tile -> block table, built once per layout
(block shapes) and cached with its other host-side planning, so a step's launches cost no
Python work proportional to the number of rows.
Saved for backward: 8 bytes per row (A, C) plus references to the inputs
(no normalised copies, no gradient computed ahead). Eager autograd instead keeps
input-sized temporaries per block alive until the backward (normalised copies, their
product, a cast teacher when dtypes differ): that is the peak memory the fused path saves.
Traffic: S and T are read twice (forward and backward) and dS written once. Computing dS
in the forward would read S and T once but must hold dS (input-sized) until the backward
and rescale it by grad_out there (another read and write): the same bytes, more memory.

The two passes are torch custom ops (``starfish_fast::cosine_loss``, ``::cosine_loss_backward``)
with a fake implementation, so ``torch.compile`` traces through them (no graph break). Their CUDA
implementation is the Triton kernels; on the CPU the same math in plain torch (or the kernels in
Triton's interpreter when ``TRITON_INTERPRET=1``, how the tests check them without a GPU).

Zero rows behave as in F.normalize (the loss term is 1, the gradient ``-w t^/eps``); in
fp16 that gradient (~1e12) exceeds the format, so it is saturated to +-65504 instead of
becoming inf (the fp16 reference gives NaN: its eps underflows to 0).

Teachers are targets: no gradient flows to them (STARFISH teachers are frozen).
The returned loss is fp32 whatever the student dtype (the reference returns the
student dtype): it is accumulated in fp32 and a bf16 scalar would round the logged value.
"""
from __future__ import annotations

import functools
import logging
from typing import Sequence

import torch
import torch.nn.functional as F

from ._dispatch import HAVE_TRITON, INTERPRET, choose, device_table, empty, launching

log = logging.getLogger(__name__)

EPS = 1e-12               # F.normalize's default
PERS = ("token", "sample", "shape")
FORMER_PERS = {"auto": "shape"}     # the former word, still accepted
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_TAB = 8                  # int64 fields per block in the launch table (see _group_table)


# --------------------------------------------------------------------------- reference
def _rows(x: torch.Tensor, per: str) -> torch.Tensor:
    per = FORMER_PERS.get(per, per)
    if per == "shape":
        per = "token" if x.dim() == 3 else "sample"
    if per == "token":
        return x.reshape(-1, x.shape[-1])                                         # (B*T, D)
    if per == "sample":
        return x.reshape(x.shape[0], -1)                                          # (B, prod(rest))
    raise ValueError(f"unknown per={per!r}; allowed: {', '.join(PERS)}")


def multi_block_cosine_loss_reference(students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor],
                                      per: str = "token", block_weights: Sequence[float] | torch.Tensor | None = None,
                                      per_block: bool = False):
    """Plain torch, as the STARFISH reference writes it (result in the student dtype). With
    ``block_weights`` the mean over blocks is weighted (``sum w_l loss_l / sum w_l``); with
    ``per_block`` also each block's unweighted loss (L,), detached."""
    losses = []
    for s, t in zip(students, teachers):
        sn = F.normalize(_rows(s, per), dim=1, eps=EPS)                           # (R, D)
        tn = F.normalize(_rows(t.to(s.dtype), per), dim=1, eps=EPS)               # (R, D)
        losses.append((1 - (sn * tn).sum(1)).mean())
    return weighted_block_mean(torch.stack(losses), block_weights, per_block)


def weighted_block_mean(stacked: torch.Tensor, block_weights=None, per_block: bool = False):
    """The mean over blocks of per-block losses (L,), weighted (``sum w_l loss_l / sum w_l``) when
    ``block_weights`` are given; with ``per_block`` also the losses themselves, detached, fp32."""
    if block_weights is None:
        loss = stacked.mean()
    else:
        weights = torch.as_tensor(block_weights, dtype=stacked.dtype, device=stacked.device)   # (L,)
        loss = (stacked * weights).sum() / weights.sum()
    return (loss, stacked.detach().float()) if per_block else loss


# --------------------------------------------------------------------------- kernels
if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _block_fields(tab_ptr, blk, s_any, t_any, TAB: tl.constexpr, ALIGNED: tl.constexpr):
        """Block ``blk``'s table row: (s_ptr, t_ptr, R, D, s_stride, t_stride, tile0, row0)."""
        row = tab_ptr + blk * TAB
        s_ptr = tl.load(row + 0).to(tl.pointer_type(s_any.dtype.element_ty))
        t_ptr = tl.load(row + 1).to(tl.pointer_type(t_any.dtype.element_ty))
        D = tl.load(row + 3)
        s_stride = tl.load(row + 4)
        t_stride = tl.load(row + 5)
        if ALIGNED:
            # Host-checked: 16-byte aligned rows, D and row strides multiples of 8 elements. Addresses
            # loaded from the table carry no alignment information otherwise (every load was scalar).
            s_ptr = tl.multiple_of(s_ptr, 16)
            t_ptr = tl.multiple_of(t_ptr, 16)
            D = tl.multiple_of(D, 8)
            s_stride = tl.multiple_of(s_stride, 8)
            t_stride = tl.multiple_of(t_stride, 8)
        return s_ptr, t_ptr, tl.load(row + 2), D, s_stride, t_stride, tl.load(row + 6), tl.load(row + 7)

    @triton.jit
    def _cos_stats_kernel(tab_ptr, tblk_ptr, s_any, t_any, part_ptr, n_split, rows_total,
                          TAB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr):
        """part[split, 0..2, row] = partial (s.s, t.t, s.t) over this program's share of the row."""
        pid = tl.program_id(0)
        tile = pid // n_split
        split = pid % n_split
        blk = tl.load(tblk_ptr + tile)              # this tile's block (group-local)
        s_ptr, t_ptr, R, D, s_stride, t_stride, tile0, row0 = _block_fields(tab_ptr, blk, s_any, t_any, TAB, ALIGNED)
        rows = (tile - tile0) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)     # (BR,) rows of this block
        rmask = rows < R
        # this split's contiguous range of D-chunks
        n_chunks = tl.cdiv(D, BLOCK_D)
        per_split = tl.cdiv(n_chunks, n_split)
        c0 = split * per_split
        c1 = tl.minimum(c0 + per_split, n_chunks)
        ss = tl.zeros((BLOCK_R,), dtype=tl.float32)
        tt = tl.zeros((BLOCK_R,), dtype=tl.float32)
        st = tl.zeros((BLOCK_R,), dtype=tl.float32)
        arange_d = tl.arange(0, BLOCK_D)
        for c in range(c0, c1):
            cols = c * BLOCK_D + arange_d                                         # (BD,)
            m = rmask[:, None] & (cols[None, :] < D)
            s = tl.load(s_ptr + rows[:, None] * s_stride + cols[None, :], mask=m, other=0.0).to(tl.float32)
            # the reference casts the teacher to the student dtype before normalising
            t = tl.load(t_ptr + rows[:, None] * t_stride + cols[None, :], mask=m, other=0.0)
            t = t.to(s_any.dtype.element_ty).to(tl.float32)                      # (BR, BD)
            ss += tl.sum(s * s, axis=1)
            tt += tl.sum(t * t, axis=1)
            st += tl.sum(s * t, axis=1)
        out = part_ptr + split * 3 * rows_total + row0 + rows
        tl.store(out, ss, mask=rmask)
        tl.store(out + rows_total, tt, mask=rmask)
        tl.store(out + 2 * rows_total, st, mask=rmask)

    @triton.jit
    def _cos_finalize_kernel(tab_ptr, tblk_ptr, part_ptr, coef_ptr, loss_ptr, raw_ptr, w_ptr, n_split, part_rows,
                             coef_rows, eps,
                             TAB: tl.constexpr, BLOCK_R: tl.constexpr):
        """Per row: loss term and gradient coefficients (A, C); per program: its weighted loss sum and its
        block's unweighted mean contribution. ``w_ptr``: each block's weight over the weights' sum."""
        tile = tl.program_id(0)
        blk = tl.load(tblk_ptr + tile)              # this tile's block (group-local)
        row = tab_ptr + blk * TAB
        R = tl.load(row + 2)
        tile0 = tl.load(row + 6)
        row0 = tl.load(row + 7)
        rows = (tile - tile0) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        rmask = rows < R
        ss = tl.zeros((BLOCK_R,), dtype=tl.float32)
        tt = tl.zeros((BLOCK_R,), dtype=tl.float32)
        st = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for sp in range(0, n_split):
            p = part_ptr + sp * 3 * part_rows + row0 + rows
            ss += tl.load(p, mask=rmask, other=0.0)
            tt += tl.load(p + part_rows, mask=rmask, other=0.0)
            st += tl.load(p + 2 * part_rows, mask=rmask, other=0.0)
        norm_s = tl.sqrt(ss)
        ns = tl.maximum(norm_s, eps)                  # F.normalize: x / norm.clamp_min(eps)
        nt = tl.maximum(tl.sqrt(tt), eps)
        cos = st / (ns * nt)
        w = tl.load(w_ptr + blk) / R.to(tl.float32)   # mean over rows, then weighted mean over blocks
        coef_a = -w / (ns * nt)
        # clamp_min passes gradient only where norm >= eps; below it n(s) is the constant eps
        coef_c = tl.where(norm_s >= eps, w * cos / (ns * ns), 0.0)
        tl.store(coef_ptr + row0 + rows, coef_a, mask=rmask)
        tl.store(coef_ptr + coef_rows + row0 + rows, coef_c, mask=rmask)
        tl.store(loss_ptr + tile, tl.sum(tl.where(rmask, w * (1.0 - cos), 0.0), axis=0))
        tl.store(raw_ptr + tile, tl.sum(tl.where(rmask, (1.0 - cos) / R.to(tl.float32), 0.0), axis=0))

    @triton.jit
    def _cos_grad_kernel(tab_ptr, tblk_ptr, gtab_ptr, s_any, t_any, coef_ptr, gout_ptr, n_split, rows_total,
                         TAB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, CLAMP: tl.constexpr,
                         ALIGNED: tl.constexpr):
        """dL/ds = grad_out * (A * t + C * s), written in the student dtype (rows contiguous)."""
        pid = tl.program_id(0)
        tile = pid // n_split
        split = pid % n_split
        blk = tl.load(tblk_ptr + tile)              # this tile's block (group-local)
        s_ptr, t_ptr, R, D, s_stride, t_stride, tile0, row0 = _block_fields(tab_ptr, blk, s_any, t_any, TAB, ALIGNED)
        g_ptr = tl.load(gtab_ptr + blk).to(tl.pointer_type(s_any.dtype.element_ty))
        if ALIGNED:
            g_ptr = tl.multiple_of(g_ptr, 16)
        rows = (tile - tile0) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        rmask = rows < R
        gout = tl.load(gout_ptr).to(tl.float32)
        coef_a = tl.load(coef_ptr + row0 + rows, mask=rmask, other=0.0) * gout                 # (BR,)
        coef_c = tl.load(coef_ptr + rows_total + row0 + rows, mask=rmask, other=0.0) * gout    # (BR,)
        n_chunks = tl.cdiv(D, BLOCK_D)
        per_split = tl.cdiv(n_chunks, n_split)
        c0 = split * per_split
        c1 = tl.minimum(c0 + per_split, n_chunks)
        arange_d = tl.arange(0, BLOCK_D)
        for c in range(c0, c1):
            cols = c * BLOCK_D + arange_d
            m = rmask[:, None] & (cols[None, :] < D)
            s = tl.load(s_ptr + rows[:, None] * s_stride + cols[None, :], mask=m, other=0.0).to(tl.float32)
            t = tl.load(t_ptr + rows[:, None] * t_stride + cols[None, :], mask=m, other=0.0)
            t = t.to(s_any.dtype.element_ty).to(tl.float32)
            g = coef_a[:, None] * t + coef_c[:, None] * s                          # (BR, BD)
            if CLAMP > 0:  # fp16: a zero row's exact gradient (~1e12) would round to inf; saturate instead
                g = tl.minimum(tl.maximum(g, -CLAMP), CLAMP)
            tl.store(g_ptr + rows[:, None] * D + cols[None, :], g.to(s_any.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------- launch planning
def _chunk(ds: tuple[int, ...], rs: tuple[int, ...]) -> int:
    """Largest power-of-two chunk (128..1024) whose padding wastes <= 1/8 of the lanes."""
    total = sum(r * d for r, d in zip(rs, ds))
    for c in (1024, 512, 256):
        padded = sum(r * (-(-d // c) * c) for r, d in zip(rs, ds))
        if padded - total <= total / 8:
            return c
    return 128


def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # interpreter: small, but enough to make tests exercise the split-row path
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


class _Layout:
    """What one group's launches need that depends only on the blocks' (rows, width): tile sizes, the
    row split, each block's first tile and row, and the tile -> block table on the device. Cached per
    shape (``_layout``): a training step reuses it every call."""

    def __init__(self, rs: tuple[int, ...], ds: tuple[int, ...], device: torch.device):
        self.block_d = _chunk(ds, rs)
        self.block_r = max(1, min(4096 // self.block_d, triton.next_power_of_2(max(rs))))
        tiles = [triton.cdiv(r, self.block_r) for r in rs]
        self.n_tiles, self.rows = sum(tiles), sum(rs)
        max_chunks = max(triton.cdiv(d, self.block_d) for d in ds)
        target = _target_programs(device)
        self.n_split = 1 if self.n_tiles >= target else min(max_chunks, triton.cdiv(target, self.n_tiles))
        self.tile0 = [sum(tiles[:i]) for i in range(len(rs))]
        self.row0 = [sum(rs[:i]) for i in range(len(rs))]
        self.tile_block = torch.repeat_interleave(torch.arange(len(rs), dtype=torch.int32),
                                                  torch.tensor(tiles)).to(device)                 # (tiles,)
        self.num_warps = 8 if self.block_r * self.block_d >= 4096 else 4


@functools.lru_cache(maxsize=64)
def _layout(rs: tuple[int, ...], ds: tuple[int, ...], device: torch.device) -> _Layout:
    return _Layout(rs, ds, device)


class _Group:
    """Blocks sharing (student dtype, teacher dtype): one launch of each kernel."""

    def __init__(self, ids, s_rows, t_rows, row_offset, tile_offset):
        device = s_rows[0].device
        self.ids, self.row_offset, self.tile_offset = ids, row_offset, tile_offset
        self.layout = _layout(tuple(s.shape[0] for s in s_rows), tuple(s.shape[1] for s in s_rows), device)
        values = []
        for s, t, tile0, row0 in zip(s_rows, t_rows, self.layout.tile0, self.layout.row0):
            values += [s.data_ptr(), t.data_ptr(), s.shape[0], s.shape[1], s.stride(0), t.stride(0), tile0, row0]
        self.table = device_table(values, device)                                # (L_g * 8,)
        # vector loads: 16-byte aligned rows, D and strides multiples of 8 elements (16 bytes of bf16)
        self.aligned = all(x.data_ptr() % 16 == 0 and x.stride(0) % 8 == 0 and x.shape[1] % 8 == 0
                           for x in (*s_rows, *t_rows))


def _as_rows(x: torch.Tensor, per: str) -> torch.Tensor:
    rows = _rows(x, per)
    return rows if rows.stride(1) == 1 else rows.contiguous()


def _groups(s_rows, t_rows) -> list[_Group]:
    by_dtype: dict[tuple, list[int]] = {}
    for i, (s, t) in enumerate(zip(s_rows, t_rows)):
        if s.shape != t.shape:
            raise ValueError(f"student rows {tuple(s.shape)} != teacher rows {tuple(t.shape)}")
        by_dtype.setdefault((s.dtype, t.dtype), []).append(i)
    groups, rows, tiles = [], 0, 0
    for ids in by_dtype.values():
        group = _Group(ids, [s_rows[i] for i in ids], [t_rows[i] for i in ids], rows, tiles)
        groups.append(group)
        rows, tiles = rows + group.layout.rows, tiles + group.layout.n_tiles
    return groups


# --------------------------------------------------------------------------- the two passes
def _forward_triton(s_rows, t_rows, weights):
    """(loss, per-block losses (L,), coefficients (2, R)) from the Triton kernels."""
    device = s_rows[0].device
    groups = _groups(s_rows, t_rows)
    rows_total = sum(g.layout.rows for g in groups)
    tiles_total = sum(g.layout.n_tiles for g in groups)
    coef = empty((2, rows_total), dtype=torch.float32, device=device)        # (A, C) per row
    loss_parts = empty((tiles_total,), dtype=torch.float32, device=device)   # one per finalize program
    raw_parts = empty((tiles_total,), dtype=torch.float32, device=device)    # the same, unweighted
    per_block = torch.zeros(len(s_rows), dtype=torch.float32, device=device)                  # (L,)
    one = len(groups) == 1                       # the usual case: every block in one launch, in order
    for g in groups:
        lay = g.layout
        ids = None if one else device_table(list(g.ids), device)                # (L_g,) the blocks, overall
        part = empty((lay.n_split, 3, lay.rows), dtype=torch.float32, device=device)  # (split, ss|tt|st, row)
        s0, t0 = s_rows[g.ids[0]], t_rows[g.ids[0]]
        with launching("cosine_loss forward", blocks=len(g.ids), rows=lay.rows, first=tuple(s0.shape),
                       dtypes=(s0.dtype, t0.dtype)):
            _cos_stats_kernel[(lay.n_tiles * lay.n_split,)](
                g.table, lay.tile_block, s0, t0, part, lay.n_split, lay.rows,
                TAB=_TAB, BLOCK_R=lay.block_r, BLOCK_D=lay.block_d, ALIGNED=g.aligned, num_warps=lay.num_warps)
            _cos_finalize_kernel[(lay.n_tiles,)](
                g.table, lay.tile_block, part, coef[:, g.row_offset:], loss_parts[g.tile_offset:],
                raw_parts[g.tile_offset:], weights if one else weights.index_select(0, ids), lay.n_split,
                lay.rows, rows_total, EPS, TAB=_TAB, BLOCK_R=lay.block_r, num_warps=4)
        # each finalize program's unweighted part, summed into its block's loss
        per_block.index_add_(0, lay.tile_block if one else ids[lay.tile_block.long()],
                             raw_parts[g.tile_offset:g.tile_offset + lay.n_tiles])
    return loss_parts.sum(), per_block, coef


def _backward_triton(coef, s_rows, t_rows, grad_out):
    """dL/ds per block (rows layout, student dtype) from the Triton kernel."""
    grads: list = [None] * len(s_rows)
    grad_out = grad_out.reshape(1).to(torch.float32)
    rows_total = coef.shape[1]
    for g in _groups(s_rows, t_rows):
        lay = g.layout
        outs = {i: empty(s_rows[i].shape, dtype=s_rows[i].dtype, device=coef.device) for i in g.ids}
        gtab = device_table([outs[i].data_ptr() for i in g.ids], coef.device)
        s0 = s_rows[g.ids[0]]
        with launching("cosine_loss backward", blocks=len(g.ids), rows=lay.rows, first=tuple(s0.shape),
                       dtype=s0.dtype):
            _cos_grad_kernel[(lay.n_tiles * lay.n_split,)](
                g.table, lay.tile_block, gtab, s0, t_rows[g.ids[0]], coef[:, g.row_offset:], grad_out,
                lay.n_split, rows_total,
                TAB=_TAB, BLOCK_R=lay.block_r, BLOCK_D=lay.block_d, num_warps=lay.num_warps,
                CLAMP=float(torch.finfo(torch.float16).max) if s0.dtype == torch.float16 else 0.0,
                ALIGNED=g.aligned and all(out.data_ptr() % 16 == 0 for out in outs.values()))
        for i in g.ids:
            grads[i] = outs[i]
    return grads


def _forward_torch(s_rows, t_rows, weights):
    """The same three results as ``_forward_triton``, in plain torch (fp32 sums per row)."""
    terms, coefs = [], []
    for s, t, w in zip(s_rows, t_rows, weights):
        s32, t32 = s.float(), t.to(s.dtype).float()                                          # (R, D)
        norm_s = s32.square().sum(1).sqrt()
        ns, nt = norm_s.clamp_min(EPS), t32.square().sum(1).sqrt().clamp_min(EPS)           # (R,)
        cos = (s32 * t32).sum(1) / (ns * nt)
        w_row = w / s.shape[0]
        terms.append(1 - cos)
        coefs.append(torch.stack([-w_row / (ns * nt), torch.where(norm_s >= EPS, w_row * cos / ns.square(), 0.0)]))
    per_block = torch.stack([term.mean() for term in terms])                                   # (L,)
    return (per_block * weights).sum(), per_block, torch.cat(coefs, dim=1)


def _backward_torch(coef, s_rows, t_rows, grad_out):
    grads, row0 = [], 0
    for s, t in zip(s_rows, t_rows):
        a, c = coef[:, row0:row0 + s.shape[0], None] * grad_out.float()                       # (R, 1) each
        grads.append((a * t.to(s.dtype).float() + c * s.float()).to(s.dtype))
        row0 += s.shape[0]
    return grads


def _on_triton(s_rows, t_rows) -> bool:
    """The kernels run on CUDA, and on CPU tensors in Triton's interpreter (tests)."""
    return HAVE_TRITON and (s_rows[0].is_cuda or INTERPRET) and all(
        s.dtype in _SUPPORTED and t.dtype in _SUPPORTED for s, t in zip(s_rows, t_rows))


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("starfish_fast::cosine_loss", mutates_args=())
def _cosine_loss_op(students: list[torch.Tensor], teachers: list[torch.Tensor], weights: torch.Tensor,
                    per: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weighted loss (), each block's unweighted loss (L,), per-row gradient coefficients (2, R)).
    ``weights``: (L,) fp32 block weights over their sum."""
    s_rows = [_as_rows(s, per) for s in students]                                           # (R_l, D_l) each
    t_rows = [_as_rows(t, per) for t in teachers]
    forward = _forward_triton if _on_triton(s_rows, t_rows) else _forward_torch
    return forward(s_rows, t_rows, weights)


@_cosine_loss_op.register_fake
def _(students, teachers, weights, per):
    rows = sum(_rows(s, per).shape[0] for s in students)
    new = students[0].new_empty
    return new((), dtype=torch.float32), new((len(students),), dtype=torch.float32), \
        new((2, rows), dtype=torch.float32)


@torch.library.custom_op("starfish_fast::cosine_loss_backward", mutates_args=())
def _cosine_loss_backward_op(coef: torch.Tensor, students: list[torch.Tensor], teachers: list[torch.Tensor],
                             grad_out: torch.Tensor, per: str) -> list[torch.Tensor]:
    """Each student's gradient (its shape and dtype) for the loss's gradient ``grad_out`` (0-dim)."""
    s_rows = [_as_rows(s, per) for s in students]
    t_rows = [_as_rows(t, per) for t in teachers]
    backward = _backward_triton if _on_triton(s_rows, t_rows) else _backward_torch
    return [g.view(s.shape) for g, s in zip(backward(coef, s_rows, t_rows, grad_out), students)]


@_cosine_loss_backward_op.register_fake
def _(coef, students, teachers, grad_out, per):
    return [torch.empty_like(s, memory_format=torch.contiguous_format) for s in students]


def _setup_context(ctx, inputs, output):
    students, teachers, _, per = inputs
    ctx.per, ctx.n = per, len(students)
    ctx.save_for_backward(output[2], *students, *teachers)


def _backward(ctx, grad_loss, _grad_per_block, _grad_coef):
    coef, *saved = ctx.saved_tensors
    students, teachers = saved[:ctx.n], saved[ctx.n:]
    grads = torch.ops.starfish_fast.cosine_loss_backward(coef, students, teachers, grad_loss, ctx.per)
    return list(grads), [None] * ctx.n, None, None


_cosine_loss_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function
def multi_block_cosine_loss(students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor], per: str = "token",
                            *, block_weights: Sequence[float] | torch.Tensor | None = None, per_block: bool = False,
                            kernel: bool | str | None = None):
    """Mean over blocks of mean over rows of ``1 - cos(student_row, teacher_row)``.

    ``block_weights``: (L,) non-negative weights of the blocks (a device tensor costs no copy): the mean
    over blocks becomes ``sum w_l loss_l / sum w_l``, in the same launches. ``per_block``: also return
    each block's unweighted loss, (L,) fp32, detached: ``(loss, per_block)``.
    ``kernel``: the fused op (True / "triton"), the plain-torch reference (False / "torch"), or the
    dispatch table's choice (None / "auto"; ``kernels/_dispatch.py``). The fused op returns fp32, the
    reference the student dtype. Teachers get no gradient.
    """
    if len(students) != len(teachers) or not students:
        raise ValueError(f"need the same non-zero number of student and teacher blocks, got "
                         f"{len(students)} and {len(teachers)}")
    per = FORMER_PERS.get(per, per)
    if per not in PERS:
        raise ValueError(f"unknown per={per!r}; allowed: {', '.join(PERS)}")
    if block_weights is not None and len(block_weights) != len(students):
        raise ValueError(f"{len(block_weights)} block weights for {len(students)} blocks")
    if choose("cosine_loss", students[0].device, kernel) and _kernel_ok(students, teachers):
        device = students[0].device
        weights = torch.ones(len(students), device=device) if block_weights is None else \
            torch.as_tensor(block_weights, device=device).float()                            # (L,)
        loss, blocks, _ = _cosine_loss_op(list(students), [t.detach() for t in teachers], weights / weights.sum(),
                                          per)
        return (loss, blocks.detach()) if per_block else loss
    return multi_block_cosine_loss_reference(students, teachers, per, block_weights, per_block)


def _kernel_ok(students, teachers) -> bool:
    return all(s.dtype in _SUPPORTED and t.dtype in _SUPPORTED and s.numel() > 0 and s.device == t.device
               == students[0].device for s, t in zip(students, teachers))


__all__ = ["multi_block_cosine_loss", "multi_block_cosine_loss_reference", "weighted_block_mean"]
