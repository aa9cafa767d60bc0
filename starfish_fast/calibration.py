"""What a calibration pass needs around a model: eval mode on a device, and torchvision attention whose
out_proj runs as a module (so that hooks on it fire).

    from starfish_fast.calibration import evaluating, out_proj_as_module
    with evaluating(model, "cuda") as device, out_proj_as_module(model):
        model(images.to(device))              # hooks on every out_proj see its input
"""
from __future__ import annotations

import contextlib
from typing import Collection

import torch
from torch import nn

from starfish_fast.compaction import TorchvisionCompactQkAttention, _unsupported_attention
from starfish_fast.models import set_submodule


@contextlib.contextmanager
def evaluating(model: nn.Module, device: str | torch.device | None = None):
    """``model`` in eval mode on ``device`` (default: where its parameters are) for the duration; yields
    the device. Each module's own train/eval flag and the parameters' device are restored after."""
    home = next(model.parameters()).device
    target = torch.device(device) if device is not None else home
    modes = [(module, module.training) for module in model.modules()]
    model.eval().to(target)
    try:
        yield target
    finally:
        model.to(home)
        for module, mode in modes:
            module.training = mode


@contextlib.contextmanager
def out_proj_as_module(model: nn.Module, paths: Collection[str] | None = None):
    """torchvision's ``nn.MultiheadAttention`` hands out_proj's weights to a functional kernel, so no hook
    on out_proj ever runs: for the duration, each one (at ``paths``, default all) is replaced by the
    compaction's stand-in with every row kept, which computes the same attention with the same out_proj
    module and calls it. Attention the stand-in cannot replace (not batch-first self-attention) stays.
    Yields the paths replaced."""
    swapped = [(name, module) for name, module in model.named_modules()
               if name and type(module) is nn.MultiheadAttention and (paths is None or name in paths)
               and _unsupported_attention(module) is None]
    for name, module in swapped:
        rows = torch.arange(module.in_proj_weight.shape[0])
        set_submodule(model, name, TorchvisionCompactQkAttention(module, rows, module.head_dim))
    try:
        yield [name for name, _ in swapped]
    finally:
        for name, module in swapped:
            set_submodule(model, name, module)
