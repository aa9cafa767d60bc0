"""The kernels' cases, shared by ``bench_kernels.py`` (pytest-benchmark) and ``gpu_check.py``: inputs
and the step to time for each (op, model shape, mask, variant), and correctness checks of each Triton
kernel against its reference on poisoned outputs.

    from kernel_cases import MODELS, linear_case, check_cosine_loss
    case = linear_case(MODELS["deit_b"], "rows50", "triton", device, torch.bfloat16, batch=64)
    case.step()                           # forward + backward; case.work bytes or FLOPs, case.unit
    check_cosine_loss([(8, 197, 768)] * 12, torch.bfloat16, device)   # AssertionError if off; its errors

Variants: ``triton`` (the kernel), ``eager`` (the plain-torch reference), ``compile``
(torch.compile of the reference), and for the optimizer ``torch_fused`` (torch's fused AdamW plus
a mask multiply, the strongest stock baseline).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import starfish_fast.kernels._dispatch as dispatch
from starfish_fast.kernels import (mask_layout, masked_adam_step, masked_adam_step_reference, masked_linear,
                                   masked_linear_reference, multi_block_cosine_loss,
                                   multi_block_cosine_loss_reference)

# model -> tokens per image, width, MLP width, blocks
MODELS = {
    "deit_b": dict(tokens=197, dim=768, hidden=3072, blocks=12),
    "deit3_h": dict(tokens=257, dim=1280, hidden=5120, blocks=32),
}
# relative tolerances by dtype: fp32 ~1e-5, fp16 ~1e-3, bf16 ~1e-2 (fp32 kernels accumulate differently
# than the fp64 reference; the GEMMs sum thousands of products)
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@dataclass
class Case:
    step: Callable[[], None]
    work: float          # bytes or FLOPs of one step
    unit: str            # "byte" or "flop"
    shape: list
    output_bytes: int = 0  # what every variant must produce (the students' gradients), left out of memory


def _compiled(fn):
    return torch.compile(fn)


def linear_mask(kind: str, n: int, k: int, device) -> torch.Tensor:
    if kind == "random50":
        return torch.rand(n, k, device=device) > 0.5
    if kind == "rows50":
        mask = torch.ones(n, k, dtype=torch.bool, device=device)
        mask[n // 2:] = False                    # the second half of the output neurons pruned
        return mask
    raise ValueError(kind)


def linear_case(spec: dict, mask_kind: str, variant: str, device, dtype, batch: int) -> Case:
    """Masked linear forward + backward (dx, dW, dbias) at the model's fc1 shape."""
    m, k, n = batch * spec["tokens"], spec["dim"], spec["hidden"]                  # fc1: (M, K) -> (M, N)
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)          # (M, K)
    w = (torch.randn(n, k, device=device) / k ** 0.5).to(dtype).requires_grad_()   # (N, K)
    b = torch.zeros(n, device=device, dtype=dtype, requires_grad=True)
    mask = linear_mask(mask_kind, n, k, device)
    dy = torch.randn(m, n, device=device, dtype=dtype)
    if variant == "triton":
        layout = mask_layout(mask, dtype)                                           # built once, as MaskedLinear does
        fn = lambda: masked_linear(x, w, mask, b, layout=layout, kernel=True)       # noqa: E731
    elif variant == "eager":
        fn = lambda: masked_linear_reference(x, w, mask, b)                         # noqa: E731
    else:
        compiled = _compiled(masked_linear_reference)
        fn = lambda: compiled(x, w, mask, b)                                       # noqa: E731

    def step():
        x.grad = w.grad = b.grad = None
        fn().backward(dy)
    return Case(step, 3 * 2 * m * n * k, "flop", [m, k, n])


def cosine_case(spec: dict, variant: str, device, dtype, batch: int, blocks: int | None = None) -> Case:
    """Multi-block cosine loss forward + backward over the model's block outputs (B, T, D)."""
    shape = (batch, spec["tokens"], spec["dim"])
    blocks = blocks or spec["blocks"]
    students = [torch.randn(*shape, device=device, dtype=dtype, requires_grad=True) for _ in range(blocks)]
    teachers = [torch.randn(*shape, device=device, dtype=dtype) for _ in range(blocks)]
    if variant == "triton":
        fn = lambda: multi_block_cosine_loss(students, teachers, "token", kernel=True)   # noqa: E731
    elif variant == "eager":
        fn = lambda: multi_block_cosine_loss_reference(students, teachers, "token")      # noqa: E731
    else:
        compiled = _compiled(multi_block_cosine_loss_reference)
        fn = lambda: compiled(students, teachers, "token")                            # noqa: E731

    def step():
        for s in students:
            s.grad = None
        fn().backward()
    elems = blocks * shape[0] * shape[1] * shape[2]
    size = torch.finfo(dtype).bits // 8
    # the fused design's traffic: read S and T in the forward, read S and T and write dS in the backward
    return Case(step, 5 * elems * size, "byte", [blocks, *shape], output_bytes=elems * size)


def model_weight_shapes(spec: dict, blocks: int | None = None) -> list[tuple[int, int]]:
    d, h = spec["dim"], spec["hidden"]
    return [(3 * d, d), (d, d), (h, d), (d, h)] * (blocks or spec["blocks"])   # qkv, proj, fc1, fc2 per block


def adam_case(spec: dict, variant: str, device, blocks: int | None = None) -> Case:
    """One masked AdamW step over every linear weight of the model (fp32, bool masks: 29 bytes per element)."""
    shapes = model_weight_shapes(spec, blocks)
    params = [torch.randn(*s, device=device) for s in shapes]
    grads = [torch.randn(*s, device=device) for s in shapes]
    masks = [torch.rand(*s, device=device) > 0.5 for s in shapes]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    kw = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05, decoupled=True)
    if variant == "torch_fused":
        leaves = [torch.nn.Parameter(p) for p in params]
        for leaf, g in zip(leaves, grads):
            leaf.grad = g
        optimizer = torch.optim.AdamW(leaves, lr=1e-4, weight_decay=0.05, fused=True)
        float_masks = [m.to(torch.float32) for m in masks]

        def step():
            optimizer.step()
            with torch.no_grad():
                torch._foreach_mul_(leaves, float_masks)
    else:
        fn = {"triton": lambda *a, **k: masked_adam_step(*a, kernel=True, **k), "eager": masked_adam_step_reference,
              "compile": None}[variant] or _compiled(masked_adam_step_reference)

        def step():
            # a fixed step count: a new Python int every call would recompile the compiled variant
            fn(params, grads, exp_avgs, exp_avg_sqs, masks, step=10, **kw)
    numel = sum(p.numel() for p in params)
    return Case(step, 29 * numel, "byte", [len(shapes), numel])


# ----------------------------------------------------------------------------- correctness
def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute error relative to the reference's max magnitude; ``a`` must be finite (poison)."""
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        raise AssertionError("non-finite values: a poisoned output element was never written")
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() if b.numel() else 0.0


def _within(errors: dict[str, float], dtype) -> dict:
    tolerance = TOL[dtype]
    bad = {name: value for name, value in errors.items() if not value <= tolerance}
    if bad:
        raise AssertionError(f"errors above {tolerance:g} ({dtype}): {bad}")
    return {"max_rel_err": max(errors.values()), "tolerance": tolerance}


def check_cosine_loss(shapes: list[tuple], dtype, device, teacher_dtype=None, per: str = "token",
                      grad_scale: float = 1.0) -> dict:
    """The fused loss and its gradients against the reference in fp64 (teacher cast to the student dtype).
    ``grad_scale`` multiplies the loss before the backward, as fp16 training's GradScaler does: at DeiT-B's
    shape the unscaled fp16 gradients (1e-8 to 2e-7) are subnormal (relative error 0.15 on an H200)."""
    dispatch.POISON = True
    try:
        torch.manual_seed(0)
        students = [torch.randn(*shape, device=device).to(dtype).requires_grad_() for shape in shapes]
        teachers = [(s.detach().float() + 0.7 * torch.randn(*s.shape, device=device)).to(teacher_dtype or dtype)
                    for s in students]
        loss = multi_block_cosine_loss(students, teachers, per=per, kernel=True)
        (loss * grad_scale).backward()
    finally:
        dispatch.POISON = False
    s64 = [s.detach().double().requires_grad_() for s in students]
    reference = multi_block_cosine_loss_reference(s64, [t.to(dtype).double() for t in teachers], per=per)
    (reference * grad_scale).backward()
    errors = {"loss": abs(loss.item() - reference.item()) / max(1.0, abs(reference.item()))}
    errors.update({f"grad{i}": _err(s.grad, r.grad) for i, (s, r) in enumerate(zip(students, s64))})
    return _within(errors, dtype)


def check_masked_linear(m: int, k: int, n: int, mask_kind: str, dtype, device) -> dict:
    """Forward, dx, dW (exactly zero where masked) and dbias against the reference in fp64."""
    torch.manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(n, k, device=device) / k ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(n, device=device, dtype=dtype).requires_grad_()
    mask = linear_mask(mask_kind, n, k, device) if mask_kind != "odd" else torch.rand(n, k, device=device) > 0.3
    dispatch.POISON = True
    try:
        y = masked_linear(x, w, mask, b, kernel=True)
        dy = torch.randn_like(y)
        y.backward(dy)
    finally:
        dispatch.POISON = False
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = masked_linear_reference(x64, w64, mask, b64)
    y64.backward(dy.double())
    if not (w.grad[~mask] == 0).all():
        raise AssertionError("dW is not exactly zero where the mask is")
    return _within({"y": _err(y, y64), "dx": _err(x.grad, x64.grad), "dw": _err(w.grad, w64.grad),
                    "dbias": _err(b.grad, b64.grad)}, dtype)


def check_masked_adam(shapes: list[tuple], dtype, device, moments_dtype=torch.float32) -> dict:
    """Three AdamW steps against the reference in fp64; masked entries exactly zero."""
    torch.manual_seed(0)
    params = [torch.randn(*s, device=device).to(dtype) for s in shapes]
    masks = [torch.rand(*s, device=device) > 0.5 for s in shapes]
    moments = [[torch.zeros(*s, device=device, dtype=moments_dtype) for s in shapes] for _ in range(2)]
    p64 = [p.double() for p in params]
    m64 = [[torch.zeros_like(p) for p in p64] for _ in range(2)]
    for step in range(1, 4):
        grads = [torch.randn(*s, device=device).to(dtype) for s in shapes]
        kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05, step=step, decoupled=True)
        masked_adam_step(params, grads, *moments, masks, kernel=True, **kw)
        masked_adam_step_reference(p64, [g.double() for g in grads], *m64, masks, **kw)
    if not all((p[~m] == 0).all() for p, m in zip(params, masks)):
        raise AssertionError("masked parameters are not exactly zero")
    return _within({f"param{i}": _err(p, r) for i, (p, r) in enumerate(zip(params, p64))}, dtype)
