"""The plan: every ``auto`` of a ``HealConfig`` decided once, for one model on one device.

    from starfish_fast.plan import resolve_plan
    plan = resolve_plan(config, model, "cuda", calib=batches)
    plan.precision, plan.teacher_store, plan.kernels["cosine_loss"]      # "bf16", "device", "triton"
    print(plan.summary())                                              # the one line heal logs at INFO
    plan.reasons["compile"]          # "auto: eager: 50,000 images save 3.9 s, less than a 17 s cold compile ..."

``heal`` resolves the plan before any work and returns it as ``HealResult.plan``; every other
module reads it and none decides again (kernels per op, teacher store, compaction with the
user's blocks, compile and its cache, precision). Each rule's comment names the measurement
behind it (under ``bench/results/``); a rule nothing has measured yet keeps the safe path.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Sequence

import torch
from torch import nn

from starfish_fast import compile_cache, distributed
from starfish_fast.calibration import capture_inputs
from starfish_fast.compaction import ATTENTION_LAYERS
from starfish_fast.config import HealConfig
from starfish_fast.kernels._dispatch import OPS, choose
from starfish_fast.models import adapter_for, prunable_weights
from starfish_fast.objectives import objective
from starfish_fast.sequential import joint_bytes
from starfish_fast.sparse24 import block_step_timer, choose_semi_structured, two_four_linears
from starfish_fast.teacher import estimate_bytes, host_available_bytes, teacher_outputs

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Keep this fraction of free memory for the student's activations, weights and optimizer.
GPU_HEADROOM_FRACTION = 0.5
HOST_HEADROOM_FRACTION = 0.5


class CompileCost(NamedTuple):
    """What compile bought and cost in one measured setting: steady-state images/s eager and compiled,
    the seconds a whole call took longer than eager with cold caches and with its compile cache warm,
    and the trainable weights of the model measured (the gain per image scales with them)."""
    eager: float
    compiled: float
    cold: float
    warm: float
    weights: float
    source: str


# (device kind, model family) -> CompileCost. Device kind: "cpu", or "sm" + compute capability.
COMPILE_MEASURED = {
    # H200 (sm90), DeiT-B at batch 64, fast mode bf16, 1,024 images x 3 epochs: whole call 3.2 s eager,
    # 20.2 s cold, 6.5 s with a warm inductor cache; steady state eager 2,045 img/s, compiled up to 2,431.
    ("sm90", "timm_vit"): CompileCost(2045.0, 2431.0, 17.0, 3.3, 84.9e6,
                                      "bench/results/gpu_check_h200_2026-12-04/reference_vs_fast_and_compile.jsonl"),
    # This 2-core CPU, the bundled ViT, 4,096 images x 2 epochs at batch 64 (bench/bench_compile.py): compiled
    # blocks ran slower than eager (1,111 against 1,467 img/s) after 17.6 s (cold) / 16.1 s (warm) of compile.
    ("cpu", "timm_vit"): CompileCost(1467.0, 1111.0, 17.6, 16.1, 294912.0, "bench/results/compile_fashion_vit_cpu.json"),
}


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
    teacher_store: str                # device | pinned | disk | recompute | none
    compile: bool
    compact_mlp: bool
    compact_qk: bool
    attention_fp32_core: bool         # attention modules swapped for ones whose core runs in fp32 (CPU bf16)
    kernels: Mapping[str, str] = field(default_factory=dict)   # op -> triton | torch
    semi_structured: bool = False     # some 2:4-masked linears heal on a sparse backend (which: below)
    semi_structured_choice: Mapping[str, str] = field(default_factory=dict)   # linear -> dense | backend
    semi_structured_timings: Mapping = field(default_factory=dict)            # what the choice measured
    world_size: int = 1               # torchrun processes (1: none)
    rank: int = 0
    sync_bn: bool = False
    compile_cache: str | None = None  # torch.compile's saved artifacts for this model, device and dtype
    order: str = "joint"              # joint | sequential (block after block: sequential.py)
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
                (", sequential order" if self.order == "sequential" else "") +
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


def _precision(config: HealConfig, device: torch.device, family: str) -> tuple[str, str, str]:
    """(compute precision, teacher dtype, reason).

    CPU ``auto``: bf16 autocast healed ViTs 1.4x faster than fp32 once the attention core runs
    in fp32 (the ViT families' attention is swapped for compaction.py's module), and the MobileNet-style
    CNN 0.9x as fast (bench/results/precision_fashion_{vit,cnn}_cpu.json): bf16 for those ViTs on
    bf16-native CPUs only. fp16 needs loss scaling (its unscaled gradients fall into fp16's subnormal
    range: a relative error of 0.15 at DeiT-B shape on an H200, bench/results/gpu_check_h200_2026-12-04):
    the fast step scales the loss with torch's GradScaler, which reads one flag from the GPU per step."""
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
    """Per op: triton or torch, by the kernels' one rule (kernels/_dispatch.py: choose)."""
    if config.mode == "exact":
        return {op: "torch" for op in OPS}
    return {op: "triton" if choose(op, device, config.kernels) else "torch" for op in OPS}


def _compaction(config: HealConfig, device: torch.device, adapter, model: nn.Module) -> tuple[bool, bool, str]:
    """(narrow MLP neurons, narrow QK dims, reason), only where the model has them. MLP narrowing only
    shrinks dense GEMMs: on in fast mode (CPU: 1.24-1.28x, bench/results/compaction_deit_tiny_patch16_224_cpu.json).
    QK narrowing was faster on CPU (1.33-1.44x with MLP, same file); on CUDA q/k narrower than v rules out
    the flash SDPA kernel, so there it needs compact="on" until a GPU run measures it."""
    has_mlp, has_qk = bool(adapter.mlp_pairs(model)), adapter.family in ATTENTION_LAYERS
    if config.compact != "auto":
        on = config.compact == "on"
        return on and has_mlp, on and has_qk, "requested"
    fast = config.mode == "fast"
    mlp, qk = fast and has_mlp, fast and has_qk and device.type == "cpu"
    if not (has_mlp or has_qk):
        return False, False, f"auto: a {adapter.family} model has no MLP neurons or QK dims to narrow"
    return mlp, qk, "auto: MLP in fast mode, QK dims on CPU only"


def _store_rule(cache_bytes: int, device: torch.device) -> tuple[str, str]:
    """``teacher_store="auto"``: on the device while the cache fits half its free memory, else pinned host
    memory (CUDA), else a memory-mapped file."""
    host_free = host_available_bytes()
    size = f"cache {cache_bytes / 2**30:.2f} GiB"
    if device.type != "cuda":
        if cache_bytes <= HOST_HEADROOM_FRACTION * host_free or host_free == 0:
            return "device", f"{size} fits in RAM ({host_free / 2**30:.1f} GiB free)"
        return "disk", f"{size} exceeds half the free RAM ({host_free / 2**30:.1f} GiB)"
    gpu_free, _ = torch.cuda.mem_get_info(device)
    if cache_bytes <= GPU_HEADROOM_FRACTION * gpu_free:
        return "device", f"{size} fits in half the free GPU memory ({gpu_free / 2**30:.1f} GiB)"
    if cache_bytes <= HOST_HEADROOM_FRACTION * host_free:
        return "pinned", f"{size} exceeds half the free GPU memory ({gpu_free / 2**30:.1f} GiB), fits pinned"
    return "disk", f"{size} exceeds GPU and host memory: memory-mapped file"


def _teacher_store(config: HealConfig, model: nn.Module, adapter, blocks, calib, device, dtype, spec,
                   world_size: int) -> tuple[str, str]:
    """Each process keeps the targets of its own slices: sized by its share of the calibration images."""
    if not (spec.needs_teacher_logits or spec.needs_blocks):
        return "none", f"objective {spec.name!r} needs no teacher outputs"
    if config.teacher_store != "auto":
        if config.teacher_store == "pinned" and device.type != "cuda":
            raise ValueError(f"teacher_store 'pinned' needs a CUDA device, got {device}")
        return config.teacher_store, "requested"
    if calib is None:
        return "device", "auto without calibration data: size unknown"
    cache_bytes = estimate_bytes(model, adapter, blocks, calib[0][:1], sum(b.shape[0] for b in calib) // world_size,
                                 spec.needs_teacher_logits, spec.needs_blocks, dtype)
    return _store_rule(cache_bytes, device)


def _compile(config: HealConfig, device: torch.device, family: str, trained_weights: int, images: int,
             cache: str | None) -> tuple[bool, str]:
    """``compile="auto"``: compile when the steady-state time it saves over this job's images exceeds
    what it adds (cold, or warm when this model's compile cache is on disk), from ``COMPILE_MEASURED``
    scaled by the trainable weights; eager where nothing was measured."""
    if config.mode != "fast":
        return False, "exact mode: eager, as the reference"
    if config.compile != "auto":
        return config.compile == "on", "requested"
    kind = device_kind(device)
    cost = COMPILE_MEASURED.get((kind, family))
    if cost is None:
        return False, (f"auto: eager: compile is unmeasured for {family} models on {kind} "
                       f"(compile='on' to try it)")
    measured = (f"{kind}, {family}: {cost.eager:,.0f} img/s eager, {cost.compiled:,.0f} compiled, measured at "
                f"{cost.weights / 1e6:.1f}M weights; {cost.source}")
    if cost.compiled <= cost.eager:
        return False, f"auto: eager: compiled blocks ran no faster here ({measured})"
    per_image = (1 / cost.eager - 1 / cost.compiled) * trained_weights / cost.weights
    saved, spent = images * per_image, cost.warm if cache and compile_cache.exists(cache) else cost.cold
    warmth = "warm (cache on disk)" if spent == cost.warm else "cold"
    decision = saved > spent
    return decision, (f"auto: {'compiled' if decision else 'eager'}: {images:,} images save about {saved:.1f} s "
                      f"against a {spent:.1f} s {warmth} compile ({measured})")


def _semi_structured(config: HealConfig, model, adapter, blocks, masks, calib, device, dtype, world_size: int):
    """``semi_structured``: the 2:4-masked linears' backends, timed on this device for the healing step at this
    run's tokens per step, per layer shape and then the step of the block holding the most 2:4 linears with
    the choice against all dense (sparse24.choose_semi_structured, block_step_timer); nothing is timed when
    off, in exact mode, on the CPU, or without 2:4 masks."""
    if config.mode == "exact":
        return dataclasses.replace(choose_semi_structured(model, masks, device, dtype, "off", purpose="heal"),
                                   reason="exact mode: dense, as the reference")
    if config.semi_structured == "off" or device.type != "cuda" or not calib:
        return choose_semi_structured(model, masks, device, dtype, config.semi_structured, purpose="heal")
    home = next(model.parameters()).device
    batch = calib[0][:max(1, config.batch_size // world_size)].to(home)           # one process's batch
    sample = teacher_outputs(model, adapter, blocks[:1], batch[:1], keep_logits=False)
    per_image = sample[0].shape[1] if sample and sample[0].dim() == 3 else 1   # (1, T, D): T tokens
    linears = two_four_linears(model, masks)
    busiest = max(blocks, key=lambda block: sum(name.startswith(block + ".") for name in linears))
    measure_step = None
    if any(name.startswith(busiest + ".") for name in linears):
        inputs = capture_inputs(model.get_submodule(busiest),
                                lambda: adapter.forward_blocks(model, batch, [busiest], need_logits=False))
        measure_step = block_step_timer(model, busiest, inputs, masks, device, dtype)
    return choose_semi_structured(model, masks, device, dtype, config.semi_structured, purpose="heal",
                                  tokens=batch.shape[0] * per_image, measure_step=measure_step)


def _order_rule(config: HealConfig, estimate_bytes: int, free_bytes: int) -> tuple[str, str]:
    """``order``: as asked; ``auto``: sequential only when the estimate of a joint run (``sequential.joint_bytes``:
    weights, gradients, moments, teacher targets on the device) exceeds the free device memory, and only for a
    block-local objective (the others need the whole model at once)."""
    if config.order != "auto":
        return config.order, "requested"
    if not objective(config.objective).block_local:
        return "joint", f"auto: joint: objective {config.objective!r} needs the whole model at once"
    sizes = (f"a joint run needs about {estimate_bytes / 2**30:.2f} GiB (weights, gradients, Adam moments, teacher "
             f"targets), {free_bytes / 2**30:.2f} GiB free")
    if estimate_bytes > free_bytes:
        return "sequential", f"auto: sequential: {sizes}"
    return "joint", f"auto: joint: {sizes}"


def _free_bytes(model: nn.Module, device: torch.device) -> int:
    """The device's free memory plus what the student and its dense twin (taken as the same size) already hold
    there: a joint run's estimate counts them."""
    resident = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == device.type)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else host_available_bytes()
    return free + resident


def _joint_estimate(config: HealConfig, model, adapter, blocks, calib, store: str, teacher_dtype, trained: int,
                    world_size: int) -> int:
    """``sequential.joint_bytes`` for this model: fp32 weights and gradients, the moments' dtype, and the teacher
    targets when the plan keeps them on the device."""
    spec = objective(config.objective)
    teacher = estimate_bytes(model, adapter, blocks, calib[0][:1], sum(b.shape[0] for b in calib) // world_size,
                             spec.needs_teacher_logits, spec.needs_blocks, teacher_dtype) \
        if store == "device" and calib else 0
    moments = 2 if config.moments_dtype == "bf16" and config.mode == "fast" else 4
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return joint_bytes(weights, trained, teacher, moment_bytes=moments)


def resolve_plan(config: HealConfig, model: nn.Module, device: str | torch.device | None = None, *,
                 calib: Sequence[torch.Tensor] | None = None, block_names: Sequence[str] | None = None,
                 masks: Mapping[str, torch.Tensor] | None = None) -> Plan:
    """Decide every ``auto`` of ``config`` for ``model`` on ``device`` (default ``config.device``).
    ``calib``: the calibration batches (sizes the teacher store, the compile decision and the 2:4 timing);
    ``block_names``: default all blocks; ``masks``: which linears are 2:4 (timed where semi_structured
    is auto or on)."""
    device, group = process_device(config, device)
    world_size = group.world_size if group else 1
    if config.sync_bn and world_size > 1 and device.type != "cuda":
        raise ValueError("sync_bn needs CUDA processes (SyncBatchNorm runs on GPUs); on the CPU each process "
                         "keeps its own BatchNorm statistics")
    spec = objective(config.objective)
    adapter = adapter_for(model, block_names)
    scope = adapter.check_scope(config.scope)
    blocks = tuple(block_names) if block_names is not None else tuple(adapter.block_names(model))
    if not blocks and spec.needs_blocks:
        raise ValueError("no blocks to align: block_names is empty")
    if isinstance(config.block_weights, tuple) and len(config.block_weights) != len(blocks):
        raise ValueError(f"{len(config.block_weights)} block weights for {len(blocks)} blocks")
    precision, teacher_dtype, precision_reason = _precision(config, device, adapter.family)
    compact_mlp, compact_qk, compact_reason = _compaction(config, device, adapter, model)
    store, store_reason = _teacher_store(config, model, adapter, blocks, calib, device, DTYPES[teacher_dtype], spec,
                                         world_size)
    cache = compile_cache.path_for(model, device, precision) if config.mode == "fast" else None
    images = config.epochs * sum(b.shape[0] for b in calib) // world_size if calib is not None else 0
    trained = sum(w.numel() for w in prunable_weights(model, adapter.scope_predicate(scope)).values())
    compile_on, compile_reason = _compile(config, device, adapter.family, trained, images, cache)
    fast = config.mode == "fast"
    two_four = _semi_structured(config, model, adapter, blocks, masks or {}, calib, device, DTYPES[precision],
                                world_size)
    order, order_reason = _order_rule(config, *(
        (_joint_estimate(config, model, adapter, blocks, calib, store, DTYPES[teacher_dtype], trained, world_size),
         _free_bytes(model, device)) if config.order == "auto" else (0, 0)))
    reasons = {"order": order_reason, "precision": precision_reason, "teacher_store": store_reason,
               "compact": compact_reason,
               "compile": compile_reason,
               "kernels": "requested" if config.kernels != "auto" else "auto: kernels/_dispatch.py table",
               "semi_structured": two_four.reason}
    plan = Plan(device=str(device), mode=config.mode, family=adapter.family, scope=scope, blocks=blocks,
                cosine_per=adapter.cosine_per if config.cosine_per == "auto" else config.cosine_per,
                precision=precision, teacher_dtype=teacher_dtype, teacher_store=store, compile=compile_on,
                compact_mlp=compact_mlp, compact_qk=compact_qk, kernels=_kernels(config, device),
                attention_fp32_core=fast and device.type == "cpu" and adapter.family in ATTENTION_LAYERS,
                semi_structured=two_four.semi_structured, semi_structured_choice=dict(two_four.choice),
                semi_structured_timings=two_four.record() if two_four.shapes else {}, world_size=world_size,
                rank=group.rank if group else 0, sync_bn=config.sync_bn and world_size > 1,
                compile_cache=cache if compile_on else None, order=order, reasons=reasons)
    log.debug("plan reasons: %s", reasons)
    return plan
