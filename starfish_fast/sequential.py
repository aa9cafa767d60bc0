"""Sequential order: heal block after block, each against its dense twin, as EBFT, SparseGPT and Wanda
work through a large model: at any moment the device holds one student block, its dense twin, the
block's optimizer state and one batch.

    source = ModelBlockSource(student, dense, masks, adapter, blocks, device)     # or a streaming source
    result = heal_sequential(source, batches, config, plan)                     # a HealResult
    result.history      # [{"block": 1, "name": "blocks.0", "loss_first": ..., "loss_last": ..., "loss": ...}, ...]

For block i: its inputs are the carried student stream, the healed blocks 0..i-1's outputs over the
calibration set (``sequential_inputs="student"``), or the dense stream (``"dense"``, EBFT-style); its
targets are the dense block's outputs on the dense stream. Only the block's masked weights train, for
``epochs`` passes with the block-local objective (starfish, mse), through the engine's own steps
(``steps.ExactStep`` / ``FastStep``: masked Adam, the learning-rate schedule restarted per block,
precision) and under torchrun through DDP over the block. Then the healed block's outputs become the
next block's inputs. Both streams live in a teacher store kind (``teacher.store_of``: device, pinned,
disk), one block's worth at a time, kept in the compute precision (they are the next block's inputs).

A source of blocks is a ``BlockSource``: ``ModelBlockSource`` for a model held in memory (ViTs, CNNs,
Hugging Face causal LMs; the stem and the block forwards are the adapter's); a streaming source reads
each block when its turn comes. The loop uses only that interface. Resume checkpoints
(``checkpoint.save_resume``) record the block and the step within it, and the healed blocks' weights:
a resumed run replays the healed blocks' forwards to rebuild the streams and goes on where it stopped.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import inspect
import logging
import time
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import nn

from starfish_fast import distributed
from starfish_fast.calibration import capture_inputs
from starfish_fast.checkpoint import load_resume, save_resume
from starfish_fast.config import HealConfig
from starfish_fast.masks import apply_masks
from starfish_fast.models import adapter_for, freeze_all
from starfish_fast.models.adapters import GenericAdapter
from starfish_fast.objectives import OBJECTIVES, objective
from starfish_fast.optim import lr_schedule_values
from starfish_fast.progress import RunLog
from starfish_fast.run import HealResult, RunState, steady_rate
from starfish_fast.steps import ExactStep, FastStep
from starfish_fast.teacher import TeacherStore, store_of, teacher_autocast

if TYPE_CHECKING:
    from starfish_fast.plan import Plan

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the interface
class BlockSource(abc.ABC):
    """Where a sequential run's blocks come from and go to (the contract with streaming sources)."""

    train_student: bool = False     # the student block heals in train mode (BatchNorm statistics update)
    item: str = "seq"               # one calibration example in progress output (img for images)

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of blocks."""

    @abc.abstractmethod
    def stem(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The hidden states entering block 0 for one calibration batch (on the compute device) and the
        keyword arguments every block forward needs for it (attention mask, rotary embeddings, ...)."""

    @abc.abstractmethod
    def open(self, i: int) -> tuple[nn.Module, nn.Module, dict[str, torch.Tensor]]:
        """(student block i, dense block i, its masks keyed by the block's own parameter names) on the compute
        device; the student's masked parameters are the trainable ones."""

    @abc.abstractmethod
    def run(self, block: nn.Module, hidden: torch.Tensor, extra: dict) -> torch.Tensor:
        """One block forward (tuple outputs unwrapped)."""

    @abc.abstractmethod
    def close(self, i: int, student_block: nn.Module) -> None:
        """Block i is healed: write it back and free it."""

    @abc.abstractmethod
    def finish(self) -> None:
        """After the last block."""

    def name(self, i: int) -> str:
        """Block i's name in progress output and the history."""
        return f"block {i}"

    def stem_done(self) -> None:
        """Every batch's stem is taken: what only the stem needed may go (a streamed model's embeddings)."""


class ModelBlockSource(BlockSource):
    """The blocks of a student and a dense model held in memory (where they are, usually host memory): block i
    goes to the compute device when opened and back when closed; the student's parts outside the blocks stay on
    the device for the run (both streams start at the student's stem). The stem is the adapter's forward
    stopped at block 0: the patch embedding, or a language model's token embeddings with its rotary embeddings
    and causal mask."""

    def __init__(self, student: nn.Module, dense: nn.Module, masks: Mapping[str, torch.Tensor], blocks: Sequence[str],
                 device: torch.device, sample: torch.Tensor | None = None):
        self.student, self.dense, self.blocks, self.device = student, dense.eval(), list(blocks), device
        self.adapter = adapter_for(student, self.blocks)
        self.masks = masks
        self.train_student, self.item = self.adapter.train_student, self.adapter.item
        self.home = next(student.parameters()).device
        _check_chain(dense, self.adapter, self.blocks, sample)
        freeze_all(student)
        apply_masks(student, masks)
        _move_outside(student, self.blocks, device)          # the dense model's stem is never run: it stays

    def __len__(self):
        return len(self.blocks)

    def name(self, i):
        return self.blocks[i]

    @torch.no_grad()
    def stem(self, batch):
        first = self.student.get_submodule(self.blocks[0])
        args, kwargs = capture_inputs(first, lambda: self.adapter.forward_blocks(
            self.student, batch.to(self.device), self.blocks[:1], need_logits=False))
        return _as_keywords(first, args, kwargs)

    def open(self, i):
        name, prefix = self.blocks[i], self.blocks[i] + "."
        student, dense = (model.get_submodule(name).to(self.device) for model in (self.student, self.dense))
        masks = {key[len(prefix):]: mask for key, mask in self.masks.items() if key.startswith(prefix)}
        for key in masks:
            student.get_parameter(key).requires_grad_(True)
        return student, dense.eval(), masks

    def run(self, block, hidden, extra):
        output = block(hidden, **extra)
        return output[0] if isinstance(output, (tuple, list)) else output

    def close(self, i, student_block):
        for model in (self.student, self.dense):
            model.get_submodule(self.blocks[i]).to(self.home)

    def finish(self):
        _move_outside(self.student, self.blocks, self.home)


def _as_keywords(block: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """A block call's (first input, every other input by keyword), whatever the model passed positionally
    (GPT-2 hands its blocks the cache and mask by position)."""
    bound = inspect.signature(block.forward).bind(*args, **kwargs)
    parameters = inspect.signature(block.forward).parameters
    (first, hidden), *rest = bound.arguments.items()
    extra = {}
    for name, value in rest:
        if parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            extra.update(value)
        elif parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise ValueError(f"sequential order: {type(block).__name__}.forward takes *{name}; its inputs cannot "
                                 f"be passed by keyword")
        else:
            extra[name] = value
    return hidden, extra


def _move_outside(model: nn.Module, blocks: Sequence[str], device: torch.device, prefix: str = "") -> None:
    """Every parameter and buffer of ``model`` outside ``blocks`` to ``device`` (in place: tied weights stay tied)."""
    for name, child in model.named_children():
        path = prefix + name
        if path in blocks:
            continue
        if any(block.startswith(path + ".") for block in blocks):
            _move_outside(child, blocks, device, path + ".")
        else:
            child.to(device)
    with torch.no_grad():
        for tensor in [*model._parameters.values(), *model._buffers.values()]:
            if tensor is not None:
                tensor.data = tensor.data.to(device)


@torch.no_grad()
def _check_chain(dense: nn.Module, adapter, blocks: Sequence[str], sample: torch.Tensor | None) -> None:
    """Sequential order needs each block to take the previous block's output and the same keyword inputs as
    block 0: true of the explicit block loops (all their blocks) and of decoder layers with one attention
    type; a generic model is checked on one example (``sample``) through forward hooks."""
    own = adapter.block_names(dense)
    if not isinstance(adapter, GenericAdapter):
        if list(blocks) != own:
            raise ValueError(f"sequential order heals every block of a {adapter.family} model in order ({len(own)} "
                             f"blocks); got {len(blocks)} block names")
        return
    layer_types = getattr(getattr(dense, "config", None), "layer_types", None)
    if layer_types and len(set(layer_types)) > 1:
        raise ValueError(f"sequential order: {type(dense).__name__} mixes attention types across its layers "
                         f"({', '.join(sorted(set(layer_types)))}), each with its own mask; use order='joint'")
    if sample is None or adapter.family == "hf_causal_lm":
        return                                                   # decoder layers feed each other by construction
    seen: dict[str, tuple] = {}
    handles = [dense.get_submodule(name).register_forward_pre_hook(
        lambda module, args, kwargs, name=name: seen.__setitem__(name, (args[0] if args else None, kwargs)),
        with_kwargs=True) for name in blocks]
    handles += [dense.get_submodule(name).register_forward_hook(
        lambda module, args, output, name=name: seen.__setitem__(name + "/out", output)) for name in blocks]
    home = next(dense.parameters()).device
    try:
        adapter.forward_blocks(dense, sample[:1].to(home), list(blocks), need_logits=False)
    finally:
        for handle in handles:
            handle.remove()
    for before, after in zip(blocks, blocks[1:]):
        output = seen[before + "/out"]
        output = output[0] if isinstance(output, (tuple, list)) else output
        if seen[after][0] is not output or seen[after][1].keys() != seen[blocks[0]][1].keys():
            raise ValueError(f"sequential order: {after} does not take {before}'s output as its input (something "
                             f"runs between them); give block names that feed each other, or use order='joint'")


# ----------------------------------------------------------------------------- the loop
class _OneBlock:
    """What a block's ``RunState`` calls its adapter: the block's forward on batch ``index``'s hidden states,
    with that batch's keyword inputs (the loop sets ``index`` before each step)."""

    def __init__(self, source: BlockSource, extras: Sequence[dict]):
        self.source, self.extras, self.index = source, extras, 0

    def forward_blocks(self, model, hidden, block_names, need_logits=True):
        return None, [self.source.run(model, hidden, self.extras[self.index])]


@dataclasses.dataclass
class _Streams:
    """A sequential run's state between blocks: the carried inputs and what every process needs to go on."""

    student: TeacherStore                  # block i's inputs from the healed blocks before it
    dense: TeacherStore                    # the dense model's inputs of block i
    extras: list[dict]                     # each batch's keyword inputs of every block
    sizes: list[int]                       # each of this process's batches' sizes


def heal_sequential(source: BlockSource, batches: Sequence[torch.Tensor], config: HealConfig, plan: Plan, *,
                    fingerprints: Mapping[str, str] | None = None, facts: Mapping | None = None) -> HealResult:
    """Heal ``source``'s blocks one after the other on the calibration ``batches`` (the global batches; under
    torchrun each process takes its slice). ``fingerprints``: what a resume checkpoint must match; ``facts``:
    what the caller ran before (recorded in ``HealResult.ran``)."""
    called = time.perf_counter()
    spec = objective(config.objective)
    if not spec.block_local:
        raise ValueError(f"HealConfig.objective={config.objective!r} cannot heal in order='sequential'; allowed: "
                         f"{', '.join(name for name, entry in OBJECTIVES.items() if entry.block_local)}")
    group = distributed.current() if plan.world_size > 1 else None
    local = distributed.shard_batches(batches, group)
    resume = load_resume(config.checkpoint_path, fingerprints or {}, plan.world_size) if config.resume else None
    loop = _Loop(source, config, plan, spec, group, local, batches, dict(fingerprints or {}))
    loop.facts = dict(facts or {})
    if resume is not None:
        loop.losses[:resume["step"]] = torch.tensor(resume["step_losses"], dtype=torch.float32)
        if loop.run_log.main:
            log.info("resuming from %s at block %d, step %d of it", config.checkpoint_path, resume["block"] + 1,
                     resume["block_step"])
    started = time.perf_counter()
    streams = loop.start()
    source.stem_done()
    loop.teacher_seconds += time.perf_counter() - started
    try:
        for i in range(len(source)):
            streams = loop.block(i, streams, resume)
    except BaseException:
        loop.run_log.abort()
        raise
    source.finish()
    return loop.result(called)


class _Loop:
    """One sequential run: the streams from block to block, each block's steps, checkpoints and the result."""

    def __init__(self, source, config, plan, spec, group, local, batches, fingerprints):
        self.source, self.config, self.plan, self.spec, self.group = source, config, plan, spec, group
        self.local, self.batches, self.fingerprints = local, batches, fingerprints
        self.device, self.per_block = plan.torch_device, config.epochs * len(local)
        self.kind = plan.teacher_store if plan.teacher_store in ("device", "pinned", "disk") else "device"
        self.losses = torch.zeros(len(source) * self.per_block, dtype=torch.float32, device=self.device)   # (S,)
        self.healed: dict[int, dict] = {}      # the healed blocks' weights, kept for resume checkpoints
        self.ran: dict = {}
        self.facts: dict = {}                  # what ran before the loop, recorded with the rest
        self.teacher_seconds = self.heal_seconds = 0.0
        self.marks: list[tuple[int, float]] = []
        self.run_log = RunLog(config, len(self.losses), 0, main=group is None or group.main,
                              desc="heal (sequential)", item=source.item)

    def start(self) -> _Streams:
        """The stem of every batch: both streams begin there (the same tensors)."""
        extras = []

        def hidden():
            for batch in self.local:
                state, extra = self.source.stem(batch.to(self.device))
                extras.append(extra)
                yield [state]
        sizes = [b.shape[0] for b in self.local]
        stem = store_of(self.kind, hidden(), sizes, self.device, self.plan.compute_dtype, self.config.teacher_dir)
        return _Streams(stem, stem, extras, sizes)

    def forward(self, block: nn.Module, stream: TeacherStore, streams: _Streams) -> TeacherStore:
        """``block``'s outputs over the calibration set on ``stream`` (eval mode, no grad), as a new stream: in
        the block's dtype, or as the teacher runs (autocast on CUDA in the compute precision)."""
        block.eval()
        dtype = next(block.parameters()).dtype

        @torch.no_grad()
        def outputs():
            for index in range(len(streams.sizes)):
                stream.prefetch(index + 1)
                hidden = stream.get(index)[0].to(self.device, dtype)
                with teacher_autocast(self.device, self.plan.compute_dtype):
                    output = self.source.run(block, hidden, streams.extras[index])
                yield [output]
        return store_of(self.kind, outputs(), streams.sizes, self.device, self.plan.compute_dtype,
                        self.config.teacher_dir)

    def block(self, i: int, streams: _Streams, resume: dict | None) -> _Streams:
        """Heal block i (or restore it from ``resume``); the streams entering block i + 1."""
        student, dense, masks = self.source.open(i)
        started = time.perf_counter()
        targets = self.forward(dense, streams.dense, streams)
        del dense                             # the targets are all the block needs of its twin: freed before training
        self.teacher_seconds += time.perf_counter() - started
        dense_inputs = self.config.sequential_inputs == "dense"
        inputs = streams.dense if dense_inputs else streams.student
        start = 0
        if resume is not None and i <= resume["block"]:
            student.load_state_dict(resume["blocks"][i])
            start = resume["block_step"] if i == resume["block"] else self.per_block
        if not dense_inputs:
            streams.dense = None              # three streams at most: inputs, targets, the carried outputs
        if start < self.per_block:
            started = time.perf_counter()
            self.train(i, student, masks, inputs, targets, streams, start, resume)
            self.heal_seconds += time.perf_counter() - started
        if self.config.checkpoint_every:
            self.healed[i] = {key: value.detach().cpu().clone() for key, value in student.state_dict().items()}
        carried = targets if dense_inputs else self.forward(student, inputs, streams)
        self.source.close(i, student)
        return _Streams(carried, targets, streams.extras, streams.sizes)

    def block_run(self, i: int, student, masks, inputs, streams) -> RunState:
        """Block i's ``RunState``: the engine's steps train it as they train a whole model."""
        keys = [key for key, _ in student.named_parameters() if key in masks]
        # one block, eager and dense: compile and 2:4 backends are decided per model, not per block
        plan = dataclasses.replace(self.plan, blocks=(self.source.name(i),), compile=False, compile_cache=None,
                                   semi_structured=False, semi_structured_choice={})
        run = RunState(config=self.config, plan=plan, objective=self.spec,
                       adapter=_OneBlock(self.source, streams.extras), student=student, dense=None, masks=masks,
                       global_batches=list(self.batches), batches=self.local, labels=None, keys=keys,
                       params=[student.get_parameter(k) for k in keys],
                       lrs=lr_schedule_values(self.config.lr, self.config.min_lr, self.config.lr_schedule,
                                              self.per_block),
                       group=self.group, ran=self.ran, inputs=inputs)
        run.record(order="sequential", sequential_inputs=self.config.sequential_inputs, stream_store=self.kind,
                   teacher_store=self.kind, kernels=dict(plan.kernels), precision=plan.precision,
                   compile="off: sequential order runs blocks eager", **self.facts)
        return run

    def train(self, i, student, masks, inputs, targets, streams, start, resume) -> None:
        """Block i's steps from ``start`` (a resumed block: its optimizer and RNG states from ``resume``)."""
        run = self.block_run(i, student, masks, inputs, streams)
        apply_masks(student, masks)
        step = ExactStep(run, targets) if self.plan.mode == "exact" else FastStep(run, targets)
        offset, count = i * self.per_block, len(self.local)
        if resume is not None and offset + start == resume["step"]:       # where the checkpoint was written
            if start:
                step.load_state_dict(resume["optimizer"])
            _restore_rng(resume["rng"][self.plan.rank], self.device)
        self.run_log.bar.set_description(f"heal (sequential) block {i + 1}/{len(self.source)}")
        with contextlib.ExitStack() as swaps:
            step.setup(swaps)
            if self.group is not None:
                run.parallel = distributed.data_parallel(student, run.adapter, run.plan.blocks, self.device)
            student.train(self.source.train_student)
            last, self.marks = start, self.marks or [(offset + start, time.perf_counter())]
            try:
                for s in range(start, self.per_block):
                    run.adapter.index = s % count
                    self.losses[offset + s] = step(s, s % count)
                    self.run_log.stepped()
                    done = s + 1
                    if done % self.config.log_every == 0 or done == self.per_block:
                        self.log(run, offset, last, done)
                        last = done
                    if self.config.checkpoint_every and (offset + done) % self.config.checkpoint_every == 0:
                        self.checkpoint(i, student, step, offset + done, done)
            finally:
                student.eval()

    def log(self, run: RunState, offset: int, last: int, done: int) -> None:
        window = self.losses[offset + last:offset + done].mean()
        window = self.group.mean(window) if self.group else window                  # the global batch's loss
        count, world = len(self.local), self.plan.world_size
        self.run_log.logged(step=offset + done, loss=window.item(), lr=run.lrs[done - 1],
                            images=world * sum(self.local[s % count].shape[0] for s in range(last, done)),
                            steps=done - last)
        self.marks.append((offset + done, time.perf_counter()))

    def checkpoint(self, i: int, student: nn.Module, step, done: int, block_step: int) -> None:
        """A resume checkpoint after ``done`` steps in all (``block_step`` of them in block i); written by rank 0."""
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.device)
               if self.device.type == "cuda" else None}
        so_far = self.group.mean(self.losses[:done]) if self.group else self.losses[:done]
        blocks = {**self.healed, i: {key: value.detach().cpu() for key, value in student.state_dict().items()}}
        state = {"step": done, "block": i, "block_step": block_step, "blocks": blocks,
                 "optimizer": step.state_dict(), "step_losses": so_far.tolist(), "fingerprints": self.fingerprints,
                 "world_size": self.plan.world_size, "rng": self.group.gather(rng) if self.group else [rng]}
        if self.group is None or self.group.main:
            save_resume(self.config.checkpoint_path, state)
        if self.group:
            self.group.barrier()

    def result(self, called: float) -> HealResult:
        step_losses = (self.group.mean(self.losses) if self.group else self.losses).tolist()
        history = []
        per_epoch = len(self.local)
        for i in range(len(self.source)):
            own = step_losses[i * self.per_block:(i + 1) * self.per_block]
            epochs = [sum(own[e * per_epoch:(e + 1) * per_epoch]) / per_epoch for e in range(self.config.epochs)]
            history.append({"block": i + 1, "name": self.source.name(i), "loss_first": epochs[0],
                            "loss_last": epochs[-1], "loss": epochs[-1], "epochs": epochs})
        self.run_log.finish(step_losses, history)
        world = self.plan.world_size
        marks = self.marks if len(self.marks) < 3 else self.marks[1:]
        images = self.config.epochs * sum(b.shape[0] for b in self.batches) * len(self.source)
        return HealResult(history=history, step_losses=step_losses, steps=len(step_losses), images=images,
                          teacher_seconds=self.teacher_seconds, heal_seconds=self.heal_seconds, plan=self.plan,
                          ran=self.ran, config=dataclasses.asdict(self.config),
                          wall_seconds=time.perf_counter() - called,
                          steady_images_per_second=steady_rate(marks, self.local, world) if marks else float("nan"))


def _restore_rng(rng: dict, device: torch.device) -> None:
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
