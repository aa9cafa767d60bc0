"""The Hugging Face streaming loaders, against an in-memory stand-in for ``datasets`` (no network here):
split names, shuffle/skip/take order, batching, labels (-100 where absent) and the transform."""
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from starfish_fast.data import cache_calibration_data, make_calibration_loader, make_eval_loader


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


@pytest.fixture
def fake_datasets(monkeypatch):
    calls = []

    def row(i, split):
        pixels = np.full((40, 30), i, dtype=np.uint8)                      # grayscale: the loader converts to RGB
        label = {"validation": i % 7, "test": -1}.get(split, None)           # ImageNet's test split has label -1
        return {"image": Image.fromarray(pixels, mode="L"), **({"label": label} if label is not None else {})}

    def load_dataset(name, split, streaming):
        assert streaming is True
        calls.append(("load", name, split))
        return FakeStream([row(i, split) for i in range(23)], calls)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_calibration_loader_streams_shuffled_batches(fake_datasets):
    loader = make_calibration_loader(dataset_name="fake/imagenet", split_source="test", batch_size=4, num_samples=10,
                                     seed=3, shuffle_buffer=50)
    batches = list(loader)
    assert [b[0].shape for b in batches] == [(4, 3, 224, 224)] * 2 + [(2, 3, 224, 224)]
    assert all((labels == -100).all() for _, labels in batches)             # test split: no labels
    assert fake_datasets == [("load", "fake/imagenet", "test"), ("shuffle", 3, 50), ("skip", 0), ("take", 10)]
    assert [len(b) for b in cache_calibration_data(loader, 6)] == [4, 2]
    assert torch.equal(torch.cat(cache_calibration_data(loader, 10)), torch.cat([b[0] for b in batches]))


def test_eval_loader_skips_the_calibration_images_in_order(fake_datasets):
    identity = lambda image: torch.from_numpy(np.array(image)).permute(2, 0, 1)   # (3, 40, 30) uint8
    loader = make_eval_loader(dataset_name="fake/imagenet", split_source="val", batch_size=8, num_samples=12,
                              skip_samples=5, transform=identity)
    images, labels = zip(*loader)
    first_pixels = torch.cat(images)[:, 0, 0, 0].tolist()
    assert first_pixels == list(range(5, 17))                                # unshuffled, after the skipped 5
    assert torch.cat(labels).tolist() == [i % 7 for i in range(5, 17)]
    assert ("load", "fake/imagenet", "validation") in fake_datasets and not any(c[0] == "shuffle" for c in fake_datasets)


def test_unknown_split_is_refused(fake_datasets):
    with pytest.raises(ValueError, match="allowed: train, val, test"):
        make_calibration_loader(dataset_name="fake/imagenet", split_source="validation")


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
    # calibration: shuffled val images; evaluation: val in order, after skipping the 4 calibration images
    assert fake_datasets[:4] == [("load", "fake/imagenet", "validation"), ("shuffle", 0, 5000), ("skip", 0),
                                 ("take", 4)]
    assert ("skip", 4) in fake_datasets and ("take", 6) in fake_datasets
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
