"""The two healing steps the engine's loop drives: the reference's (exact) and the fast one.

    step = FastStep(run, store)           # or ExactStep(run, store)
    with contextlib.ExitStack() as swaps:
        step.setup(swaps)                 # module swaps and compile, undone when the stack closes
        loss = step(step_index, batch_index)     # a detached 0-dim tensor; no host sync

``ExactStep`` is the reference's step: fp32, torch Adam/AdamW (non-foreach), per-step
``CosineAnnealingLR``, gradient hooks that mask the gradients, masks re-applied after every step.
``FastStep``: autocast in the plan's precision, per-block ``torch.compile`` (a block whose compile
fails runs eager, with one warning), the masked Adam with the mask folded into the step and the
learning rate read from a device tensor, teacher targets prefetched from the store.
"""
from __future__ import annotations

import contextlib
import logging
import warnings

import torch
from torch import nn

from starfish_fast import objectives
from starfish_fast.masks import apply_masks, register_zero_freeze_hooks
from starfish_fast.models import set_submodule
from starfish_fast.optim import MaskedAdam, ScalerView, lr_schedule_values
from starfish_fast.sparse24 import convert_linears, restore_linears

log = logging.getLogger(__name__)


def student_loss(run, images: torch.Tensor, targets: list[torch.Tensor], index: int) -> torch.Tensor:
    """The objective on one batch: the student's block outputs (and logits) against the teacher's."""
    plan, config = run.plan, run.config
    need_logits = objectives.needs_teacher_logits(config.objective) or config.objective == "ce"
    logits, reps = run.forward(images, need_logits)
    fused = plan.kernels["cosine_loss"] == "triton" and config.objective in ("starfish", "starfish+kl")
    if plan.precision != "fp32" and not fused:
        # the torch losses in fp32 (the fused kernel accumulates in fp32 itself)
        reps = [r.float() for r in reps]
        logits = logits.float() if logits is not None else None
    blocks = len(plan.blocks)
    loss, per_block = objectives.objective_loss(
        config.objective, student_reps=reps, student_logits=logits,
        teacher_reps=targets[:blocks] if objectives.needs_blocks(config.objective) else None,
        teacher_logits=targets[-1] if objectives.needs_teacher_logits(config.objective) else None,
        labels=run.labels[index].to(run.device) if run.labels is not None else None,
        per=plan.cosine_per, block_weights=run.block_weights, kernels=plan.kernels["cosine_loss"], per_block=True)
    if run.block_sums is not None:
        run.block_sums += per_block                    # adaptive weights: the blocks' losses, on the device
    return loss


class ExactStep:
    """The reference's step: hooks mask the gradients, torch Adam/AdamW, masks re-applied."""

    def __init__(self, run, store):
        config = run.config
        self.run, self.store = run, store
        if config.weight_decay == 0:
            self.optimizer = torch.optim.Adam(run.params, lr=config.lr, foreach=False)
        else:
            self.optimizer = torch.optim.AdamW(run.params, lr=config.lr, weight_decay=config.weight_decay,
                                               foreach=False)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=run.total_steps, eta_min=config.min_lr) if config.lr_schedule == "cosine" else None
        # on the device once: re-applying CPU masks every step would copy them host-to-device each time
        self.masks = {key: mask.to(run.device) for key, mask in run.masks.items()}

    def setup(self, swaps: contextlib.ExitStack) -> None:
        handles = register_zero_freeze_hooks(self.run.student, self.masks)
        swaps.callback(lambda: [handle.remove() for handle in handles])

    def __call__(self, step: int, index: int) -> torch.Tensor:
        run, config = self.run, self.run.config
        images = run.batches[index].to(run.device)
        targets = [t.to(run.device) for t in self.store.get(index)]
        loss = student_loss(run, images, targets, index)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            total_norm = torch.nn.utils.get_total_norm([p.grad for p in run.params if p.grad is not None])
            torch.nn.utils.clip_grads_with_norm_(run.params, config.grad_clip, total_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        apply_masks(run.student, self.masks)
        return loss.detach()

    def lr(self, step: int) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])


class FastStep:
    """Autocast, compiled blocks, masked Adam with a device learning rate, no host sync."""

    def __init__(self, run, store):
        config, plan, device = run.config, run.plan, run.device
        self.run, self.store = run, store
        self.optimizer = MaskedAdam(run.params, [run.masks[key] for key in run.keys], weight_decay=config.weight_decay,
                                    kernels=plan.kernels["masked_adam"],
                                    moments_dtype=torch.bfloat16 if config.moments_dtype == "bf16" else None)
        self.lrs_host = lr_schedule_values(config.lr, config.min_lr, config.lr_schedule, run.total_steps)
        self.lrs = torch.tensor(self.lrs_host, dtype=torch.float32, device=device)            # (S,)
        # calibration images cached once on the device (pinned staging on CUDA)
        self.images = [b.pin_memory().to(device, non_blocking=True) if device.type == "cuda" and not b.is_cuda
                       else b.to(device) for b in run.batches]
        self.scaler = torch.amp.GradScaler(device.type) if plan.precision == "fp16" else None
        self.scaler_view = ScalerView(self.optimizer)
        self.autocast = plan.precision != "fp32"

    def setup(self, swaps: contextlib.ExitStack) -> None:
        run, plan = self.run, self.run.plan
        if plan.semi_structured:
            run.ran["semi_structured"] = convert_linears(run.student, run.masks, compute_dtype=plan.compute_dtype)
            swaps.callback(restore_linears, run.student)
        if plan.kernels["masked_linear"] == "triton":
            swaps.enter_context(masked_linears(run))
        if plan.compile:
            swaps.enter_context(compiled_blocks(run, self._autocast_context))

    def _autocast_context(self):
        return torch.autocast(self.run.device.type, dtype=self.run.plan.compute_dtype, enabled=self.autocast)

    def __call__(self, step: int, index: int) -> torch.Tensor:
        run, config = self.run, self.run.config
        targets = self.store.get(index)
        self.store.prefetch((step + 1) % len(run.batches))
        with self._autocast_context():
            loss = student_loss(run, self.images[index], targets, index)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.scaler_view)
        else:
            loss.backward()
        if config.grad_clip > 0:
            grads = [p.grad for p in run.params]
            torch._foreach_mul_(grads, self.optimizer.masks)     # clip the masked gradients, as exact mode
            torch.nn.utils.clip_grad_norm_(run.params, config.grad_clip, foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.scaler_view, self.lrs[step])
            self.scaler.update()
        else:
            self.optimizer.step(self.lrs[step])
        self.optimizer.zero_grad()
        return loss.detach().float()

    def lr(self, step: int) -> float:
        return self.lrs_host[step]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


# ----------------------------------------------------------------------------- module swaps
@contextlib.contextmanager
def masked_linears(run):
    """The trained ``nn.Linear`` layers replaced by the Triton ``MaskedLinear`` (same Parameters)."""
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
    run.ran["masked_linear_layers"] = len(swapped)
    try:
        yield
    finally:
        for path, linear in swapped:
            set_submodule(run.student, path, linear)


@contextlib.contextmanager
def compiled_blocks(run, autocast_context):
    """Regional compile: each block compiled once (identical blocks share the compiled code), probed
    before the loop on its real input (forward and backward); a block whose compile fails runs eager,
    with one warning, and ``run.ran["compile"]`` says so. Every distinct block shape and batch size is
    one cache entry of the shared code object; past dynamo's default limit of 8 the rest would run eager
    with only a warning, so the limit is raised for the run. On exit the limit is restored and the
    compiled wrappers are removed (the caller's model is not left compiled)."""
    names = run.adapter.block_names(run.student)
    blocks = dict(zip(names, run.adapter.blocks_by_name(run.student, names)))
    inputs = _block_inputs(run, blocks, autocast_context)
    shapes = {tuple(tuple(p.shape) for p in block.parameters()) for block in blocks.values()}
    limit = max(8, 2 * len(shapes) * len({b.shape[0] for b in run.batches}))
    limits = {"recompile_limit": limit, "accumulated_recompile_limit": max(256, 4 * limit)}
    report = run.ran.setdefault("compile", {})
    with torch._dynamo.config.patch(   # names of torch >= 2.7 (cache_size_limit before)
            {name: value for name, value in limits.items() if hasattr(torch._dynamo.config, name)}):
        try:
            for name, block in blocks.items():
                block.compile(dynamic=False)
                report[name] = _probe(run, block, inputs.get(name, []), autocast_context)
            eager = [name for name, status in report.items() if status != "compiled"]
            if eager:
                warnings.warn(f"torch.compile failed for {len(eager)} of {len(report)} blocks ({', '.join(eager[:4])}"
                              f"{', ...' if len(eager) > 4 else ''}); they run eager: {report[eager[0]]}",
                              RuntimeWarning, stacklevel=3)
            yield
        finally:
            for block in blocks.values():
                block._compiled_call_impl = None


def _block_inputs(run, blocks: dict[str, nn.Module], autocast_context) -> dict[str, list[tuple]]:
    """Each block's positional inputs as the loop will pass them (eager, grad on), for the first batch of
    every distinct batch size: each is one compiled graph."""
    captured: dict[str, list[tuple]] = {name: [] for name in blocks}
    handles = [block.register_forward_pre_hook(
        lambda module, args, name=name: captured[name].append(tuple(
            a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args)))
        for name, block in blocks.items()]
    state = _rng_and_buffers(run.student)
    try:
        with autocast_context():
            for size in dict.fromkeys(b.shape[0] for b in run.batches):
                batch = next(b for b in run.batches if b.shape[0] == size)
                run.adapter.forward_blocks(run.student, batch.to(run.device), run.plan.blocks, need_logits=True)
    finally:
        for handle in handles:
            handle.remove()
        state.restore()
    return captured


def _probe(run, block: nn.Module, inputs: list[tuple], autocast_context) -> str:
    """Compile ``block`` now for each of its inputs (forward and backward): "compiled", or on failure
    "eager (why)" and the block runs eager."""
    state = _rng_and_buffers(block)
    try:
        for args in inputs:
            with autocast_context():
                out = block(*args)
            out = out[0] if isinstance(out, (tuple, list)) else out
            if out.requires_grad:
                out.float().sum().backward()
        return "compiled"
    except Exception as error:  # a compiler failure on this GPU/stack: this block runs eager
        block._compiled_call_impl = None
        return f"eager ({_describe(error)[:300]})"
    finally:
        state.restore()
        for parameter in run.params:
            parameter.grad = None


def _describe(error: BaseException) -> str:
    """The error and, when it wraps another (dynamo's BackendCompilerFailed does), its root cause."""
    root = error
    while True:
        inner = getattr(root, "inner_exception", None) or root.__cause__ or \
            (None if root.__suppress_context__ else root.__context__)
        if inner is None or inner is root:
            break
        root = inner
    text = (str(root).strip().splitlines() or [""])[0]
    outer = "" if root is error else f"{type(error).__name__} <- "
    return f"{outer}{type(root).__name__}: {text}"


class _rng_and_buffers:
    """The RNG states and a module's buffers (BatchNorm statistics), restored after a probe."""

    def __init__(self, module: nn.Module):
        self.buffers = [(b, b.detach().clone()) for b in module.buffers()]
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        with torch.no_grad():
            for buffer, saved in self.buffers:
                buffer.copy_(saved)
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
