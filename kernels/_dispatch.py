"""Which path a kernel call takes: the Triton kernel or plain torch. One rule, used by the plan (the
engine's ``kernels=``) and by the public kernel functions (their ``kernel=``); nothing else decides.

    from starfish_fast.kernels._dispatch import choose
    choose("cosine_loss", torch.device("cuda"), "auto")     # True: the measured table says Triton wins
    choose("masked_adam", torch.device("cpu"), "auto")      # False: CPU takes plain torch
    choose("masked_linear", torch.device("cpu"), "triton")  # ValueError unless TRITON_INTERPRET=1

- ``"torch"`` / ``False``: plain torch.
- ``"triton"`` / ``True``: the kernel; a ``ValueError`` where it cannot run (a CPU tensor without the
  interpreter, no triton).
- ``"auto"`` / ``None``: per op, :data:`AUTO_TRITON_ON_CUDA` on CUDA; plain torch on the CPU (eager
  torch is fast there; the interpreter, ``TRITON_INTERPRET=1`` set before import, is for tests that
  ask for a kernel explicitly).
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict

import torch

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

CHOICES = {"auto": None, "triton": True, "torch": False, None: None, True: True, False: False}

# kernels="auto" on CUDA, per op: the one H200 run so far (2026-12-04, torch 2.11, DeiT-B shapes, bf16;
# bench/results/gpu_check_h200_2026-12-04/gpu_check.jsonl, lines "bandwidth:*"):
# - cosine_loss: Triton 2.57 ms against eager torch 6.68 ms for the 12 blocks' forward + backward at
#   batch 128 (the loss runs outside the compiled blocks, so eager is what it competes with): Triton.
# - masked_adam: torch's fused AdamW plus a mask multiply 1.38 ms against the Triton kernel 1.72 ms over
#   DeiT-B's 85M linear weights (the eager foreach step 2.84 ms): torch, whose CUDA path is that fused
#   step (masked_adam.masked_adam_step).
# - masked_linear: cuBLAS on masked weights 0.81 ms against Triton 1.99 ms at fc1 (random 50% mask) and
#   0.78 against 1.36 ms (half the rows pruned): torch.
AUTO_TRITON_ON_CUDA = {
    "masked_linear": False,
    "cosine_loss": True,
    "masked_adam": False,
}
OPS = tuple(AUTO_TRITON_ON_CUDA)


def runnable(device: torch.device | str) -> bool:
    """True when a Triton kernel can run on ``device``: CUDA with triton, or the CPU interpreter."""
    return HAVE_TRITON and (torch.device(device).type == "cuda" or INTERPRET)


def choose(op: str, device: torch.device | str, kernels: str | bool | None = "auto") -> bool:
    """True: ``op`` runs its Triton kernel on ``device``; False: plain torch (the rules above)."""
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; known: {', '.join(OPS)}")
    if kernels not in CHOICES:
        raise ValueError(f"unknown kernels choice {kernels!r}; allowed: "
                         f"{', '.join(k for k in CHOICES if isinstance(k, str))}")
    wanted, device = CHOICES[kernels], torch.device(device)
    if wanted is False:
        return False
    if wanted is True:
        if not runnable(device):
            raise ValueError(f"kernels='triton' cannot run on {device}: the Triton kernels need a CUDA GPU with "
                             f"triton installed (or TRITON_INTERPRET=1 set before import, for tests)")
        return True
    return device.type == "cuda" and runnable(device) and AUTO_TRITON_ON_CUDA[op]


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
