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
program finds its tensor by binary search over chunk offsets. Everything is computed
in fp32 and stored in each tensor's own dtype, so fp16/bf16 parameters with fp32 or
same-dtype moments work. ``lr`` may be a 0-dim device tensor (read in the kernel: no
host sync, CUDA-graph friendly). Masked entries are written with ``where(mask, p, 0)``,
so they are exactly 0 even if the update produced inf/NaN there (the torch reference
multiplies, as the original does, which would keep a NaN).

Bytes per element (fp32 everything, bool mask): read p, g, m, v, mask, write p, m, v =
29 B; that is what the benchmark counts.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch

from ._dispatch import HAVE_TRITON, INTERPRET, device_table, launching, resolve

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
        for (pd, gd, md, vd, _), ids in groups.items():
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


# --------------------------------------------------------------------------- kernel
if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _masked_adam_kernel(tab_ptr, p_any, g_any, m_any, v_any, k_any, lr_ptr, n_tensors,
                            lr, step_size, decay, bc1, bc2_sqrt, w1, beta1, beta2, w2, eps, weight_decay,
                            HAS_MASK: tl.constexpr, LR_FROM_PTR: tl.constexpr, DECOUPLED: tl.constexpr,
                            HAS_WD: tl.constexpr, SEARCH_STEPS: tl.constexpr, TAB: tl.constexpr,
                            BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
        pid = tl.program_id(0)
        # binary search: the tensor whose first chunk (field 6) is the last one <= pid
        lo = pid * 0
        hi = lo + n_tensors
        for _ in tl.static_range(SEARCH_STEPS):
            mid = (lo + hi) // 2
            right = tl.load(tab_ptr + mid * TAB + 6) <= pid
            lo = tl.where(right, mid, lo)
            hi = tl.where(right, hi, mid)
        row = tab_ptr + lo * TAB
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
                table, params[i0], grads[i0], exp_avgs[i0], exp_avg_sqs[i0], k0 if k0 is not None else params[i0],
                lr_t if lr_is_tensor else params[i0], len(gids),
                0.0 if lr_is_tensor else float(lr), 0.0 if lr_is_tensor else float(lr) / bc1,
                1.0 if lr_is_tensor else 1.0 - float(lr) * weight_decay, bc1, bc2_sqrt, 1.0 - beta1, beta1, beta2,
                1.0 - beta2, eps, weight_decay,
                HAS_MASK=k0 is not None, LR_FROM_PTR=lr_is_tensor, DECOUPLED=bool(decoupled),
                HAS_WD=weight_decay != 0, SEARCH_STEPS=max(1, math.ceil(math.log2(len(gids))) + 1), TAB=_TAB,
                BLOCK=BLOCK, ALIGNED=key[-1], num_warps=4 if INTERPRET else 8)


def masked_adam_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                     exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                     masks: Sequence[torch.Tensor | None], *, lr, beta1: float, beta2: float, eps: float,
                     weight_decay: float, step, decoupled: bool, kernel: bool | None = None) -> None:
    """One Adam/AdamW step with masks, in place; Triton where available (see the module docstring).

    ``masks`` entries may be None (unmasked tensor), bool or 0/1 floats. Entries whose grad
    is None are skipped, as torch does. ``kernel``: None dispatches (CUDA or TRITON_INTERPRET=1
    -> Triton), False forces torch, True forces Triton (RuntimeError where it cannot run).
    """
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(masks) == n):
        raise ValueError(f"list lengths differ: {n} params, {len(grads)} grads, {len(exp_avgs)} exp_avgs, "
                         f"{len(exp_avg_sqs)} exp_avg_sqs, {len(masks)} masks")
    live = [i for i in range(n) if grads[i] is not None]
    if not live:
        return
    use = resolve(kernel, params[live[0]], "masked_adam_step")
    fast, slow = [], []
    for i in live:
        (fast if use and _kernel_ok(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i],
                                                      masks[i]) else slow).append(i)
    kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, decoupled=decoupled)
    with torch.no_grad():
        if fast:
            by_device: dict[torch.device, list[int]] = {}
            for i in fast:
                by_device.setdefault(params[i].device, []).append(i)
            for ids in by_device.values():
                _masked_adam_triton(params, grads, exp_avgs, exp_avg_sqs, masks, ids=ids, **kw)
        if slow:
            if use:
                log.debug("masked_adam_step: %d tensors not kernel-eligible (layout/dtype); using torch", len(slow))
            pick = lambda seq: [seq[i] for i in slow]  # noqa: E731
            masked_adam_step_reference(pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(masks),
                                       **kw)
