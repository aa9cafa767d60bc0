"""Teacher store: the dense model's block outputs (and logits) for every calibration batch.

    store = make_teacher_store("device", dense_model, adapter, block_names, batches, device)
    targets = store.get(i)          # list of (B, T, D) tensors on `device`, one per block (+ logits last if kept)
    store.prefetch(i + 1)           # pinned store: starts the next copy on a side stream

Kinds: ``device`` (plain tensors on the compute device: GPU memory on CUDA, RAM on the
CPU), ``pinned`` (pinned host memory in fixed-size chunks, the next batch copied on a side
CUDA stream while the current step runs), ``disk`` (a memory-mapped file, for caches larger
than RAM), ``recompute`` (the teacher runs every step). ``teacher_store="auto"`` is decided by
``plan.resolve_plan`` from ``estimate_bytes`` and the free memory.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from starfish_fast.config import STORE_KINDS

log = logging.getLogger(__name__)

# The caching allocator rounds each pinned allocation up to a power of two: 256 MiB chunks
# waste at most one partly used chunk instead of up to half of a single huge allocation.
PINNED_CHUNK_BYTES = 256 << 20


@torch.no_grad()
def teacher_outputs(dense_model: nn.Module, adapter, block_names: Sequence[str], images: torch.Tensor,
                    keep_logits: bool, keep_blocks: bool = True) -> list[torch.Tensor]:
    """Block outputs (and logits, last) of one dense forward pass."""
    logits, reps = adapter.forward_blocks(dense_model, images, block_names if keep_blocks else [],
                                          need_logits=keep_logits)
    return (list(reps) if keep_blocks else []) + ([logits] if keep_logits else [])


class TeacherStore:
    kind = "device"

    def __len__(self) -> int:
        return self.num_batches

    def get(self, index: int) -> list[torch.Tensor]:
        raise NotImplementedError

    def prefetch(self, index: int) -> None:
        """Start bringing batch ``index`` to the device (no-op unless the store streams)."""


class DeviceStore(TeacherStore):
    """Targets held as plain tensors: on the compute device (GPU-resident on CUDA, RAM on CPU), or
    in a host buffer (the disk store's mapping, kind "disk")."""

    def __init__(self, outputs_per_batch: list[list[torch.Tensor]], kind: str = "device"):
        self.outputs, self.num_batches, self.kind = outputs_per_batch, len(outputs_per_batch), kind

    def get(self, index):
        return self.outputs[index]


class PinnedStore(TeacherStore):
    """Targets in pinned host chunks; ``prefetch`` copies the next batch on a side stream (double buffered)."""

    kind = "pinned"

    def __init__(self, host_outputs: list[list[torch.Tensor]], device: torch.device):
        self.host, self.num_batches, self.device = host_outputs, len(host_outputs), device
        self.copy_stream = torch.cuda.Stream(device=device)
        self.pending: dict[int, tuple[list[torch.Tensor], torch.cuda.Event]] = {}

    def prefetch(self, index):
        if index >= self.num_batches or index in self.pending:
            return
        with torch.cuda.stream(self.copy_stream):
            tensors = [t.to(self.device, non_blocking=True) for t in self.host[index]]
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        self.pending[index] = (tensors, ready)

    def get(self, index):
        self.prefetch(index)
        tensors, ready = self.pending.pop(index)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(ready)              # GPU-side wait: the host never blocks
        for t in tensors:                      # memory made on the copy stream is used on the compute stream
            t.record_stream(compute)
        return tensors


class RecomputeStore(TeacherStore):
    """No cache: the dense model runs on every access (the reference's ``--no-dense-cache``)."""

    kind = "recompute"

    def __init__(self, dense_model, adapter, block_names, batches, device, keep_logits, keep_blocks, compute_dtype):
        self.args = (dense_model, adapter, block_names)
        self.batches, self.num_batches, self.device = batches, len(batches), device
        self.keep_logits, self.keep_blocks, self.compute_dtype = keep_logits, keep_blocks, compute_dtype

    def get(self, index):
        dense_model, adapter, block_names = self.args
        # Like the reference's LazyDenseTargets: outputs as computed, no cast.
        with teacher_autocast(self.device, self.compute_dtype):
            return teacher_outputs(dense_model, adapter, block_names, self.batches[index].to(self.device),
                                   self.keep_logits, self.keep_blocks)


def teacher_autocast(device: torch.device, compute_dtype: torch.dtype):
    """The teacher runs in the student's compute precision on CUDA (bf16/fp16 autocast), else fp32:
    on CPU it runs once, off the critical path, and exact mode (fp32) must match the reference."""
    return torch.autocast(device.type, dtype=compute_dtype,
                          enabled=compute_dtype != torch.float32 and device.type == "cuda")


class ChunkedHostBuffer:
    """Carves tensors out of fixed-size host chunks: pinned memory, or one memory-mapped file."""

    def __init__(self, total_bytes: int, pinned: bool = False, path: Path | None = None):
        self.pinned, self.offset, self.chunks = pinned, 0, []
        if path is not None:  # one file, mapped shared so pages go back to the OS under pressure
            os.truncate(path, max(total_bytes, 1))
            self.file_storage = torch.from_file(str(path), shared=True, size=max(total_bytes, 1),
                                                dtype=torch.uint8)
        else:
            self.file_storage = None

    def allocate(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = math.prod(shape) * itemsize
        self.offset = (self.offset + 63) // 64 * 64                  # 64-byte alignment for vector copies
        if self.file_storage is not None:
            raw = self.file_storage[self.offset:self.offset + nbytes]
            self.offset += nbytes
            return raw.view(dtype).view(shape)
        if not self.chunks or self.offset + nbytes > self.chunks[-1].numel():
            self.chunks.append(torch.empty(max(PINNED_CHUNK_BYTES, nbytes), dtype=torch.uint8,
                                           pin_memory=self.pinned))
            self.offset = 0
        raw = self.chunks[-1][self.offset:self.offset + nbytes]
        self.offset += nbytes
        return raw.view(dtype).view(shape)


def _fill_host(outputs: Iterable[list[torch.Tensor]], sizes: Sequence[int], dtype, buffer_of):
    """Copy each batch's ``outputs`` (``sizes``: the batches' sizes) into host memory from ``buffer_of``."""
    host = []
    buffer = None
    for size, step in zip(sizes, outputs):
        if buffer is None:   # sized for every image (batches may differ in size), plus alignment slack
            per_image = sum(t.numel() for t in step) * torch.empty((), dtype=dtype).element_size() // size
            buffer = buffer_of(per_image * sum(sizes) + 64 * len(step) * len(sizes))
        stored = []
        for t in step:
            slot = buffer.allocate(t.shape, dtype)
            slot.copy_(t.to(dtype))
            stored.append(slot)
        host.append(stored)
    return host


def estimate_bytes(model, adapter, block_names, sample: torch.Tensor, num_images: int, keep_logits: bool,
                   keep_blocks: bool, dtype: torch.dtype) -> int:
    """Bytes of the whole cache for ``num_images``, from one forward pass of ``model`` (the dense
    architecture: pruned weights give the same shapes) on ``sample`` (one image, batched)."""
    device = next(model.parameters()).device
    outputs = teacher_outputs(model, adapter, block_names, sample[:1].to(device), keep_logits, keep_blocks)
    per_image = sum(t.numel() for t in outputs) * torch.empty((), dtype=dtype).element_size()
    return per_image * num_images


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def make_teacher_store(kind: str, dense_model: nn.Module, adapter, block_names: Sequence[str],
                       batches: Sequence[torch.Tensor], device: torch.device, *, dtype: torch.dtype = torch.bfloat16,
                       compute_dtype: torch.dtype = torch.float32, keep_logits: bool = False, keep_blocks: bool = True,
                       disk_dir: str | os.PathLike | None = None) -> TeacherStore:
    """Build the store of ``kind`` (as the plan resolved it; "none": nothing kept), with one dense pass
    over ``batches`` unless recomputing. ``dtype``: how the outputs are kept; ``compute_dtype``: the
    autocast dtype of the teacher's forward on CUDA (fp32: none)."""
    if kind not in STORE_KINDS[1:] + ("none",):
        raise ValueError(f"unknown teacher store {kind!r}; allowed: {', '.join(STORE_KINDS[1:])}")
    if kind == "pinned" and device.type != "cuda":
        raise ValueError(f"teacher store {kind!r} needs a CUDA device, got {device}")
    if kind == "none":
        return DeviceStore([[] for _ in batches], "none")
    dense_model.eval()
    if kind == "recompute":
        return RecomputeStore(dense_model, adapter, block_names, batches, device, keep_logits, keep_blocks,
                              compute_dtype)

    def outputs():
        for images in batches:
            with teacher_autocast(device, compute_dtype):
                step = teacher_outputs(dense_model, adapter, block_names, images.to(device), keep_logits, keep_blocks)
            yield step
    return store_of(kind, outputs(), [b.shape[0] for b in batches], device, dtype, disk_dir)


def store_of(kind: str, outputs: Iterable[list[torch.Tensor]], sizes: Sequence[int], device: torch.device,
             dtype: torch.dtype, disk_dir: str | os.PathLike | None = None) -> TeacherStore:
    """A store of ``kind`` (device, pinned, disk) holding each batch's ``outputs`` in ``dtype``: the teacher's,
    or a sequential run's block inputs and targets. ``outputs`` is consumed one batch at a time, so nothing but
    the store itself holds them all; ``sizes``: the batches' sizes (the host buffer is sized from them)."""
    if kind == "device":
        return DeviceStore([[t.to(dtype) for t in step] for step in outputs], kind)
    if kind == "pinned":
        return PinnedStore(_fill_host(outputs, sizes, dtype, lambda n: ChunkedHostBuffer(n, pinned=True)), device)
    directory = Path(disk_dir or tempfile.gettempdir())
    directory.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="starfish_teacher_", suffix=".bin", dir=directory)
    os.close(fd)
    try:
        host = _fill_host(outputs, sizes, dtype, lambda n: ChunkedHostBuffer(n, path=Path(path)))
    finally:
        os.unlink(path)   # the mapping stays valid; the file vanishes when the store does
    store = DeviceStore(host, "disk")
    return _DeviceCopyStore(store, device) if device.type == "cuda" else store


class _DeviceCopyStore(TeacherStore):
    """Wraps a host store whose tensors must be copied to a CUDA device on access."""

    def __init__(self, host_store: TeacherStore, device: torch.device):
        self.host_store, self.device = host_store, device
        self.num_batches, self.kind = host_store.num_batches, host_store.kind

    def get(self, index):
        return [t.to(self.device, non_blocking=False) for t in self.host_store.get(index)]
