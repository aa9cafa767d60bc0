"""The probe: every fact a plan decides from, gathered once, with every side effect of planning here (joining
the torchrun process group, asking the GPU its memory, one forward of one sample, timing the 2:4 backends).

    from starfish_fast.probe import Facts, probe
    facts = probe(config, model, calib=batches, masks=masks)        # this machine, this model, this job
    facts.device_kind, facts.memory_free, facts.tokens_per_sample   # "sm90", 84_000_000_000, 197
    Facts.for_device_kind("sm86", blocks=("blocks.0",))             # an A10 from the tables, written by hand
    probe(config, model, calib=batches, device_kind="sm80")         # this model's facts on an A100 from the tables

``plan.decide(config, adapter, facts)`` is then a pure function: made-up facts give the plan for any machine.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from starfish_fast import compile_cache, distributed, rules
from starfish_fast.calibration import capture_inputs
from starfish_fast.config import HealConfig
from starfish_fast.models import adapter_for, prunable_weights
from starfish_fast.objectives import objective
from starfish_fast.probe_sparse24 import block_step_timer, time_two_four
from starfish_fast.sparse24 import shape_key, two_four_linears
from starfish_fast.teacher import host_available_bytes, teacher_outputs

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Facts:
    """What a plan decides from. The machine: ``device`` ("cpu", "cuda:0"; "cuda" for a named kind),
    ``device_kind`` ("cpu" or "sm" + compute capability), the GPU's name, the compute device's memory in bytes
    (the GPU's; the host's on the CPU; 0: unknown), the host's available memory, whether the CPU computes bf16
    natively, this process's place in a torchrun job, and ``measured`` (False: a named kind's table stood in for
    the machine). The model and job: the blocks aligned, whether it has MLPs to narrow, the trained weights,
    the calibration images (all processes; None: none given), tokens per sample and the teacher's outputs per
    sample (elements; None: not probed), the compile cache per precision and whether it is on disk, and the
    2:4 timings (``probe_sparse24.time_two_four``'s record; only the layers where nothing was timed)."""

    device: str = "cpu"
    device_kind: str = "cpu"
    gpu: str | None = None
    memory_total: int = 0
    memory_free: int = 0
    host_free: int = 0
    cpu_bf16: bool = False
    world_size: int = 1
    rank: int = 0
    measured: bool = True
    blocks: tuple[str, ...] = ()
    has_mlp: bool = False
    trained_weights: int = 0
    weight_bytes: int = 0             # the model's parameters, in bytes
    resident_bytes: int = 0           # what the student and its dense twin already hold on the compute device
    calib_images: int | None = None
    tokens_per_sample: int | None = None
    teacher_block_elements: int | None = None
    teacher_logit_elements: int | None = None
    compile_cache: Mapping[str, str] = field(default_factory=dict)
    compile_cache_warm: Mapping[str, bool] = field(default_factory=dict)
    two_four: Mapping = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device_kind != "cpu"

    @classmethod
    def for_device_kind(cls, kind: str, **fields) -> "Facts":
        """A named kind's machine from ``rules.DEVICE_KINDS`` (its card's memory, all free; host memory unknown;
        a CPU without native bf16), with ``fields`` (the model's facts, or overrides such as an H200's memory)."""
        if kind == "cpu":
            machine = {"device": "cpu", "device_kind": "cpu"}
        elif kind in rules.DEVICE_KINDS:
            card = rules.DEVICE_KINDS[kind]
            machine = {"device": "cuda", "device_kind": kind, "gpu": card.card, "memory_total": card.memory,
                       "memory_free": card.memory}
        else:
            raise ValueError(f"unknown device kind {kind!r}; known: {', '.join(rules.KNOWN_KINDS)}")
        return cls(**{**machine, "measured": False, **fields})


# ----------------------------------------------------------------------------- the machine
def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` checked against the machine; default cuda if available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name; allowed: cpu, cuda, cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA GPU is available here (torch.cuda.is_available() is False)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif resolved.type != "cpu":
        raise ValueError(f"device {device!r}: unsupported device type; allowed: cpu, cuda, cuda:N")
    return resolved


def process_device(config: HealConfig, device: str | torch.device | None = None):
    """(this process's device, its torchrun group or None): under torchrun the process group is joined
    (NCCL on CUDA, gloo on the CPU) and a CUDA device is ``cuda:LOCAL_RANK``."""
    device = resolve_device(config.device if device is None else device)
    group = distributed.join(config.distributed, device.type)
    if group is not None and device.type == "cuda":
        device = torch.device("cuda", group.local_rank)
    return device, group


def device_kind(device: torch.device) -> str:
    """"cpu", or "sm" + the GPU's compute capability (sm80 A100, sm86 A10, sm90 H100/H200)."""
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN runs bf16 GEMMs natively (4x the fp32 GEMM rate at 3200x64x192
    on the 2-core AMD EPYC with AVX512-BF16 here: 767 vs 173 GFLOP/s)."""
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def machine_facts(device: torch.device, group) -> dict:
    """The facts of this machine for ``device`` (and its torchrun ``group``, or None)."""
    host_free = host_available_bytes()
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        gpu = torch.cuda.get_device_name(device)
    else:
        free, gpu = host_free, None
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {"device": str(device), "device_kind": device_kind(device), "gpu": gpu, "memory_total": total,
            "memory_free": free, "host_free": host_free, "cpu_bf16": cpu_has_native_bf16(),
            "world_size": group.world_size if group else 1, "rank": group.rank if group else 0}


# ----------------------------------------------------------------------------- the model and the job
def _teacher_facts(model: nn.Module, adapter, blocks: Sequence[str], sample: torch.Tensor) -> dict:
    """Tokens per sample and the teacher's outputs per sample (elements), from one forward of one sample."""
    home = next(model.parameters()).device
    with torch.no_grad():
        outputs = teacher_outputs(model, adapter, blocks, sample[:1].to(home), keep_logits=True,
                                  keep_blocks=bool(blocks))
    sequences = [t for t in outputs if t.dim() == 3]                # (1, T, D): T tokens
    return {"tokens_per_sample": sequences[0].shape[1] if sequences else 1,
            "teacher_block_elements": sum(t.numel() for t in outputs[:len(blocks)]),
            "teacher_logit_elements": outputs[-1].numel()}


def _two_four_facts(config: HealConfig, model: nn.Module, adapter, blocks, masks, calib, device: torch.device,
                    dtype: torch.dtype, world_size: int, tokens_per_sample: int | None) -> dict:
    """The 2:4 timings for the healing step at this run's tokens per step, per layer shape and then the step of
    the block holding the most 2:4 linears with the choice against all dense; nothing is timed when off, in
    exact mode, on the CPU (its reason recorded), or without 2:4 masks."""
    if config.mode == "exact":
        return {"layers": {name: shape_key(linear) for name, linear in two_four_linears(model, masks).items()}}
    mode = config.semi_structured
    if mode == "off" or device.type != "cuda" or not calib:
        return time_two_four(model, masks, device, dtype, mode, purpose="heal")
    home = next(model.parameters()).device
    batch = calib[0][:max(1, config.batch_size // world_size)].to(home)           # one process's batch
    linears = two_four_linears(model, masks)
    busiest = max(blocks, key=lambda block: sum(name.startswith(block + ".") for name in linears))
    measure_step = None
    if any(name.startswith(busiest + ".") for name in linears):
        inputs = capture_inputs(model.get_submodule(busiest),
                                lambda: adapter.forward_blocks(model, batch, [busiest], need_logits=False))
        measure_step = block_step_timer(model, busiest, inputs, masks, device, dtype)
    return time_two_four(model, masks, device, dtype, mode, purpose="heal",
                         tokens=batch.shape[0] * (tokens_per_sample or 1), measure_step=measure_step)


def _weight_facts(model: nn.Module, device: torch.device | None) -> dict:
    """The model's parameter bytes, and what the student and its dense twin (taken as the same size) already
    hold on ``device`` (None: a named kind, nothing resident): a joint run's estimate counts them as free."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    resident = 0 if device is None else 2 * sum(p.numel() * p.element_size() for p in model.parameters()
                                                 if p.device.type == device.type)
    return {"weight_bytes": weights, "resident_bytes": resident}


def probe(config: HealConfig, model: nn.Module, device: str | torch.device | None = None, *,
          calib: Sequence[torch.Tensor] | None = None, block_names: Sequence[str] | None = None,
          masks: Mapping[str, torch.Tensor] | None = None, device_kind: str | None = None) -> Facts:
    """The facts for healing ``model`` with ``config`` on ``device`` (default ``config.device``; under torchrun
    the process group is joined here), or, with ``device_kind``, on a named kind from the tables (nothing of
    this machine is read; the model's facts are measured where it is, 2:4 is left to time at run time)."""
    if device_kind is None:
        device, group = process_device(config, device)
        machine = machine_facts(device, group)
    else:
        machine = dataclasses.asdict(Facts.for_device_kind(device_kind))
        device = torch.device(machine["device"])
    adapter = adapter_for(model, block_names)
    spec = objective(config.objective)
    blocks = tuple(block_names) if block_names is not None else tuple(adapter.block_names(model))
    predicate = adapter.scope_predicate(adapter.check_scope(config.scope))
    facts = {"blocks": blocks, "has_mlp": bool(adapter.mlp_pairs(model)),
             "trained_weights": sum(w.numel() for w in prunable_weights(model, predicate).values()),
             "calib_images": sum(b.shape[0] for b in calib) if calib is not None else None,
             **_weight_facts(model, device if device_kind is None else None)}
    wants_store = (config.teacher_store == "auto" or config.order == "auto") and \
        (spec.needs_teacher_logits or spec.needs_blocks)
    two_four_timed = device_kind is None and device.type == "cuda" and config.mode == "fast"
    if calib and (wants_store or two_four_timed):
        facts.update(_teacher_facts(model, adapter, blocks if spec.needs_blocks else (), calib[0]))
    if config.mode == "fast" and device_kind is None:
        paths = {precision: compile_cache.path_for(model, device, precision) for precision in TORCH_DTYPES}
        facts.update(compile_cache=paths, compile_cache_warm={p: compile_cache.exists(path)
                                                              for p, path in paths.items()})
    if device_kind is None:
        precision = rules.precision_rule(config.mode, config.precision, config.teacher_dtype, device.type == "cuda",
                                         adapter.family, machine["cpu_bf16"])[0]
        facts["two_four"] = _two_four_facts(config, model, adapter, blocks, masks or {}, calib, device,
                                            TORCH_DTYPES[precision], machine["world_size"],
                                            facts.get("tokens_per_sample"))
    else:
        facts["two_four"] = {"layers": {name: shape_key(linear)
                                        for name, linear in two_four_linears(model, masks or {}).items()}}
    return Facts(**{**machine, **facts})
