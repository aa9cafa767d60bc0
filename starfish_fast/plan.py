"""The plan: every ``auto`` of a ``HealConfig`` decided once, for one model on one device.

    from starfish_fast.plan import resolve_plan
    plan = resolve_plan(config, model, "cuda", calib=batches)
    plan.precision, plan.teacher_store, plan.kernels["cosine_loss"]      # "bf16", "gpu", "torch"
    print(plan.summary())                                              # the one line heal logs at INFO

``heal`` resolves the plan before any work and returns it as ``HealResult.plan``; every other
module reads it and none decides again. Each rule's comment names the measurement behind it
(under ``bench/results/``); a rule nothing has measured yet keeps the safe path.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from starfish_fast import distributed
from starfish_fast.compaction import ATTENTION_LAYERS
from starfish_fast.config import KERNEL_OPS, HealConfig
from starfish_fast.kernels._dispatch import AUTO_TRITON_ON_CUDA, triton_available_for
from starfish_fast.models import adapter_for
from starfish_fast.teacher import choose_store, estimate_bytes

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Plan:
    """What a healing run does, with no ``auto`` left; ``reasons`` says why for each decided ``auto``."""

    device: str
    mode: str
    family: str                       # the model adapter's family
    scope: str
    blocks: tuple[str, ...]
    cosine_per: str                   # token | sample | shape ((B, T, D) per token, (B, C, H, W) per image)
    precision: str                    # fp32 | bf16 | fp16
    teacher_dtype: str
    teacher_store: str                # gpu | pinned | disk | recompute | memory | none
    compile: bool
    compact_mlp: bool
    compact_qk: bool
    attention_fp32_core: bool         # attention modules swapped for ones whose core runs in fp32 (CPU bf16)
    kernels: Mapping[str, str] = field(default_factory=dict)   # op -> triton | torch
    semi_structured: bool = False
    world_size: int = 1               # torchrun processes (1: none)
    rank: int = 0
    sync_bn: bool = False
    reasons: Mapping[str, str] = field(default_factory=dict)

    @property
    def compute_dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    @property
    def store_dtype(self) -> torch.dtype:
        return DTYPES[self.teacher_dtype]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def summary(self) -> str:
        compact = "+".join(name for name, on in (("mlp", self.compact_mlp), ("qk", self.compact_qk)) if on) or "off"
        kernels = ",".join(f"{op}={path}" for op, path in self.kernels.items())
        return (f"plan: {self.device} {self.mode} {self.precision}, teacher {self.teacher_store}/{self.teacher_dtype}, "
                f"compile {'on' if self.compile else 'off'}, compact {compact}, kernels {kernels}, "
                f"2:4 {'on' if self.semi_structured else 'off'}, scope {self.scope}, {len(self.blocks)} blocks "
                f"({self.family}, cosine per {self.cosine_per})" +
                (f", {self.world_size} processes{' with SyncBatchNorm' if self.sync_bn else ''}"
                 if self.world_size > 1 else ""))

    def as_dict(self) -> dict:
        return {item.name: (list(value) if isinstance(value := getattr(self, item.name), tuple) else
                            dict(value) if isinstance(value, Mapping) else value) for item in dataclasses.fields(self)}


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


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN runs bf16 GEMMs natively (4x the fp32 GEMM rate at 3200x64x192
    on the 2-core AMD EPYC with AVX512-BF16 here: 767 vs 173 GFLOP/s)."""
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def _precision(config: HealConfig, device: torch.device, family: str) -> tuple[str, str, str]:
    """(compute precision, teacher dtype, reason).

    CPU ``auto``: bf16 autocast healed ViTs 1.4x faster than fp32 once the attention core runs
    in fp32 (the ViT families' attention is swapped for compaction.py's module), and the MobileNet-style
    CNN 0.9x as fast (bench/results/precision_fashion_{vit,cnn}_cpu.json): bf16 for those ViTs on
    bf16-native CPUs only."""
    if config.mode == "exact":
        return "fp32", "fp16" if config.teacher_dtype == "auto" else config.teacher_dtype, "exact mode: fp32"
    if config.precision != "auto":
        precision, reason = config.precision, "requested"
    elif device.type == "cuda":
        precision, reason = "bf16", "auto: bf16 tensor cores on CUDA"
    elif family in ATTENTION_LAYERS and cpu_has_native_bf16():
        precision, reason = "bf16", "auto: ViT on a bf16-native CPU (bench/results/precision_fashion_vit_cpu.json)"
    else:
        precision, reason = "fp32", "auto: fp32 on this CPU for this model (bench/results/precision_fashion_*_cpu.json)"
    teacher = config.teacher_dtype if config.teacher_dtype != "auto" else ("bf16" if precision == "bf16" else "fp16")
    return precision, teacher, reason


def _kernels(config: HealConfig, device: torch.device) -> dict[str, str]:
    """Per op: triton or torch. ``auto`` follows ``AUTO_TRITON_ON_CUDA`` (set from bench_kernels.py on a GPU)."""
    if config.mode == "exact" or config.kernels == "torch":
        return {op: "torch" for op in KERNEL_OPS}
    runnable = triton_available_for(torch.empty(0, device=device))   # CUDA, or the interpreter on CPU
    if config.kernels == "triton":
        if not runnable:
            raise ValueError(f"kernels='triton' cannot run on {device}: the Triton kernels need a CUDA GPU with "
                             f"triton installed (or TRITON_INTERPRET=1 set before import, for tests)")
        return {op: "triton" for op in KERNEL_OPS}
    return {op: "triton" if device.type == "cuda" and runnable and AUTO_TRITON_ON_CUDA[op] else "torch"
            for op in KERNEL_OPS}


def _compaction(config: HealConfig, device: torch.device) -> tuple[bool, bool, str]:
    """(narrow MLP neurons, narrow QK dims, reason). MLP narrowing only shrinks dense GEMMs: on in fast
    mode (CPU: 1.24-1.28x, bench/results/compaction_deit_tiny_patch16_224_cpu.json). QK narrowing was
    faster on CPU (1.33-1.44x with MLP, same file); on CUDA q/k narrower than v rules out the flash
    SDPA kernel, so there it needs compact="on" until a GPU run measures it."""
    if config.compact != "auto":
        on = config.compact == "on"
        return on, on, "requested"
    fast = config.mode == "fast"
    return fast, fast and device.type == "cpu", "auto: MLP in fast mode, QK dims on CPU only"


def _teacher_store(config: HealConfig, model: nn.Module, adapter, blocks, calib, device, dtype, keep_logits,
                   keep_blocks, world_size: int) -> tuple[str, str]:
    """Each process keeps the targets of its own slices: sized by its share of the calibration images."""
    if not (keep_logits or keep_blocks):
        return "none", f"objective {config.objective!r} needs no teacher outputs"
    if config.teacher_store != "auto":
        return choose_store(config.teacher_store, 0, device)
    if calib is None:
        return ("gpu" if device.type == "cuda" else "memory"), "auto without calibration data: size unknown"
    sample = calib[0][:1]
    cache_bytes = estimate_bytes(model, adapter, blocks, sample, sum(b.shape[0] for b in calib) // world_size,
                                 keep_logits, keep_blocks, dtype)
    return choose_store("auto", cache_bytes, device)


def resolve_plan(config: HealConfig, model: nn.Module, device: str | torch.device | None = None, *,
                 calib: Sequence[torch.Tensor] | None = None, block_names: Sequence[str] | None = None) -> Plan:
    """Decide every ``auto`` of ``config`` for ``model`` on ``device`` (default ``config.device``).
    ``calib``: the calibration batches (sizes the teacher store); ``block_names``: default all blocks."""
    from starfish_fast.objectives import needs_blocks, needs_teacher_logits

    device, group = process_device(config, device)
    world_size = group.world_size if group else 1
    if config.sync_bn and world_size > 1 and device.type != "cuda":
        raise ValueError("sync_bn needs CUDA processes (SyncBatchNorm runs on GPUs); on the CPU each process "
                         "keeps its own BatchNorm statistics")
    adapter = adapter_for(model, block_names)
    scope = adapter.check_scope(config.scope)
    blocks = tuple(block_names) if block_names is not None else tuple(adapter.block_names(model))
    if not blocks and needs_blocks(config.objective):
        raise ValueError("no blocks to align: block_names is empty")
    if isinstance(config.block_weights, tuple) and len(config.block_weights) != len(blocks):
        raise ValueError(f"{len(config.block_weights)} block weights for {len(blocks)} blocks")
    precision, teacher_dtype, precision_reason = _precision(config, device, adapter.family)
    fast = config.mode == "fast"
    compile_on = config.compile == "on" or (config.compile == "auto" and fast and device.type == "cuda")
    if compile_on and not fast:
        compile_on = False
    compact_mlp, compact_qk, compact_reason = _compaction(config, device)
    kernels = _kernels(config, device)
    store, store_reason = _teacher_store(config, model, adapter, blocks, calib, device, DTYPES[teacher_dtype],
                                         needs_teacher_logits(config.objective), needs_blocks(config.objective),
                                         world_size)
    reasons = {"precision": precision_reason, "teacher_store": store_reason, "compact": compact_reason,
               # CPU compile measured no faster than eager (1505 vs 1416 img/s best-of-4, within noise;
               # bench/results/heal_fashion_vit_cpu.json holds the eager run): compile is for CUDA
               "compile": "requested" if config.compile != "auto" else "auto: on for CUDA in fast mode",
               "kernels": "requested" if config.kernels != "auto" else "auto: kernels/_dispatch.py table",
               "semi_structured": "requested" if config.semi_structured != "auto" else
               "auto: off until bench_sparse24.py measures a gain"}
    plan = Plan(device=str(device), mode=config.mode, family=adapter.family, scope=scope, blocks=blocks,
                cosine_per=adapter.rows if config.cosine_per == "auto" else config.cosine_per, precision=precision,
                teacher_dtype=teacher_dtype, teacher_store=store, compile=compile_on, compact_mlp=compact_mlp,
                compact_qk=compact_qk, kernels=kernels,
                attention_fp32_core=fast and device.type == "cpu" and adapter.family in ATTENTION_LAYERS,
                semi_structured=fast and config.semi_structured == "on", world_size=world_size,
                rank=group.rank if group else 0, sync_bn=config.sync_bn and world_size > 1, reasons=reasons)
    log.debug("plan reasons: %s", reasons)
    return plan
