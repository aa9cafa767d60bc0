"""Calibration and evaluation data: Fashion-MNIST IDX files, folders of image files, in-memory
tensors and Hugging Face streaming (the reference's loaders, same signatures).

    from starfish_fast.data import FASHION_MNIST_DIR, fashion_mnist_split, image_files_loader, split_batches
    calib, eval_images, eval_labels = fashion_mnist_split(FASHION_MNIST_DIR, "test", calib_samples=1000,
                                                          eval_samples=9000, seed=0)
    batches = split_batches(calib, batch_size=32)                  # (32, 1, 28, 28) float batches, no labels
    loader = image_files_loader("my_images/", num_samples=512, shuffle=True)   # (images, labels=-100) batches

    from starfish_fast.data import build_transform, make_calibration_loader   # pip install 'starfish_fast[hf]'
    loader = make_calibration_loader(dataset_name="ILSVRC/imagenet-1k", source="test", batch_size=32,
                                     transform=build_transform(), calib_samples=5000, seed=0, shuffle_buffer=5000)

Calibration images are unlabeled: the functions that build calibration sets return images
only (or labels of -100), so labels can never reach the healing objective. The ``check_*`` functions
tell, before any work, whether a data source is there (one-line errors naming the flag).
"""
from __future__ import annotations

import gzip
import io
import os
import struct
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"      # where `apt-get install dataset-fashion-mnist` puts it
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_SIZES = {"train": 60000, "test": 10000}
CALIB_SOURCES = ("train", "val", "test")
# Calibration source -> (Hugging Face split, shuffled): the reference's rule.
HF_CALIB_SPLITS = {"train": ("train", True), "val": ("validation", False), "test": ("test", True)}
HF_IMAGE_KEYS = ("image", "jpg", "jpeg", "png", "webp")
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


def _check_source(source: str) -> None:
    if source not in CALIB_SOURCES:
        raise ValueError(f"unknown calibration source {source!r}; allowed: {', '.join(CALIB_SOURCES)}")


def check_split_counts(source: str, calib_samples: int, eval_samples: int,
                       sizes: Mapping[str, int] = FASHION_MNIST_SIZES) -> None:
    """ValueError unless the calibration split holds ``calib_samples`` images and ``eval_samples`` test
    images remain for evaluation (``sizes``: images per split)."""
    pool = "train" if source == "train" else "test"
    if calib_samples > sizes[pool]:
        raise ValueError(f"calibration set too small: `calib_samples` {calib_samples} but only {sizes[pool]} "
                         f"images in the Fashion-MNIST {pool} split (`source` {source})")
    if source == "train" and eval_samples > sizes["test"]:
        raise ValueError(f"`eval_samples` {eval_samples} but the Fashion-MNIST test split has only {sizes['test']} "
                         f"images (`source` {source})")
    remaining = sizes["test"] - calib_samples
    if source != "train" and eval_samples > remaining:
        raise ValueError(f"`eval_samples` {eval_samples} but only {remaining} test images remain after the "
                         f"{calib_samples} calibration images (`source` {source})")


def fashion_mnist_split(directory: str | os.PathLike, source: str, calib_samples: int, eval_samples: int,
                        seed: int = 0, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                        torch.Tensor | None]:
    """Unlabeled calibration images and disjoint labeled evaluation images ``(calib, eval_images, eval_labels)``
    (the last two None when ``eval_samples == 0``), normalised like ``load_fashion_mnist`` (in [0, 1] with
    ``normalize=False``).

    ``train``: calibration = a seeded random subset of the train split, evaluation = the first test images;
    ``test``: calibration = a seeded random subset of the test split, evaluation = the first test images
    not used for calibration, in order; ``val``: calibration = the first test images (unshuffled, the
    reference's val rule), evaluation = the next ones."""
    _check_source(source)
    if calib_samples <= 0 or eval_samples < 0:
        raise ValueError(f"need calib_samples > 0 and eval_samples >= 0, got {calib_samples} and {eval_samples}")
    check_split_counts(source, calib_samples, eval_samples, FASHION_MNIST_SIZES)   # before reading anything
    train = load_fashion_mnist(directory, "train", normalize)[0] if source == "train" else None
    test_images, test_labels = load_fashion_mnist(directory, "test", normalize) if source != "train" or eval_samples \
        else (None, None)
    sizes = {"train": 0 if train is None else train.shape[0],
             "test": 0 if test_images is None else test_images.shape[0]}
    check_split_counts(source, calib_samples, eval_samples, sizes)    # a directory of other sizes than Fashion-MNIST's
    pool = train if source == "train" else test_images
    calib_index = torch.arange(calib_samples) if source == "val" else \
        select_calibration(torch.arange(pool.shape[0]), calib_samples, seed)          # (calib_samples,)
    if eval_samples == 0:
        return pool[calib_index], None, None
    keep = torch.ones(test_images.shape[0], dtype=torch.bool)                         # (N_test,)
    if source != "train":
        keep[calib_index] = False                                                     # no image in both sets
    eval_index = keep.nonzero().flatten()[:eval_samples]                              # (eval_samples,), in order
    return pool[calib_index], test_images[eval_index], test_labels[eval_index]


def fashion_mnist_eval(directory: str | os.PathLike = FASHION_MNIST_DIR, eval_samples: int | None = None,
                       batch_size: int = 256, transform=None) -> TensorLoader | DataLoader:
    """A loader of the first ``eval_samples`` Fashion-MNIST test images and their labels (all when None):
    as stored (1x28x28, normalised), or each image through ``transform`` (``images_loader``)."""
    check_fashion_mnist_eval_samples(eval_samples)
    images, labels = load_fashion_mnist(directory, "test", normalize=transform is None)
    if transform is not None:
        return images_loader(images[:eval_samples], labels[:eval_samples], transform, batch_size)
    return TensorLoader(images[:eval_samples], labels[:eval_samples], batch_size=batch_size)


def check_fashion_mnist_eval_samples(eval_samples: int | None) -> None:
    test_size = FASHION_MNIST_SIZES["test"]
    if eval_samples is not None and not 0 < eval_samples <= test_size:
        raise ValueError(f"`eval_samples` {eval_samples}: the Fashion-MNIST test split has {test_size} images "
                         f"(ask for 1 to {test_size})")


def check_fashion_mnist(directory: str | os.PathLike, splits=("train", "test"), flag: str = "`fashion_mnist`") -> None:
    """A one-line error unless ``directory`` holds the IDX files of ``splits`` (``.gz`` or not)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{flag} {directory}: no such directory" + ("" if directory.exists() else
                                " (install it with `apt-get install -y dataset-fashion-mnist`, or give the directory "
                                "holding the IDX files)"))
    for split in splits:
        for stem in FASHION_MNIST_FILES[split]:
            if not any((directory / name).is_file() for name in (stem, stem + ".gz")):
                raise FileNotFoundError(f"{flag} {directory}: {stem}[.gz] is missing (the Fashion-MNIST {split} "
                                        f"split's IDX files are needed)")


class TransformedImages(Dataset):
    """``(transform(RGB image), label)`` for in-memory images in [0, 1] ``(N, 1 or 3, H, W)``: Fashion-MNIST
    made to fit a model that takes other images (its channels, size and mean/std, from its own transform)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, transform):
        self.images, self.transform = images, transform
        self.labels = labels if labels is not None else torch.full((images.shape[0],), -100, dtype=torch.long)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels = self.images[index].mul(255).round().byte()                                  # (C, H, W)
        image = Image.fromarray(pixels[0].numpy(), "L") if pixels.shape[0] == 1 else \
            Image.fromarray(pixels.permute(1, 2, 0).numpy(), "RGB")
        return self.transform(image.convert("RGB")), int(self.labels[index])


def images_loader(images: torch.Tensor, labels: torch.Tensor | None, transform, batch_size: int) -> DataLoader:
    """A ``DataLoader`` of ``TransformedImages`` (in order; labels -100 when None)."""
    return DataLoader(TransformedImages(images, labels, transform), batch_size=batch_size, shuffle=False)


def image_files(directory: str | os.PathLike) -> list[Path]:
    """Every image file under ``directory`` at any depth (flat, class subfolders or any nesting), sorted;
    an image is a file with one of torchvision's ``IMG_EXTENSIONS``."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"image directory {directory} does not exist")
    if not directory.is_dir():
        raise ValueError(f"{directory} is a file, not an image directory")
    files = sorted(path for path in directory.rglob("*") if path.suffix.lower() in IMG_EXTENSIONS and path.is_file())
    if not files:
        raise ValueError(f"image directory {directory} holds no images (looked for {' '.join(IMG_EXTENSIONS)} "
                         f"at any depth)")
    return files


def check_image_dir(directory: str | os.PathLike, flag: str, labeled: bool = False, at_least: int = 1) -> None:
    """A one-line error naming ``flag`` unless ``directory`` holds ``at_least`` image files (at any depth;
    with ``labeled``, inside class folders, as torchvision's ImageFolder reads them). Counting stops there."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    directory = Path(directory)
    if not directory.is_dir():
        raise (NotADirectoryError if directory.exists() else FileNotFoundError)(
            f"{flag} {directory}: {'is a file, not a' if directory.exists() else 'no such'} directory")
    found = 0
    for path in directory.rglob("*"):
        if path.suffix.lower() in IMG_EXTENSIONS and path.is_file() and (not labeled or path.parent != directory):
            found += 1
            if found >= at_least:
                return
    where = "in class folders (ImageFolder: DIR/CLASS/IMAGE)" if labeled else "at any depth"
    if found:
        raise ValueError(f"{flag} {directory}: calibration set too small: {found} images {where}, fewer than the "
                         f"{at_least} asked for (`calib_samples`)")
    raise ValueError(f"{flag} {directory}: holds no images {where} (looked for {' '.join(IMG_EXTENSIONS)})")


def check_hf_streaming(dataset_name: str, flag: str = "`hf_dataset`") -> None:
    """A one-line error unless ``dataset_name`` can be streamed now: the ``datasets`` package is installed,
    the hub's offline mode is off and its host answers (checked in seconds, before any work)."""
    import importlib.util
    import sys

    from starfish_fast.checkpoint import unreachable

    local = "give local images instead (`calib_dir=DIR`, `eval_dir=DIR`)"
    if "datasets" not in sys.modules and importlib.util.find_spec("datasets") is None:
        raise ValueError(f"{flag} {dataset_name}: streaming it needs the datasets package (pip install "
                         f"'starfish_fast[hf]'), or {local}")
    from huggingface_hub import constants

    problem = "the hub's offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else \
        unreachable(constants.ENDPOINT)
    if problem:
        raise ValueError(f"{flag} {dataset_name}: cannot stream it: {problem}; {local}")


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:          # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise ValueError(f"{path} is not a readable image ({error})") from None


class ImageFiles(Dataset):
    """``(transform(RGB image), -100)`` per image file: no labels are read."""

    def __init__(self, files: list[Path], transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(_open_rgb(self.files[index])), -100


def _subset_loader(dataset: Dataset, batch_size: int, num_samples: int, shuffle: bool, seed: int,
                   num_workers: int) -> DataLoader:
    """``num_samples > 0`` items of ``dataset`` (a seeded random subset when ``shuffle``, else the first)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)) if shuffle \
        else torch.arange(len(dataset))
    if num_samples > 0:
        order = order[:num_samples]
    return DataLoader(Subset(dataset, order.tolist()), batch_size=batch_size, shuffle=False, num_workers=num_workers)


def image_files_loader(directory: str | os.PathLike, *, batch_size: int = 32, transform=None, num_samples: int = 0,
                       shuffle: bool = False, seed: int = 0, num_workers: int = 2) -> DataLoader:
    """A ``DataLoader`` of ``(images, labels)`` over the unlabeled image files of ``image_files(directory)``;
    labels are all -100. ``num_samples > 0`` takes that many (a seeded random subset when ``shuffle``);
    default transform: ``build_transform()`` (ImageNet 224 crop), applied to the RGB image."""
    dataset = ImageFiles(image_files(directory), transform or build_transform())
    return _subset_loader(dataset, batch_size, num_samples, shuffle, seed, num_workers)


def image_folder_loader(directory: str | os.PathLike, batch_size: int = 32, transform=None, num_samples: int = 0,
                        shuffle: bool = False, seed: int = 0, num_workers: int = 2) -> DataLoader:
    """A ``DataLoader`` of ``(images, labels)`` over a labeled torchvision ImageFolder tree (class subfolders),
    streamed from disk. ``num_samples > 0`` takes that many (a seeded random subset when ``shuffle``);
    default transform: the reference's ``build_transform()`` (ImageNet 224 crop)."""
    from torchvision.datasets import ImageFolder

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"image directory {directory} does not exist")
    dataset = ImageFolder(str(directory), transform=transform or build_transform())
    if len(dataset) == 0:
        raise ValueError(f"image directory {directory} holds no images")
    return _subset_loader(dataset, batch_size, num_samples, shuffle, seed, num_workers)


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


# ----------------------------------------------------------------------------- Hugging Face streaming
def _row_image(row: Mapping) -> Image.Image:
    """The image of one dataset row: the first present key of ``HF_IMAGE_KEYS``, as a PIL image, raw bytes
    or ``{"bytes": ...}``."""
    key = next((key for key in HF_IMAGE_KEYS if row.get(key) is not None), None)
    if key is None:
        raise ValueError(f"dataset row has no image under any of {', '.join(HF_IMAGE_KEYS)}; its keys: {list(row)}")
    value = row[key]
    if isinstance(value, Mapping):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, Image.Image):
        return value
    raise ValueError(f"dataset row key {key!r} holds a {type(value).__name__}; expected a PIL image, bytes "
                     f"or {{'bytes': ...}}")


class HFImageStream(IterableDataset):
    """``(transform(RGB image), int(label))`` for every row of a Hugging Face stream; label -100 when
    absent or None."""

    def __init__(self, stream, transform):
        super().__init__()
        self.stream, self.transform = stream, transform

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        for row in self.stream:
            label = row.get("label")
            yield self.transform(_row_image(row).convert("RGB")), -100 if label is None else int(label)


def make_hf_loader(*, dataset_name: str, split: str, batch_size: int, transform, shuffle_buffer: int = 0,
                   seed: int = 0, take: int | None = None, skip: int = 0) -> DataLoader:
    """``(images, labels)`` batches streamed from a Hugging Face dataset split: shuffled (``seed``) when
    ``shuffle_buffer > 0``, then ``skip`` rows skipped, then ``take`` rows taken (all when None)."""
    if skip < 0 or (take is not None and take < 0):
        raise ValueError(f"skip and take must be >= 0, got skip={skip} and take={take}")
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise ImportError("Hugging Face streaming needs the `datasets` package: "
                          "pip install 'starfish_fast[hf]'") from error
    stream = load_dataset(dataset_name, streaming=True, split=split)
    if shuffle_buffer > 0:
        stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer)
    if skip > 0:
        stream = stream.skip(skip)
    if take is not None:
        stream = stream.take(take)
    return DataLoader(HFImageStream(stream, transform), batch_size=batch_size, num_workers=0,
                      pin_memory=torch.cuda.is_available())


def make_calibration_loader(*, dataset_name: str, source: str, batch_size: int, transform, calib_samples: int,
                            seed: int, shuffle_buffer: int) -> DataLoader:
    """The first ``calib_samples`` rows of split ``train`` (shuffled), ``validation`` (``val``: unshuffled,
    evaluation then skips them) or ``test`` (shuffled), by ``source``."""
    _check_source(source)
    split, shuffled = HF_CALIB_SPLITS[source]
    return make_hf_loader(dataset_name=dataset_name, split=split, batch_size=batch_size, transform=transform,
                          shuffle_buffer=shuffle_buffer if shuffled else 0, seed=seed, take=calib_samples)


def make_eval_loader(*, dataset_name: str, batch_size: int, transform, eval_samples: int,
                     skip: int = 0) -> DataLoader:
    """Split ``validation`` in order: ``skip`` rows skipped, then ``eval_samples`` taken."""
    return make_hf_loader(dataset_name=dataset_name, split="validation", batch_size=batch_size, transform=transform,
                          take=eval_samples, skip=skip)
