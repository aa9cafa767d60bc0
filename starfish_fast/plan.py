"""The plan: every ``auto`` of a ``HealConfig`` decided once, for one model on one device, from facts.

    from starfish_fast.plan import decide, resolve_plan
    plan = resolve_plan(config, model, "cuda", calib=batches)          # probe this machine, then decide
    plan.precision, plan.teacher_store, plan.kernels["cosine_loss"]      # "bf16", "device", "triton"
    print(plan.summary())                                              # the one line heal logs at INFO
    plan.reasons["compile"]          # "auto: eager: 50,000 images save 3.9 s, less than a 17 s cold compile ..."
    decide(config, adapter_for(model), Facts.for_device_kind("sm86", blocks=...))   # an A10's plan, on any machine

The flow is probe -> plan -> run: ``probe.probe`` gathers the facts (every side effect: the process group,
the GPU's memory, one forward, the 2:4 timings), ``decide`` is a pure function of the settings, the model's
adapter and those facts, applying ``rules`` (each threshold and measured table beside its results file), and
``heal`` runs the plan; every other module reads it and none decides again.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from starfish_fast import rules
from starfish_fast.config import HealConfig, finish_epochs
from starfish_fast.models import adapter_for
from starfish_fast.objectives import Objective, objective
from starfish_fast.probe import TORCH_DTYPES, Facts, probe, resolve_device  # noqa: F401  (callers import it here)
from starfish_fast.rules import COMPILE_MEASURED, CompileCost  # noqa: F401  (the README named them plan.*)
from starfish_fast.sparse24 import warn_once

log = logging.getLogger(__name__)

DTYPES = TORCH_DTYPES


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
    order: str = "joint"              # joint | sequential (block after block: sequential.py)
    finish: str = "none"              # none | kl: a last whole-model phase (config.phase_configs)
    compile_cache: str | None = None  # torch.compile's saved artifacts for this model, device and dtype
    reasons: Mapping[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()    # what the run warns about once (a forced 2:4 choice slower than dense)

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
                (f", then {self.finish} for the last epochs" if self.finish != "none" else "") +
                (f", {self.world_size} processes{' with SyncBatchNorm' if self.sync_bn else ''}"
                 if self.world_size > 1 else ""))

    def as_dict(self) -> dict:
        return {item.name: (list(value) if isinstance(value := getattr(self, item.name), tuple) else
                            dict(value) if isinstance(value, Mapping) else value) for item in dataclasses.fields(self)}


def _teacher_store(config: HealConfig, spec: Objective, facts: Facts, teacher_dtype: str) -> tuple[str, str]:
    """Each process keeps the targets of its own slices: sized by its share of the calibration images."""
    if not (spec.needs_teacher_logits or spec.needs_blocks):
        return "none", f"objective {spec.name!r} needs no teacher outputs"
    if config.teacher_store != "auto":
        if config.teacher_store == "pinned" and not facts.cuda:
            raise ValueError(f"teacher_store 'pinned' needs a CUDA device, got {facts.device}")
        return config.teacher_store, "requested"
    cache_bytes = _cache_bytes(spec, facts, teacher_dtype)
    if cache_bytes is None:
        return "device", "auto without calibration data: size unknown"
    return rules.store_rule(cache_bytes, cuda=facts.cuda, gpu_free=facts.memory_free, host_free=facts.host_free)


def _cache_bytes(spec: Objective, facts: Facts, teacher_dtype: str) -> int | None:
    """This process's teacher targets in bytes (None: not probed)."""
    if facts.calib_images is None or facts.teacher_block_elements is None:
        return None
    per_sample = (facts.teacher_block_elements if spec.needs_blocks else 0) + \
        ((facts.teacher_logit_elements or 0) if spec.needs_teacher_logits else 0)
    return per_sample * rules.DTYPE_BYTES[teacher_dtype] * (facts.calib_images // facts.world_size)


def _order(config: HealConfig, spec: Objective, facts: Facts, store: str, teacher_dtype: str) -> tuple[str, str]:
    """``order``: the joint run's size (weights, gradients, moments, and the targets where the plan keeps them
    on the device) against the device memory free for it (what the two models already hold there counts)."""
    teacher = (_cache_bytes(spec, facts, teacher_dtype) or 0) if store == "device" else 0
    moments = rules.DTYPE_BYTES["bf16" if config.moments_dtype == "bf16" and config.mode == "fast" else "fp32"]
    estimate = rules.joint_bytes(facts.weight_bytes, facts.trained_weights, teacher, moment_bytes=moments)
    return rules.order_rule(config.order, config.objective, spec.block_local, estimate,
                            facts.memory_free + facts.resident_bytes)


def _two_four(config: HealConfig, facts: Facts) -> rules.Decision:
    """The healing 2:4 choice from the probe's timings (exact mode: dense, as the reference)."""
    if config.mode == "exact":
        return dataclasses.replace(rules.decide_two_four("off", "heal", facts.two_four),
                                   reason="exact mode: dense, as the reference")
    return rules.decide_two_four(config.semi_structured, "heal", facts.two_four)


def _check(config: HealConfig, spec: Objective, facts: Facts) -> None:
    if config.sync_bn and facts.world_size > 1 and not facts.cuda:
        raise ValueError("sync_bn needs CUDA processes (SyncBatchNorm runs on GPUs); on the CPU each process "
                         "keeps its own BatchNorm statistics")
    if not facts.blocks and spec.needs_blocks:
        raise ValueError("no blocks to align: block_names is empty")
    if isinstance(config.block_weights, tuple) and len(config.block_weights) != len(facts.blocks):
        raise ValueError(f"{len(config.block_weights)} block weights for {len(facts.blocks)} blocks")


def decide(config: HealConfig, adapter, facts: Facts) -> Plan:
    """The plan for ``config`` on the model ``adapter`` stands for, from ``facts`` alone (pure: nothing is
    probed, run or timed here; ``rules`` holds every threshold)."""
    spec = objective(config.objective)
    _check(config, spec, facts)
    scope, family, fast = adapter.check_scope(config.scope), adapter.family, config.mode == "fast"
    precision, teacher_dtype, precision_reason = rules.precision_rule(
        config.mode, config.precision, config.teacher_dtype, facts.cuda, family, facts.cpu_bf16)
    compact_mlp, compact_qk, compact_reason = rules.compaction_rule(config.mode, config.compact, facts.cuda, family,
                                                                    facts.has_mlp)
    store, store_reason = _teacher_store(config, spec, facts, teacher_dtype)
    images = config.epochs * facts.calib_images // facts.world_size if facts.calib_images is not None else 0
    compile_on, compile_reason = rules.compile_rule(config.mode, config.compile, facts.device_kind, family,
                                                    facts.trained_weights, images,
                                                    facts.compile_cache_warm.get(precision, False))
    two_four = _two_four(config, facts)
    order, order_reason = _order(config, spec, facts, store, teacher_dtype)
    finish, finish_reason = rules.finish_rule(config.finish, adapter.next_token_labels, spec.block_local,
                                              order, finish_epochs(config))
    reasons = {"order": order_reason, "finish": finish_reason, "precision": precision_reason,
               "teacher_store": store_reason, "compact": compact_reason,
               "compile": compile_reason,
               "kernels": "requested" if config.kernels != "auto" else "auto: kernels/_dispatch.py table",
               "semi_structured": two_four.reason}
    return Plan(device=facts.device, mode=config.mode, family=family, scope=scope, blocks=facts.blocks,
                cosine_per=adapter.cosine_per if config.cosine_per == "auto" else config.cosine_per,
                precision=precision, teacher_dtype=teacher_dtype, teacher_store=store, compile=compile_on,
                compact_mlp=compact_mlp, compact_qk=compact_qk,
                kernels=rules.kernel_paths(config.mode, config.kernels, facts.device),
                attention_fp32_core=rules.attention_fp32_core(config.mode, facts.cuda, family),
                semi_structured=two_four.semi_structured, semi_structured_choice=dict(two_four.choice),
                semi_structured_timings=two_four.record() if two_four.shapes else {}, world_size=facts.world_size,
                rank=facts.rank, sync_bn=config.sync_bn and facts.world_size > 1,
                compile_cache=facts.compile_cache.get(precision) if compile_on and fast else None, order=order,
                finish=finish, reasons=reasons,
                warnings=(two_four.warning,) if two_four.warning else ())


def resolve_plan(config: HealConfig, model: nn.Module, device: str | torch.device | None = None, *,
                 calib: Sequence[torch.Tensor] | None = None, block_names: Sequence[str] | None = None,
                 masks: Mapping[str, torch.Tensor] | None = None, facts: Facts | None = None) -> Plan:
    """Decide every ``auto`` of ``config`` for ``model`` on ``device`` (default ``config.device``): the probe
    (``probe.probe``: ``calib`` sizes the teacher store, the compile decision and the 2:4 timing;
    ``block_names``: default all blocks; ``masks``: which linears are 2:4), then ``decide``. With ``facts``
    nothing is probed (``device``, ``calib`` and ``masks`` are then not read). The plan's warnings are raised
    once each."""
    if facts is None:
        facts = probe(config, model, device, calib=calib, block_names=block_names, masks=masks)
    plan = decide(config, adapter_for(model, block_names), facts)
    for warning in plan.warnings:
        warn_once(warning, stacklevel=3)
    log.debug("plan reasons: %s", plan.reasons)
    return plan
