"""Healing objectives: one registry, the only module that spells their names.

    from starfish_fast.objectives import OBJECTIVES, LossInputs
    spec = OBJECTIVES["starfish"]        # Objective(name="starfish", needs_blocks=True, fused_cosine=True, ...)
    loss, per_block = spec.loss(LossInputs(student_reps=students, teacher_reps=teachers, per="token"))
    loss = objective_loss("mse", student_reps=students, teacher_reps=teachers)   # the same, by name

``starfish``      mean over blocks of mean over rows of 1 - cos(student, teacher); a row is a
                  token for (B, T, D) outputs and an image for anything else (reference rule)
``mse``           mean over blocks of the mean squared error between block outputs
``kl``            KL(dense || pruned) of the softmax outputs, batch mean (token mean for language models)
``ce``            cross-entropy of the pruned logits with the labels (the only one using labels; for a
                  causal language model the next tokens of the calibration text)
``starfish+kl``   0.5 * starfish + 0.5 * kl

Adding an objective is one ``Objective`` entry in ``OBJECTIVES`` plus its loss function: config
validation and the CLI's choices (``config.HealConfig.objective``), the teacher store (what it keeps),
both steps (what the student computes, whether the fused cosine kernel runs) and the engine (labels)
read the entry; tests/test_objectives.py checks the README's table against it. torch is imported
inside the loss functions, so ``config`` (and ``starfish-fast --help``) reads the names torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class LossInputs:
    """What one step hands an objective; each objective reads the fields its entry says it needs."""

    student_reps: Any = None           # list of (B, T, D) / (B, C, H, W) block outputs, one per block
    teacher_reps: Any = None           # the dense model's, same shapes
    student_logits: Any = None         # (B, classes)
    teacher_logits: Any = None
    labels: Any = None                 # (B,) class indices
    per: str = "shape"                 # cosine rows: token | sample | shape (token for 3-D outputs, else sample)
    block_weights: Any = None          # (L,) weights of the mean over blocks; None: uniform
    fused: bool = False                # the plan's choice: the fused Triton cosine loss (else plain torch)


@dataclass(frozen=True)
class Objective:
    """One healing loss and what it needs. ``loss(inputs) -> (scalar, per-block losses (L,) detached, or
    None for objectives without blocks)``."""

    name: str
    help: str
    loss: Callable[[LossInputs], tuple]
    needs_blocks: bool = False          # student and teacher block outputs
    needs_student_logits: bool = False
    needs_teacher_logits: bool = False  # the teacher store keeps the dense logits
    needs_labels: bool = False          # heal(..., labels=...) is required
    fused_cosine: bool = False          # its block term is the cosine the fused kernel computes

    @property
    def block_local(self) -> bool:
        """Whether one block and its dense twin alone give the loss (what sequential order trains with)."""
        return self.needs_blocks and not (self.needs_student_logits or self.needs_teacher_logits or
                                          self.needs_labels)


def block_cosine_loss(students, teachers, per: str = "shape", block_weights=None, fused: bool = False,
                      per_block: bool = False):
    """STARFISH loss; the teacher is cast to the student's dtype first (reference rule). ``block_weights``
    weight the mean over blocks; ``per_block`` also returns each block's loss (L,), detached.
    ``fused``: the Triton kernel (the plan decides it; see ``kernels/_dispatch.py``), else plain torch."""
    from starfish_fast.kernels.cosine_loss import multi_block_cosine_loss

    if len(students) != len(teachers) or not students:
        raise ValueError(f"need the same non-zero number of student and teacher blocks, got "
                         f"{len(students)} and {len(teachers)}")
    return multi_block_cosine_loss(list(students), list(teachers), per, block_weights=block_weights,
                                   per_block=per_block, kernel=fused)


def block_mse_loss(students, teachers, block_weights=None, per_block: bool = False):
    import torch
    import torch.nn.functional as F

    from starfish_fast.kernels.cosine_loss import weighted_block_mean

    stacked = torch.stack([F.mse_loss(s, t.to(s.dtype)) for s, t in zip(students, teachers)])      # (L,)
    return weighted_block_mean(stacked, block_weights, per_block)


def kl_dense_to_pruned(student_logits, teacher_logits):
    """KL(p_dense || p_pruned), mean over the batch (over every token for a language model's (B, T, V)
    logits); computed in fp32."""
    import torch.nn.functional as F

    student, teacher = student_logits.flatten(0, -2).float(), teacher_logits.flatten(0, -2).float()   # (rows, V)
    return F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), reduction="batchmean",
                    log_target=True)


def _starfish(inputs: LossInputs):
    return block_cosine_loss(inputs.student_reps, inputs.teacher_reps, inputs.per, inputs.block_weights,
                             inputs.fused, per_block=True)


def _mse(inputs: LossInputs):
    return block_mse_loss(inputs.student_reps, inputs.teacher_reps, inputs.block_weights, per_block=True)


def _kl(inputs: LossInputs):
    return kl_dense_to_pruned(inputs.student_logits, inputs.teacher_logits), None


def _ce(inputs: LossInputs):
    """Cross-entropy of the logits with the labels; for a language model's (B, T, V) logits and (B, T)
    tokens, next-token prediction (position t predicts token t + 1)."""
    import torch.nn.functional as F

    logits, labels = inputs.student_logits, inputs.labels
    if labels is None:
        raise ValueError("objective 'ce' needs labels with the calibration batches")
    if logits.dim() == 3:
        logits, labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()                # (B*(T-1), V)
    return F.cross_entropy(logits.float(), labels), None


def _starfish_kl(inputs: LossInputs):
    loss, blocks = _starfish(inputs)
    return 0.5 * loss + 0.5 * kl_dense_to_pruned(inputs.student_logits, inputs.teacher_logits), blocks


DEFAULT = "starfish"              # HealConfig's default: the paper's objective
FINISHES = ("kl",)                # whole-model objectives a run may finish with (HealConfig.finish)
OBJECTIVES: Mapping[str, Objective] = {spec.name: spec for spec in (
    Objective("starfish", "per-block cosine alignment with the dense model (the paper's)", _starfish,
              needs_blocks=True, fused_cosine=True),
    Objective("mse", "per-block mean squared error to the dense model's outputs", _mse, needs_blocks=True),
    Objective("kl", "KL divergence of the pruned output distribution from the dense one", _kl,
              needs_student_logits=True,
              needs_teacher_logits=True),
    Objective("ce", "cross-entropy with the labels (labels=), or a causal language model's next tokens", _ce,
              needs_student_logits=True,
              needs_labels=True),
    Objective("starfish+kl", "0.5 starfish + 0.5 kl", _starfish_kl, needs_blocks=True, needs_student_logits=True,
              needs_teacher_logits=True, fused_cosine=True),
)}


def objective(name: str) -> Objective:
    """The registry entry of ``name``; ValueError naming the allowed ones otherwise."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; allowed: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def objective_loss(name: str, per_block: bool = False, **inputs):
    """The scalar loss of objective ``name`` on ``LossInputs(**inputs)``; with ``per_block`` a pair
    (loss, each block's unweighted loss (L,) detached, or None for the output-only objectives)."""
    loss, blocks = objective(name).loss(LossInputs(**inputs))
    return (loss, blocks) if per_block else loss


def adaptive_block_weights(distances):
    """Block weights from each block's distance to the dense model (its mean ``1 - cos``): proportional
    to the distance, normalised to mean 1 (uniform where every distance is 0). On the device, no sync."""
    import torch

    distances = distances.float().clamp_min(0)                                              # (L,)
    total = distances.sum()
    uniform = torch.ones_like(distances)
    return torch.where(total > 0, distances * distances.numel() / total.clamp_min(1e-30), uniform)
