"""Masked Adam/AdamW step: parameters and both moments updated in one fused pass; masked weights stay 0.

    import torch
    from starfish_fast.kernels import masked_adam_step
    p = [torch.randn(64, 32)]; g = [torch.randn(64, 32)]
    m, v = [torch.zeros(64, 32)], [torch.zeros(64, 32)]
    mask = [torch.rand(64, 32) > 0.5]
    masked_adam_step(p, g, m, v, mask, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                     weight_decay=0.05, step=1, decoupled=True)      # AdamW; p[~mask] == 0 after

Semantics: exactly ``torch.optim.Adam`` (``decoupled=False``: L2, ``grad += wd * p``) or
``torch.optim.AdamW`` (``decoupled=True``: ``p *= 1 - lr * wd``), amsgrad and maximize off,
followed by ``p *= mask``. ``step`` is the step count after its increment (what torch's
bias correction uses). The moments are updated everywhere, as torch does, so they also
match torch's; with STARFISH's masked gradients they stay 0 on masked entries anyway.

Triton path: one launch per group of tensors sharing the same dtypes (normally one
launch per step). A table of addresses lets a single grid walk all tensors; each
program finds its tensor with one load from a chunk -> tensor table made once per layout. Everything is computed
in fp32 and stored in each tensor's own dtype, so fp16/bf16 parameters with fp32 or
same-dtype moments work. ``lr`` may be a 0-dim device tensor (read in the kernel: no
host sync, CUDA-graph friendly). Masked entries are written with ``where(mask, p, 0)``,
so they are exactly 0 even if the update produced inf/NaN there (the torch reference
multiplies, as the original does, which would keep a NaN).

Bytes per element (fp32 everything, bool mask): read p, g, m, v, mask, write p, m, v =
29 B; that is what the benchmark counts.

Paths (``kernel=``, see ``_dispatch.choose``): the Triton kernel is the custom op
``torch.ops.starfish_fast.masked_adam_step`` (a fake implementation lets ``torch.compile`` trace it);
plain torch is, on CUDA where each group's tensors share one dtype, torch's own fused Adam/AdamW
(``torch._fused_adam_`` / ``_fused_adamw_``, one multi-tensor kernel) followed by ``p *= mask`` --
measured faster than this kernel on an H200 (1.38 against 1.72 ms over DeiT-B's 85M linear weights,
bench/results/gpu_check_h200_2026-12-04) -- and elsewhere the ``_foreach`` reference.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional, Sequence

import torch

from ._dispatch import HAVE_TRITON, INTERPRET, choose, device_table, launching

log = logging.getLogger(__name__)

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_TAB = 8   # int64 fields per tensor in the launch table: p, g, m, v, mask, numel, first chunk, (pad)
BLOCK = 256 if INTERPRET else 2048


# --------------------------------------------------------------------------- reference
def _step_scalars(beta1, beta2, step):
    step = int(step.item()) if isinstance(step, torch.Tensor) else int(step)
    if step < 1:
        raise ValueError(f"step is the count after the increment, so >= 1; got {step}")
    bc1 = 1 - beta1 ** step
    bc2_sqrt = (1 - beta2 ** step) ** 0.5
    return step, bc1, bc2_sqrt


def masked_adam_step_reference(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                               exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                               masks: Sequence[torch.Tensor | None], *, lr, beta1: float, beta2: float, eps: float,
                               weight_decay: float, step, decoupled: bool) -> None:
    """torch._foreach version of torch's Adam/AdamW step followed by ``p *= mask`` (in place)."""
    # lr may be a 0-dim tensor (the fast loop's schedule on the device): it then enters the update
    # as a tensor, so a CUDA lr costs no host sync (float(lr) would be one per step)
    _, bc1, bc2_sqrt = _step_scalars(beta1, beta2, step)
    with torch.no_grad():
        groups: dict[tuple, list[int]] = {}
        for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
            groups.setdefault((p.dtype, g.dtype, m.dtype, v.dtype, p.device), []).append(i)
        for (pd, gd, md, vd, _), ids in _chunked(groups, params):
            same = pd == gd == md == vd
            # mixed dtypes (e.g. bf16 params, fp32 moments): compute in fp32, write back
            P = [params[i] if same else params[i].float() for i in ids]
            G = [grads[i] if same else grads[i].float() for i in ids]
            M = [exp_avgs[i] if same else exp_avgs[i].float() for i in ids]
            V = [exp_avg_sqs[i] if same else exp_avg_sqs[i].float() for i in ids]
            if weight_decay != 0:
                if decoupled:
                    torch._foreach_mul_(P, 1 - lr * weight_decay)
                else:
                    G = torch._foreach_add(G, P, alpha=weight_decay)
            torch._foreach_lerp_(M, G, 1 - beta1)
            torch._foreach_mul_(V, beta2)
            torch._foreach_addcmul_(V, G, G, 1 - beta2)
            denom = torch._foreach_sqrt(V)
            torch._foreach_div_(denom, bc2_sqrt)
            torch._foreach_add_(denom, eps)
            if isinstance(lr, torch.Tensor):
                update = torch._foreach_div(M, denom)
                torch._foreach_mul_(update, lr / bc1)
                torch._foreach_sub_(P, update)
            else:
                torch._foreach_addcdiv_(P, M, denom, -lr / bc1)
            masked = [(k, masks[i]) for k, i in enumerate(ids) if masks[i] is not None]
            if masked:
                torch._foreach_mul_([P[k] for k, _ in masked], [mk.to(P[k].dtype) for k, mk in masked])
            if not same:
                for k, i in enumerate(ids):
                    params[i].copy_(P[k])
                    exp_avgs[i].copy_(M[k])
                    exp_avg_sqs[i].copy_(V[k])


# the reference's temporaries (denominators, updates, masks as floats) are as large as the tensors a _foreach call
# takes: bounded at this many elements per call (a 7B layer's 202 M weights would otherwise need 2 x 0.8 GB more
# at its peak; bench/results/stream_7b_cpu.md). Elementwise: the values do not depend on the chunks.
CHUNK_ELEMENTS = 1 << 25


def _chunked(groups: dict, params: Sequence[torch.Tensor]):
    """Each group's (key, ids) split into runs of at most ``CHUNK_ELEMENTS`` elements (a larger tensor alone)."""
    for key, ids in groups.items():
        run, size = [], 0
        for i in ids:
            if run and size + params[i].numel() > CHUNK_ELEMENTS:
                yield key, run
                run, size = [], 0
            run.append(i)
            size += params[i].numel()
        yield key, run


# --------------------------------------------------------------------------- kernel
if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _masked_adam_kernel(tab_ptr, ctab_ptr, p_any, g_any, m_any, v_any, k_any, lr_ptr,
                            lr, step_size, decay, bc1, bc2_sqrt, w1, beta1, beta2, w2, eps, weight_decay,
                            HAS_MASK: tl.constexpr, LR_FROM_PTR: tl.constexpr, DECOUPLED: tl.constexpr,
                            HAS_WD: tl.constexpr, TAB: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
        pid = tl.program_id(0)
        # this chunk's tensor: one load from the chunk -> tensor table (built once per layout)
        row = tab_ptr + tl.load(ctab_ptr + pid).to(tl.int64) * TAB
        p_ptr = tl.load(row + 0).to(tl.pointer_type(p_any.dtype.element_ty))
        g_ptr = tl.load(row + 1).to(tl.pointer_type(g_any.dtype.element_ty))
        m_ptr = tl.load(row + 2).to(tl.pointer_type(m_any.dtype.element_ty))
        v_ptr = tl.load(row + 3).to(tl.pointer_type(v_any.dtype.element_ty))
        numel = tl.load(row + 5)
        if ALIGNED:
            # Host-checked: every tensor 16-byte aligned, numel a multiple of 16. Addresses loaded from
            # the table carry no alignment information otherwise, and every load was scalar (PTX).
            p_ptr = tl.multiple_of(p_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            m_ptr = tl.multiple_of(m_ptr, 16)
            v_ptr = tl.multiple_of(v_ptr, 16)
            numel = tl.multiple_of(numel, 16)
        chunk = pid - tl.load(row + 6)
        offs = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)                   # (BLOCK,)
        inb = offs < numel

        # scalars come precomputed in double on the host (as torch computes them) unless lr
        # is a device tensor, which is read here so that the step never syncs with the host
        if LR_FROM_PTR:
            lr = tl.load(lr_ptr).to(tl.float32)
            step_size = lr / bc1
            decay = 1.0 - lr * weight_decay

        p = tl.load(p_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        if HAS_WD:
            if DECOUPLED:
                p = p * decay                                     # AdamW: 1 - lr * wd
            else:
                g = g + weight_decay * p                          # Adam's L2 term
        # torch's lerp_(g, w1): self + w1 * (g - self) for w1 < 0.5, else g - (g - self) * (1 - w1)
        if w1 < 0.5:
            m = m + w1 * (g - m)
        else:
            m = g - (g - m) * beta1
        v = v * beta2 + w2 * g * g                                # mul_(beta2).addcmul_(g, g, 1 - beta2)
        denom = tl.sqrt(v) / bc2_sqrt + eps
        p = p - step_size * (m / denom)
        if HAS_MASK:
            k_ptr = tl.load(row + 4).to(tl.pointer_type(k_any.dtype.element_ty))
            if ALIGNED:
                k_ptr = tl.multiple_of(k_ptr, 16)
            keep = tl.load(k_ptr + offs, mask=inb, other=0)
            p = tl.where(keep != 0, p, 0.0)                       # exactly 0, whatever the update was
        tl.store(p_ptr + offs, p.to(p_any.dtype.element_ty), mask=inb)
        tl.store(m_ptr + offs, m.to(m_any.dtype.element_ty), mask=inb)
        tl.store(v_ptr + offs, v.to(v_any.dtype.element_ty), mask=inb)


def _kernel_ok(p, g, m, v, k) -> bool:
    tensors = [p, g, m, v] + ([k] if k is not None else [])
    return (all(t.is_contiguous() and t.numel() == p.numel() and t.device == p.device for t in tensors)
            and all(t.dtype in _SUPPORTED for t in (p, g, m, v)) and p.numel() > 0)


def _mask_view(k: torch.Tensor | None):
    if k is None:
        return None
    return k.view(torch.uint8) if k.dtype == torch.bool else k


@functools.lru_cache(maxsize=32)
def _chunk_tensors(numels: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(chunks,) int32: which tensor of a launch each program's chunk belongs to; one table per layout,
    so a training step reuses it (it replaced a binary search of dependent loads in every program)."""
    chunks = torch.tensor([triton.cdiv(n, BLOCK) for n in numels])
    return torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), chunks).to(device)


def _masked_adam_triton(params, grads, exp_avgs, exp_avg_sqs, masks, *, lr, beta1, beta2, eps, weight_decay,
                        step, decoupled, ids) -> None:
    _, bc1, bc2_sqrt = _step_scalars(beta1, beta2, step)
    device = params[ids[0]].device
    lr_is_tensor = isinstance(lr, torch.Tensor)
    if lr_is_tensor:
        lr_t = lr.detach().reshape(1)
        if lr_t.dtype != torch.float32 or lr_t.device != device:
            lr_t = lr_t.to(device=device, dtype=torch.float32)
    groups: dict[tuple, list[int]] = {}
    for i in ids:
        k = _mask_view(masks[i])
        tensors = [params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]] + ([k] if k is not None else [])
        aligned = params[i].numel() % 16 == 0 and all(t.data_ptr() % 16 == 0 for t in tensors)
        key = (params[i].dtype, grads[i].dtype, exp_avgs[i].dtype, exp_avg_sqs[i].dtype,
               None if k is None else k.dtype, aligned)
        groups.setdefault(key, []).append(i)
    for key, gids in groups.items():
        values, chunk0 = [], 0
        for i in gids:
            k = _mask_view(masks[i])
            n = params[i].numel()
            values += [params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(),
                       exp_avg_sqs[i].data_ptr(), 0 if k is None else k.data_ptr(), n, chunk0, 0]
            chunk0 += triton.cdiv(n, BLOCK)
        table = device_table(values, device)                                     # (T * 8,) int64
        i0 = gids[0]
        k0 = _mask_view(masks[i0])
        with launching("masked_adam", tensors=len(gids), elements=sum(params[i].numel() for i in gids),
                       dtypes=key[:5]):
            _masked_adam_kernel[(chunk0,)](
                table, _chunk_tensors(tuple(params[i].numel() for i in gids), device), params[i0], grads[i0],
                exp_avgs[i0], exp_avg_sqs[i0], k0 if k0 is not None else params[i0],
                lr_t if lr_is_tensor else params[i0],
                0.0 if lr_is_tensor else float(lr), 0.0 if lr_is_tensor else float(lr) / bc1,
                1.0 if lr_is_tensor else 1.0 - float(lr) * weight_decay, bc1, bc2_sqrt, 1.0 - beta1, beta1, beta2,
                1.0 - beta2, eps, weight_decay,
                HAS_MASK=k0 is not None, LR_FROM_PTR=lr_is_tensor, DECOUPLED=bool(decoupled),
                HAS_WD=weight_decay != 0, TAB=_TAB,
                BLOCK=BLOCK, ALIGNED=key[-1], num_warps=4 if INTERPRET else 8)


def _fused_torch_step(params, grads, exp_avgs, exp_avg_sqs, masks, *, lr, beta1, beta2, eps, weight_decay, step,
                      decoupled) -> None:
    """torch's fused Adam/AdamW kernel (one launch over all tensors), then ``p *= mask`` (float masks).
    Every tensor of one dtype; ``lr`` a float or a 0-dim tensor on the parameters' device."""
    device = params[0].device
    steps = [torch.full((), float(step), dtype=torch.float32, device=device)] * len(params)
    fused = torch._fused_adamw_ if decoupled else torch._fused_adam_
    fused(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
          weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
    masked = [(p, m) for p, m in zip(params, masks) if m is not None]
    if masked:
        torch._foreach_mul_([p for p, _ in masked], [m if m.dtype == p.dtype else m.to(p.dtype) for p, m in masked])


def _torch_step(params, grads, exp_avgs, exp_avg_sqs, masks, **kw) -> None:
    """The plain-torch path: the fused kernel on CUDA when the tensors share one dtype, else the reference."""
    dtypes = {t.dtype for seq in (params, grads, exp_avgs, exp_avg_sqs) for t in seq}
    lr = kw["lr"]
    if params[0].is_cuda and len(dtypes) == 1 and not (isinstance(lr, torch.Tensor) and lr.device != params[0].device):
        _fused_torch_step(params, grads, exp_avgs, exp_avg_sqs, masks, **kw)
    else:
        masked_adam_step_reference(params, grads, exp_avgs, exp_avg_sqs, masks, **kw)


# --------------------------------------------------------------------------- custom op
@torch.library.custom_op("starfish_fast::masked_adam_step", mutates_args=("params", "exp_avgs", "exp_avg_sqs"))
def _masked_adam_op(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                    exp_avg_sqs: list[torch.Tensor], masks: list[Optional[torch.Tensor]], lr: float,
                    lr_tensor: Optional[torch.Tensor], beta1: float, beta2: float, eps: float, weight_decay: float,
                    step: int, decoupled: bool) -> None:
    """The Triton step over kernel-eligible tensors (CUDA, or CPU in the interpreter); the others, and
    CPU tensors without the interpreter, take the plain-torch path."""
    kw = dict(lr=lr if lr_tensor is None else lr_tensor, beta1=beta1, beta2=beta2, eps=eps,
              weight_decay=weight_decay, step=step, decoupled=decoupled)
    triton_ok = HAVE_TRITON and (params[0].is_cuda or INTERPRET)
    fast = [i for i in range(len(params)) if triton_ok and _kernel_ok(params[i], grads[i], exp_avgs[i],
                                                                       exp_avg_sqs[i], masks[i])]
    slow = [i for i in range(len(params)) if i not in set(fast)]
    if fast:
        _masked_adam_triton(params, grads, exp_avgs, exp_avg_sqs, masks, ids=fast, **kw)
    if slow:
        log.debug("masked_adam_step: %d tensors not kernel-eligible (layout/dtype); using torch", len(slow))
        pick = lambda seq: [seq[i] for i in slow]  # noqa: E731
        _torch_step(pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(masks), **kw)


@_masked_adam_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, masks, lr, lr_tensor, beta1, beta2, eps, weight_decay, step, decoupled):
    return None


def masked_adam_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                     exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                     masks: Sequence[torch.Tensor | None], *, lr, beta1: float, beta2: float, eps: float,
                     weight_decay: float, step: int, decoupled: bool, kernel: bool | str | None = None) -> None:
    """One Adam/AdamW step with masks, in place (see the module docstring).

    ``masks``: bool or 0/1 float tensors, one per parameter (None: unmasked). Entries whose grad is None are skipped, as
    torch does. ``lr``: a float or a 0-dim tensor on the parameters' device (no host sync).
    ``kernel``: True / "triton" the Triton op, False / "torch" plain torch, None / "auto" the dispatch
    table's choice (``kernels/_dispatch.py``).
    """
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(masks) == n):
        raise ValueError(f"list lengths differ: {n} params, {len(grads)} grads, {len(exp_avgs)} exp_avgs, "
                         f"{len(exp_avg_sqs)} exp_avg_sqs, {len(masks)} masks")
    live = [i for i in range(n) if grads[i] is not None]
    if not live:
        return
    _step_scalars(beta1, beta2, step)                                   # step >= 1, checked before any write
    pick = lambda seq: [seq[i] for i in live]  # noqa: E731
    lists = pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(masks)
    with torch.no_grad():
        if choose("masked_adam", params[live[0]].device, kernel):
            lr_tensor = lr.detach().reshape(()).float() if isinstance(lr, torch.Tensor) else None
            torch.ops.starfish_fast.masked_adam_step(*lists, 0.0 if lr_tensor is not None else float(lr), lr_tensor,
                                                     beta1, beta2, eps, weight_decay, int(step), bool(decoupled))
        else:
            _torch_step(*lists, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
                        decoupled=decoupled)
