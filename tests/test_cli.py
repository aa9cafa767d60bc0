"""The command line end to end on the bundled model and Fashion-MNIST, on a timm model with a local
checkpoint and a folder of images; every user mistake is one line, exit code 2, and nothing written."""
import argparse
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import interrupted_at
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
ENGINE_FLAGS = ["--mode", "--objective", "--precision", "--compile", "--teacher-store", "--teacher-dtype", "--kernels",
                "--compact", "--semi-structured", "--moments-dtype", "--log-every", "--checkpoint-every", "--resume",
                "--export", "--calib-dir", "--eval-dir", "--fashion-mnist", "--allow-unsafe-pickle", "--blocks"]


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


def _only_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


# ----------------------------------------------------------------------------- help and entry points
def test_help_lists_every_flag_with_defaults_and_imports_nothing_heavy(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["recover", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0
    for flag in REFERENCE_FLAGS + ENGINE_FLAGS:
        assert flag in text, flag
    assert "(default: outputs/recovered.pt)" in text and "(default: fast)" in text and "%%" not in text
    assert "--mode exact gives the reference's step semantics, bit for bit" in text     # fast by default, as the API
    assert "missing parent folders are created" in text and "removed once the run finishes" in text
    assert "DRY RUN" in text and "--random-init" in text
    for command in ("demo", "eval", "prune", "blocks"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert "usage: starfish-fast " + command in capsys.readouterr().out
    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, parser in commands.items():             # every option says what it is (demo --fashion-mnist did not)
        for action in parser._actions:
            assert action.help, f"{name} {action.option_strings} has no help"
    # --help answers at once: parsing imports neither torch nor the library's heavy modules
    code = ("import sys; from starfish_fast import cli\n"
            "for c in ('demo', 'recover', 'eval', 'prune', 'blocks'):\n"
            "    try: cli.build_parser().parse_args([c, '--help'])\n"
            "    except SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'timm', 'starfish_fast.engine') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stderr


def test_version_and_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "starfish_fast", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("starfish-fast ")


# ----------------------------------------------------------------------------- recover
def test_recover_writes_the_reference_checkpoint_and_prints_a_summary(tmp_path, mask_file, capsys):
    output = tmp_path / "out" / "recovered.pt"
    old = os.umask(0o022)
    try:
        assert cli.main(_recover_args(mask_file, output, "--export", str(tmp_path / "out" / "healed.safetensors"))) == 0
    finally:
        os.umask(old)
    summary = json.loads(capsys.readouterr().out)
    metadata = torch.load(output, weights_only=True)["metadata"]
    assert set(metadata) == {"model_name", "dense_path", "mask_path", "calib_source", "calib_samples", "epochs",
                             "batch_size", "lr", "grad_checkpointing", "blocks", "history", "top1_before",
                             "top1_after", "mask_density"}
    assert json.loads(Path(str(output) + ".json").read_text()) == json.loads(json.dumps(metadata))
    assert metadata["blocks"] == [f"blocks.{i}" for i in range(6)] and metadata["history"][0]["epoch"] == 1.0
    assert summary["top1_after"] == metadata["top1_after"] and summary["output"] == str(output)
    assert summary["plan"].startswith("plan: cpu fast")                    # fast by default, as the API
    healed = compat.load_model("fashion_vit", output, "cpu")
    for key, mask in torch.load(mask_file, weights_only=True).items():
        assert (healed.state_dict()[key][~mask] == 0).all()
    files = {p.name for p in output.parent.iterdir()}
    assert files == {"recovered.pt", "recovered.pt.json", "recovered.pt.metrics.jsonl", "recovered.pt.loss.png",
                     "healed.safetensors"}                                  # no temporary files left
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in output.parent.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes                          # as the umask says


def test_recover_heals_in_sequential_order(tmp_path, mask_file, capsys):
    output = tmp_path / "out" / "recovered.pt"
    assert cli.main(_recover_args(mask_file, output, "--order", "sequential", "--sequential-inputs", "dense")) == 0
    summary = json.loads(capsys.readouterr().out)
    metadata = torch.load(output, weights_only=True)["metadata"]
    assert "sequential order" in summary["plan"] and summary["top1_after"] == metadata["top1_after"]
    assert [h["name"] for h in metadata["history"]] == [f"blocks.{i}" for i in range(6)]
    healed = compat.load_model("fashion_vit", output, "cpu")
    for key, mask in torch.load(mask_file, weights_only=True).items():
        assert (healed.state_dict()[key][~mask] == 0).all()
    assert cli.main(_recover_args(mask_file, output, "--order", "sequential", "--objective", "kl")) == 2
    assert "cannot heal in order='sequential'" in _only_line(capsys.readouterr().err)


def _bad_file(tmp_path, mask_file, case):
    path = tmp_path / {"bogus_safetensors": "bad.safetensors"}.get(case, "bad.pt")
    if case == "bad_shape":
        masks = torch.load(mask_file, weights_only=True)
        masks["blocks.0.attn.qkv.weight"] = masks["blocks.0.attn.qkv.weight"][:, :5]
        torch.save(masks, path)
    elif case == "pickle":
        torch.save({"blocks.0.attn.qkv.weight": torch.ones(192, 64), "note": os.stat_result(range(10))}, path)
    elif case == "text":
        path.write_text("these are not masks\n")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(Path(mask_file).read_bytes()[:300])
    elif case == "bogus_safetensors":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    elif case == "directory":
        path.mkdir()
    return path


@pytest.mark.parametrize("case,message", [
    ("bad_shape", "has shape (192, 5) but the weight has shape (192, 64)"),
    ("pickle", "holds Python objects that weights_only=True refuses"),
    ("text", "is not a torch.save or safetensors file (it starts with b'these ar': text)"),
    ("empty", "is empty (0 bytes)"),
    ("truncated", "is truncated or corrupt"),
    ("bogus_safetensors", "is not a valid safetensors file"),
    ("directory", "is a directory, not a checkpoint or mask file"),
    ("missing", "--mask-path"),
])
def test_bad_mask_files_are_one_line_naming_the_file(tmp_path, mask_file, capsys, case, message):
    output = tmp_path / "out" / "recovered.pt"
    path = tmp_path / "none.pt" if case == "missing" else _bad_file(tmp_path, mask_file, case)
    args = _recover_args(mask_file, output)
    args[args.index("--mask-path") + 1] = str(path)
    assert cli.main(args) == 2
    line = _only_line(capsys.readouterr().err)
    assert message in line and str(path.name) in line
    assert ("--allow-unsafe-pickle" in line) == (case == "pickle")   # the hint only for a real refused pickle
    assert not output.parent.exists()


@pytest.mark.parametrize("extra,message", [
    (["--prune-scope", "conv_only"], "unknown prune scope 'conv_only'"),
    (["--fashion-mnist", "/nowhere"], "--fashion-mnist /nowhere: no such directory"),
    (["--calib-samples", "70000"], "calibration set too small: --calib-samples 70000 but only 60000"),
    (["--calib-source", "test", "--calib-samples", "1000", "--eval-samples", "9500"],
     "--eval-samples 9500 but only 9000 test images remain after the 1000 calibration images"),
    (["--epochs", "0"], "--epochs must be a positive integer, got 0"),
    (["--device", "cuda"], "no CUDA GPU is available here"),
    (["--blocks", "blocks.(["], "is not a regular expression"),
    (["--blocks", "nothing.*"], "matches no module of fashion_vit"),
    (["--export", "healed.pt"], "the export is a .safetensors file"),
    (["--no-dense-cache", "--teacher-store", "disk"], "contradict each other"),
])
def test_recover_mistakes_fail_before_any_work(tmp_path, mask_file, capsys, extra, message):
    output = tmp_path / "out" / "recovered.pt"
    assert cli.main(_recover_args(mask_file, output, *extra)) == 2
    assert message in _only_line(capsys.readouterr().err)
    assert not output.parent.exists()


def test_unknown_model_name_lists_close_matches(tmp_path, mask_file, capsys):
    assert cli.main(["recover", "--model-name", "fashion_vitt", "--mask-path", str(mask_file)]) == 2
    assert "unknown model name 'fashion_vitt'; close matches: fashion_vit" in _only_line(capsys.readouterr().err)


def test_debug_shows_the_traceback(tmp_path, mask_file):
    with pytest.raises(ValueError, match="--epochs"):
        cli.main(_recover_args(mask_file, tmp_path / "r.pt", "--epochs", "0", "--debug"))


def test_ctrl_c_exits_130_keeps_the_resume_checkpoint_and_leaves_no_partial_output(tmp_path, mask_file, capsys):
    import starfish_fast.steps as steps

    output = tmp_path / "out" / "recovered.pt"
    with interrupted_at(steps.ExactStep, 1):
        assert cli.main(_recover_args(mask_file, output, "--checkpoint-every", "1", "--mode", "exact")) == 130
    assert _only_line(capsys.readouterr().err) == "starfish-fast recover: interrupted"
    assert sorted(p.name for p in output.parent.iterdir()) == ["recovered.pt.resume"]
    assert cli.main(_recover_args(mask_file, output, "--checkpoint-every", "1", "--resume", "--mode", "exact")) == 0
    assert output.exists() and not Path(f"{output}.resume").exists()     # a finished run leaves no resume file


def test_calibration_from_a_flat_folder_evaluates_the_bundled_model_on_fashion_mnist(tmp_path, mask_file, capsys):
    from PIL import Image

    from starfish_fast.data import load_fashion_mnist
    images, _ = load_fashion_mnist(split="train", normalize=False)
    (tmp_path / "calib").mkdir()
    for i in range(64):                                  # a flat folder of unlabeled images
        Image.fromarray((images[i, 0] * 255).byte().numpy()).save(tmp_path / "calib" / f"{i}.png")
    output = tmp_path / "out" / "recovered.pt"
    args = _recover_args(mask_file, output, "--calib-dir", str(tmp_path / "calib"), "--epochs", "3")
    assert cli.main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    # Fashion-MNIST test images: the pruned model's 47.8% rises to 60.0% here (3 epochs on 64 images)
    assert 30 < summary["top1_before"] and summary["top1_after"] > summary["top1_before"] + 5
    args[args.index("--calib-samples") + 1] = "65"
    assert cli.main(args) == 2
    line = _only_line(capsys.readouterr().err)
    assert "--calib-dir" in line and "calibration set too small: 64 images at any depth, fewer than the 65" in line


# ----------------------------------------------------------------------------- eval and demo
def test_eval_prints_one_json_format_with_or_without_diagnostics(tmp_path, mask_file, capsys):
    assert cli.main(["eval", "--model-name", "fashion_vit", "--eval-samples", "300"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["model_name"] == "fashion_vit" and 10 < plain["top1"] <= 100
    output = tmp_path / "recovered.pt"
    assert cli.main(_recover_args(mask_file, output)) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--model-name", "fashion_vit", "--checkpoint", str(output), "--eval-samples", "300",
                     "--diagnostics", "--mask-path", str(mask_file)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["kl"] < report["pruned"]["kl"] <= report["pruned"]["bound_certified"]
    assert len(report["model"]["block_cosine"]) == 6 and report["top1"] == pytest.approx(report["model"]["top1_model"])
    assert set(report["files"]) == {"diagnostics", "block_cosine_plot", "kl_bound_plot"}
    for path in report["files"].values():
        assert Path(path).exists()
    assert Path(report["files"]["kl_bound_plot"]).read_bytes()[:4] == b"\x89PNG"


def test_demo_reduced_improves_over_pruned(tmp_path, capsys):
    args = ["demo", "--calib-samples", "256", "--epochs", "3", "--eval-samples", "1000", "--output-dir",
            str(tmp_path / "demo"), "--no-progress"]
    assert cli.main(args) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["healed_top1"] > summary["pruned_top1"] + 5
    assert summary["sparsity"] == pytest.approx(0.75, abs=1e-3) and summary["plan"]["mode"] == "fast"
    assert {p.name for p in (tmp_path / "demo").iterdir()} == {"loss.png", "metrics.jsonl", "healed.safetensors",
                                                               "summary.json"}
    assert "healed top-1" in capsys.readouterr().out
    healed = tmp_path / "demo" / "healed.safetensors"                  # the demo's weights: an export eval reads
    assert cli.main(["eval", "--model-name", "fashion_vit", "--checkpoint", str(healed), "--eval-samples", "1000",
                     "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(summary["healed_top1"])
    assert cli.main(["demo", "--epochs", "0", "--output-dir", str(tmp_path / "nothing")]) == 2
    assert "--epochs" in capsys.readouterr().err and not (tmp_path / "nothing").exists()


# ----------------------------------------------------------------------------- prune, blocks, any timm model
def test_prune_writes_reference_pt_and_safetensors(tmp_path, capsys):
    pt, st = tmp_path / "masks.pt", tmp_path / "out" / "masks.safetensors"
    assert cli.main(["prune", "--model-name", "fashion_vit", "--method", "magnitude", "--sparsity", "0.6", "--per",
                     "global", "--output", str(pt)]) == 0
    assert json.loads(capsys.readouterr().out)["sparsity"] == pytest.approx(0.6, abs=1e-5)
    raw = torch.load(pt, weights_only=True)
    assert type(raw) is dict and all(v.dtype == torch.bool for v in raw.values())
    assert cli.main(["prune", "--model-name", "fashion_vit", "--method", "nm", "--prune-scope", "qkv", "--output",
                     str(st)]) == 0
    from starfish_fast.checkpoint import load_tensor_file
    loaded = load_tensor_file(st)                     # bit-packed on disk, bool here
    assert set(loaded) == {f"blocks.{i}.attn.qkv.weight" for i in range(6)}
    assert all((mask.view(mask.shape[0], -1, 4).sum(-1) == 2).all() for mask in loaded.values())


@pytest.mark.parametrize("argv,message", [
    (["--method", "magnitude", "--sparsity", "0.5", "--output", "{tmp}/m.bin"], "--output must end with"),
    (["--method", "magnitude", "--output", "{tmp}/m.pt"], "needs --sparsity"),
    (["--method", "magnitude", "--sparsity", "1.2", "--output", "{tmp}/m.pt"], "sparsity must be"),
    (["--method", "nm", "--sparsity", "0.5", "--output", "{tmp}/m.pt"], "does not apply to --method nm"),
    (["--method", "nm", "--m", "3", "--output", "{tmp}/m.pt"], "multiple of m=3"),
    (["--method", "magnitude", "--sparsity", "0.5", "--prune-scope", "conv_fc", "--output", "{tmp}/m.pt"],
     "unknown prune scope"),
    (["--method", "structured", "--sparsity", "0.5", "--kind", "channel", "--output", "{tmp}/m.pt"],
     "does not apply"),
])
def test_prune_mistakes_write_nothing(tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert cli.main(["prune", "--model-name", "fashion_vit", *argv]) == 2
    assert message in _only_line(capsys.readouterr().err)
    assert not list(tmp_path.iterdir())


def test_prune_model_errors(tmp_path, capsys):
    assert cli.main(["prune", "--model-name", "deit_tiny_patch16_224", "--sparsity", "0.5", "--output",
                     str(tmp_path / "m.pt")]) == 2
    assert "needs its dense weights: --dense-path FILE, --pretrained or --pretrained-file" in capsys.readouterr().err


def test_blocks_lists_blocks_and_scopes(capsys):
    assert cli.main(["blocks", "--model-name", "resnet18", "--model-kwargs", "num_classes=10"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["found_by"] == "timm's group_matcher" and len(report["blocks"]) == 8
    assert report["blocks"][0] == {"name": "layer1.0", "class": "BasicBlock", "parameters": 73984}
    assert report["default_scope"] == "conv" and report["scope_weights"]["linear"] == 0


def test_prune_recover_eval_on_a_timm_model_with_a_local_checkpoint_and_image_folders(tmp_path, capsys):
    from PIL import Image

    import timm
    generator = torch.Generator().manual_seed(0)
    for split, count in (("calib", 12), ("eval/a", 3), ("eval/b", 3)):
        (tmp_path / split).mkdir(parents=True)
        for i in range(count):
            pixels = (torch.rand(40, 40, 3, generator=generator) * 255).byte().numpy()
            Image.fromarray(pixels).save(tmp_path / split / f"{i}.png")
    torch.manual_seed(0)
    dense = tmp_path / "dense.safetensors"
    from safetensors.torch import save_file
    save_file(timm.create_model("regnetx_002", num_classes=2).state_dict(), str(dense))
    common = ["--model-name", "regnetx_002", "--model-kwargs", "num_classes=2", "--dense-path", str(dense)]
    assert cli.main(["prune", *common, "--sparsity", "0.5", "--output", str(tmp_path / "masks.pt")]) == 0
    capsys.readouterr()
    output = tmp_path / "out" / "healed.pt"
    assert cli.main(["recover", *common, "--mask-path", str(tmp_path / "masks.pt"), "--calib-dir",
                     str(tmp_path / "calib"), "--calib-samples", "8", "--batch-size", "4", "--epochs", "2",
                     "--eval-dir", str(tmp_path / "eval"), "--eval-samples", "6", "--mode", "fast",
                     "--output-path", str(output), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    # top-1 before healing is the pruned model's on the 6 labeled images, computed here by hand
    from starfish_fast.data import image_folder_loader
    from starfish_fast.masks import apply_masks
    from starfish_fast.models import load_model, model_spec
    pruned = load_model("regnetx_002", dense, "cpu", num_classes=2)
    apply_masks(pruned, {k: v.float() for k, v in torch.load(tmp_path / "masks.pt", weights_only=True).items()})
    loader = image_folder_loader(tmp_path / "eval", transform=model_spec("regnetx_002").transform(pruned),
                                 num_workers=0)
    with torch.no_grad():
        right = sum(int((pruned(x).argmax(-1) == y).sum()) for x, y in loader)
    assert summary["top1_before"] == pytest.approx(100 * right / 6)
    assert "generic" in summary["plan"] and "scope conv" in summary["plan"]
    assert cli.main(["eval", *common[:4], "--checkpoint", str(output), "--eval-dir", str(tmp_path / "eval")]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(summary["top1_after"])


@pytest.mark.parametrize("argv", [
    ["--method", "wanda", "--sparsity", "0.7"],
    ["--method", "wanda", "--n", "2", "--m", "4"],
    ["--method", "representation", "--sparsity", "0.7", "--levels", "0.5", "0.9"],
    ["--method", "sparsegpt", "--sparsity", "0.7"],
    ["--method", "sparsegpt", "--n", "2", "--m", "4"],
])
def test_prune_with_calibration_images(tmp_path, capsys, argv):
    """wanda, representation and sparsegpt read Fashion-MNIST calibration images and reach the requested
    sparsity over the scope (representation spreads it unevenly across the blocks)."""
    out = tmp_path / "masks.safetensors"
    assert cli.main(["prune", "--model-name", "fashion_vit", *argv, "--calib-samples", "64", "--batch-size", "32",
                     "--output", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    from starfish_fast.checkpoint import load_tensor_file
    masks = load_tensor_file(out)
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert report["sparsity"] == pytest.approx(1 - kept, abs=1e-6)
    assert report["sparsity"] == pytest.approx(0.5 if "--n" in argv else 0.7, abs=0.01)
    if "representation" in argv:
        per_block = {k.split(".")[1]: 1 - float(m.float().mean()) for k, m in masks.items() if "mlp.fc1" in k}
        assert max(per_block.values()) - min(per_block.values()) > 0.01
