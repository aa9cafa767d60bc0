"""The healing engine: train only the surviving weights of a pruned model so that every block's
output aligns with the dense model's.

    import starfish_fast as sf
    result = sf.heal(pruned, dense, masks, calib_images, sf.HealConfig(epochs=5, batch_size=32))
    result.history        # [{"epoch": 1.0, "loss": 0.21}, ...]
    result.plan           # what was decided (precision, teacher store, compile, kernels, ...)
    result.ran            # what actually ran (compiled blocks, kernels per op, compacted layers)
    result.images_per_second, result.whole_call_images_per_second, result.compile_seconds

The flow: the plan is resolved (``plan.resolve_plan``) before any work; structured masks may
narrow the student (``compaction``); the teacher store runs the dense model once; one loop
drives the plan's step (``steps.ExactStep`` or ``steps.FastStep``) with resume checkpoints,
progress and metrics shared by both; the kept weights are written back. Masked weights stay
exactly zero and the student is left in eval mode. A run that finishes with a whole-model phase
(``plan.finish``) is two such runs, one after the other (``config.phase_configs``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from typing import Mapping, Sequence

import torch
from torch import nn

from starfish_fast import distributed
from starfish_fast.checkpoint import load_resume, save_resume
from starfish_fast.compaction import compact_model, expand_into, find_compactions
from starfish_fast.compensation import compensate
from starfish_fast.config import HealConfig, phase_configs
from starfish_fast.data import as_batches, split_batches
from starfish_fast.masks import apply_masks, validate_masks
from starfish_fast.models import WeightPredicate, adapter_for, enable_grad_checkpointing, freeze_all, prunable_weights
from starfish_fast.objectives import adaptive_block_weights, objective
from starfish_fast.optim import lr_schedule_values
from starfish_fast.plan import Plan, resolve_plan
from starfish_fast.progress import RunLog, join_phases
from starfish_fast.run import HealResult, RunState, run_fingerprints, steady_rate
from starfish_fast.sequential import ModelBlockSource, heal_sequential
from starfish_fast.sparsegpt import sparsegpt_update
from starfish_fast.steps import ExactStep, FastStep, student_loss
from starfish_fast.teacher import make_teacher_store

log = logging.getLogger(__name__)


def heal(pruned_model: nn.Module, dense_model: nn.Module, masks: Mapping[str, torch.Tensor], calib,
         config: HealConfig | None = None, *, labels=None, block_names: Sequence[str] | None = None,
         predicate: WeightPredicate | None = None) -> HealResult:
    """Heal ``pruned_model`` in place towards ``dense_model`` on unlabeled ``calib``.

    ``calib``: one image tensor (N, C, H, W), a list of images, or any iterable of
    batches (tensors or ``(images, labels)`` pairs; labels are dropped).
    ``masks``: ``{weight key: 0/1 or bool tensor}`` covering every weight of the scope.
    ``labels``: only for objectives that need labels (``Objective.needs_labels``). ``block_names``: default all
    blocks.
    ``predicate``: which modules' weights train (default: ``config.scope`` of the adapter).
    """
    called = time.perf_counter()
    config = config or HealConfig()
    batches = as_batches(calib, config.batch_size)
    if not batches:
        raise ValueError("calibration set is empty")
    plan = resolve_plan(config, pruned_model, calib=batches, block_names=block_names, masks=masks)
    group = distributed.current()
    if group is None or group.main:
        log.info("%s", plan.summary())
    if plan.finish != "none":
        configs, phases = phase_configs(config, plan.finish), []
        for number, phase in enumerate(configs, 1):
            if group is None or group.main:
                log.info("phase %d of 2: %s for %d epochs", number, phase.objective, phase.epochs)
            phases.append(heal(pruned_model, dense_model, masks, calib, phase, labels=labels, block_names=block_names,
                               predicate=predicate))
        result = HealResult.joined(phases, plan, config, time.perf_counter() - called)
        if group is None or group.main:
            join_phases(config, configs[1], phases[0].steps, result.step_losses, result.history)
        return result
    adapter = adapter_for(pruned_model, plan.blocks)               # the user's blocks, for everything below
    predicate = predicate or adapter.scope_predicate(plan.scope)
    masks = validate_masks(masks, pruned_model, predicate)
    warm_start = _warm_start(config, pruned_model, dense_model, masks, batches, plan.torch_device)
    if plan.order == "sequential":
        result = _heal_sequential(pruned_model, dense_model, masks, batches, config, plan, {"warm_start": warm_start})
        result.wall_seconds = time.perf_counter() - called
        return result
    compactions = find_compactions(pruned_model, masks, adapter, mlp=plan.compact_mlp, qk=plan.compact_qk,
                                   every_attention=plan.attention_fp32_core)
    facts = {"warm_start": warm_start}
    if not compactions:
        result = _heal_model(pruned_model, dense_model, masks, batches, config, plan, labels, predicate, facts)
    else:
        student, student_masks = compact_model(pruned_model, masks, compactions)
        facts["compacted"] = [item.summary() for item in compactions if item.summary()[1]]
        result = _heal_model(student, dense_model, student_masks, batches, config, plan, labels, predicate, facts)
        pruned_model.to(plan.torch_device)
        expand_into(pruned_model, student, compactions)
        apply_masks(pruned_model, masks)
        trainable = {name for name, p in student.named_parameters() if p.requires_grad}
        for name, parameter in pruned_model.named_parameters():
            parameter.requires_grad_(name in trainable)
        pruned_model.eval()
    result.wall_seconds = time.perf_counter() - called
    return result


def _start_run(student, dense, masks, batches, config: HealConfig, plan: Plan, labels, predicate) -> RunState:
    """The run's state: models on the device, every weight of the scope trainable and masked."""
    device = plan.torch_device
    group = distributed.current() if plan.world_size > 1 else None
    spec, adapter = objective(config.objective), adapter_for(student, plan.blocks)
    if spec.needs_labels and labels is None and adapter.next_token_labels:
        labels = batches                                   # a causal LM predicts its calibration text's next tokens
    labels = _label_batches(labels, batches, config) if spec.needs_labels else None
    student, dense = student.to(device), dense.to(device).eval()
    freeze_all(student)
    trainable = prunable_weights(student, predicate)       # every weight of the scope has a mask
    for p in trainable.values():
        p.requires_grad_(True)
    apply_masks(student, masks)
    checkpointing = config.grad_checkpointing and enable_grad_checkpointing(student)
    if config.grad_checkpointing and not checkpointing:
        warnings.warn(f"grad_checkpointing: {type(student).__name__} has no gradient checkpointing switch (timm's "
                      f"set_grad_checkpointing, transformers' gradient_checkpointing_enable); healing without it",
                      RuntimeWarning, stacklevel=3)
    run = RunState(
        config=config, plan=plan, objective=spec, adapter=adapter, student=student,
        dense=dense, masks=masks, global_batches=batches, batches=distributed.shard_batches(batches, group),
        labels=[y.to(device) for y in distributed.shard_batches(labels, group)] if labels is not None else None,
        keys=list(trainable), params=list(trainable.values()),
        lrs=lr_schedule_values(config.lr, config.min_lr, config.lr_schedule, config.epochs * len(batches)),
        group=group,
        block_weights=torch.tensor(config.block_weights, device=device)
        if isinstance(config.block_weights, tuple) else None,
        block_sums=torch.zeros(len(plan.blocks), device=device) if config.block_weights == "adaptive" else None)
    run.record(kernels=dict(plan.kernels), precision=plan.precision, grad_checkpointing=bool(checkpointing))
    return run


def _label_batches(labels, batches, config) -> list[torch.Tensor]:
    if labels is None:
        raise ValueError(f"objective {config.objective!r} needs labels: pass labels=[label batch per calibration "
                         f"batch]")
    split = split_batches(labels, config.batch_size) if isinstance(labels, torch.Tensor) \
        else [torch.as_tensor(y) for y in labels]
    if [len(y) for y in split] != [b.shape[0] for b in batches]:
        raise ValueError("labels do not match the calibration batches one for one")
    return split


def _heal_sequential(student, dense, masks, batches, config: HealConfig, plan: Plan, facts: dict) -> HealResult:
    """Block after block (``sequential.heal_sequential``) on the models where they are; no compaction."""
    fingerprints = run_fingerprints(config, masks, dense, batches, order=plan.order,
                                    sequential_inputs=config.sequential_inputs) \
        if (config.checkpoint_every or config.resume) else {}
    source = ModelBlockSource(student, dense, masks, plan.blocks, plan.torch_device, sample=batches[0])
    return heal_sequential(source, batches, config, plan, fingerprints=fingerprints, facts=facts)


def _warm_start(config: HealConfig, pruned_model, dense_model, masks, batches, device) -> dict | None:
    """The closed-form start before healing (``config.warm_start``), its report or None."""
    if config.warm_start == "compensate":
        return compensate(pruned_model, dense_model, masks, batches, batch_size=config.batch_size, device=device)
    if config.warm_start == "sparsegpt":
        return sparsegpt_update(pruned_model, dense_model, masks, batches, batch_size=config.batch_size,
                                device=device)
    return None


def _heal_model(student, dense, masks, batches, config: HealConfig, plan: Plan, labels, predicate,
                facts: dict) -> HealResult:
    run = _start_run(student, dense, masks, batches, config, plan, labels, predicate)
    run.record(**facts)
    fingerprints = run.fingerprints() if (config.checkpoint_every or config.resume) else {}
    # a checkpoint of another run or world size is refused before the teacher's pass
    resume = load_resume(config.checkpoint_path, fingerprints, plan.world_size) if config.resume else None
    started = time.perf_counter()
    store = make_teacher_store(plan.teacher_store, run.dense, run.adapter, plan.blocks, run.batches, run.device,
                               dtype=plan.store_dtype, compute_dtype=plan.compute_dtype,
                               keep_logits=run.objective.needs_teacher_logits, keep_blocks=run.objective.needs_blocks,
                               disk_dir=config.teacher_dir)
    run.record(teacher_store=store.kind)
    teacher_seconds = time.perf_counter() - started
    step = ExactStep(run, store) if plan.mode == "exact" else FastStep(run, store)
    with contextlib.ExitStack() as swaps:       # module swaps and compiled wrappers, undone on any exit
        try:
            swaps.enter_context(run.adapter.prepared(run.student, plan.blocks))
            if run.block_sums is not None and resume is None:
                _measure_block_damage(run, store)
            # the reference's student mode (BatchNorm statistics update); language models heal in eval mode
            run.student.train(run.adapter.train_student)
            step.setup(swaps)                   # compile probes run here, before DDP hooks the gradients
            if run.group is not None:
                _parallel(run, swaps)
            started = time.perf_counter()
            step_losses, history, steady = _loop(run, store, step, resume, fingerprints)
        finally:
            run.student.eval()
    heal_seconds = time.perf_counter() - started
    images = config.epochs * sum(b.shape[0] for b in run.global_batches)
    return HealResult(history=history, step_losses=step_losses, steps=run.total_steps, images=images,
                      teacher_seconds=teacher_seconds, heal_seconds=heal_seconds, plan=plan, ran=run.ran,
                      config=dataclasses.asdict(config), steady_images_per_second=steady)


@torch.no_grad()
def _measure_block_damage(run: RunState, store) -> None:
    """Adaptive block weights before the first step: each block's distance to the dense model over the
    calibration set (one forward pass of the pruned student, eval mode: BatchNorm statistics untouched)."""
    run.student.eval()
    with torch.autocast(run.device.type, dtype=run.plan.compute_dtype, enabled=run.plan.precision != "fp32"):
        for index, images in enumerate(run.batches):
            student_loss(run, images.to(run.device), [t.to(run.device) for t in store.get(index)], index)
    _update_block_weights(run, len(run.batches))
    run.record(block_weights_initial=run.block_weights.tolist())


def _update_block_weights(run: RunState, steps: int) -> None:
    """Adaptive weights from the blocks' mean losses over the last ``steps`` steps (all processes)."""
    distances = run.block_sums / steps
    distances = run.group.mean(distances) if run.group else distances
    run.block_weights = adaptive_block_weights(distances)
    run.block_sums.zero_()


def _parallel(run: RunState, swaps: contextlib.ExitStack) -> None:
    """DDP over the block forward (and SyncBatchNorm if asked), undone with the other swaps."""
    if run.plan.sync_bn:
        swapped = distributed.sync_batchnorm(run.student, run.device)
        swaps.callback(distributed.restore_modules, run.student, swapped)
    run.parallel = distributed.data_parallel(run.student, run.adapter, run.plan.blocks, run.device)
    swaps.callback(setattr, run, "parallel", None)


def _loop(run: RunState, store, step, resume: dict | None, fingerprints: dict
          ) -> tuple[list[float], list[dict], float]:
    """Drive ``step`` over every step, from ``resume`` if given: progress, metrics at log points, resume
    checkpoints; (per-step losses, per-epoch history, steady-state images/s). Log points are the only host
    syncs, so their times are exact: the steady-state rate is taken between the first and the last."""
    config, batches = run.config, run.batches
    losses = torch.zeros(run.total_steps, dtype=torch.float32, device=run.device)          # (S,)
    start = _resume(run, step, losses, resume) if resume is not None else 0
    run_log = RunLog(config, run.total_steps, start, main=run.main, desc=f"heal ({run.plan.mode}, {config.objective})",
                     item=run.adapter.item)
    world = run.plan.world_size
    store.prefetch(start % len(batches))
    last, marks = start, [(start, time.perf_counter())]          # (steps done, time) at each log point
    try:
        for index in range(start, run.total_steps):
            losses[index] = step(index, index % len(batches))
            run_log.stepped()
            done = index + 1
            if done % config.log_every == 0 or done == run.total_steps:
                window = losses[last:done].mean()
                window = run.group.mean(window) if run.group else window           # the global batch's loss
                run_log.logged(step=done, loss=window.item(), lr=run.lrs[index],   # the host sync
                               images=world * sum(batches[i % len(batches)].shape[0] for i in range(last, done)),
                               steps=done - last)
                marks.append((done, time.perf_counter()))
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
    return step_losses, history, steady_rate(marks if len(marks) < 3 else marks[1:], batches, world)


def _checkpoint(run: RunState, step, done: int, losses: torch.Tensor, fingerprints: dict) -> None:
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


def _resume(run: RunState, step, losses: torch.Tensor, state: dict) -> int:
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
