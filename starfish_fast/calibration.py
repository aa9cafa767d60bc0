"""What a calibration pass needs around a model: eval mode on a device, torchvision attention whose
out_proj runs as a module (so that hooks on it fire), a forward that stops at a module, and a layer's
input as rows of its reduction.

    from starfish_fast.calibration import capture, evaluating, input_rows, out_proj_as_module
    with evaluating(model, "cuda") as device, out_proj_as_module(model):
        model(images.to(device))              # hooks on every out_proj see its input
    x = capture(model, "blocks.3.mlp.fc2", images, output=False)     # the forward stops there
    rows = input_rows(model.get_submodule("blocks.3.mlp.fc2"), x)     # (tokens, in_features)
"""
from __future__ import annotations

import contextlib
from typing import Callable, Collection, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from starfish_fast.compaction import TorchvisionCompactQkAttention, unsupported_attention
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
               and unsupported_attention(module) is None]
    for name, module in swapped:
        rows = torch.arange(module.in_proj_weight.shape[0])
        set_submodule(model, name, TorchvisionCompactQkAttention(module, rows, module.head_dim))
    try:
        yield [name for name, _ in swapped]
    finally:
        for name, module in swapped:
            set_submodule(model, name, module)


def input_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s input ``x`` as rows of its reduction: (tokens, in) for a linear, the im2col columns
    (images * positions, in_channels * kh * kw) for an ``nn.Conv2d``, channel-major as its weight's
    ``reshape(out, -1)`` (zero padding, as the conv's own)."""
    if isinstance(layer, nn.Conv2d):
        columns = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (B, in, L)
        return columns.transpose(1, 2).reshape(-1, columns.shape[1])                           # (B * L, in)
    return x.reshape(-1, x.shape[-1])                                                          # (tokens, in)


class Stop(Exception):
    """Raised by a hook: the rest of the forward is not needed (``capture``, ``stop_after``)."""


@contextlib.contextmanager
def stop_after(module: nn.Module):
    """For the duration, a forward of the model stops (raises ``Stop``) when ``module`` returns."""
    def stop(*_):
        raise Stop

    handle = module.register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()


def capture(model: nn.Module, name: str, images: torch.Tensor, output: bool) -> torch.Tensor:
    """The input (``output=False``) or output of module ``name`` in the model's forward, which stops there."""
    module, seen = model.get_submodule(name), []

    def grab(_module, args, result=None):
        seen.append(result if output else args[0])
        raise Stop

    handle = module.register_forward_hook(grab) if output else module.register_forward_pre_hook(grab)
    try:
        model(images)
    except Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"{name} did not run in the model's forward")
    return seen[0]


def cloned(inputs: tuple[tuple, dict]) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a call with every tensor detached and cloned (a block may write into its input)."""
    args, kwargs = inputs
    copy = lambda value: value.detach().clone() if isinstance(value, torch.Tensor) else value   # noqa: E731
    return tuple(copy(a) for a in args), {name: copy(value) for name, value in kwargs.items()}


def capture_inputs(module: nn.Module, run: Callable[[], object]) -> tuple[tuple, dict]:
    """The positional and keyword inputs of ``module``'s first call during ``run()`` (which stops there),
    tensors cloned (a block may write into its input)."""
    seen = []

    def grab(_module, args, kwargs):
        seen.append(cloned((args, kwargs)))
        raise Stop

    handle = module.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run()
    except Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"{type(module).__name__} did not run in the forward")
    return seen[0]


@torch.no_grad()
def layer_input_sums(model: nn.Module, layers: Mapping[str, str], batches, statistic: Callable, device, *,
                     stop: str | None = None, purpose: str) -> dict[str, torch.Tensor]:
    """``{key: sum over the batches of statistic(key, module, x)}``, x the input of the module at
    ``layers[key]`` (a MultiheadAttention's query) in forwards of ``model`` on ``device`` (already there, in
    eval mode) that stop when module ``stop`` returns (None: whole forwards). torchvision's attention runs
    with out_proj as a module meanwhile (stand-ins made anew per call: they copy the in-projection).
    ``RuntimeError`` naming ``purpose`` when a layer never ran."""
    sums: dict[str, torch.Tensor] = {}

    def hook(key):
        def pre_hook(module, args, kwargs):
            x = args[0] if args else kwargs["query"]          # MultiheadAttention's query may be a keyword
            value = statistic(key, module, x.detach())
            sums[key] = sums[key] + value if key in sums else value
        return pre_hook

    attention = {path.rpartition(".")[0] for path in layers.values() if path.endswith(".out_proj")}
    with out_proj_as_module(model, attention):
        handles = [model.get_submodule(path).register_forward_pre_hook(hook(key), with_kwargs=True)
                   for key, path in layers.items()]
        try:
            for images in batches:
                try:
                    with stop_after(model.get_submodule(stop)) if stop else contextlib.nullcontext():
                        model(images.to(device))
                except Stop:
                    pass
        finally:
            for handle in handles:
                handle.remove()
    missing = [key for key in layers if key not in sums]
    if missing:
        raise RuntimeError(f"layers {missing[:3]} did not run in the model's forward: {purpose} needs their inputs")
    return sums
