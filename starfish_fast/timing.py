"""Timing on a CUDA device, shared by what measures before it decides (2:4 backends, cuSPARSELt algorithms)
and by the benchmarks.

    from starfish_fast.timing import cuda_median_ms
    ms = cuda_median_ms(lambda: x @ w, iters=20)      # the median of 20 CUDA-event timings, after 5 warm-ups
"""
from __future__ import annotations

import statistics
from typing import Callable

import torch


def cuda_median_ms(fn: Callable[[], object], iters: int = 20, warmup: int = 5) -> float:
    """Median kernel time of ``fn()`` on the current CUDA stream (CUDA events), in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
