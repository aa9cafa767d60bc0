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
rows), ``per="sample"`` to ``(B, -1)``, ``per="auto"`` picks token for 3-D and
sample otherwise (``_rows`` below).

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
Saved for backward: 8 bytes per row (A, C) plus references to the inputs
(no normalised copies, no gradient computed ahead). Eager autograd instead keeps
input-sized temporaries per block alive until the backward (normalised copies, their
product, a cast teacher when dtypes differ): that is the peak memory the fused path saves.
Traffic: S and T are read twice (forward and backward) and dS written once. Computing dS
in the forward would read S and T once but must hold dS (input-sized) until the backward
and rescale it by grad_out there (another read and write): the same bytes, more memory.

Zero rows behave as in F.normalize (the loss term is 1, the gradient ``-w t^/eps``); in
fp16 that gradient (~1e12) exceeds the format, so it is saturated to +-65504 instead of
becoming inf (the fp16 reference gives NaN: its eps underflows to 0).

Teachers are targets: no gradient flows to them (STARFISH teachers are frozen).
The returned loss is fp32 whatever the student dtype (the reference returns the
student dtype): it is accumulated in fp32 and a bf16 scalar would round the logged value.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F

from ._dispatch import HAVE_TRITON, device_table, empty, launching, resolve

log = logging.getLogger(__name__)

EPS = 1e-12               # F.normalize's default
PERS = ("token", "sample", "auto")
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_TAB = 8                  # int64 fields per block in the launch table (see _group_table)


# --------------------------------------------------------------------------- reference
def _rows(x: torch.Tensor, per: str) -> torch.Tensor:
    if per == "auto":
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
    def _block_of(tab_ptr, tile, n_blocks, TAB: tl.constexpr):
        """Index of the block whose tile range holds ``tile`` (tile starts at field 6, ascending)."""
        blk = tile * 0
        for b in range(1, n_blocks):
            blk += (tile >= tl.load(tab_ptr + b * TAB + 6)).to(blk.dtype)
        return blk

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
    def _cos_stats_kernel(tab_ptr, s_any, t_any, part_ptr, n_blocks, n_split, rows_total,
                          TAB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr):
        """part[split, 0..2, row] = partial (s.s, t.t, s.t) over this program's share of the row."""
        pid = tl.program_id(0)
        tile = pid // n_split
        split = pid % n_split
        blk = _block_of(tab_ptr, tile, n_blocks, TAB)
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
    def _cos_finalize_kernel(tab_ptr, part_ptr, coef_ptr, loss_ptr, raw_ptr, w_ptr, n_blocks, n_split, part_rows,
                             coef_rows, eps,
                             TAB: tl.constexpr, BLOCK_R: tl.constexpr):
        """Per row: loss term and gradient coefficients (A, C); per program: its weighted loss sum and its
        block's unweighted mean contribution. ``w_ptr``: each block's weight over the weights' sum."""
        tile = tl.program_id(0)
        blk = _block_of(tab_ptr, tile, n_blocks, TAB)
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
    def _cos_grad_kernel(tab_ptr, gtab_ptr, s_any, t_any, coef_ptr, gout_ptr, n_blocks, n_split, rows_total,
                         TAB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, CLAMP: tl.constexpr,
                         ALIGNED: tl.constexpr):
        """dL/ds = grad_out * (A * t + C * s), written in the student dtype (rows contiguous)."""
        pid = tl.program_id(0)
        tile = pid // n_split
        split = pid % n_split
        blk = _block_of(tab_ptr, tile, n_blocks, TAB)
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
def _chunk(ds: list[int], rs: list[int]) -> int:
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


class _Group:
    """Blocks sharing (student dtype, teacher dtype): one launch of each kernel."""

    def __init__(self, ids, s_rows, t_rows, device, row_offset, tile_offset):
        self.ids = ids
        self.block_ids = device_table(list(ids), device)                          # (L_g,) the blocks, overall
        ds = [s.shape[1] for s in s_rows]
        rs = [s.shape[0] for s in s_rows]
        self.block_d = _chunk(ds, rs)
        self.block_r = max(1, min(4096 // self.block_d, triton.next_power_of_2(max(rs))))
        tiles = [triton.cdiv(r, self.block_r) for r in rs]
        self.n_tiles = sum(tiles)
        max_chunks = max(triton.cdiv(d, self.block_d) for d in ds)
        target = _target_programs(device)
        self.n_split = 1 if self.n_tiles >= target else min(max_chunks, triton.cdiv(target, self.n_tiles))
        self.rows, self.row_offset, self.tile_offset = sum(rs), row_offset, tile_offset
        values, tile0, row0 = [], 0, 0
        for s, t, r, n in zip(s_rows, t_rows, rs, tiles):
            values += [s.data_ptr(), t.data_ptr(), r, s.shape[1], s.stride(0), t.stride(0), tile0, row0]
            tile0, row0 = tile0 + n, row0 + r
        self.table = device_table(values, device)                                # (L_g * 8,)
        # which block (overall index) each finalize program's tile belongs to: per-block sums of the raw parts
        self.tile_blocks = device_table([i for i, n in zip(ids, tiles) for _ in range(n)], device)   # (tiles,)
        # vector loads: 16-byte aligned rows, D and strides multiples of 8 elements (16 bytes of bf16)
        self.aligned = all(x.data_ptr() % 16 == 0 and x.stride(0) % 8 == 0 and x.shape[1] % 8 == 0
                           for x in (*s_rows, *t_rows))
        self.num_warps = 8 if self.block_r * self.block_d >= 4096 else 4


def _as_rows(x: torch.Tensor, per: str) -> torch.Tensor:
    rows = _rows(x, per)
    return rows if rows.stride(1) == 1 else rows.contiguous()


# --------------------------------------------------------------------------- autograd
class MultiBlockCosineLoss(torch.autograd.Function):
    """Triton forward (stats + finalize) and backward (gradient) over all blocks."""

    @staticmethod
    def forward(ctx, per, n_blocks, weights, *tensors):
        """``weights``: (L,) fp32 block weights over their sum on the device. Returns the weighted loss and
        each block's unweighted loss (L,), the latter not differentiable."""
        students, teachers = tensors[:n_blocks], tensors[n_blocks:]
        device = students[0].device
        s_rows = [_as_rows(s, per) for s in students]                              # (R_l, D_l) each
        t_rows = [_as_rows(t.detach(), per) for t in teachers]
        for s, t in zip(s_rows, t_rows):
            if s.shape != t.shape:
                raise ValueError(f"student rows {tuple(s.shape)} != teacher rows {tuple(t.shape)}")
        groups: dict[tuple, list[int]] = {}
        for i, (s, t) in enumerate(zip(s_rows, t_rows)):
            groups.setdefault((s.dtype, t.dtype), []).append(i)
        plans, rows_total, tiles_total = [], 0, 0
        for ids in groups.values():
            g = _Group(ids, [s_rows[i] for i in ids], [t_rows[i] for i in ids], device, rows_total, tiles_total)
            plans.append(g)
            rows_total += g.rows
            tiles_total += g.n_tiles
        coef = empty((2, rows_total), dtype=torch.float32, device=device)        # (A, C) per row
        loss_parts = empty((tiles_total,), dtype=torch.float32, device=device)   # one per finalize program
        raw_parts = empty((tiles_total,), dtype=torch.float32, device=device)    # the same, unweighted
        per_block = torch.zeros(n_blocks, dtype=torch.float32, device=device)    # (L,)
        for g in plans:
            part = empty((g.n_split, 3, g.rows), dtype=torch.float32, device=device)  # (split, ss|tt|st, row)
            s0, t0 = s_rows[g.ids[0]], t_rows[g.ids[0]]
            with launching("cosine_loss forward", blocks=len(g.ids), rows=g.rows, first=tuple(s0.shape),
                           dtypes=(s0.dtype, t0.dtype)):
                _cos_stats_kernel[(g.n_tiles * g.n_split,)](
                    g.table, s0, t0, part, len(g.ids), g.n_split, g.rows,
                    TAB=_TAB, BLOCK_R=g.block_r, BLOCK_D=g.block_d, ALIGNED=g.aligned, num_warps=g.num_warps)
                _cos_finalize_kernel[(g.n_tiles,)](
                    g.table, part, coef[:, g.row_offset:], loss_parts[g.tile_offset:], raw_parts[g.tile_offset:],
                    weights.index_select(0, g.block_ids), len(g.ids), g.n_split, g.rows, rows_total, EPS,
                    TAB=_TAB, BLOCK_R=g.block_r, num_warps=4)
            per_block.index_add_(0, g.tile_blocks, raw_parts[g.tile_offset:g.tile_offset + g.n_tiles])
        loss = loss_parts.sum()                                                    # () fp32
        ctx.mark_non_differentiable(per_block)
        ctx.per, ctx.n_blocks, ctx.plans, ctx.rows_total = per, n_blocks, plans, rows_total
        ctx.shapes = [s.shape for s in students]
        ctx.save_for_backward(coef, *s_rows, *t_rows)
        return loss, per_block

    @staticmethod
    def backward(ctx, grad_out, _grad_per_block):
        coef, *rows = ctx.saved_tensors
        n = ctx.n_blocks
        s_rows, t_rows = rows[:n], rows[n:]
        grad_out = grad_out.reshape(1).to(torch.float32)
        grads: list[torch.Tensor | None] = [None] * n
        for g in ctx.plans:
            if not any(ctx.needs_input_grad[3 + i] for i in g.ids):
                continue
            # every block of the group is written (one launch); unneeded ones are dropped after
            outs = {i: empty(s_rows[i].shape, dtype=s_rows[i].dtype, device=coef.device) for i in g.ids}
            gtab = device_table([outs[i].data_ptr() for i in g.ids], coef.device)
            s0 = s_rows[g.ids[0]]
            with launching("cosine_loss backward", blocks=len(g.ids), rows=g.rows, first=tuple(s0.shape),
                           dtype=s0.dtype):
                _cos_grad_kernel[(g.n_tiles * g.n_split,)](
                    g.table, gtab, s0, t_rows[g.ids[0]], coef[:, g.row_offset:], grad_out,
                    len(g.ids), g.n_split, ctx.rows_total,
                    TAB=_TAB, BLOCK_R=g.block_r, BLOCK_D=g.block_d, num_warps=g.num_warps,
                    CLAMP=float(torch.finfo(torch.float16).max) if s0.dtype == torch.float16 else 0.0,
                    ALIGNED=g.aligned and all(out.data_ptr() % 16 == 0 for out in outs.values()))
            for i in g.ids:
                grads[i] = outs[i].view(ctx.shapes[i]) if ctx.needs_input_grad[3 + i] else None
        return (None, None, None, *grads, *([None] * n))


def _kernel_ok(students, teachers) -> bool:
    return all(s.dtype in _SUPPORTED and t.dtype in _SUPPORTED and s.numel() > 0 and s.device == t.device
               == students[0].device for s, t in zip(students, teachers))


def multi_block_cosine_loss(students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor], per: str = "token",
                            *, block_weights: Sequence[float] | torch.Tensor | None = None, per_block: bool = False,
                            kernel: bool | None = None):
    """Mean over blocks of mean over rows of ``1 - cos(student_row, teacher_row)``.

    ``block_weights``: (L,) non-negative weights of the blocks (a device tensor costs no copy): the mean
    over blocks becomes ``sum w_l loss_l / sum w_l``, in the same launches. ``per_block``: also return
    each block's unweighted loss, (L,) fp32, detached: ``(loss, per_block)``.
    ``kernel``: None dispatches (CUDA or TRITON_INTERPRET=1 -> Triton, else torch); False
    forces torch; True forces Triton (RuntimeError where it cannot run). The kernel path
    returns fp32, the reference the student dtype.
    """
    if len(students) != len(teachers) or not students:
        raise ValueError(f"need the same non-zero number of student and teacher blocks, got "
                         f"{len(students)} and {len(teachers)}")
    if per not in PERS:
        raise ValueError(f"unknown per={per!r}; allowed: {', '.join(PERS)}")
    if block_weights is not None and len(block_weights) != len(students):
        raise ValueError(f"{len(block_weights)} block weights for {len(students)} blocks")
    if resolve(kernel, students[0], "multi_block_cosine_loss") and _kernel_ok(students, teachers):
        device = students[0].device
        weights = torch.ones(len(students), device=device) if block_weights is None else \
            torch.as_tensor(block_weights, device=device).float()                            # (L,)
        loss, blocks = MultiBlockCosineLoss.apply(per, len(students), weights / weights.sum(), *students,
                                                  *[t.detach() for t in teachers])
        return (loss, blocks) if per_block else loss
    return multi_block_cosine_loss_reference(students, teachers, per, block_weights, per_block)


__all__ = ["multi_block_cosine_loss", "multi_block_cosine_loss_reference", "MultiBlockCosineLoss",
           "weighted_block_mean"]
