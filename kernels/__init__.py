"""Triton kernels for STARFISH healing, each beside its plain-torch reference.

    import torch
    from starfish_fast.kernels import masked_linear, multi_block_cosine_loss, masked_adam_step
    y = masked_linear(torch.randn(4, 8), torch.randn(3, 8), torch.rand(3, 8) > 0.5)   # (4, 3)

Public functions dispatch with :func:`triton_available_for`: CUDA tensors take the
Triton kernel, CPU tensors the reference (eager torch), unless ``TRITON_INTERPRET=1``
was set before this package was imported (then the kernels run in Triton's CPU
interpreter: how the tests check them without a GPU). The references can be called
directly, and ``kernel=True/False`` forces a path.

The engine's ``kernels="auto"|"triton"|"torch"`` choice is resolved by
:func:`starfish_fast.kernels._dispatch.use_triton`: ``torch`` always takes the
references, ``triton`` the kernels wherever they can run, ``auto`` follows the per-op
table ``AUTO_TRITON_ON_CUDA`` (set from ``bench/bench_kernels.py`` results; CPU
always takes the reference).

Installed as ``starfish_fast.kernels`` (never as a top-level ``kernels`` package).
"""
from ._dispatch import AUTO_TRITON_ON_CUDA, HAVE_TRITON, INTERPRET, KernelError, triton_available_for, use_triton
from .cosine_loss import MultiBlockCosineLoss, multi_block_cosine_loss, multi_block_cosine_loss_reference
from .masked_adam import masked_adam_step, masked_adam_step_reference
from .masked_linear import (MaskedLinear, MaskedLinearFunction, MaskPlan, mask_plan, masked_linear,
                            masked_linear_reference)

__all__ = [
    "masked_linear", "masked_linear_reference", "MaskedLinear", "MaskedLinearFunction", "MaskPlan", "mask_plan",
    "multi_block_cosine_loss", "multi_block_cosine_loss_reference", "MultiBlockCosineLoss",
    "masked_adam_step", "masked_adam_step_reference",
    "triton_available_for", "use_triton", "KernelError", "AUTO_TRITON_ON_CUDA", "HAVE_TRITON", "INTERPRET",
]
