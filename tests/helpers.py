"""Tiny models, masks and comparison helpers shared by the tests (random weights, nothing downloaded)."""
from __future__ import annotations

import contextlib

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from starfish_fast.models import adapter_for, prunable_weights


def tiny_vit(seed: int = 0, **overrides) -> VisionTransformer:
    torch.manual_seed(seed)
    arch = dict(img_size=16, patch_size=4, in_chans=3, num_classes=10, embed_dim=32, depth=2, num_heads=2)
    arch.update(overrides)
    return VisionTransformer(**arch).eval()


def tiny_mobilenet(seed: int = 0):
    from timm.models.efficientnet import _gen_mobilenet_v1

    torch.manual_seed(seed)
    # Same block structure as mobilenetv1_100 (stages 1,2,2,6,2), a quarter of the channels.
    return _gen_mobilenet_v1("mobilenetv1_100", channel_multiplier=0.25, num_classes=10).eval()


def random_masks(model, scope: str = "auto", density: float = 0.5, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weights = prunable_weights(model, adapter_for(model).scope_predicate(scope))
    return {key: torch.rand(w.shape, generator=generator) < density for key, w in weights.items()}


def images(n: int, size: int = 16, channels: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


# Relative tolerances by dtype: fp32 ~1e-5, fp16 ~1e-3, bf16 ~1e-2.
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute error relative to the reference's max magnitude; ``a`` must be all finite
    (a poisoned element a kernel never wrote stays NaN)."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values (a poisoned element was never written?)"
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() if b.numel() else 0.0


@pytest.fixture
def poison(monkeypatch):
    """Kernel outputs pre-filled with NaN (see kernels/_dispatch.py POISON)."""
    import starfish_fast.kernels._dispatch as dispatch

    monkeypatch.setattr(dispatch, "POISON", True)


@contextlib.contextmanager
def interrupted_at(step_class: type, at: int, seen: list | None = None):
    """Within: ``step_class``'s step ``at`` raises KeyboardInterrupt (Ctrl-C) instead of running; ``seen``
    collects the number of every step called."""
    original = step_class.__call__

    def interrupted(self, step, index):
        if seen is not None:
            seen.append(step)
        if step == at:
            raise KeyboardInterrupt
        return original(self, step, index)

    step_class.__call__ = interrupted
    try:
        yield
    finally:
        step_class.__call__ = original


class Crashed(Exception):
    """What ``crash_after_saving`` raises in place of a crash."""


@contextlib.contextmanager
def crash_after_saving(module, at: int):
    """Within (which must crash): ``module.save_resume`` writes step ``at``'s resume checkpoint, then the run
    crashes (``Crashed``, expected here); afterwards the checkpoint writer is ``module``'s own again."""
    original = module.save_resume

    def save_then_crash(path, state):
        original(path, state)
        if state["step"] == at:
            raise Crashed

    module.save_resume = save_then_crash
    try:
        with pytest.raises(Crashed):
            yield
    finally:
        module.save_resume = original
