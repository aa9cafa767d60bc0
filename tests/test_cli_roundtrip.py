"""Every file the command line writes is read back by every command that takes its kind: the masks
(`prune`), the healed checkpoint, its export and the resume checkpoint (`recover`), for the bundled ViT
and for a timm model with random weights (`--random-init`); a file of one kind given where another is
expected is one line naming the flag."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import interrupted_at
from starfish_fast import cli, steps
from starfish_fast.checkpoint import load_tensor_file
from starfish_fast.data import FASHION_MNIST_DIR

pytestmark = pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(),
                                reason="needs `apt-get install dataset-fashion-mnist` (setup.sh installs it)")


def _images(root: Path) -> dict:
    """Random RGB images: 8 unlabeled for calibration, 2 classes of 3 for evaluation."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for folder, count in (("calib", 8), ("eval/a", 3), ("eval/b", 3)):
        (root / folder).mkdir(parents=True)
        for i in range(count):
            Image.fromarray((torch.rand(40, 40, 3, generator=generator) * 255).byte().numpy()).save(
                root / folder / f"{i}.png")
    return {"calib": ["--calib-dir", str(root / "calib")], "eval": ["--eval-dir", str(root / "eval")]}


def _setup(name: str, root: Path) -> dict:
    """The flags of each model: its name, where its dense weights come from, its data."""
    if name == "fashion_vit":
        return {"model": ["--model-name", "fashion_vit"], "weights": [], "calib": ["--calib-source", "train"],
                "eval": [], "eval_samples": "200"}
    return {"model": ["--model-name", "regnetx_002", "--model-kwargs", "num_classes=2"], "weights": ["--random-init"],
            **_images(root), "eval_samples": "6"}


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", ["fashion_vit", "regnetx_002"])
def test_every_artifact_loads_in_every_command_that_takes_its_kind(tmp_path, capsys, name):
    flags = _setup(name, tmp_path)
    model, dense = flags["model"], flags["model"] + flags["weights"]
    masks, masks_st = tmp_path / "masks.pt", tmp_path / "masks.safetensors"
    for path in (masks, masks_st):                                       # prune -> masks, both formats
        assert cli.main(["prune", *dense, "--sparsity", "0.5", "--output", str(path)]) == 0
        assert _json(capsys)["dense_weights"] == ("bundled" if name == "fashion_vit" else cli_random_init())

    output, export = tmp_path / "out" / "recovered.pt", tmp_path / "out" / "healed.safetensors"
    recover = ["recover", *dense, "--mask-path", str(masks_st), *flags["calib"], "--calib-samples", "8",
               "--batch-size", "4", "--epochs", "1", *flags["eval"], "--eval-samples", flags["eval_samples"],
               "--output-path", str(output), "--export", str(export), "--checkpoint-every", "1", "--no-progress"]
    with interrupted_at(steps.FastStep, 1):
        assert cli.main(recover) == 130                                  # Ctrl-C: the resume checkpoint stays
    assert sorted(p.name for p in output.parent.iterdir()) == ["recovered.pt.resume"]
    assert cli.main([*recover, "--resume"]) == 0                         # resume file -> --resume
    summary = _json(capsys)
    assert sorted(p.name for p in output.parent.iterdir()) == [             # the resume file is spent
        "healed.safetensors", "recovered.pt", "recovered.pt.json", "recovered.pt.loss.png",
        "recovered.pt.metrics.jsonl"]
    exported = load_file(str(export))                                    # exactly the model's keys, masked zeros
    state = torch.load(output, weights_only=True)["state_dict"]
    assert exported.keys() == state.keys()
    for key, mask in load_tensor_file(masks_st).items():
        assert (exported[key][~mask] == 0).all() and torch.equal(exported[key], state[key])

    top1 = []
    for weights in (["--checkpoint", str(output)], ["--checkpoint", str(export)], ["--dense-path", str(export)],
                    ["--dense-path", str(output)]):                      # recovered.pt and export -> eval, both ways
        assert cli.main(["eval", *model, *weights, *flags["eval"], "--eval-samples", flags["eval_samples"],
                         "--no-progress"]) == 0
        top1.append(_json(capsys)["top1"])
    assert top1 == [summary["top1_after"]] * 4

    assert cli.main(["eval", *dense, "--checkpoint", str(export), "--diagnostics", "--mask-path", str(masks),
                     *flags["eval"], "--eval-samples", flags["eval_samples"], "--no-progress"]) == 0
    report = _json(capsys)                                               # masks.pt -> eval --diagnostics
    assert report["top1"] == summary["top1_after"] and report["pruned"]["examples"] == int(flags["eval_samples"])
    assert sorted(report["files"]) == ["block_cosine_plot", "diagnostics", "kl_bound_plot"]
    if name == "fashion_vit":                                            # trained weights: healing brings it closer
        assert report["model"]["kl"] < report["pruned"]["kl"]

    again = tmp_path / "again.pt"                                        # the healed model as the next dense model
    assert cli.main(["prune", *model, "--dense-path", str(export), "--sparsity", "0.6", "--output", str(again)]) == 0
    assert _json(capsys)["dense_weights"] == f"--dense-path {export}"
    assert cli.main(["recover", *model, "--dense-path", str(output), "--mask-path", str(again), *flags["calib"],
                     "--calib-samples", "8", "--batch-size", "4", "--epochs", "1",
                     "--output-path", str(tmp_path / "again" / "r.pt"), "--no-progress"]) == 0
    assert _json(capsys)["mask_density"] == pytest.approx(0.4, abs=1e-3)


def cli_random_init() -> str:
    from starfish_fast.commands_images import RANDOM_INIT
    return RANDOM_INIT


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """The bundled ViT's masks, healed checkpoint, export and (an interrupted run's) resume checkpoint."""
    root = tmp_path_factory.mktemp("artifacts")
    base = ["--model-name", "fashion_vit", "--calib-source", "train", "--calib-samples", "8", "--epochs", "1",
            "--no-progress", "--mask-path", str(root / "masks.pt")]
    assert cli.main(["prune", "--model-name", "fashion_vit", "--sparsity", "0.5", "--output",
                     str(root / "masks.pt")]) == 0
    assert cli.main(["recover", *base, "--output-path", str(root / "recovered.pt"), "--export",
                     str(root / "healed.safetensors")]) == 0
    with interrupted_at(steps.FastStep, 1):
        assert cli.main(["recover", *base, "--output-path", str(root / "stopped.pt"), "--checkpoint-every", "1",
                         "--batch-size", "4"]) == 130
    return root


@pytest.mark.parametrize("command,flag,file,message", [
    ("eval", "--checkpoint", "masks.pt", "is a mask file (every tensor bool), not model weights"),
    ("eval", "--checkpoint", "stopped.pt.resume", "is a resume checkpoint, not model weights"),
    ("recover", "--dense-path", "stopped.pt.resume", "is a resume checkpoint, not model weights"),
    ("recover", "--mask-path", "recovered.pt", "is a healed checkpoint (recover's output), not a mask file"),
    ("recover", "--mask-path", "healed.safetensors", "is a weights export (recover's --export), not a mask file"),
    ("prune", "--pretrained-file", "masks.pt", "is a mask file (every tensor bool), not model weights"),
])
def test_a_file_of_another_kind_is_refused_in_one_line(artifacts, tmp_path, capsys, monkeypatch, command, flag, file,
                                                       message):
    import starfish_fast.commands_images as images

    monkeypatch.setattr(images, "load_dense", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = {"eval": ["eval", "--model-name", "fashion_vit", "--eval-samples", "10"],
            "recover": ["recover", "--model-name", "fashion_vit", "--mask-path", str(artifacts / "masks.pt"),
                        "--output-path", str(tmp_path / "out" / "r.pt")],
            "prune": ["prune", "--model-name", "fashion_vit", "--sparsity", "0.5", "--output", str(tmp_path / "m.pt")]}
    argv = argv[command] + [flag, str(artifacts / file)]
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{flag} {artifacts / file} {message}" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_a_resume_checkpoint_must_be_one(artifacts, tmp_path, capsys):
    output = tmp_path / "r.pt"
    shutil.copy(artifacts / "masks.pt", f"{output}.resume")
    assert cli.main(["recover", "--model-name", "fashion_vit", "--mask-path", str(artifacts / "masks.pt"),
                     "--output-path", str(output), "--resume", "--checkpoint-every", "1"]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and f"--resume {output}.resume is a mask file" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.pt.resume"]
