"""The two healing steps the engine's loop drives: the reference's (exact) and the fast one.

    step = FastStep(run, store)           # or ExactStep(run, store); run: run.RunState
    with contextlib.ExitStack() as swaps:
        step.setup(swaps)                 # module swaps and compile, undone when the stack closes
        loss = step(step_index, batch_index)     # a detached 0-dim tensor; no host sync in bf16/fp32

``ExactStep`` is the reference's step: fp32, torch Adam/AdamW (non-foreach), per-step
``CosineAnnealingLR``, gradient hooks that mask the gradients, masks re-applied after every step.
``FastStep``: autocast in the plan's precision, per-block ``torch.compile`` when the plan says so
(a block whose compile fails runs eager, with one warning), the masked Adam with the mask folded
into the step and the learning rate read from a device tensor, teacher targets prefetched from the
store. Host syncs: none in bf16/fp32; in fp16 torch's GradScaler reads its inf/NaN flag every step.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import time
import warnings

import torch
from torch import nn

from starfish_fast import compile_cache
from starfish_fast.masks import apply_masks, register_zero_freeze_hooks
from starfish_fast.models import set_submodule
from starfish_fast.objectives import LossInputs
from starfish_fast.optim import MaskedAdam, ScalerView
from starfish_fast.sparse24 import convert_linears, restore_linears

log = logging.getLogger(__name__)


def student_loss(run, images: torch.Tensor, targets: list[torch.Tensor], index: int) -> torch.Tensor:
    """The objective on one batch: the student's block outputs (and logits) against the teacher's."""
    plan, spec = run.plan, run.objective
    logits, reps = run.forward(images, spec.needs_student_logits)
    fused = plan.kernels["cosine_loss"] == "triton" and spec.fused_cosine
    if plan.precision != "fp32" and not fused:
        # the torch losses in fp32 (the fused kernel accumulates in fp32 itself)
        reps = [r.float() for r in reps]
        logits = logits.float() if logits is not None else None
    blocks = len(plan.blocks)
    loss, per_block = spec.loss(LossInputs(
        student_reps=reps, student_logits=logits,
        teacher_reps=targets[:blocks] if spec.needs_blocks else None,
        teacher_logits=targets[-1] if spec.needs_teacher_logits else None,
        labels=run.labels[index] if run.labels is not None else None,   # on the device since the run began
        per=plan.cosine_per, block_weights=run.block_weights, fused=fused))
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
        images = (run.batches[index] if run.inputs is None else run.inputs.get(index)[0]).to(run.device)
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

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])


class FastStep:
    """Autocast, compiled blocks, masked Adam with a device learning rate, no host sync (bf16, fp32)."""

    def __init__(self, run, store):
        config, plan, device = run.config, run.plan, run.device
        self.run, self.store = run, store
        self.optimizer = MaskedAdam(run.params, [run.masks[key] for key in run.keys], weight_decay=config.weight_decay,
                                    kernel=plan.kernels["masked_adam"] == "triton",
                                    moments_dtype=torch.bfloat16 if config.moments_dtype == "bf16" else None)
        self.lrs = torch.tensor(run.lrs, dtype=torch.float32, device=device)                   # (S,)
        # calibration images cached once on the device (pinned staging on CUDA); a sequential run's block inputs
        # stay in their stream (run.inputs), one batch on the device at a time
        self.images = None if run.inputs is not None else [
            b.pin_memory().to(device, non_blocking=True) if device.type == "cuda" and not b.is_cuda else b.to(device)
            for b in run.batches]
        # fp16's gradients underflow unscaled: the loss is scaled, and GradScaler reads found_inf (a host sync)
        self.scaler = torch.amp.GradScaler(device.type) if plan.precision == "fp16" else None
        self.scaler_view = ScalerView(self.optimizer)
        self.autocast = plan.precision != "fp32"
        # the compiled graphs are made for the most common batch size; other sizes (a short last batch)
        # run eager instead of recompiling
        self.compiled_size = collections.Counter(b.shape[0] for b in run.batches).most_common(1)[0][0]

    def setup(self, swaps: contextlib.ExitStack) -> None:
        run, plan = self.run, self.run.plan
        if plan.semi_structured:
            run.record(semi_structured=convert_linears(run.student, run.masks, compute_dtype=plan.compute_dtype,
                                                       choice=plan.semi_structured_choice))
            swaps.callback(restore_linears, run.student)
        if plan.kernels["masked_linear"] == "triton":
            swaps.enter_context(masked_linears(run))
        if plan.compile:
            swaps.enter_context(compiled_blocks(run, self._autocast_context, self.compiled_size))

    def _autocast_context(self):
        return torch.autocast(self.run.device.type, dtype=self.run.plan.compute_dtype, enabled=self.autocast)

    def _stance(self, index: int):
        if self.run.plan.compile and self.run.batches[index].shape[0] != self.compiled_size:
            return torch.compiler.set_stance("force_eager")
        return contextlib.nullcontext()

    def __call__(self, step: int, index: int) -> torch.Tensor:
        run, config = self.run, self.run.config
        targets = self.store.get(index)
        self.store.prefetch((step + 1) % len(run.batches))
        images = self.images[index] if self.images is not None else run.inputs.get(index)[0]
        if self.images is None:
            run.inputs.prefetch((step + 1) % len(run.batches))
        with self._autocast_context(), self._stance(index):
            loss = student_loss(run, images, targets, index)
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
            set_submodule(run.student, path, layer.prepare(run.plan.compute_dtype))
            swapped.append((path, module))
    run.record(masked_linear_layers=len(swapped))
    try:
        yield
    finally:
        for path, linear in swapped:
            set_submodule(run.student, path, linear)


@contextlib.contextmanager
def compiled_blocks(run, autocast_context, batch_size: int):
    """Regional compile: each block compiled once (identical blocks share the compiled code), probed
    before the loop on its real input at ``batch_size`` (forward and backward); a block whose compile
    fails runs eager, with one warning, and ``ran["compile"]`` says so. torch's compile artifacts are
    loaded from ``plan.compile_cache`` first and saved there after (compile_cache.py). Each distinct block
    shape is one cache entry of the shared code object; past dynamo's default limit of 8 the rest would
    run eager with only a warning, so the limit is raised for the run. On exit the limit is restored and
    the compiled wrappers are removed (the caller's model is not left compiled)."""
    started = time.perf_counter()
    names = run.adapter.block_names(run.student)
    blocks = dict(zip(names, run.adapter.blocks_by_name(run.student, names)))
    inputs = _block_inputs(run, blocks, autocast_context, batch_size)
    shapes = {tuple(tuple(p.shape) for p in block.parameters()) for block in blocks.values()}
    limit = max(8, 2 * len(shapes))
    limits = {"recompile_limit": limit, "accumulated_recompile_limit": max(256, 4 * limit)}
    report: dict[str, str] = {}
    warm = compile_cache.load(run.plan.compile_cache) if run.plan.compile_cache else False
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
            elif run.plan.compile_cache and run.main:
                compile_cache.save(run.plan.compile_cache)
            run.record(compile=report, compile_cache="warm" if warm else "cold",
                       compile_seconds=time.perf_counter() - started)
            yield
        finally:
            for block in blocks.values():
                block._compiled_call_impl = None


def _block_inputs(run, blocks: dict[str, nn.Module], autocast_context, batch_size: int
                  ) -> dict[str, list[tuple[tuple, dict]]]:
    """Each block's inputs, positional and keyword (a decoder layer's position embeddings and mask), as the
    loop will pass them (eager, grad on) for a batch of ``batch_size``: one compiled graph per distinct block."""
    captured: dict[str, list[tuple[tuple, dict]]] = {name: [] for name in blocks}
    handles = [block.register_forward_pre_hook(
        lambda module, args, kwargs, name=name: captured[name].append((_detached(args), _detached(kwargs))),
        with_kwargs=True) for name, block in blocks.items()]
    state = _rng_and_buffers(run.student)
    try:
        with autocast_context():
            batch = next(b for b in run.batches if b.shape[0] == batch_size)
            run.adapter.forward_blocks(run.student, batch.to(run.device), run.plan.blocks, need_logits=True)
    finally:
        for handle in handles:
            handle.remove()
        state.restore()
    return captured


def _detached(value):
    """``value`` with every tensor inside (tuples, lists, dicts) detached, keeping its requires_grad."""
    if isinstance(value, torch.Tensor):
        return value.detach().requires_grad_(value.requires_grad)
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {key: _detached(v) for key, v in value.items()}
    return value


def _probe(run, block: nn.Module, inputs: list[tuple[tuple, dict]], autocast_context) -> str:
    """Compile ``block`` now for each of its inputs (forward and backward): "compiled", or on failure
    "eager (why)" and the block runs eager."""
    state = _rng_and_buffers(block)
    try:
        for args, kwargs in inputs:
            with autocast_context():
                out = block(*args, **kwargs)
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
