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
from starfish_fast.kernels.cosine_loss import multi_block_cosine_loss, weighted_block_mean
from starfish_fast.kernels._dispatch import use_triton



def needs_blocks(objective: str) -> bool:
    return objective in ("starfish", "mse", "starfish+kl")


def needs_teacher_logits(objective: str) -> bool:
    return objective in ("kl", "starfish+kl")


def block_cosine_loss(students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor], per: str = "auto",
                      block_weights: Sequence[float] | torch.Tensor | None = None, kernels: str = "torch",
                      per_block: bool = False):
    """STARFISH loss; the teacher is cast to the student's dtype first (reference rule). ``block_weights``
    weight the mean over blocks; ``per_block`` also returns each block's loss (L,), detached.

    ``kernels``: ``torch`` (plain reference), ``triton`` or ``auto`` (the fused Triton loss
    where the dispatch table says it wins: CUDA); both take the weights in the same launches."""
    if len(students) != len(teachers) or not students:
        raise ValueError(f"need the same non-zero number of student and teacher blocks, got "
                         f"{len(students)} and {len(teachers)}")
    per = "auto" if per == "shape" else per           # the plan's "by shape" is the kernels' auto
    fused = use_triton("cosine_loss", students[0], kernels)
    return multi_block_cosine_loss(list(students), list(teachers), per, block_weights=block_weights,
                                   per_block=per_block, kernel=fused)


def block_mse_loss(students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor],
                   block_weights: Sequence[float] | torch.Tensor | None = None, per_block: bool = False):
    stacked = torch.stack([F.mse_loss(s, t.to(s.dtype)) for s, t in zip(students, teachers)])      # (L,)
    return weighted_block_mean(stacked, block_weights, per_block)


def kl_dense_to_pruned(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_dense || p_pruned), mean over the batch; computed in fp32."""
    return F.kl_div(F.log_softmax(student_logits.float(), dim=-1), F.log_softmax(teacher_logits.float(), dim=-1),
                    reduction="batchmean", log_target=True)


def objective_loss(objective: str, *, student_reps=None, teacher_reps=None, student_logits=None,
                   teacher_logits=None, labels=None, per: str = "auto",
                   block_weights: Sequence[float] | torch.Tensor | None = None, kernels: str = "torch",
                   per_block: bool = False):
    """The scalar healing loss of ``objective`` (see the module docstring); with ``per_block`` a pair
    (loss, each block's unweighted loss (L,) detached, or None for the output-only objectives)."""
    blocks = None
    if objective in ("starfish", "starfish+kl"):
        loss, blocks = block_cosine_loss(student_reps, teacher_reps, per, block_weights, kernels, per_block=True)
        if objective == "starfish+kl":
            loss = 0.5 * loss + 0.5 * kl_dense_to_pruned(student_logits, teacher_logits)
    elif objective == "mse":
        loss, blocks = block_mse_loss(student_reps, teacher_reps, block_weights, per_block=True)
    elif objective == "kl":
        loss = kl_dense_to_pruned(student_logits, teacher_logits)
    elif objective == "ce":
        if labels is None:
            raise ValueError("objective 'ce' needs labels with the calibration batches")
        loss = F.cross_entropy(student_logits.float(), labels)
    else:
        raise ValueError(f"unknown objective {objective!r}; allowed: {', '.join(OBJECTIVES)}")
    return (loss, blocks) if per_block else loss


def adaptive_block_weights(distances: torch.Tensor) -> torch.Tensor:
    """Block weights from each block's distance to the dense model (its mean ``1 - cos``): proportional
    to the distance, normalised to mean 1 (uniform where every distance is 0). On the device, no sync."""
    distances = distances.float().clamp_min(0)                                              # (L,)
    total = distances.sum()
    uniform = torch.ones_like(distances)
    return torch.where(total > 0, distances * distances.numel() / total.clamp_min(1e-30), uniform)
