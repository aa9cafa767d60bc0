"""What one healing run works on (``RunState``, shared by the loop and both steps, joint or one block of a
sequential run) and what it returns (``HealResult``).

    result.history        # joint: [{"epoch": 1.0, "loss": 0.21}, ...]; sequential: one record per block
    run.record(compile=report)          # the one writer of HealResult.ran
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import nn

from starfish_fast import distributed
from starfish_fast.checkpoint import settings_fingerprint, tensor_fingerprint
from starfish_fast.config import HealConfig
from starfish_fast.models import ModelAdapter
from starfish_fast.objectives import Objective

if TYPE_CHECKING:                  # the plan imports the sequential loop, which builds on this module
    from starfish_fast.plan import Plan


@dataclass
class HealResult:
    history: list[dict]                    # one {"epoch": e, "loss": mean} per epoch, e from 1 (sequential: block)
    step_losses: list[float]
    steps: int
    images: int                            # images seen by the loop (epochs x calibration images)
    teacher_seconds: float                 # the dense pass that fills the teacher store
    heal_seconds: float                    # the training loop (compile and probes excluded: compile_seconds)
    plan: Plan
    ran: dict = field(default_factory=dict)       # what actually ran: compile per block, kernels per op, ...
    config: dict = field(default_factory=dict)    # the HealConfig as given
    wall_seconds: float = 0.0              # the whole call: plan, teacher pass, compile, loop, write-back
    steady_images_per_second: float = float("nan")   # the loop after its first logged window

    @classmethod
    def joined(cls, phases: Sequence["HealResult"], plan: Plan, config, wall_seconds: float) -> "HealResult":
        """One result of a run healed in phases (``config.phase_configs``): epochs numbered on, each history entry
        with its phase's objective; ``ran`` is the first phase's, the later ones' under ``ran["phases"]``."""
        history, epochs = [], 0
        for phase in phases:        # a sequential phase's entries are blocks: their epochs are numbered on after
            history += [{**entry, **({"epoch": entry["epoch"] + epochs} if "epoch" in entry else {}),
                         "objective": phase.config["objective"]} for entry in phase.history]
            epochs += phase.config["epochs"]
        images = sum(phase.images for phase in phases)
        steady = images / sum(phase.images / phase.steady_images_per_second for phase in phases)
        return cls(history=history, step_losses=[loss for phase in phases for loss in phase.step_losses],
                   steps=sum(phase.steps for phase in phases), images=images,
                   teacher_seconds=sum(phase.teacher_seconds for phase in phases),
                   heal_seconds=sum(phase.heal_seconds for phase in phases), plan=plan,
                   ran={**phases[0].ran, "phases": [phase.ran for phase in phases]},
                   config=dataclasses.asdict(config), wall_seconds=wall_seconds, steady_images_per_second=steady)

    @property
    def compile_seconds(self) -> float:
        """Compiling and probing the blocks before the loop (0 when nothing was compiled)."""
        return self.ran.get("compile_seconds", 0.0)

    @property
    def images_per_second(self) -> float:
        """Steady state: the loop after its first logged window (warm-up and compile excluded); the loop's
        average when it has a single window."""
        return self.steady_images_per_second

    @property
    def whole_call_images_per_second(self) -> float:
        """What a user waits for: images over the whole call (teacher pass and compile included)."""
        return self.images / self.wall_seconds if self.wall_seconds > 0 else float("nan")

    @property
    def teacher_store(self) -> str:
        return self.ran.get("teacher_store", self.plan.teacher_store)

    @property
    def mode(self) -> str:
        return self.plan.mode

    @property
    def device(self) -> str:
        return self.plan.device


@dataclass
class RunState:
    """What one healing run works on, shared by the loop and both steps. Under torchrun ``batches`` are
    this process's slices of the global batches (``global_batches``) and ``forward`` goes through DDP.
    What actually ran is written only through ``record``."""

    config: HealConfig
    plan: Plan
    objective: Objective
    adapter: ModelAdapter
    student: nn.Module
    dense: nn.Module | None               # None in sequential order: the block's targets are stored
    masks: Mapping[str, torch.Tensor]
    global_batches: list[torch.Tensor]
    batches: list[torch.Tensor]                 # this process's share of each global batch
    labels: list[torch.Tensor] | None
    keys: list[str]                             # the trained weights' names, in optimizer order
    params: list[nn.Parameter]
    lrs: list[float]                            # every step's learning rate (the schedule, closed form)
    group: distributed.Group | None = None
    parallel: nn.Module | None = None           # the DDP wrapper of the block forward, when several processes
    block_weights: torch.Tensor | None = None   # (L,) on the device; None: uniform
    block_sums: torch.Tensor | None = None      # (L,) adaptive weights: the blocks' losses summed over an epoch
    ran: dict = field(default_factory=dict)
    inputs: object | None = None                # sequential order: the block's input stream (a teacher store)

    @property
    def device(self) -> torch.device:
        return self.plan.torch_device

    @property
    def total_steps(self) -> int:
        return len(self.lrs)

    @property
    def main(self) -> bool:
        return self.group is None or self.group.main

    def record(self, **facts) -> None:
        """What actually ran (kernels, compile per block, teacher store, ...): HealResult.ran."""
        self.ran.update(facts)

    def forward(self, images: torch.Tensor, need_logits: bool):
        """The student's logits (when needed) and the plan's block outputs."""
        if self.parallel is not None:
            return self.parallel(images, need_logits)
        return self.adapter.forward_blocks(self.student, images, self.plan.blocks, need_logits=need_logits)

    def fingerprints(self) -> dict[str, str]:
        return run_fingerprints(self.config, self.masks, self.dense, self.global_batches)


def run_fingerprints(config: HealConfig, masks: Mapping[str, torch.Tensor], dense: nn.Module,
                     batches: Sequence[torch.Tensor], **settings) -> dict[str, str]:
    """What a resume checkpoint must match: the masks, the dense model, the calibration batches and the
    settings that change the result (plus ``settings``: a sequential run's order and inputs)."""
    chosen = json.loads(settings_fingerprint(config))
    return {"masks": tensor_fingerprint(masks),
            "dense_model": tensor_fingerprint(dense.state_dict()),
            "calibration": tensor_fingerprint({str(i): b for i, b in enumerate(batches)}),
            "config": json.dumps({**chosen, **settings}, sort_keys=True, default=list)}


def steady_rate(marks: list[tuple[int, float]], batches, world: int) -> float:
    """Images per second between the first and the last of ``marks`` ((steps done, time) pairs)."""
    (first, t0), (end, t1) = marks[0], marks[-1]
    images = world * sum(batches[i % len(batches)].shape[0] for i in range(first, end))
    return images / (t1 - t0) if t1 > t0 else float("nan")
