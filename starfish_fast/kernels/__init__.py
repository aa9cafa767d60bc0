"""Triton kernels for STARFISH healing, each beside its plain-torch reference.

    import torch
    from starfish_fast.kernels import masked_linear, multi_block_cosine_loss, masked_adam_step
    y = masked_linear(torch.randn(4, 8), torch.randn(3, 8), torch.rand(3, 8) > 0.5)   # (4, 3)

Every public function takes ``kernel=``: True (or "triton") runs the kernel, False ("torch") the
plain-torch reference, None ("auto") follows :func:`choose` in ``_dispatch.py``: the per-op table
``AUTO_TRITON_ON_CUDA`` (set from a GPU run committed under ``bench/results/``) on CUDA, plain torch on
the CPU. The engine resolves its ``kernels=`` option with the same rule, once, in its plan. The 2:4
linear (``sparse24_linear``) is an op of the same kind that runs a 2:4 backend's packed weight instead
of a Triton kernel (which backend: the plan's 2:4 rule).
Each kernel is a torch custom op (``torch.ops.starfish_fast.*``) with a fake implementation, so
``torch.compile`` traces through it without a graph break; on CPU tensors the ops run the same math
in plain torch, or the kernels in Triton's interpreter when ``TRITON_INTERPRET=1`` was set before
import (how the tests check them without a GPU).

The kernel modules live in the checkout's top-level ``kernels/`` folder, which has no
``__init__.py`` on purpose: with the checkout on ``sys.path`` it can never shadow PyPI's ``kernels``
package (transformers depends on it). This package assembles them: in a checkout its ``__path__``
reaches that folder; ``pip install`` copies the modules in beside this file (setup.py).
"""
from pathlib import Path as _Path

_CHECKOUT = _Path(__file__).resolve().parents[2]
# only in a checkout (setup.py beside the package): an installed copy has the modules here already,
# and site-packages/kernels would be someone else's package
if (_CHECKOUT / "setup.py").is_file() and (_CHECKOUT / "kernels" / "_dispatch.py").is_file():
    __path__.append(str(_CHECKOUT / "kernels"))
from ._dispatch import AUTO_TRITON_ON_CUDA, HAVE_TRITON, INTERPRET, KernelError, choose, runnable
from .cosine_loss import multi_block_cosine_loss, multi_block_cosine_loss_reference
from .masked_adam import masked_adam_step, masked_adam_step_reference
from .masked_linear import MaskedLinear, MaskLayout, mask_layout, masked_linear, masked_linear_reference
from .sparse24_linear import register_layer, sparse24_linear, sparse24_linear_reference

__all__ = [
    "masked_linear", "masked_linear_reference", "MaskedLinear", "MaskLayout", "mask_layout",
    "multi_block_cosine_loss", "multi_block_cosine_loss_reference",
    "masked_adam_step", "masked_adam_step_reference",
    "sparse24_linear", "sparse24_linear_reference", "register_layer",
    "choose", "runnable", "KernelError", "AUTO_TRITON_ON_CUDA", "HAVE_TRITON", "INTERPRET",
]
