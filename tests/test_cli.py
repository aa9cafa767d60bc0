"""The command line end to end on the bundled model and Fashion-MNIST; bad inputs write nothing."""
import json
import os
from pathlib import Path

import pytest
import torch

from starfish_fast import cli, compat
from starfish_fast.bundled import load_bundled_model
from starfish_fast.data import FASHION_MNIST_DIR
from starfish_fast.prune import magnitude_masks

pytestmark = pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(),
                                reason="needs `apt-get install dataset-fashion-mnist` (setup.sh installs it)")

REFERENCE_FLAGS = ["--dense-path", "--mask-path", "--model-name", "--output-path", "--epochs", "--calib-samples",
                   "--batch-size", "--lr", "--min-lr", "--lr-schedule", "--weight-decay", "--grad-clip",
                   "--grad-checkpointing", "--hf-dataset", "--calib-source", "--shuffle-buffer", "--eval-samples",
                   "--prune-scope", "--store-dense-float32", "--no-dense-cache", "--device", "--seed"]


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory):
    model, _ = load_bundled_model()
    path = tmp_path_factory.mktemp("masks") / "masks.pt"
    torch.save(magnitude_masks(model, sparsity=0.75, scope="qkv_out_mlp"), path)
    return path


def _recover_args(mask_file, output, *extra):
    return ["recover", "--model-name", "fashion_vit", "--mask-path", str(mask_file), "--calib-source", "train",
            "--calib-samples", "64", "--epochs", "1", "--eval-samples", "500", "--output-path", str(output),
            "--no-progress", *extra]


def test_help_lists_every_reference_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["recover", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in REFERENCE_FLAGS + ["--mode", "--fashion-mnist", "--calib-dir", "--allow-unsafe-pickle"]:
        assert flag in text, flag
    for command in ("demo", "eval", "prune"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert "usage: starfish-fast " + command in capsys.readouterr().out


def test_recover_writes_reference_checkpoint(tmp_path, mask_file):
    output = tmp_path / "out" / "recovered.pt"
    assert cli.main(_recover_args(mask_file, output)) == 0
    checkpoint = torch.load(output, weights_only=True)
    metadata = checkpoint["metadata"]
    expected_keys = {"model_name", "dense_path", "mask_path", "calib_source", "calib_samples", "epochs", "batch_size",
                     "lr", "grad_checkpointing", "blocks", "history", "top1_before", "top1_after", "mask_density"}
    assert set(metadata) == expected_keys
    assert json.loads(Path(str(output) + ".json").read_text()) == json.loads(json.dumps(metadata))
    assert metadata["blocks"] == [f"blocks.{i}" for i in range(6)]
    assert metadata["history"][0]["epoch"] == 1.0 and metadata["mask_density"] == pytest.approx(0.25, abs=1e-3)
    assert 0 <= metadata["top1_before"] <= 100 and 0 <= metadata["top1_after"] <= 100
    healed = compat.load_model("fashion_vit", output, "cpu")
    masks = torch.load(mask_file, weights_only=True)
    for key, mask in masks.items():
        assert (healed.state_dict()[key][~mask] == 0).all()
    assert Path(str(output) + ".loss.png").exists() and Path(str(output) + ".metrics.jsonl").exists()
    assert sorted(p.name for p in output.parent.iterdir() if p.name.startswith(".")) == []   # no temp files left


def _bad_mask(tmp_path, mask_file):
    masks = torch.load(mask_file, weights_only=True)
    masks["blocks.0.attn.qkv.weight"] = masks["blocks.0.attn.qkv.weight"][:, :5]
    path = tmp_path / "bad.pt"
    torch.save(masks, path)
    return path


@pytest.mark.parametrize("case,message", [
    ("bad_mask", "has shape (192, 5) but the weight has shape (192, 64)"),
    ("scope", "unknown prune scope 'conv_only'"),
    ("data_dir", "does not exist"),
    ("too_few", "calibration set too small: --calib-samples 70000 but only 60000"),
    ("pickle", "weights_only=True"),
    ("missing_mask", "does not exist"),
])
def test_recover_bad_inputs_write_nothing(tmp_path, mask_file, capsys, case, message):
    output = tmp_path / "out" / "recovered.pt"
    args = _recover_args(mask_file, output)
    if case == "bad_mask":
        args[args.index("--mask-path") + 1] = str(_bad_mask(tmp_path, mask_file))
    elif case == "scope":
        args += ["--prune-scope", "conv_only"]
    elif case == "data_dir":
        args += ["--fashion-mnist", str(tmp_path / "nowhere")]
    elif case == "too_few":
        args[args.index("--calib-samples") + 1] = "70000"
    elif case == "pickle":
        pickled = tmp_path / "pickled.pt"
        torch.save({"blocks.0.attn.qkv.weight": torch.ones(192, 64), "note": os.stat_result(range(10))}, pickled)
        args[args.index("--mask-path") + 1] = str(pickled)
    elif case == "missing_mask":
        args[args.index("--mask-path") + 1] = str(tmp_path / "none.pt")
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
    assert not output.parent.exists() or not any(output.parent.iterdir())


def test_recover_from_image_folders(tmp_path, mask_file, capsys):
    from PIL import Image

    from starfish_fast.data import load_fashion_mnist
    images, labels = load_fashion_mnist(split="test", normalize=False)
    for i in range(8):                                   # an ImageFolder tree of real test images
        folder = tmp_path / "images" / f"class_{int(labels[i])}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((images[i, 0] * 255).byte().numpy()).save(folder / f"{i}.png")
    output = tmp_path / "out" / "recovered.pt"
    args = _recover_args(mask_file, output) + ["--calib-dir", str(tmp_path / "images"), "--eval-dir",
                                                str(tmp_path / "images")]
    args[args.index("--calib-samples") + 1] = "6"
    args[args.index("--eval-samples") + 1] = "8"
    assert cli.main(args) == 0
    assert torch.load(output, weights_only=True)["metadata"]["calib_samples"] == 6
    args[args.index("--calib-samples") + 1] = "9"
    assert cli.main(args) == 2
    assert "calibration set too small: 9 samples requested but the loader gave 8" in capsys.readouterr().err


def test_unknown_model_name_is_rejected(tmp_path, mask_file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["recover", "--model-name", "resnet50", "--mask-path", str(mask_file)])
    assert exit_info.value.code == 2
    assert "invalid choice: 'resnet50'" in capsys.readouterr().err


def test_eval_reports_top1(capsys):
    assert cli.main(["eval", "--model-name", "fashion_vit", "--eval-samples", "300"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["model_name"] == "fashion_vit" and 10 < report["top1"] <= 100


def test_eval_diagnostics_before_and_after(tmp_path, mask_file, capsys):
    output = tmp_path / "recovered.pt"
    assert cli.main(_recover_args(mask_file, output)) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--model-name", "fashion_vit", "--checkpoint", str(output), "--eval-samples", "300",
                     "--diagnostics", "--mask-path", str(mask_file)]) == 0
    text = capsys.readouterr().out
    assert "pruned: top-1" in text and "healed: top-1" in text and "KL(dense || healed)" in text
    report = json.loads(Path(str(output) + ".diagnostics.json").read_text())
    assert report["after"]["kl"] < report["before"]["kl"] <= report["before"]["bound_certified"]
    assert len(report["after"]["block_cosine"]) == 6
    for suffix in (".block_cosine.png", ".kl_bound.png"):
        assert Path(str(output) + suffix).read_bytes()[:4] == b"\x89PNG"


def test_demo_reduced_improves_over_pruned(tmp_path):
    args = ["demo", "--calib-samples", "256", "--epochs", "3", "--eval-samples", "1000", "--output-dir",
            str(tmp_path), "--no-progress"]
    assert cli.main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["healed_top1"] > summary["pruned_top1"] + 5
    assert summary["sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert (tmp_path / "loss.png").exists() and (tmp_path / "healed.safetensors").exists()
