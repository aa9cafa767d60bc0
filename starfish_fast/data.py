"""Calibration and evaluation data: Fashion-MNIST IDX files, ImageFolder trees,
in-memory tensors and (optionally) Hugging Face streaming, as the reference.

    from starfish_fast.data import load_fashion_mnist, calibration_batches
    images, labels = load_fashion_mnist(split="train")           # (60000,1,28,28) float, (60000,)
    calib = calibration_batches(images, num_samples=1000, batch_size=32, seed=0)

Calibration images are unlabeled: the functions that build calibration sets
return images only, so labels can never reach the healing objective.
"""
from __future__ import annotations

import gzip
import logging
import os
import struct
from pathlib import Path
from typing import Iterable, Iterator

import torch

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Per-pixel statistics of the Fashion-MNIST train split (60k images, [0,1] scale).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _open_maybe_gz(directory: Path, stem: str):
    for name in (stem + ".gz", stem):
        if (directory / name).exists():
            path = directory / name
            return gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb")
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory} "
        f"(install it with `apt-get install -y dataset-fashion-mnist` or pass a directory holding the four IDX files)")


def _read_idx(directory: Path, stem: str) -> torch.Tensor:
    with _open_maybe_gz(directory, stem) as f:
        magic = f.read(4)
        if len(magic) != 4 or magic[0] != 0 or magic[1] != 0 or magic[2] != 8:
            raise ValueError(f"{directory / stem}: not an unsigned-byte IDX file (magic {magic!r})")
        ndim = magic[3]
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        data = f.read()
    expected = 1
    for s in shape:
        expected *= s
    if len(data) != expected:
        raise ValueError(f"{directory / stem}: header says {shape} ({expected} bytes) but holds {len(data)} bytes")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(shape)


def load_fashion_mnist(directory: str | os.PathLike = FASHION_MNIST_DIR, split: str = "train",
                       normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, 28, 28)`` float32 (normalised with the train-split mean/std
    unless ``normalize=False``, then in [0, 1]) and labels ``(N,)`` int64."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; allowed: {sorted(FASHION_MNIST_FILES)}")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST directory {directory} does not exist "
                                f"(install it with `apt-get install -y dataset-fashion-mnist`)")
    image_stem, label_stem = FASHION_MNIST_FILES[split]
    images = _read_idx(directory, image_stem).unsqueeze(1).float().div_(255.0)  # (N, 1, 28, 28)
    labels = _read_idx(directory, label_stem).long()                            # (N,)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{directory}: {images.shape[0]} images but {labels.shape[0]} labels")
    if normalize:
        images = (images - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return images, labels


def image_folder_loader(directory: str | os.PathLike, batch_size: int = 32, transform=None, num_samples: int = 0,
                        shuffle: bool = False, seed: int = 0, num_workers: int = 2):
    """A ``DataLoader`` of ``(images, labels)`` over a torchvision ImageFolder tree, streamed from disk.
    ``num_samples > 0`` takes that many (a seeded random subset when ``shuffle``); default
    transform: the reference's ``build_transform()`` (ImageNet 224 crop)."""
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import ImageFolder

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"image directory {directory} does not exist")
    dataset = ImageFolder(str(directory), transform=transform or build_transform())
    if len(dataset) == 0:
        raise ValueError(f"image directory {directory} holds no images")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)) if shuffle \
        else torch.arange(len(dataset))
    if num_samples > 0:
        order = order[:num_samples]
    return DataLoader(Subset(dataset, order.tolist()), batch_size=batch_size, shuffle=False, num_workers=num_workers)


def build_transform():
    """Resize(256), CenterCrop(224), ToTensor, Normalize(ImageNet mean/std): the reference's transform."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def fashion_mnist_transform():
    """Image files for the bundled model: grayscale 28x28, normalised like ``load_fashion_mnist``."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Grayscale(),
        transforms.Resize((28, 28)),
        transforms.ToTensor(),
        transforms.Normalize((FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,)),
    ])


def select_calibration(images: torch.Tensor, num_samples: int, seed: int = 0) -> torch.Tensor:
    """A seeded random subset of ``num_samples`` images (no labels)."""
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if num_samples > images.shape[0]:
        raise ValueError(f"calibration set too small: {num_samples} samples requested but only "
                         f"{images.shape[0]} images available")
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(images.shape[0], generator=generator)[:num_samples]
    return images[index]


def split_batches(images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive batches of ``batch_size`` (the last may be smaller), as the reference loader yields."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return [images[i:i + batch_size] for i in range(0, images.shape[0], batch_size)]


def calibration_batches(images: torch.Tensor, num_samples: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    return split_batches(select_calibration(images, num_samples, seed), batch_size)


def as_batches(calib, batch_size: int | None = None) -> list[torch.Tensor]:
    """Normalise what users pass as calibration data into a list of image batches.

    Accepts one tensor ``(N, C, H, W)`` (split by ``batch_size``), a list of single
    images ``(C, H, W)`` (stacked, then split), or any iterable of batches, kept as
    given, where an element may be a tensor or an ``(images, labels)`` pair (labels
    are dropped)."""
    if isinstance(calib, torch.Tensor):
        if calib.dim() < 2:
            raise ValueError(f"calibration tensor must be batched (N, ...), got shape {tuple(calib.shape)}")
        return split_batches(calib, batch_size or calib.shape[0])
    items = [item[0] if isinstance(item, (tuple, list)) else item for item in calib]
    if not items:
        raise ValueError("calibration set is empty")
    for i, item in enumerate(items):
        if not isinstance(item, torch.Tensor):
            raise ValueError(f"calibration item {i} is a {type(item).__name__}, expected a tensor")
    if all(item.dim() == 3 for item in items):  # single images (C, H, W)
        return split_batches(torch.stack(items), batch_size or len(items))
    return items  # already batches (a DataLoader, the reference's calib_batches): kept as given


def cache_calibration_data(loader: Iterable, num_samples: int) -> list[torch.Tensor]:
    """Exactly ``num_samples`` images from ``loader`` as CPU batches (reference semantics)."""
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    batches, taken = [], 0
    for item in loader:
        images = item[0] if isinstance(item, (tuple, list)) else item
        images = images[: num_samples - taken].cpu()
        batches.append(images)
        taken += images.shape[0]
        if taken >= num_samples:
            return batches
    raise ValueError(f"calibration set too small: {num_samples} samples requested but the loader gave {taken}")


class TensorLoader:
    """A re-iterable loader of ``(images, labels)`` batches over in-memory tensors."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 256):
        if labels is not None and labels.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images, self.batch_size = images, batch_size
        self.labels = labels if labels is not None else torch.full((images.shape[0],), -100, dtype=torch.long)

    def __len__(self) -> int:
        return (self.images.shape[0] + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, self.images.shape[0], self.batch_size):
            yield self.images[i:i + self.batch_size], self.labels[i:i + self.batch_size]


def _hf_stream(dataset_name: str, split: str, transform, skip: int, take: int, seed: int, shuffle_buffer: int,
               shuffle: bool):
    try:
        from datasets import load_dataset
    except ImportError as error:  # pragma: no cover - optional extra
        raise ImportError("Hugging Face streaming needs the `hf` extra: pip install 'starfish_fast[hf]'") from error
    split_name = {"train": "train", "val": "validation", "test": "test"}[split]
    stream = load_dataset(dataset_name, split=split_name, streaming=True)
    if shuffle:
        stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer)
    stream = stream.skip(skip).take(take)
    for row in stream:
        image = row.get("image", row.get("img"))
        label = row.get("label", -100)
        yield transform(image.convert("RGB")), (-100 if label is None or label < 0 else int(label))


def _hf_loader(*, dataset_name: str, split_source: str, batch_size: int, transform, skip: int, num_samples: int,
               seed: int, shuffle_buffer: int, shuffle: bool):
    if split_source not in ("train", "val", "test"):
        raise ValueError(f"unknown split source {split_source!r}; allowed: train, val, test")
    transform = transform or build_transform()

    class _Loader:
        def __iter__(self):
            images, labels = [], []
            for image, label in _hf_stream(dataset_name, split_source, transform, skip, num_samples, seed,
                                           shuffle_buffer, shuffle):
                images.append(image)
                labels.append(label)
                if len(images) == batch_size:
                    yield torch.stack(images), torch.tensor(labels)
                    images, labels = [], []
            if images:
                yield torch.stack(images), torch.tensor(labels)

    return _Loader()


def make_calibration_loader(*, dataset_name: str = "ILSVRC/imagenet-1k", split_source: str = "test",
                            batch_size: int = 32, transform=None, num_samples: int = 5000, seed: int = 0,
                            shuffle_buffer: int = 5000, shuffle: bool = True):
    """Streaming ``(image, label)`` batches from a Hugging Face dataset (reference API)."""
    return _hf_loader(dataset_name=dataset_name, split_source=split_source, batch_size=batch_size,
                      transform=transform, skip=0, num_samples=num_samples, seed=seed,
                      shuffle_buffer=shuffle_buffer, shuffle=shuffle)


def make_eval_loader(*, dataset_name: str = "ILSVRC/imagenet-1k", split_source: str = "val", batch_size: int = 32,
                     transform=None, num_samples: int = 0, skip_samples: int = 0, seed: int = 0,
                     shuffle_buffer: int = 5000, shuffle: bool = False):
    """Streaming evaluation batches; ``skip_samples`` skips the calibration images when both use ``val``."""
    return _hf_loader(dataset_name=dataset_name, split_source=split_source, batch_size=batch_size,
                      transform=transform, skip=skip_samples, num_samples=num_samples, seed=seed,
                      shuffle_buffer=shuffle_buffer, shuffle=shuffle)

