"""The Hugging Face streaming loaders, against an in-memory stand-in for ``datasets`` (no network here):
split names per source, shuffle/skip/take order, batching, labels (-100 where absent), image keys and
formats, and the errors."""
import io
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from starfish_fast.data import (HFImageStream, cache_calibration_data, make_calibration_loader, make_eval_loader,
                                make_hf_loader)


def first_pixel(image):
    """A transform that keeps only what the tests compare: the red value of the top-left pixel."""
    return torch.tensor([np.array(image)[0, 0, 0]])                         # (1,) uint8


def as_tensor(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)                 # (3, H, W) uint8


class FakeStream:
    """The subset of ``datasets.IterableDataset`` the loaders use, recording the calls."""

    def __init__(self, rows, calls):
        self.rows, self.calls = rows, calls

    def shuffle(self, seed, buffer_size):
        self.calls.append(("shuffle", seed, buffer_size))
        order = np.random.default_rng(seed).permutation(len(self.rows))
        return FakeStream([self.rows[i] for i in order], self.calls)

    def skip(self, n):
        self.calls.append(("skip", n))
        return FakeStream(self.rows[n:], self.calls)

    def take(self, n):
        self.calls.append(("take", n))
        return FakeStream(self.rows[:n], self.calls)

    def __iter__(self):
        return iter(self.rows)


def gray(i: int) -> Image.Image:
    return Image.fromarray(np.full((40, 30), i, dtype=np.uint8), mode="L")   # the loader converts to RGB


def install(monkeypatch, make_row, n=23):
    """``sys.modules["datasets"]`` replaced by a stand-in whose splits hold ``make_row(i, split)`` rows."""
    calls = []

    def load_dataset(name, streaming, split):
        assert streaming is True
        calls.append(("load", name, split))
        return FakeStream([make_row(i, split) for i in range(n)], calls)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr("starfish_fast.checkpoint.unreachable", lambda url, timeout=3.0: None)  # the stand-in is local
    return calls


@pytest.fixture
def fake_datasets(monkeypatch):
    def row(i, split):
        label = {"validation": i % 7, "test": -1}.get(split)                 # ImageNet's test split has label -1
        return {"image": gray(i), **({"label": label} if label is not None else {})}

    return install(monkeypatch, row)


@pytest.mark.parametrize("source,split,shuffled", [("train", "train", True), ("val", "validation", False),
                                                   ("test", "test", True)])
def test_calibration_loader_split_and_shuffle_per_source(fake_datasets, source, split, shuffled):
    loader = make_calibration_loader(dataset_name="fake/imagenet", source=source, batch_size=4,
                                     transform=first_pixel, calib_samples=10, seed=3, shuffle_buffer=50)
    assert isinstance(loader, torch.utils.data.DataLoader) and loader.num_workers == 0 and not loader.pin_memory
    images, labels = zip(*loader)
    assert [len(b) for b in images] == [4, 4, 2]
    expected = np.random.default_rng(3).permutation(23)[:10].tolist() if shuffled else list(range(10))
    assert torch.cat(images).flatten().tolist() == expected
    assert torch.cat(labels).tolist() == [{"train": -100, "validation": i % 7, "test": -1}[split] for i in expected]
    assert fake_datasets == [("load", "fake/imagenet", split), *([("shuffle", 3, 50)] if shuffled else []),
                             ("take", 10)]


def test_calibration_loader_is_reiterable_and_cached_exactly(fake_datasets):
    loader = make_calibration_loader(dataset_name="fake/imagenet", source="test", batch_size=4, transform=first_pixel,
                                     calib_samples=10, seed=0, shuffle_buffer=5)
    batches = list(loader)
    assert [len(b) for b in cache_calibration_data(loader, 6)] == [4, 2]
    assert torch.equal(torch.cat(cache_calibration_data(loader, 10)), torch.cat([b[0] for b in batches]))


def test_no_shuffle_without_a_buffer(fake_datasets):
    loader = make_calibration_loader(dataset_name="d", source="train", batch_size=8, transform=first_pixel,
                                     calib_samples=3, seed=3, shuffle_buffer=0)
    assert torch.cat([b[0] for b in loader]).flatten().tolist() == [0, 1, 2]
    assert fake_datasets == [("load", "d", "train"), ("take", 3)]


def test_hf_loader_shuffles_then_skips_then_takes(fake_datasets):
    loader = make_hf_loader(dataset_name="d", split="validation", batch_size=5, transform=first_pixel,
                            shuffle_buffer=100, seed=7, take=6, skip=4)
    expected = np.random.default_rng(7).permutation(23)[4:10].tolist()      # shuffled, then skip 4, take 6
    assert torch.cat([b[0] for b in loader]).flatten().tolist() == expected
    assert fake_datasets == [("load", "d", "validation"), ("shuffle", 7, 100), ("skip", 4), ("take", 6)]
    fake_datasets.clear()
    assert len(list(make_hf_loader(dataset_name="d", split="test", batch_size=5, transform=first_pixel))) == 5
    assert fake_datasets == [("load", "d", "test")]                          # all rows, in order
    with pytest.raises(ValueError, match="skip and take must be >= 0, got skip=-1 and take=None"):
        make_hf_loader(dataset_name="d", split="test", batch_size=5, transform=first_pixel, skip=-1)


def test_eval_loader_skips_the_calibration_images_in_order(fake_datasets):
    loader = make_eval_loader(dataset_name="fake/imagenet", batch_size=8, transform=as_tensor,
                              eval_samples=12, skip=5)
    images, labels = zip(*loader)
    assert [len(b) for b in images] == [8, 4] and images[0].shape[1:] == (3, 40, 30)
    assert torch.cat(images)[:, 0, 0, 0].tolist() == list(range(5, 17))      # unshuffled, after the skipped 5
    assert torch.cat(labels).tolist() == [i % 7 for i in range(5, 17)]
    assert fake_datasets == [("load", "fake/imagenet", "validation"), ("skip", 5), ("take", 12)]
    fake_datasets.clear()
    list(make_eval_loader(dataset_name="fake/imagenet", batch_size=8, transform=first_pixel, eval_samples=3))
    assert fake_datasets == [("load", "fake/imagenet", "validation"), ("take", 3)]


def test_unknown_source_is_refused(fake_datasets):
    with pytest.raises(ValueError, match="unknown calibration source 'validation'; allowed: train, val, test"):
        make_calibration_loader(dataset_name="fake/imagenet", source="validation", batch_size=4,
                                transform=first_pixel, calib_samples=4, seed=0, shuffle_buffer=0)
    assert fake_datasets == []


def _encoded(i: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((6, 5, 3), i, dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def test_image_keys_and_formats():
    rows = [{"image": gray(1), "label": 3},                                   # PIL image, grayscale -> RGB
            {"jpg": _encoded(2, "PNG"), "label": None},                       # raw bytes; label None -> -100
            {"image": None, "jpeg": {"bytes": _encoded(3, "PNG"), "path": None}},   # first PRESENT key
            {"png": {"bytes": _encoded(4, "PNG")}, "label": np.int64(5)},
            {"webp": _encoded(5, "WEBP"), "jpg": _encoded(9, "PNG")},         # key order: jpg before webp
            {"image": Image.fromarray(np.full((4, 4, 4), 6, dtype=np.uint8), mode="RGBA"), "label": 0}]
    images, labels = zip(*HFImageStream(rows, first_pixel))
    assert torch.cat(images).tolist() == [1, 2, 3, 4, 9, 6]
    assert list(labels) == [3, -100, -100, 5, -100, 0] and all(type(label) is int for label in labels)


@pytest.mark.parametrize("row,message", [
    ({"text": "a cat", "label": 1},
     r"no image under any of image, jpg, jpeg, png, webp; its keys: \['text', 'label'\]"),
    ({"image": None, "label": 1}, r"its keys: \['image', 'label'\]"),
    ({"image": "cat.png"}, r"dataset row key 'image' holds a str; expected a PIL image, bytes"),
    ({"png": {"path": "cat.png"}}, r"dataset row key 'png' holds a NoneType"),
])
def test_rows_without_an_image_are_refused(row, message):
    with pytest.raises(ValueError, match=message):
        list(HFImageStream([row], first_pixel))


def test_missing_datasets_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)                       # `import datasets` fails
    for make in (lambda: make_hf_loader(dataset_name="d", split="test", batch_size=1, transform=first_pixel),
                 lambda: make_calibration_loader(dataset_name="d", source="val", batch_size=1, transform=first_pixel,
                                                 calib_samples=1, seed=0, shuffle_buffer=0),
                 lambda: make_eval_loader(dataset_name="d", batch_size=1, transform=first_pixel, eval_samples=1)):
        with pytest.raises(ImportError, match=r"`datasets` package: pip install 'starfish_fast\[hf\]'"):
            make()


def test_recover_cli_streams_calibration_and_evaluation_from_hugging_face(fake_datasets, tmp_path):
    import timm

    from starfish_fast import cli
    from starfish_fast.prune import magnitude_masks

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    torch.save(magnitude_masks(model, 0.5, scope="qkv_out_mlp"), tmp_path / "masks.pt")
    output = tmp_path / "recovered.pt"
    assert cli.main(["recover", "--model-name", "deit_tiny_patch16_224", "--dense-path", str(tmp_path / "dense.pt"),
                     "--mask-path", str(tmp_path / "masks.pt"), "--hf-dataset", "fake/imagenet",
                     "--calib-source", "val", "--calib-samples", "4", "--batch-size", "2", "--epochs", "1",
                     "--eval-samples", "6", "--output-path", str(output), "--no-progress"]) == 0
    # calibration: the first val images, unshuffled (the reference's val rule); evaluation: val in order, after them
    assert fake_datasets[:2] == [("load", "fake/imagenet", "validation"), ("take", 4)]
    assert ("skip", 4) in fake_datasets and ("take", 6) in fake_datasets
    assert not any(call[0] == "shuffle" for call in fake_datasets)
    metadata = torch.load(output, weights_only=True)["metadata"]
    assert metadata["calib_samples"] == 4 and 0.0 <= metadata["top1_before"] <= 100.0


def test_recover_cli_reports_a_checkpoint_of_the_wrong_shape(tmp_path, capsys):
    import timm

    from starfish_fast import cli

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=7)
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    torch.save({}, tmp_path / "masks.pt")
    assert cli.main(["recover", "--model-name", "deit_tiny_patch16_224", "--dense-path", str(tmp_path / "dense.pt"),
                     "--mask-path", str(tmp_path / "masks.pt"), "--output-path", str(tmp_path / "out.pt")]) == 2
    error = capsys.readouterr().err
    assert "does not fit deit_tiny_patch16_224" in error and "head.weight" in error
    assert not (tmp_path / "out.pt").exists()
    from starfish_fast import compat
    with pytest.raises(RuntimeError, match="size mismatch for head.weight"):      # what reference callers catch
        compat.load_model("deit_tiny_patch16_224", str(tmp_path / "dense.pt"), "cpu")
