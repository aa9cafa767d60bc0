"""The 2:4 part of the probe: timings on this GPU of each 2:4 layer shape per backend and of a block's step,
the facts ``rules.decide_two_four`` chooses from; and ``choose_semi_structured``, the two together.

    from starfish_fast.probe_sparse24 import choose_semi_structured, time_two_four
    timings = time_two_four(model, masks, "cuda", torch.bfloat16, "auto", tokens=128 * 197, purpose="heal")
    timings["shapes"]["3072x768"]["ms"]        # {"dense": 0.21, "torch_cusparselt": 0.74, ...}
    decision = choose_semi_structured(model, masks, "cuda", torch.bfloat16, "auto", tokens=128 * 197)
    decision.choice, decision.reason, decision.record()

The micro-benchmarks (``layer_step``, ``measure_layer``, ``benchmark_layer``) are what the timings run, and what
``bench/bench_sparse24.py`` and ``bench/gpu_check_sparse24.py`` time.
"""
from __future__ import annotations

import copy
import functools
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from starfish_fast import cusparselt, rules
from starfish_fast.checkpoint import error_line
from starfish_fast.sparse24 import (SemiStructuredLinear, convert_linears, shape_key, two_four_linears,
                                    warn_once)
from starfish_fast.sparse24_backends import BACKENDS, backend_reason, choose_backend, pack, shape_reason
from starfish_fast.timing import cuda_median_ms

DEFAULT_TOKENS = 128 * 197               # DeiT-B at batch 128


# ----------------------------------------------------------------------------- measuring
def _pattern_mask(shape: Sequence[int], device) -> torch.Tensor:
    return torch.tensor([True, True, False, False], device=device).repeat(shape[0], shape[1] // 4)  # (out, in)


def layer_step(name: str, shape: Sequence[int], *, tokens: int, dtype: torch.dtype, device, purpose: str,
               bias: bool = True) -> Callable[[], object]:
    """One call of a linear of ``shape`` (out, in) at ``tokens`` tokens on backend ``name`` ("dense" or a 2:4
    one), on random weights with a 2:4 mask. ``inference``: the forward with the weight packed once, in
    ``dtype``. ``heal``: the healing step under ``dtype`` autocast over fp32 weights (packing every call,
    dense backward) against the dense masked ``F.linear`` forward and backward; ``heal_forward``: its forward
    alone."""
    device = torch.device(device)
    mask = _pattern_mask(shape, device)
    if purpose == "inference":
        weight = torch.randn(*shape, device=device, dtype=dtype) * mask                   # (out, in), 2:4
        b = torch.randn(shape[0], device=device, dtype=dtype) if bias else None
        x = torch.randn(tokens, shape[1], device=device, dtype=dtype)                     # (tokens, in)
        if name == "dense":
            return functools.partial(F.linear, x, weight, b)
        return functools.partial(pack(name, weight, b), x)
    linear = nn.Linear(shape[1], shape[0], bias=bias, device=device)
    if name == "dense":
        forward = lambda inputs: F.linear(inputs, linear.weight * mask, linear.bias)  # noqa: E731
    else:
        forward = SemiStructuredLinear.from_linear(linear, mask, name)
        if forward.backend_for(device, dtype) is None:
            raise RuntimeError(f"the 2:4 path {name} cannot run here")
    x = torch.randn(tokens, shape[1], device=device, requires_grad=purpose == "heal")  # (tokens, in)
    if purpose == "heal_forward":
        @torch.no_grad()
        def forward_only():
            with torch.autocast(device.type, dtype=dtype):
                return forward(x)
        return forward_only
    grad_y = torch.randn(tokens, shape[0], device=device, dtype=dtype)                 # (tokens, out)

    def step():
        with torch.autocast(device.type, dtype=dtype):
            y = forward(x)
        y.backward(grad_y)
    return step


def block_step_timer(model: nn.Module, block: str, inputs: tuple[tuple, dict], masks: Mapping[str, torch.Tensor],
                     device, dtype: torch.dtype, timer: Callable[[Callable[[], object]], float] = cuda_median_ms
                     ) -> Callable[[Mapping[str, str]], float]:
    """``measure_step(choice) -> ms`` for ``choose_semi_structured``: the forward and backward of a copy of
    ``model``'s ``block`` on ``device``, its 2:4 linears on the backends ``choice`` gives them (module names of
    the whole model), on ``inputs`` (the block's captured ``(args, kwargs)``) under ``dtype`` autocast. Only
    the blocks hold swappable linears and the rest of a healing step is the same either way, so with
    identical blocks the whole step is faster exactly when the block is."""
    device, prefix = torch.device(device), block + "."
    local = lambda mapping: {k[len(prefix):]: v for k, v in mapping.items() if k.startswith(prefix)}  # noqa: E731
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v                                # noqa: E731
    args, kwargs = tuple(move(a) for a in inputs[0]), {k: move(v) for k, v in inputs[1].items()}

    def measure(choice: Mapping[str, str]) -> float:
        copied = copy.deepcopy(model.get_submodule(block)).to(device).requires_grad_(True)
        convert_linears(copied, local(masks), compute_dtype=dtype, choice=local(choice))

        def step():
            with torch.autocast(device.type, dtype=dtype):
                out = copied(*args, **kwargs)
            (out[0] if isinstance(out, tuple) else out).float().square().mean().backward()
        return timer(step)
    return measure


def measure_layer(name: str, shape: Sequence[int], *, tokens: int, dtype: torch.dtype, device, purpose: str,
                  bias: bool = True, timer: Callable | None = None) -> float:
    """Median milliseconds of ``layer_step`` (CUDA events unless ``timer(fn) -> ms`` is given)."""
    step = layer_step(name, shape, tokens=tokens, dtype=dtype, device=device, purpose=purpose, bias=bias)
    return (timer or cuda_median_ms)(step)


def benchmark_layer(out_features: int, in_features: int, tokens: int, dtype: torch.dtype = torch.bfloat16,
                    backward: bool = True, iters: int = 20, device: str | torch.device = "cuda",
                    backend: str | None = None) -> dict:
    """Median ms of one healing-style call (bf16 autocast over fp32 weights, pack included) of the dense
    masked linear and of ``SemiStructuredLinear`` on ``backend`` (default: the default one), on random
    weights with a 2:4 mask. ``RuntimeError`` naming the reason where the sparse path cannot run."""
    device = torch.device(device)
    weight = torch.empty(out_features, in_features, device=device)
    backend, reason = choose_backend(weight, _pattern_mask(weight.shape, device), dtype, backend)
    if backend is None:
        raise RuntimeError(f"the 2:4 path cannot run here: {reason}")
    timer = functools.partial(cuda_median_ms, iters=iters)
    purpose = "heal" if backward else "heal_forward"
    times = {name: measure_layer(name, weight.shape, tokens=tokens, dtype=dtype, device=device, purpose=purpose,
                                 timer=timer) for name in ("dense", backend)}
    return {"backend": backend, "purpose": purpose, "dense_ms": times["dense"], "sparse_ms": times[backend],
            "speedup": times["dense"] / times[backend]}


# ----------------------------------------------------------------------------- the timings the rules read
def _context(device: torch.device, dtype: torch.dtype, tokens: int, margin: float) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else None
    return {"device": str(device), "gpu": gpu, "dtype": str(dtype).replace("torch.", ""), "tokens": tokens,
            "margin": margin, "torch": torch.__version__, "library": cusparselt.library_info()}


def _time_shapes(layers: Mapping[str, nn.Linear], candidates: Sequence[str], measure: Callable,
                 setting: dict) -> dict[str, dict]:
    """Per distinct weight shape: its layers, ms of dense and of each candidate that takes it, refusals."""
    shapes: dict[str, dict] = {}
    for name, linear in layers.items():
        key = shape_key(linear)
        if key in shapes:
            shapes[key]["layers"].append(name)
            continue
        shape, bias = (linear.out_features, linear.in_features), linear.bias is not None
        ms, errors = {"dense": measure("dense", shape, bias=bias, **setting)}, {}
        for backend in candidates:
            why = shape_reason(backend, shape, setting["dtype"])
            try:
                if why:
                    raise ValueError(why)
                ms[backend] = measure(backend, shape, bias=bias, **setting)
            except Exception as error:  # a backend that refuses or fails is recorded, and not chosen
                errors[backend] = why or error_line(error)
        shapes[key] = {"layers": [name], "ms": ms, "errors": errors}
        if "cached_cusparselt" in ms:          # the alg id / split-k its timing picked, per token count
            shapes[key]["cusparselt_configs"] = [{"tokens": k[3], "dtype": str(k[4]), **v} for k, v in
                                                 cusparselt.TUNED.items() if tuple(k[1:3]) == shape]
    return shapes


def time_two_four(model: nn.Module, masks: Mapping[str, torch.Tensor], device, compute_dtype: torch.dtype,
                  mode: str = "auto", *, tokens: int = DEFAULT_TOKENS, purpose: str = "inference",
                  candidates: Sequence[str] | None = None, measure: Callable | None = None,
                  measure_step: Callable[[Mapping[str, str]], float] | None = None,
                  margin: float = rules.MARGIN) -> dict:
    """What ``rules.decide_two_four`` decides from: ``layers`` (each 2:4 linear's shape key), ``shapes`` (per
    shape, ms of dense and of every backend of ``candidates``, default each of ``BACKENDS`` this device has),
    ``context`` (device, dtype, tokens, unavailable backends and why) and, with ``measure_step(choice) ->
    ms``, ``step_ms``: the block step with the per-shape choice against all dense. ``measure(name, shape, *,
    tokens, dtype, device, purpose, bias) -> ms`` replaces the timing (tests inject it; default
    ``measure_layer``). Nothing is timed under ``off``, without 2:4 layers, or where no backend runs."""
    device = torch.device(device)
    layers = two_four_linears(model, masks)
    record = {"layers": {name: shape_key(linear) for name, linear in layers.items()},
              "context": _context(device, compute_dtype, tokens, margin)}
    if mode == "off" or not layers:
        return record
    if candidates is None:
        unavailable = {name: backend_reason(name, device, compute_dtype) for name in BACKENDS}
        record["context"]["unavailable"] = {name: why for name, why in unavailable.items() if why}
        candidates = [name for name in BACKENDS if not unavailable[name]]
    record["candidates"] = list(candidates)
    if not candidates:
        return record
    record["shapes"] = _time_shapes(layers, candidates, measure or measure_layer,
                                    dict(tokens=tokens, dtype=compute_dtype, device=device, purpose=purpose))
    choice = rules.per_layer_choice(record, mode, margin)
    if measure_step is not None and any(backend != "dense" for backend in choice.values()):
        record["step_ms"] = {"chosen": measure_step(choice), "dense": measure_step({name: "dense" for name in choice})}
    return record


def choose_semi_structured(model: nn.Module, masks: Mapping[str, torch.Tensor], device, compute_dtype: torch.dtype,
                           mode: str = "auto", *, tokens: int = DEFAULT_TOKENS, purpose: str = "inference",
                           candidates: Sequence[str] | None = None, measure: Callable | None = None,
                           measure_step: Callable[[Mapping[str, str]], float] | None = None,
                           margin: float = rules.MARGIN) -> rules.Decision:
    """Decide, by timing on ``device``, which 2:4-masked linears of ``model`` run on which backend:
    ``time_two_four`` (its arguments), then ``rules.decide_two_four``; its warning (a forced choice that is
    slower than dense, or that no backend serves) is raised once per process."""
    rules.check_two_four(mode, purpose)                         # a bad mode or purpose fails before any timing
    timings = time_two_four(model, masks, device, compute_dtype, mode, tokens=tokens, purpose=purpose,
                            candidates=candidates, measure=measure, measure_step=measure_step, margin=margin)
    decision = rules.decide_two_four(mode, purpose, timings, margin)
    if decision.warning:
        warn_once(decision.warning)
    return decision
