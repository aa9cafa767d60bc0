"""Which path a kernel call takes: the Triton kernel or the plain-torch reference.

    from starfish_fast.kernels._dispatch import triton_available_for, use_triton
    triton_available_for(torch.zeros(1))                 # False on CPU unless TRITON_INTERPRET=1
    use_triton("cosine_loss", torch.zeros(1), "auto")    # the engine's kernels="auto"|"triton"|"torch"

Rules:
- CUDA tensors use the Triton kernels when triton imports.
- CPU tensors use the reference (eager torch is fast there; the interpreter is
  orders of magnitude slower) unless ``TRITON_INTERPRET=1`` was set before
  ``starfish_fast.kernels`` was imported: then the kernels run in Triton's CPU
  interpreter, which is how the tests check them without a GPU.

The engine's ``kernels`` option:
- ``"torch"``: always the references (plain torch; what ``torch.compile`` sees best).
- ``"triton"``: the kernels wherever :func:`triton_available_for` allows, else the
  reference (a CPU tensor without the interpreter cannot run a kernel).
- ``"auto"``: per op, from :data:`AUTO_TRITON_ON_CUDA` (set from
  ``bench/bench_kernels.py`` results); CPU always takes the reference.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict

import torch

from starfish_fast.config import KERNEL_CHOICES

log = logging.getLogger(__name__)

# Read once: Triton decides interpreter vs compiled when a kernel is *defined*
# (import time), so a later change of the variable cannot switch paths safely.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:  # triton is a Linux-only dependency; the references work without it
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401
    HAVE_TRITON = True
except Exception as exc:  # pragma: no cover - depends on the install
    HAVE_TRITON = False
    log.debug("triton not importable (%s); kernels fall back to the torch references", exc)


# kernels="auto" on CUDA, per op. Decided by bench/bench_kernels.py (which prints the
# recommended table). Status 2026-11: NOT YET MEASURED on a GPU (no session so far had one), so
# auto keeps every op on its plain-torch reference: benchmarks, not expectations, pick the
# defaults. What is known without a GPU: the kernels match the references
# in Triton's interpreter, compile for sm80/sm86/sm90 within shared memory, and the loss and
# optimizer load with 16-byte vectors (tests/test_kernels_compile.py). kernels="triton" uses them.
AUTO_TRITON_ON_CUDA = {
    "masked_linear": False,
    "cosine_loss": False,
    "masked_adam": False,
}


# Tests set this to True: every buffer a kernel is supposed to fill completely is
# then pre-filled with NaN (float) or -1 (int), so a kernel that skips an element is caught.
POISON = False


def empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; poisoned when :data:`POISON` is set."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


_TABLES: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()


def device_table(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 tensor of ``values`` on ``device``, cached by content.

    Launch tables hold tensor addresses; parameters keep theirs and block outputs
    usually come back at the same ones every step (caching allocator), so the steady
    state needs no host-to-device copy; a miss costs one small pinned, non-blocking copy
    (no host sync). The cached tensors are never written, so reuse is always safe.
    """
    key = (device, tuple(values))
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        table = host.pin_memory().to(device, non_blocking=True)
    else:
        table = host.to(device)
    _TABLES[key] = table
    if len(_TABLES) > 64:
        _TABLES.popitem(last=False)
    return table


class KernelError(RuntimeError):
    """A Triton kernel that was chosen failed to compile or launch (never silently replaced by torch)."""


@contextlib.contextmanager
def launching(kernel: str, **details):
    """Turn any failure inside the block into a ``KernelError`` naming ``kernel`` and ``details`` (shapes,
    dtypes): a compile error from triton, a launch error from the driver, an illegal configuration."""
    try:
        yield
    except KernelError:
        raise
    except Exception as error:
        text = str(error).strip()
        facts = ", ".join(f"{key}={value}" for key, value in details.items())
        raise KernelError(f"Triton kernel {kernel} failed to compile or launch ({facts}): {type(error).__name__}: "
                          f"{text.splitlines()[0] if text else ''} (kernels='torch' runs the plain-torch path)") \
            from error


def triton_available_for(tensor: torch.Tensor) -> bool:
    """True when a Triton kernel can run on ``tensor``: CUDA + triton, or the CPU interpreter."""
    if not HAVE_TRITON:
        return False
    if INTERPRET:
        return True
    return tensor.is_cuda


def resolve(kernel: bool | None, tensor: torch.Tensor, name: str) -> bool:
    """A public function's ``kernel=`` argument: None dispatches, False is torch, True must be runnable."""
    if kernel is None:
        return triton_available_for(tensor)
    if kernel and not triton_available_for(tensor):
        raise RuntimeError(f"{name}(kernel=True): Triton cannot run on a {tensor.device.type} tensor here "
                           f"(needs CUDA, or TRITON_INTERPRET=1 set before importing starfish_fast.kernels)")
    return bool(kernel)


def use_triton(op: str, tensor: torch.Tensor, kernels: str = "auto") -> bool:
    """The engine's choice for ``op`` ("masked_linear", "cosine_loss", "masked_adam")."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernels choice {kernels!r}; allowed: {', '.join(KERNEL_CHOICES)}")
    if op not in AUTO_TRITON_ON_CUDA:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(AUTO_TRITON_ON_CUDA)}")
    if kernels == "torch" or not triton_available_for(tensor):
        return False
    if kernels == "triton":
        return True
    # auto: the interpreter is for tests only; real CUDA follows the benchmark table
    return tensor.is_cuda and AUTO_TRITON_ON_CUDA[op]


def shared_memory_limit(device: torch.device | int | None = None) -> int:
    """Bytes of shared memory one block may use on ``device`` (opt-in maximum)."""
    if not torch.cuda.is_available():
        return 99 * 1024  # sm86 (A10), the smallest target: what the default configs must fit
    index = torch.device("cuda", device).index if isinstance(device, int) else \
        (device.index if device is not None and device.index is not None else torch.cuda.current_device())
    props = torch.cuda.get_device_properties(index)
    value = getattr(props, "shared_memory_per_block_optin", None)  # torch >= 2.3
    if value:
        return int(value)
    try:  # triton's view of the same number
        from triton.runtime import driver
        return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # pragma: no cover
        return 99 * 1024
