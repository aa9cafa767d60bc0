"""The healing engine: train only the surviving weights of a pruned model so that every block's
output aligns with the dense model's.

    import starfish_fast as sf
    result = sf.heal(pruned, dense, masks, calib_images, sf.HealConfig(epochs=5, batch_size=32))
    result.history        # [{"epoch": 1.0, "loss": 0.21}, ...]
    result.plan           # what was decided (precision, teacher store, compile, kernels, ...)
    result.ran            # what actually ran (compiled blocks, kernels per op, compacted layers)

The flow: the plan is resolved (``plan.resolve_plan``) before any work; structured masks may
narrow the student (``compaction``); the teacher store runs the dense model once; one loop
drives the plan's step (``steps.ExactStep`` or ``steps.FastStep``) with resume checkpoints,
progress and metrics shared by both; the kept weights are written back. Masked weights stay
exactly zero and the student is left in eval mode.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from starfish_fast import distributed, objectives
from starfish_fast.checkpoint import load_resume, save_resume, tensor_fingerprint
from starfish_fast.compaction import compact_model, compaction_plan, expand_into
from starfish_fast.compensation import compensate
from starfish_fast.config import HealConfig
from starfish_fast.data import as_batches, split_batches
from starfish_fast.masks import apply_masks, validate_masks
from starfish_fast.models import WeightPredicate, adapter_for, freeze_all, prunable_weights
from starfish_fast.plan import Plan, resolve_plan
from starfish_fast.progress import RunLog
from starfish_fast.steps import ExactStep, FastStep, student_loss
from starfish_fast.teacher import make_teacher_store

log = logging.getLogger(__name__)


@dataclass
class HealResult:
    history: list[dict[str, float]]        # one {"epoch": e, "loss": mean} per epoch, e from 1
    step_losses: list[float]
    steps: int
    images: int
    teacher_seconds: float                 # the dense pass that fills the teacher store
    heal_seconds: float                    # the training loop
    plan: Plan
    ran: dict = field(default_factory=dict)       # what actually ran: compile per block, kernels per op, ...
    config: dict = field(default_factory=dict)    # the HealConfig as given

    @property
    def images_per_second(self) -> float:
        return self.images / self.heal_seconds if self.heal_seconds > 0 else float("nan")

    @property
    def wall_seconds(self) -> float:
        return self.teacher_seconds + self.heal_seconds

    @property
    def teacher_store(self) -> str:
        return self.ran.get("teacher_store", self.plan.teacher_store)

    @property
    def mode(self) -> str:
        return self.plan.mode

    @property
    def device(self) -> str:
        return self.plan.device


def heal(pruned_model: nn.Module, dense_model: nn.Module, masks: Mapping[str, torch.Tensor], calib,
         config: HealConfig | None = None, *, labels=None, block_names: Sequence[str] | None = None,
         predicate: WeightPredicate | None = None) -> HealResult:
    """Heal ``pruned_model`` in place towards ``dense_model`` on unlabeled ``calib``.

    ``calib``: one image tensor (N, C, H, W), a list of images, or any iterable of
    batches (tensors or ``(images, labels)`` pairs; labels are dropped).
    ``masks``: ``{weight key: 0/1 or bool tensor}`` covering every weight of the scope.
    ``labels``: only for ``objective="ce"``. ``block_names``: default all blocks.
    ``predicate``: which modules' weights train (default: ``config.scope`` of the adapter).
    """
    config = config or HealConfig()
    batches = as_batches(calib, config.batch_size)
    if not batches:
        raise ValueError("calibration set is empty")
    plan = resolve_plan(config, pruned_model, calib=batches, block_names=block_names)
    group = distributed.current()
    if group is None or group.main:
        log.info("%s", plan.summary())
    predicate = predicate or adapter_for(pruned_model, plan.blocks).scope_predicate(plan.scope)
    masks = validate_masks(masks, pruned_model, predicate)
    warm_start = compensate(pruned_model, dense_model, masks, batches, batch_size=config.batch_size,
                            device=plan.torch_device) if config.warm_start == "compensate" else None
    narrowing = compaction_plan(pruned_model, masks, mlp=plan.compact_mlp, qk=plan.compact_qk,
                                every_attention=plan.attention_fp32_core)
    if not narrowing:
        result = _heal_model(pruned_model, dense_model, masks, batches, config, plan, labels, predicate)
        result.ran["warm_start"] = warm_start
        return result
    student, student_masks = compact_model(pruned_model, masks, narrowing)
    result = _heal_model(student, dense_model, student_masks, batches, config, plan, labels, predicate)
    result.ran.update(compacted=[item.summary() for item in narrowing if item.summary()[1]], warm_start=warm_start)
    pruned_model.to(plan.torch_device)
    expand_into(pruned_model, student, narrowing)
    apply_masks(pruned_model, masks)
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    for name, parameter in pruned_model.named_parameters():
        parameter.requires_grad_(name in trainable)
    pruned_model.eval()
    return result


class _Run:
    """What one healing run works on, shared by the loop and both steps. Under torchrun ``batches`` are
    this process's slices of the global batches (``global_batches``), and ``forward`` goes through DDP."""

    def __init__(self, student, dense, masks, batches, config: HealConfig, plan: Plan, labels, predicate):
        self.config, self.plan, self.device = config, plan, plan.torch_device
        self.group = distributed.current() if plan.world_size > 1 else None
        self.adapter = adapter_for(student, plan.blocks)
        self.masks, self.global_batches = masks, batches
        self.batches = distributed.shard_batches(batches, self.group)
        labels = _label_batches(labels, batches, config) if config.objective == "ce" else None
        self.labels = distributed.shard_batches(labels, self.group) if labels is not None else None
        self.student, self.dense = student.to(self.device), dense.to(self.device).eval()
        self.total_steps = config.epochs * len(batches)
        self.parallel = None                # the DDP wrapper of the block forward, when several processes
        # block weights on the device (None: uniform); adaptive ones are re-estimated every epoch from the
        # blocks' losses summed in block_sums (objectives.adaptive_block_weights)
        self.block_weights = torch.tensor(config.block_weights, device=self.device) \
            if isinstance(config.block_weights, tuple) else None
        self.block_sums = torch.zeros(len(plan.blocks), device=self.device) \
            if config.block_weights == "adaptive" else None
        self.ran: dict = {"kernels": dict(plan.kernels), "precision": plan.precision}
        freeze_all(self.student)
        trainable = prunable_weights(self.student, predicate)       # every weight of the scope has a mask
        self.keys = list(trainable)
        self.params = [trainable[key] for key in self.keys]
        for p in self.params:
            p.requires_grad_(True)
        apply_masks(self.student, masks)
        if config.grad_checkpointing and hasattr(self.student, "set_grad_checkpointing"):
            self.student.set_grad_checkpointing(True)

    def forward(self, images: torch.Tensor, need_logits: bool):
        """The student's logits (when needed) and the plan's block outputs."""
        if self.parallel is not None:
            return self.parallel(images, need_logits)
        return self.adapter.forward_blocks(self.student, images, self.plan.blocks, need_logits=need_logits)

    @property
    def main(self) -> bool:
        return self.group is None or self.group.main

    def fingerprints(self) -> dict[str, str]:
        settings = ("epochs", "lr", "min_lr", "lr_schedule", "weight_decay", "grad_clip", "batch_size", "mode",
                    "objective", "precision", "moments_dtype", "block_weights", "warm_start")
        return {"masks": tensor_fingerprint(self.masks),
                "dense_model": tensor_fingerprint(self.dense.state_dict()),
                "calibration": tensor_fingerprint({str(i): b for i, b in enumerate(self.global_batches)}),
                "config": json.dumps({k: v for k, v in dataclasses.asdict(self.config).items() if k in settings},
                                     sort_keys=True)}


def _label_batches(labels, batches, config) -> list[torch.Tensor]:
    if labels is None:
        raise ValueError("objective 'ce' needs labels: pass labels=[label batch per calibration batch]")
    split = split_batches(labels, config.batch_size) if isinstance(labels, torch.Tensor) \
        else [torch.as_tensor(y) for y in labels]
    if [len(y) for y in split] != [b.shape[0] for b in batches]:
        raise ValueError("labels do not match the calibration batches one for one")
    return split


def _heal_model(student, dense, masks, batches, config: HealConfig, plan: Plan, labels, predicate) -> HealResult:
    run = _Run(student, dense, masks, batches, config, plan, labels, predicate)
    fingerprints = run.fingerprints() if (config.checkpoint_every or config.resume) else {}
    # a checkpoint of another run or world size is refused before the teacher's pass
    resume = load_resume(config.checkpoint_path, fingerprints, plan.world_size) if config.resume else None
    started = time.perf_counter()
    store = make_teacher_store(plan.teacher_store, run.dense, run.adapter, plan.blocks, run.batches, run.device,
                               dtype=plan.store_dtype, compute_dtype=plan.compute_dtype,
                               keep_logits=objectives.needs_teacher_logits(config.objective),
                               keep_blocks=objectives.needs_blocks(config.objective), disk_dir=config.teacher_dir)
    run.ran["teacher_store"] = store.kind
    teacher_seconds = time.perf_counter() - started
    step = ExactStep(run, store) if plan.mode == "exact" else FastStep(run, store)
    started = time.perf_counter()
    with contextlib.ExitStack() as swaps:       # module swaps and compiled wrappers, undone on any exit
        try:
            swaps.enter_context(run.adapter.prepared(run.student, plan.blocks))
            if run.block_sums is not None and resume is None:
                _measure_block_damage(run, store)
            run.student.train()                 # the reference's student mode (BatchNorm statistics update)
            step.setup(swaps)                   # compile probes run here, before DDP hooks the gradients
            if run.group is not None:
                _parallel(run, swaps)
            step_losses, history = _loop(run, store, step, resume, fingerprints)
        finally:
            run.student.eval()
    heal_seconds = time.perf_counter() - started
    return HealResult(history=history, step_losses=step_losses, steps=run.total_steps,
                      images=config.epochs * sum(b.shape[0] for b in run.global_batches),
                      teacher_seconds=teacher_seconds,
                      heal_seconds=heal_seconds, plan=plan, ran=run.ran, config=dataclasses.asdict(config))


@torch.no_grad()
def _measure_block_damage(run: _Run, store) -> None:
    """Adaptive block weights before the first step: each block's distance to the dense model over the
    calibration set (one forward pass of the pruned student, eval mode: BatchNorm statistics untouched)."""
    run.student.eval()
    with torch.autocast(run.device.type, dtype=run.plan.compute_dtype, enabled=run.plan.precision != "fp32"):
        for index, images in enumerate(run.batches):
            student_loss(run, images.to(run.device), [t.to(run.device) for t in store.get(index)], index)
    _update_block_weights(run, len(run.batches))
    run.ran["block_weights_initial"] = run.block_weights.tolist()


def _update_block_weights(run: _Run, steps: int) -> None:
    """Adaptive weights from the blocks' mean losses over the last ``steps`` steps (all processes)."""
    distances = run.block_sums / steps
    distances = run.group.mean(distances) if run.group else distances
    run.block_weights = objectives.adaptive_block_weights(distances)
    run.block_sums.zero_()


def _parallel(run: _Run, swaps: contextlib.ExitStack) -> None:
    """DDP over the block forward (and SyncBatchNorm if asked), undone with the other swaps."""
    if run.plan.sync_bn:
        swapped = distributed.sync_batchnorm(run.student, run.device)
        swaps.callback(distributed.restore_modules, run.student, swapped)
    run.parallel = distributed.data_parallel(run.student, run.adapter, run.plan.blocks, run.device)
    swaps.callback(setattr, run, "parallel", None)


def _loop(run: _Run, store, step, resume: dict | None, fingerprints: dict) -> tuple[list[float], list[dict]]:
    """Drive ``step`` over every step, from ``resume`` if given: progress, metrics at log points, resume
    checkpoints; (per-step losses, per-epoch history)."""
    config, batches = run.config, run.batches
    losses = torch.zeros(run.total_steps, dtype=torch.float32, device=run.device)          # (S,)
    start = _resume(run, step, losses, resume) if resume is not None else 0
    run_log = RunLog(config, run.total_steps, start, main=run.main, desc=f"heal ({run.plan.mode})")
    world = run.plan.world_size
    store.prefetch(start % len(batches))
    last = start
    try:
        for index in range(start, run.total_steps):
            losses[index] = step(index, index % len(batches))
            done = index + 1
            if done % config.log_every == 0 or done == run.total_steps:
                window = losses[last:done].mean()
                window = run.group.mean(window) if run.group else window           # the global batch's loss
                run_log.logged(step=done, loss=window.item(), lr=step.lr(index),   # the host sync
                               images=world * sum(batches[i % len(batches)].shape[0] for i in range(last, done)),
                               steps=done - last)
                last = done
            if run.block_sums is not None and done % len(batches) == 0:
                _update_block_weights(run, len(batches))      # once an epoch: every batch seen, no extra pass
            if config.checkpoint_every and done % config.checkpoint_every == 0:
                _checkpoint(run, step, done, losses, fingerprints)
    except BaseException:
        run_log.abort()
        raise
    step_losses, per_epoch = (run.group.mean(losses) if run.group else losses).tolist(), len(batches)
    history = [{"epoch": float(e + 1), "loss": sum(step_losses[e * per_epoch:(e + 1) * per_epoch]) / per_epoch}
               for e in range(config.epochs)]
    run_log.finish(step_losses, history)
    return step_losses, history


def _checkpoint(run: _Run, step, done: int, losses: torch.Tensor, fingerprints: dict) -> None:
    """A resume checkpoint after ``done`` steps: model and optimizer (the same on every process), the
    losses so far and every process's RNG states; written by rank 0, behind a barrier."""
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(run.device)
           if run.device.type == "cuda" else None}
    so_far = run.group.mean(losses[:done]) if run.group else losses[:done]        # the global batches' losses
    state = {"step": done, "model": run.student.state_dict(), "optimizer": step.state_dict(),
             "step_losses": so_far.tolist(), "fingerprints": fingerprints, "world_size": run.plan.world_size,
             "rng": run.group.gather(rng) if run.group else [rng],
             "block_weights": run.block_weights, "block_sums": run.block_sums}
    if run.main:
        save_resume(run.config.checkpoint_path, state)
    if run.group:
        run.group.barrier()                    # nobody runs ahead of a checkpoint that is not written yet


def _resume(run: _Run, step, losses: torch.Tensor, state: dict) -> int:
    """Load a resume checkpoint into the student, the step's optimizer and ``losses``; the step to start at."""
    run.student.load_state_dict(state["model"], strict=True)
    step.load_state_dict(state["optimizer"])
    losses[:state["step"]] = torch.tensor(state["step_losses"], dtype=torch.float32)
    run.block_weights, run.block_sums = state["block_weights"], state["block_sums"]
    rng = state["rng"][run.plan.rank]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and run.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], run.device)
    if run.main:
        log.info("resuming from %s at step %d", run.config.checkpoint_path, state["step"])
    return state["step"]
