"""Top-1 accuracy of a classifier over a loader or in-memory tensors.

    from starfish_fast.evaluate import evaluate_top1_tensors
    top1 = evaluate_top1_tensors(model, test_images, test_labels)   # percent
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn


@torch.no_grad()
def evaluate_top1(model: nn.Module, loader: Iterable, device: str | torch.device, desc: str | None = None) -> float:
    """Top-1 in percent over labels >= 0 (reference semantics); NaN if the loader has none. Under
    torchrun each process evaluates every world-size-th batch and the counts are summed. With ``desc``,
    a progress bar."""
    from starfish_fast import distributed
    from starfish_fast.progress import progress_bar

    group = distributed.current()
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    counted = torch.zeros((), dtype=torch.long, device=device)
    for index, (images, labels) in enumerate(progress_bar(loader, desc=desc, enabled=group is None or group.main)):
        if group is not None and index % group.world_size != group.rank:
            continue
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        predictions = model(images).argmax(dim=-1)   # (B,)
        valid = labels >= 0                           # (B,)
        correct += (predictions.eq(labels) & valid).sum()
        counted += valid.sum()
    model.train(was_training)
    if group is not None:
        correct, counted = group.sum(correct), group.sum(counted)
    counted_total = int(counted)
    return math.nan if counted_total == 0 else 100.0 * int(correct) / counted_total


def evaluate_top1_tensors(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000,
                          device: str | torch.device | None = None) -> float:
    """Top-1 in percent of ``model`` on in-memory ``images (N, ...)`` and ``labels (N,)``."""
    from starfish_fast.data import TensorLoader

    device = device or next(model.parameters()).device
    return evaluate_top1(model, TensorLoader(images, labels, batch_size), device)
