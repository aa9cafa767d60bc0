"""Healing objectives: STARFISH per-block cosine alignment and the baselines it is compared with.

    from starfish_fast.objectives import block_cosine_loss
    loss = block_cosine_loss(student_reps, teacher_reps)     # lists of (B, T, D) or (B, C, H, W)

``starfish``      mean over blocks of mean over rows of 1 - cos(student, teacher); a row is a
                  token for (B, T, D) outputs and an image for anything else (reference rule)
``mse``           mean over blocks of the mean squared error between block outputs
``kl``            KL(dense || pruned) of the softmax outputs, batch mean
``ce``            cross-entropy of the pruned logits with the labels (the only one using labels)
``starfish+kl``   0.5 * starfish + 0.5 * kl
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from starfish_fast.config import OBJECTIVES
from starfish_fast.kernels import multi_block_cosine_loss, multi_block_cosine_loss_reference
from starfish_fast.kernels._dispatch import use_triton



def needs_blocks(objective: str) -> bool:
    return objective in ("starfish", "mse", "starfish+kl")


def needs_teacher_logits(objective: str) -> bool:
    return objective in ("kl", "starfish+kl")


def _weighted_block_mean(per_block: list[torch.Tensor], block_weights: Sequence[float] | None) -> torch.Tensor:
    stacked = torch.stack(per_block)                                  # (L,)
    if block_weights is None:
        return stacked.mean()
    if len(block_weights) != len(per_block):
        raise ValueError(f"{len(block_weights)} block weights for {len(per_block)} blocks")
    weights = torch.as_tensor(block_weights, dtype=stacked.dtype, device=stacked.device)
    return (stacked * weights).sum() / weights.sum()


def block_cosine_loss(students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor], per: str = "auto",
                      block_weights: Sequence[float] | None = None, kernels: str = "torch") -> torch.Tensor:
    """STARFISH loss; the teacher is cast to the student's dtype first (reference rule).

    ``kernels``: ``torch`` (plain reference), ``triton`` or ``auto`` (the fused Triton loss
    where the dispatch table says it wins: CUDA)."""
    if len(students) != len(teachers) or not students:
        raise ValueError(f"need the same non-zero number of student and teacher blocks, got "
                         f"{len(students)} and {len(teachers)}")
    per = "auto" if per == "shape" else per           # the plan's "by shape" is the kernels' auto
    if block_weights is None:
        fused = use_triton("cosine_loss", students[0], kernels)
        return multi_block_cosine_loss(list(students), list(teachers), per, kernel=fused)
    per_block = [multi_block_cosine_loss_reference([s], [t], per) for s, t in zip(students, teachers)]
    return _weighted_block_mean(per_block, block_weights)


def block_mse_loss(students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor],
                   block_weights: Sequence[float] | None = None) -> torch.Tensor:
    per_block = [F.mse_loss(s, t.to(s.dtype)) for s, t in zip(students, teachers)]
    return _weighted_block_mean(per_block, block_weights)


def kl_dense_to_pruned(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_dense || p_pruned), mean over the batch; computed in fp32."""
    return F.kl_div(F.log_softmax(student_logits.float(), dim=-1), F.log_softmax(teacher_logits.float(), dim=-1),
                    reduction="batchmean", log_target=True)


def objective_loss(objective: str, *, student_reps=None, teacher_reps=None, student_logits=None,
                   teacher_logits=None, labels=None, per: str = "auto",
                   block_weights: Sequence[float] | None = None, kernels: str = "torch") -> torch.Tensor:
    """The scalar healing loss of ``objective`` (see the module docstring)."""
    if objective == "starfish":
        return block_cosine_loss(student_reps, teacher_reps, per, block_weights, kernels)
    if objective == "mse":
        return block_mse_loss(student_reps, teacher_reps, block_weights)
    if objective == "kl":
        return kl_dense_to_pruned(student_logits, teacher_logits)
    if objective == "ce":
        if labels is None:
            raise ValueError("objective 'ce' needs labels with the calibration batches")
        return F.cross_entropy(student_logits.float(), labels)
    if objective == "starfish+kl":
        return 0.5 * block_cosine_loss(student_reps, teacher_reps, per, block_weights, kernels) + \
            0.5 * kl_dense_to_pruned(student_logits, teacher_logits)
    raise ValueError(f"unknown objective {objective!r}; allowed: {', '.join(OBJECTIVES)}")
