"""Local data: unlabeled image files at any depth, and Fashion-MNIST calibration/evaluation splits
without overlap (checked on stand-in splits whose images are their own indices, then on the real files)."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from starfish_fast import data
from starfish_fast.data import (FASHION_MNIST_DIR, fashion_mnist_split, fashion_mnist_transform, image_files,
                                image_files_loader, load_fashion_mnist, select_calibration)

needs_fashion_mnist = pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(),
                                         reason="needs `apt-get install dataset-fashion-mnist` (setup.sh installs it)")


def write_image(path: Path, value: int, size=(6, 5), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, dtype=np.uint8)).save(path, format=fmt)
    return path


def first_pixel(image):
    return torch.tensor(np.array(image)[0, 0, 0])                            # () uint8: batches are (B,)


# ----------------------------------------------------------------------------- image files
def test_image_files_flat_nested_and_class_folders(tmp_path):
    flat = [write_image(tmp_path / "flat" / name, 0) for name in ("b.jpg", "a.png", "C.PNG")]
    (tmp_path / "flat" / "notes.txt").write_text("not an image")
    assert image_files(tmp_path / "flat") == sorted(flat)
    nested = [write_image(tmp_path / "nested" / rel, 0) for rel in ("top.png", "x/y/z/deep.webp", "x/mid.bmp")]
    assert image_files(tmp_path / "nested") == sorted(nested)
    classes = [write_image(tmp_path / "classes" / rel, 0) for rel in ("dog/2.png", "cat/1.png", "cat/3.jpeg")]
    assert image_files(str(tmp_path / "classes")) == sorted(classes)


def test_image_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image directory .*nowhere does not exist"):
        image_files(tmp_path / "nowhere")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.md").write_text("")
    with pytest.raises(ValueError, match=r"holds no images \(looked for .jpg .jpeg .png .* at any depth\)"):
        image_files(tmp_path / "empty")
    write_image(tmp_path / "a.png", 0)
    with pytest.raises(ValueError, match="is a file, not an image directory"):
        image_files(tmp_path / "a.png")


def test_image_files_loader_unlabeled_batches(tmp_path):
    for i in range(7):                                                      # class folders: their names are ignored
        write_image(tmp_path / f"class_{i % 2}" / f"{i}.png", 10 * i)
    order = [0, 20, 40, 60, 10, 30, 50]                                     # sorted paths: class_0 first
    loader = image_files_loader(tmp_path, batch_size=3, transform=first_pixel, num_workers=0)
    images, labels = zip(*loader)
    assert [len(b) for b in images] == [3, 3, 1]
    assert torch.cat(images).tolist() == order and torch.cat(labels).tolist() == [-100] * 7
    first = image_files_loader(tmp_path, batch_size=8, transform=first_pixel, num_samples=4, num_workers=0)
    assert torch.cat([b[0] for b in first]).tolist() == order[:4]
    picks = [torch.cat([b[0] for b in image_files_loader(tmp_path, batch_size=8, transform=first_pixel,
                                                         num_samples=4, shuffle=True, seed=seed, num_workers=0)])
             for seed in (1, 1, 2)]
    expected = [order[i] for i in torch.randperm(7, generator=torch.Generator().manual_seed(1))[:4]]
    assert picks[0].tolist() == expected and torch.equal(picks[0], picks[1]) and not torch.equal(picks[0], picks[2])


def test_image_files_loader_transforms(tmp_path):
    write_image(tmp_path / "a.png", 200, size=(300, 260))
    Image.fromarray(np.full((30, 30), 90, dtype=np.uint8), mode="L").save(tmp_path / "gray.png")
    images, labels = next(iter(image_files_loader(tmp_path, num_workers=0)))           # build_transform()
    assert images.shape == (2, 3, 224, 224) and labels.tolist() == [-100, -100]
    images, _ = next(iter(image_files_loader(tmp_path, transform=fashion_mnist_transform(), num_workers=0)))
    assert images.shape == (2, 1, 28, 28)                                   # the transform converts RGB to gray
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg is not a readable image"):
        list(image_files_loader(tmp_path, transform=first_pixel, num_workers=0))


def test_check_image_dir_before_any_work(tmp_path):
    write_image(tmp_path / "flat" / "a.png", 0)
    write_image(tmp_path / "flat" / "b.png", 0)
    data.check_image_dir(tmp_path / "flat", "--calib-dir", at_least=2)
    with pytest.raises(ValueError, match=r"--calib-dir .*flat: calibration set too small: 2 images at any depth, "
                                         r"fewer than the 3 asked for"):
        data.check_image_dir(tmp_path / "flat", "--calib-dir", at_least=3)
    with pytest.raises(ValueError, match=r"--eval-dir .*flat: holds no images in class folders \(ImageFolder"):
        data.check_image_dir(tmp_path / "flat", "--eval-dir", labeled=True)       # ImageFolder ignores loose files
    write_image(tmp_path / "flat" / "cat" / "c.png", 0)
    data.check_image_dir(tmp_path / "flat", "--eval-dir", labeled=True)
    with pytest.raises(FileNotFoundError, match=r"--calib-dir .*nowhere: no such directory"):
        data.check_image_dir(tmp_path / "nowhere", "--calib-dir")
    with pytest.raises(NotADirectoryError, match=r"a.png: is a file, not a directory"):
        data.check_image_dir(tmp_path / "flat" / "a.png", "--calib-dir")


def test_check_fashion_mnist_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="`fashion_mnist` .*nowhere: no such directory \\(install it with"):
        data.check_fashion_mnist(tmp_path / "nowhere")
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(b"")
    data.check_fashion_mnist(tmp_path, ["test"])                                # .gz or not, either is found
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte\\[.gz\\] is missing \\(the Fashion-MNIST "
                                                "train split's IDX files are needed\\)"):
        data.check_fashion_mnist(tmp_path, ["train", "test"])


def test_fashion_mnist_through_a_model_transform_is_the_same_pixels_in_three_channels():
    from torchvision import transforms

    images = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))   # [0, 1], as normalize=False
    loader = data.images_loader(images, torch.arange(5), transforms.ToTensor(), batch_size=2)
    batches = list(loader)
    assert [b[0].shape for b in batches] == [(2, 3, 28, 28), (2, 3, 28, 28), (1, 3, 28, 28)]
    out, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    expected = images.mul(255).round().div(255).expand(-1, 3, -1, -1)             # gray -> RGB, 8-bit pixels
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert labels.tolist() == list(range(5))
    assert data.TransformedImages(images, None, transforms.ToTensor())[0][1] == -100    # unlabeled: -100


# ----------------------------------------------------------------------------- Fashion-MNIST splits
@pytest.fixture
def indexed_splits(monkeypatch):
    """``load_fashion_mnist`` replaced by splits of the real sizes whose image i (and label i) is the value i;
    records the splits read."""
    reads = []

    def load(directory, split, normalize=True):
        reads.append(split)
        n = data.FASHION_MNIST_SIZES[split]
        return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n)

    monkeypatch.setattr(data, "load_fashion_mnist", load)
    return reads


def _ids(images: torch.Tensor) -> list[int]:
    return images.flatten().long().tolist()


def test_split_from_train(indexed_splits):
    calib, eval_images, eval_labels = fashion_mnist_split("any", "train", calib_samples=100, eval_samples=50, seed=3)
    assert _ids(calib) == select_calibration(torch.arange(60000), 100, seed=3).tolist()
    assert _ids(eval_images) == eval_labels.tolist() == list(range(50))    # the first test images
    assert indexed_splits == ["train", "test"]


def test_split_from_test_keeps_calibration_out_of_evaluation(indexed_splits):
    calib, eval_images, eval_labels = fashion_mnist_split("any", "test", calib_samples=1000, eval_samples=9000, seed=5)
    calib_ids, eval_ids = _ids(calib), _ids(eval_images)
    assert calib_ids == select_calibration(torch.arange(10000), 1000, seed=5).tolist()
    assert not set(calib_ids) & set(eval_ids) and sorted(calib_ids + eval_ids) == list(range(10000))
    assert eval_ids == sorted(eval_ids) == eval_labels.tolist()           # original order
    _, fewer, _ = fashion_mnist_split("any", "test", calib_samples=1000, eval_samples=20, seed=5)
    assert _ids(fewer) == eval_ids[:20]
    assert indexed_splits == ["test", "test"]                              # the train split is never read


def test_split_from_val_is_unshuffled(indexed_splits):
    calib, eval_images, eval_labels = fashion_mnist_split("any", "val", calib_samples=300, eval_samples=200, seed=9)
    assert _ids(calib) == list(range(300)) and _ids(eval_images) == eval_labels.tolist() == list(range(300, 500))


def test_no_evaluation_reads_only_the_calibration_split(indexed_splits):
    calib, eval_images, eval_labels = fashion_mnist_split("any", "train", calib_samples=10, eval_samples=0)
    assert calib.shape == (10, 1, 1, 1) and eval_images is None and eval_labels is None
    assert indexed_splits == ["train"]


@pytest.mark.parametrize("source,calib,evaluate,message", [
    ("test", 1000, 9500, "`eval_samples` 9500 but only 9000 test images remain after the 1000 calibration images "
                         "(`source` test)"),
    ("val", 10000, 1, "`eval_samples` 1 but only 0 test images remain after the 10000 calibration images "
                      "(`source` val)"),
    ("train", 10, 10001, "`eval_samples` 10001 but the Fashion-MNIST test split has only 10000 images "
                         "(`source` train)"),
    ("train", 70000, 0, "calibration set too small: `calib_samples` 70000 but only 60000 images in the "
                        "Fashion-MNIST train split (`source` train)"),
    ("test", 10001, 0, "calibration set too small: `calib_samples` 10001 but only 10000 images in the "
                       "Fashion-MNIST test split (`source` test)"),
    ("validation", 10, 0, "unknown calibration source 'validation'; allowed: train, val, test"),
    ("test", 0, 0, "need calib_samples > 0 and eval_samples >= 0, got 0 and 0"),
])
def test_impossible_counts_fail_before_reading(tmp_path, source, calib, evaluate, message):
    # the directory does not exist: the error is about the counts, so nothing was opened
    with pytest.raises(ValueError) as error:
        fashion_mnist_split(tmp_path / "nowhere", source, calib_samples=calib, eval_samples=evaluate)
    assert str(error.value) == message


def test_possible_counts_then_read_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        fashion_mnist_split(tmp_path / "nowhere", "test", calib_samples=1000, eval_samples=9000)


@needs_fashion_mnist
def test_split_on_the_real_files():
    test_images, test_labels = load_fashion_mnist(split="test")
    calib, eval_images, eval_labels = fashion_mnist_split(FASHION_MNIST_DIR, "test", 500, 9500, seed=0)
    assert calib.shape == (500, 1, 28, 28) and eval_images.shape == (9500, 1, 28, 28)
    assert torch.equal(calib, select_calibration(test_images, 500, seed=0))   # as the README's calibration
    keep = torch.ones(10000, dtype=torch.bool)
    keep[select_calibration(torch.arange(10000), 500, seed=0)] = False
    assert torch.equal(eval_images, test_images[keep]) and torch.equal(eval_labels, test_labels[keep])
    calib, eval_images, eval_labels = fashion_mnist_split(FASHION_MNIST_DIR, "val", 100, 50)
    assert torch.equal(calib, test_images[:100]) and torch.equal(eval_images, test_images[100:150])
    calib, eval_images, _ = fashion_mnist_split(FASHION_MNIST_DIR, "train", 64, 10, seed=1)
    assert torch.equal(calib, select_calibration(load_fashion_mnist(split="train")[0], 64, seed=1))
    assert torch.equal(eval_images, test_images[:10])


def test_fashion_mnist_eval_takes_the_first_test_images(indexed_splits, tmp_path):
    from starfish_fast.data import fashion_mnist_eval

    images, labels = zip(*fashion_mnist_eval("any", 300, batch_size=128))
    assert [len(b) for b in images] == [128, 128, 44] and torch.cat(labels).tolist() == list(range(300))
    assert sum(len(b) for b, _ in fashion_mnist_eval("any")) == 10000          # None: the whole test split
    with pytest.raises(ValueError, match="`eval_samples` 10001: the Fashion-MNIST test split has 10000 images"):
        fashion_mnist_eval(tmp_path / "nowhere", 10001)                        # before reading anything
    assert indexed_splits == ["test", "test"]
