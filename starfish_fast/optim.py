"""Masked Adam/AdamW for the fast loop: the mask is folded into the step, so pruned
weights stay exactly zero without a separate masking pass or gradient hooks.

    optimizer = MaskedAdam(params, masks, weight_decay=0.0)      # Adam; AdamW when weight_decay > 0
    optimizer.step(lr)                                           # lr: float or 0-dim device tensor
    optimizer.zero_grad()

Only the prunable weights are in it. Moments may be kept in bf16 (``moments_dtype``)
to halve optimizer memory on large models. The update is the kernels' ``masked_adam_step``:
``kernel=True`` the Triton kernel, False plain torch (torch's fused Adam/AdamW and a mask multiply
on CUDA, ``torch._foreach`` ops elsewhere); the engine passes its plan's choice.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from starfish_fast.kernels import masked_adam_step


class MaskedAdam:
    """Adam (``weight_decay == 0``, or L2 when ``decoupled=False``) / AdamW (decoupled) with masks."""

    def __init__(self, params: Sequence[torch.nn.Parameter], masks: Sequence[torch.Tensor], *, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled: bool | None = None,
                 moments_dtype: torch.dtype | None = None, kernel: bool = False):
        if len(params) != len(masks):
            raise ValueError(f"{len(params)} parameters but {len(masks)} masks")
        for p, m in zip(params, masks):
            if p.shape != m.shape:
                raise ValueError(f"mask shape {tuple(m.shape)} does not match parameter shape {tuple(p.shape)}")
        self.params = list(params)
        # bool masks stay bool (a quarter of a float mask's memory: the torch path converts them a chunk at a time,
        # kernels/masked_adam.CHUNK_ELEMENTS); 0/1 float masks take the parameters' dtype
        self.masks = [m.to(device=p.device) if m.dtype == torch.bool else m.to(device=p.device, dtype=p.dtype)
                      for p, m in zip(params, masks)]
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        # The reference picks Adam when weight_decay == 0, else AdamW.
        self.decoupled = weight_decay > 0 if decoupled is None else decoupled
        self.moments_dtype = moments_dtype
        self.kernel = kernel
        # the kernel reads bool masks (1 byte per element of its 29, against 4 for float masks);
        # the torch path multiplies by the masks as given
        self.step_masks = [m.to(torch.bool) for m in self.masks] if kernel else self.masks
        self.exp_avgs = [torch.zeros_like(p, dtype=moments_dtype or p.dtype) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p, dtype=moments_dtype or p.dtype) for p in self.params]
        self.step_count = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr: float | torch.Tensor) -> None:
        self.step_count += 1
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        masked_adam_step(self.params, grads, self.exp_avgs, self.exp_avg_sqs, self.step_masks, lr=lr,
                         beta1=self.betas[0], beta2=self.betas[1], eps=self.eps, weight_decay=self.weight_decay,
                         step=self.step_count, decoupled=self.decoupled, kernel=self.kernel)

    def state_dict(self) -> dict:
        return {"step": self.step_count, "exp_avgs": [t.clone() for t in self.exp_avgs],
                "exp_avg_sqs": [t.clone() for t in self.exp_avg_sqs]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["exp_avgs"]) != len(self.params):
            raise ValueError(f"optimizer state holds {len(state['exp_avgs'])} tensors, this run has "
                             f"{len(self.params)} trainable weights")
        self.step_count = int(state["step"])
        for own, saved in zip(self.exp_avgs + self.exp_avg_sqs, state["exp_avgs"] + state["exp_avg_sqs"]):
            own.copy_(saved)


def lr_schedule_values(lr: float, min_lr: float, schedule: str, total_steps: int) -> list[float]:
    """Per-step learning rates: closed-form cosine from ``lr`` to ``min_lr`` over ``total_steps``
    (what ``CosineAnnealingLR`` gives step by step), or constant."""
    if schedule == "constant":
        return [lr] * total_steps
    return [min_lr + (lr - min_lr) * (1 + math.cos(math.pi * t / total_steps)) / 2 for t in range(total_steps)]


class ScalerView(torch.optim.Optimizer):
    """Lets ``GradScaler`` unscale and step a ``MaskedAdam`` (it expects a torch optimizer)."""

    def __init__(self, optimizer: MaskedAdam):
        self.param_groups = [{"params": optimizer.params}]
        self.defaults, self.state, self.masked_adam = {}, {}, optimizer

    def step(self, lr):
        return self.masked_adam.step(lr)
