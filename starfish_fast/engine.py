"""The healing engine: train only the surviving weights of a pruned model so that
every block's output aligns with the dense model's.

    import starfish_fast as sf
    result = sf.heal(pruned, dense, masks, calib_images, sf.HealConfig(epochs=5, batch_size=32))
    result.history        # [{"epoch": 1.0, "loss": 0.21}, ...]

Two modes of one loop:
``exact``  the reference semantics step for step: fp32, torch Adam/AdamW (non-foreach),
           per-step ``CosineAnnealingLR``, gradient hooks, masks re-applied after every
           step, loss read every step.
``fast``   (default) bf16 autocast and per-block ``torch.compile`` on CUDA, masked fused
           Adam (the mask folded into the step), learning rate from a device tensor,
           teacher targets from the teacher store, loss accumulated on the device and
           read only every ``log_every`` steps.
Both keep masked weights exactly zero and leave the student in eval mode.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from starfish_fast import objectives
from starfish_fast.checkpoint import load_tensor_file, save_torch_atomic
from starfish_fast.compaction import compact_model, compaction_plan, expand_into
from starfish_fast.data import as_batches, split_batches
from starfish_fast.kernels._dispatch import use_triton
from starfish_fast.masks import apply_masks, register_zero_freeze_hooks, validate_masks
from starfish_fast.models import WeightPredicate, adapter_for, freeze_all, prunable_weights, set_submodule
from starfish_fast.optim import MaskedAdam
from starfish_fast.sparse24 import convert_linears, restore_linears
from starfish_fast.teacher import STORE_KINDS, MemoryStore, make_teacher_store

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RESUME_FORMAT = "starfish_fast.resume/1"


@dataclass
class HealConfig:
    """Healing hyper-parameters and engine settings. ``HealConfig.from_dict`` rejects unknown keys."""

    epochs: int = 10
    lr: float = 6e-4
    min_lr: float = 1e-6
    lr_schedule: str = "cosine"            # cosine | constant
    weight_decay: float = 0.0              # 0 -> Adam, else AdamW (reference rule)
    grad_clip: float = 0.0                 # > 0 clips the total norm of the masked gradients
    batch_size: int = 32
    scope: str = "auto"                    # prune scope of the adapter; auto = its default
    mode: str = "fast"                     # fast | exact
    objective: str = "starfish"            # starfish | mse | kl | ce | starfish+kl
    cosine_per: str = "auto"               # auto (token for (B,T,D), sample otherwise) | token | sample
    block_weights: tuple[float, ...] | None = None
    precision: str = "auto"                # auto (bf16 on CUDA and, for wide layers, bf16 CPUs) | fp32 | bf16 | fp16
    compile: str = "auto"                  # auto (on for CUDA) | on | off
    teacher_store: str = "auto"            # auto | gpu | pinned | disk | recompute | memory
    teacher_dtype: str = "auto"            # auto (fp16 exact / fp32 compute, bf16 with bf16 compute) | fp16 | bf16 | fp32
    teacher_dir: str | None = None         # directory of the disk store
    moments_dtype: str = "fp32"            # fp32 | bf16 (fast mode)
    kernels: str = "auto"                  # auto | triton | torch: the loss/optimizer implementation
    # drop fully pruned MLP neurons and QK dims from the products; auto = fast mode, QK dims on CPU only
    compact: str = "auto"                  # auto | on | off
    # on: 2:4-masked linears run their forward through to_sparse_semi_structured (CUDA; else a
    # warned fallback). auto = off until bench_sparse24.py measures a gain on the GPU at hand.
    semi_structured: str = "auto"          # auto | on | off
    grad_checkpointing: bool = False
    device: str | None = None              # default: cuda if available, else cpu
    log_every: int = 10                    # steps between loss reads (host syncs) in fast mode
    checkpoint_every: int = 0              # steps between resume checkpoints; 0 = none
    checkpoint_path: str | None = None
    resume: bool = False                   # continue from checkpoint_path if it exists
    metrics_path: str | None = None        # JSON lines, one per logged step and per epoch
    plot_path: str | None = None           # PNG of the loss curve
    progress: bool = True

    def __post_init__(self):
        choices = {"lr_schedule": ("cosine", "constant"), "mode": ("fast", "exact"),
                   "objective": objectives.OBJECTIVES, "cosine_per": ("auto", "token", "sample"),
                   "precision": ("auto", *DTYPES), "compile": ("auto", "on", "off"),
                   "teacher_store": STORE_KINDS, "teacher_dtype": ("auto", *DTYPES),
                   "moments_dtype": ("fp32", "bf16"), "kernels": ("auto", "triton", "torch"),
                   "compact": ("auto", "on", "off"), "semi_structured": ("auto", "on", "off")}
        if isinstance(self.compile, bool):
            self.compile = "on" if self.compile else "off"
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"HealConfig.{key}={getattr(self, key)!r}; allowed: {', '.join(allowed)}")
        if self.epochs <= 0:
            raise ValueError(f"HealConfig.epochs must be positive, got {self.epochs}")
        if self.batch_size <= 0:
            raise ValueError(f"HealConfig.batch_size must be positive, got {self.batch_size}")
        for key in ("lr", "min_lr", "weight_decay", "grad_clip"):
            if not math.isfinite(getattr(self, key)) or getattr(self, key) < 0:
                raise ValueError(f"HealConfig.{key} must be finite and >= 0, got {getattr(self, key)}")
        if self.log_every <= 0:
            raise ValueError(f"HealConfig.log_every must be positive, got {self.log_every}")
        if (self.checkpoint_every > 0 or self.resume) and not self.checkpoint_path:
            raise ValueError("HealConfig.checkpoint_path is needed for checkpoint_every > 0 or resume")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "HealConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown HealConfig keys {unknown}; allowed: {sorted(known)}")
        return cls(**values)


@dataclass
class HealResult:
    history: list[dict[str, float]]        # one {"epoch": e, "loss": mean} per epoch, e from 1
    step_losses: list[float]
    steps: int
    images: int
    teacher_seconds: float                 # the dense pass that fills the teacher store
    heal_seconds: float                    # the training loop
    teacher_store: str
    mode: str
    device: str
    config: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images / self.heal_seconds if self.heal_seconds > 0 else float("nan")

    @property
    def wall_seconds(self) -> float:
        return self.teacher_seconds + self.heal_seconds


# ----------------------------------------------------------------------------- helpers
def resolve_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def lr_schedule_values(config: HealConfig, total_steps: int) -> list[float]:
    """Per-step learning rates: closed-form cosine from lr to min_lr over total_steps, or constant."""
    if config.lr_schedule == "constant":
        return [config.lr] * total_steps
    return [config.min_lr + (config.lr - config.min_lr) * (1 + math.cos(math.pi * t / total_steps)) / 2
            for t in range(total_steps)]


def tensor_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(value.shape)}:{value.dtype};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _resolve_dtypes(config: HealConfig, device: torch.device, model_kind: str) -> tuple[torch.dtype, torch.dtype]:
    """(compute precision, teacher store dtype); ``model_kind``: the adapter's "vit" or "mobilenet".

    ``auto`` on CPU, measured in fast mode on the 2-core AMD EPYC (AVX512-BF16), best of 4 runs:
    bf16 autocast healed ViTs about 2x faster than fp32 (bundled model 1784 vs 1057 img/s at batch
    64, DeiT-tiny 40.8 vs 20.1 at batch 16) once the attention core runs in fp32 (compaction.py),
    but the MobileNetV1-style CNN 0.61x as fast (2161 vs 3564 img/s): bf16 for ViTs only."""
    if config.mode == "exact":
        precision = torch.float32
        teacher = DTYPES["fp16" if config.teacher_dtype == "auto" else config.teacher_dtype]
        return precision, teacher
    if config.precision != "auto":
        precision = DTYPES[config.precision]
    else:
        cpu_bf16 = cpu_has_native_bf16() and model_kind == "vit"
        precision = torch.bfloat16 if device.type == "cuda" or cpu_bf16 else torch.float32
    if config.teacher_dtype != "auto":
        return precision, DTYPES[config.teacher_dtype]
    return precision, torch.bfloat16 if precision == torch.bfloat16 else torch.float16


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN runs bf16 GEMMs natively (4x the fp32 GEMM rate at 3200x64x192
    on the 2-core AMD EPYC with AVX512-BF16 here: 767 vs 173 GFLOP/s)."""
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def _loss_fn(config: HealConfig) -> Callable:
    """The objective; fast mode lets the kernels' dispatch pick the fused Triton loss (CUDA)."""
    kernels = config.kernels if config.mode == "fast" else "torch"

    def loss(**kwargs):
        return objectives.objective_loss(config.objective, per=config.cosine_per, block_weights=config.block_weights,
                                         kernels=kernels, **kwargs)
    return loss


def _write_metrics(path: str | None, record: dict) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def plot_loss_curve(step_losses: Sequence[float], history: Sequence[dict], path: str | os.PathLike,
                    title: str = "STARFISH healing loss") -> None:
    """PNG of the per-step loss and the per-epoch mean (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from starfish_fast.checkpoint import atomic_path

    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(range(1, len(step_losses) + 1), step_losses, lw=1, alpha=0.6, label="step")
    steps_per_epoch = len(step_losses) / max(1, len(history))
    axis.plot([steps_per_epoch * h["epoch"] for h in history], [h["loss"] for h in history], "o-",
              label="epoch mean")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


# ----------------------------------------------------------------------------- the engine
class _Run:
    """State of one healing run, shared by the exact and fast loops."""

    def __init__(self, pruned_model, dense_model, masks, calib, config, labels, block_names, predicate):
        self.config = config
        self.device = resolve_device(config.device)
        self.adapter = adapter_for(pruned_model)
        self.block_names = list(block_names) if block_names is not None else self.adapter.block_names(pruned_model)
        if not self.block_names and objectives.needs_blocks(config.objective):
            raise ValueError("no blocks to align: block_names is empty")
        self.predicate: WeightPredicate = predicate or self.adapter.scope_predicate(config.scope)
        self.masks = validate_masks(masks, pruned_model, self.predicate)
        self.batches = as_batches(calib, config.batch_size)
        if not self.batches:
            raise ValueError("calibration set is empty")
        self.labels = None
        if config.objective == "ce":
            if labels is None:
                raise ValueError("objective 'ce' needs labels: pass labels=[label batch per calibration batch]")
            self.labels = split_batches(labels, config.batch_size) if isinstance(labels, torch.Tensor) \
                else [torch.as_tensor(y) for y in labels]
            if [len(y) for y in self.labels] != [b.shape[0] for b in self.batches]:
                raise ValueError("labels do not match the calibration batches one for one")
        self.student, self.dense = pruned_model.to(self.device), dense_model.to(self.device).eval()
        self.total_steps = config.epochs * len(self.batches)

        freeze_all(self.student)
        trainable = prunable_weights(self.student, self.predicate)   # every weight of the scope has a mask
        self.keys = list(trainable)
        self.params = [trainable[key] for key in self.keys]
        self.precision, self.teacher_dtype = _resolve_dtypes(config, self.device, self.adapter.kind)
        for p in self.params:
            p.requires_grad_(True)
        apply_masks(self.student, self.masks)
        if config.grad_checkpointing and hasattr(self.student, "set_grad_checkpointing"):
            self.student.set_grad_checkpointing(True)

    def fingerprints(self) -> dict[str, str]:
        return {"masks": tensor_fingerprint(self.masks),
                "dense_model": tensor_fingerprint(self.dense.state_dict()),
                "calibration": tensor_fingerprint({str(i): b for i, b in enumerate(self.batches)}),
                "config": json.dumps({k: v for k, v in dataclasses.asdict(self.config).items()
                                      if k in ("epochs", "lr", "min_lr", "lr_schedule", "weight_decay", "grad_clip",
                                               "batch_size", "mode", "objective", "precision", "moments_dtype")},
                                     sort_keys=True)}


def _save_resume(run: _Run, path: str, step: int, optimizer_state: dict, scheduler_state: dict | None,
                 step_losses: list, fingerprints: dict) -> None:
    state = {"format": RESUME_FORMAT, "step": step, "model": run.student.state_dict(),
             "optimizer": optimizer_state, "scheduler": scheduler_state, "step_losses": list(step_losses),
             "fingerprints": fingerprints, "rng": torch.get_rng_state()}
    if run.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(run.device)
    save_torch_atomic(state, path)


def _load_resume(run: _Run, path: str, fingerprints: dict) -> dict | None:
    if not os.path.exists(path):
        log.info("no checkpoint at %s: starting from step 0", path)
        return None
    state = load_tensor_file(path)
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise ValueError(f"{path} is not a starfish_fast resume checkpoint (format {RESUME_FORMAT})")
    for key, value in fingerprints.items():
        if state["fingerprints"].get(key) != value:
            raise ValueError(f"refusing to resume from {path}: the {key.replace('_', ' ')} differs from the "
                             f"checkpoint's (fingerprint {state['fingerprints'].get(key, '?')[:12]} vs {value[:12]})")
    run.student.load_state_dict(state["model"], strict=True)
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and run.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], run.device)
    log.info("resuming from %s at step %d", path, state["step"])
    return state


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
    fast_auto = config.compact == "auto" and config.mode == "fast"
    on_cpu = resolve_device(config.device).type == "cpu"
    narrow_mlp = config.compact == "on" or fast_auto
    # QK dims: measured faster on CPU (bench_compaction.py); on CUDA unmeasured (q/k narrower than v
    # rules out the flash SDPA kernel), so only with compact="on" there until a GPU run decides.
    narrow_qk = config.compact == "on" or (fast_auto and on_cpu)
    # fast mode on CPU: attention modules whose core runs fp32 under bf16 autocast (compaction.py)
    cpu_attention = config.mode == "fast" and on_cpu
    if narrow_mlp or narrow_qk or cpu_attention:
        predicate = predicate or adapter_for(pruned_model).scope_predicate(config.scope)
        validated = validate_masks(masks, pruned_model, predicate)
        plan = compaction_plan(pruned_model, validated, mlp=narrow_mlp, qk=narrow_qk, every_attention=cpu_attention)
        if plan:
            student, student_masks = compact_model(pruned_model, validated, plan)
            result = _heal_model(student, dense_model, student_masks, calib, config, labels, block_names, predicate)
            pruned_model.to(resolve_device(config.device))
            expand_into(pruned_model, student, plan)
            apply_masks(pruned_model, validated)
            trainable = {name for name, p in student.named_parameters() if p.requires_grad}
            for name, parameter in pruned_model.named_parameters():
                parameter.requires_grad_(name in trainable)
            pruned_model.eval()
            return result
    return _heal_model(pruned_model, dense_model, masks, calib, config, labels, block_names, predicate)


def _heal_model(pruned_model, dense_model, masks, calib, config: HealConfig, labels, block_names,
                predicate) -> HealResult:
    run = _Run(pruned_model, dense_model, masks, calib, config, labels, block_names, predicate)
    started = time.perf_counter()
    keep_blocks, keep_logits = objectives.needs_blocks(config.objective), objectives.needs_teacher_logits(config.objective)
    store = MemoryStore([[] for _ in run.batches], "none") if not (keep_blocks or keep_logits) else make_teacher_store(
        config.teacher_store, run.dense, run.adapter, run.block_names, run.batches, run.device, dtype=run.teacher_dtype,
        compute_dtype=run.precision, keep_logits=keep_logits, keep_blocks=keep_blocks, disk_dir=config.teacher_dir)
    teacher_seconds = time.perf_counter() - started
    loop = _exact_loop if config.mode == "exact" else _fast_loop
    started = time.perf_counter()
    try:
        step_losses = loop(run, store)
    finally:
        run.student.eval()
    heal_seconds = time.perf_counter() - started
    steps_per_epoch = len(run.batches)
    history = [{"epoch": float(e + 1), "loss": sum(step_losses[e * steps_per_epoch:(e + 1) * steps_per_epoch])
                / steps_per_epoch} for e in range(config.epochs)]
    for record in history:
        _write_metrics(config.metrics_path, {"type": "epoch", **record})
    if config.plot_path:
        plot_loss_curve(step_losses, history, config.plot_path)
    images = config.epochs * sum(b.shape[0] for b in run.batches)
    return HealResult(history=history, step_losses=step_losses, steps=run.total_steps, images=images,
                      teacher_seconds=teacher_seconds, heal_seconds=heal_seconds, teacher_store=store.kind,
                      mode=config.mode, device=str(run.device), config=dataclasses.asdict(config))


def _progress(run: _Run, start_step: int):
    return tqdm(total=run.total_steps, initial=start_step, disable=not run.config.progress, unit="step",
                desc=f"heal ({run.config.mode})", dynamic_ncols=True)


def _student_loss(run: _Run, loss_fn, images, targets, index, need_logits):
    logits, reps = run.adapter.forward_blocks(run.student, images, run.block_names, need_logits=need_logits)
    fused_loss = run.config.objective in ("starfish", "starfish+kl") and run.config.block_weights is None \
        and use_triton("cosine_loss", images, run.config.kernels)
    if run.precision != torch.float32 and not fused_loss:
        # the torch losses in fp32 (the fused kernel accumulates in fp32 itself)
        reps = [r.float() for r in reps]
        logits = logits.float() if logits is not None else None
    has_blocks = objectives.needs_blocks(run.config.objective)
    teacher_reps = targets[:len(run.block_names)] if has_blocks else None
    teacher_logits = targets[-1] if objectives.needs_teacher_logits(run.config.objective) else None
    labels = run.labels[index].to(run.device) if run.labels is not None else None
    return loss_fn(student_reps=reps, teacher_reps=teacher_reps, student_logits=logits,
                   teacher_logits=teacher_logits, labels=labels)


def _exact_loop(run: _Run, store) -> list[float]:
    """The reference's step: hooks mask the gradients, torch Adam/AdamW, masks re-applied, a sync per step."""
    config = run.config
    if config.weight_decay == 0:
        optimizer = torch.optim.Adam(run.params, lr=config.lr, foreach=False)
    else:
        optimizer = torch.optim.AdamW(run.params, lr=config.lr, weight_decay=config.weight_decay, foreach=False)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=run.total_steps, eta_min=config.min_lr) \
        if config.lr_schedule == "cosine" else None
    # on the device once: re-applying CPU masks every step would copy them host-to-device each time
    device_masks = {key: mask.to(run.device) for key, mask in run.masks.items()}
    handles = register_zero_freeze_hooks(run.student, device_masks)
    fingerprints = run.fingerprints() if (config.checkpoint_every or config.resume) else {}
    step_losses: list[float] = []
    start = 0
    if config.resume:
        state = _load_resume(run, config.checkpoint_path, fingerprints)
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(state["scheduler"])
            start, step_losses = state["step"], list(state["step_losses"])
    loss_fn = _loss_fn(config)
    run.student.train()
    bar = _progress(run, start)
    tick = time.perf_counter()
    try:
        for step in range(start, run.total_steps):
            index = step % len(run.batches)
            images = run.batches[index].to(run.device)
            targets = [t.to(run.device) for t in store.get(index)]
            loss = _student_loss(run, loss_fn, images, targets, index, need_logits=True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in run.params if p.grad is not None]
            total_norm = torch.nn.utils.get_total_norm(grads)
            if config.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(run.params, config.grad_clip, total_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            apply_masks(run.student, device_masks)
            step_losses.append(loss.item())     # a host sync every step, as the reference (exact mode only)
            now = time.perf_counter()
            bar.update(1)
            bar.set_postfix(loss=f"{step_losses[-1]:.4f}", img_s=f"{images.shape[0] / (now - tick):.0f}")
            tick = now
            if step % config.log_every == 0:
                _write_metrics(config.metrics_path, {"type": "step", "step": step + 1, "loss": step_losses[-1],
                                                     "grad_norm": float(total_norm),
                                                     "lr": optimizer.param_groups[0]["lr"]})
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
                _save_resume(run, config.checkpoint_path, step + 1, optimizer.state_dict(),
                             scheduler.state_dict() if scheduler is not None else None, step_losses, fingerprints)
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
    return step_losses


def _compile_blocks(run: _Run) -> contextlib.ExitStack:
    """Regional compile: each block compiled once (identical blocks share the compiled code).

    Every distinct block shape (compacted widths can differ per block) and batch size is one
    cache entry of the shared code object; past dynamo's default limit of 8 the rest would run
    eager with only a warning, so the limit is raised for the run. ``close()`` on the returned
    stack restores it and removes the compiled wrappers (the caller's model is not left compiled)."""
    blocks = run.adapter._blocks(run.student)
    for block in blocks:
        block.compile(dynamic=False)
    shapes = {tuple(tuple(p.shape) for p in block.parameters()) for block in blocks}
    limit = max(8, 2 * len(shapes) * len({b.shape[0] for b in run.batches}))
    limits = {"recompile_limit": limit, "accumulated_recompile_limit": max(256, 4 * limit)}
    cleanup = contextlib.ExitStack()
    cleanup.enter_context(torch._dynamo.config.patch(   # names of torch >= 2.7 (cache_size_limit before)
        {name: value for name, value in limits.items() if hasattr(torch._dynamo.config, name)}))
    cleanup.callback(lambda: [setattr(block, "_compiled_call_impl", None) for block in blocks])
    return cleanup


def _swap_in_masked_linears(run: _Run) -> list[tuple[str, nn.Linear]]:
    """Replace the trained ``nn.Linear`` layers by the Triton ``MaskedLinear`` (same Parameters)."""
    from starfish_fast.kernels import MaskedLinear

    swapped = []
    for key in run.keys:
        path = key.rpartition(".")[0]
        module = run.student.get_submodule(path)
        if type(module) is nn.Linear:
            layer = MaskedLinear.from_linear(module, run.masks[key].to(run.device, torch.bool))
            layer.kernel = True
            set_submodule(run.student, path, layer)
            swapped.append((path, module))
    return swapped


def _fast_loop(run: _Run, store) -> list[float]:
    """Mask folded into a fused Adam step, lr from a device tensor, no host sync between log points."""
    config, device = run.config, run.device
    compile_on = config.compile == "on" or (config.compile == "auto" and device.type == "cuda")
    sparse_layers = convert_linears(run.student, run.masks, compute_dtype=run.precision) \
        if config.semi_structured == "on" else []
    # The masked-linear kernel only where the dispatch table (bench_kernels.py) says it beats cuBLAS.
    swapped = _swap_in_masked_linears(run) if run.params and use_triton("masked_linear", run.params[0],
                                                                          config.kernels) else []
    masks = [run.masks[key] for key in run.keys]
    optimizer = MaskedAdam(run.params, masks, weight_decay=config.weight_decay, kernels=config.kernels,
                           moments_dtype=torch.bfloat16 if config.moments_dtype == "bf16" else None)
    device_masks = optimizer.masks
    lrs = torch.tensor(lr_schedule_values(config, run.total_steps), dtype=torch.float32, device=device)  # (S,)
    losses = torch.zeros(run.total_steps, dtype=torch.float32, device=device)                          # (S,)
    fingerprints = run.fingerprints() if (config.checkpoint_every or config.resume) else {}
    start = 0
    if config.resume:
        state = _load_resume(run, config.checkpoint_path, fingerprints)
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            start = state["step"]
            losses[:start] = torch.tensor(state["step_losses"], dtype=torch.float32)
    # Calibration images cached once on the device (pinned staging on CUDA).
    images_on_device = [b.pin_memory().to(device, non_blocking=True) if device.type == "cuda" and not b.is_cuda
                        else b.to(device) for b in run.batches]
    use_autocast = run.precision != torch.float32
    scaler = torch.amp.GradScaler(device.type) if run.precision == torch.float16 else None
    scaler_view = _ScalerView(optimizer)
    need_logits = objectives.needs_teacher_logits(config.objective) or config.objective == "ce"
    loss_fn = _loss_fn(config)
    run.student.train()
    bar = _progress(run, start)
    last_logged, tick = start, time.perf_counter()
    store.prefetch(start % len(run.batches))
    compiled = _compile_blocks(run) if compile_on else contextlib.ExitStack()   # lazy: compiles on first call
    try:
        for step in range(start, run.total_steps):
            index = step % len(run.batches)
            targets = store.get(index)
            store.prefetch((step + 1) % len(run.batches))
            with torch.autocast(device.type, dtype=run.precision, enabled=use_autocast):
                loss = _student_loss(run, loss_fn, images_on_device[index], targets, index, need_logits)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(scaler_view)
            else:
                loss.backward()
            if config.grad_clip > 0:
                grads = [p.grad for p in run.params]
                torch._foreach_mul_(grads, device_masks)        # clip the masked gradients, as exact mode
                torch.nn.utils.clip_grad_norm_(run.params, config.grad_clip, foreach=True)
            if scaler is not None:
                scaler.step(scaler_view, lrs[step])
                scaler.update()
            else:
                optimizer.step(lrs[step])
            optimizer.zero_grad()
            losses[step] = loss.detach().float()
            done = step + 1
            if done % config.log_every == 0 or done == run.total_steps:
                recent = losses[last_logged:done].mean().item()          # the only host sync
                now = time.perf_counter()
                images = sum(run.batches[i % len(run.batches)].shape[0] for i in range(last_logged, done))
                bar.update(done - last_logged)
                bar.set_postfix(loss=f"{recent:.4f}", img_s=f"{images / (now - tick):.0f}")
                _write_metrics(config.metrics_path, {"type": "step", "step": done, "loss": recent,
                                                     "lr": float(lrs[step]), "images_per_s": images / (now - tick)})
                last_logged, tick = done, now
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
                _save_resume(run, config.checkpoint_path, step + 1, optimizer.state_dict(), None,
                             losses[:step + 1].tolist(), fingerprints)
    finally:
        bar.close()
        compiled.close()
        for path, linear in swapped:
            set_submodule(run.student, path, linear)
        if sparse_layers:
            restore_linears(run.student)
    return losses.tolist()


class _ScalerView(torch.optim.Optimizer):
    """Lets ``GradScaler`` unscale and step our ``MaskedAdam`` (it expects a torch optimizer)."""

    def __init__(self, optimizer: MaskedAdam):
        self.param_groups = [{"params": optimizer.params}]
        self.defaults, self.state, self.masked_adam = {}, {}, optimizer

    def step(self, lr):
        return self.masked_adam.step(lr)
