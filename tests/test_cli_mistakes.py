"""A new user's mistakes, each found by one validation pass before any work: exit code 2, one line on
stderr naming the flag, nothing written, and (observably) no model built or no healing step run. Also
--pretrained without a network, for real: one line within seconds, nothing left in the caches."""
import json
import socket
from pathlib import Path

import pytest
import torch

from helpers import interrupted_at
from starfish_fast import cli
from starfish_fast.bundled import load_bundled_model
from starfish_fast.data import FASHION_MNIST_DIR
from starfish_fast.prune import magnitude_masks

pytestmark = pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(),
                                reason="needs `apt-get install dataset-fashion-mnist` (setup.sh installs it)")


@pytest.fixture(autouse=True)
def private_caches(tmp_path, monkeypatch):
    """Torch hub and Hugging Face caches of this test alone (nothing touches the user's)."""
    import huggingface_hub.constants as hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "caches" / "torch"))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "caches" / "hf"))
    return tmp_path / "caches"


@pytest.fixture
def no_work(monkeypatch):
    """Any model load or healing step fails the test: the mistake had to be caught before."""
    import starfish_fast.commands as commands
    import starfish_fast.commands_images as images

    monkeypatch.setattr(images, "load_dense", lambda *a, **k: pytest.fail("a model was built before the check"))
    monkeypatch.setattr(commands, "heal", lambda *a, **k: pytest.fail("healing started before the check"))


@pytest.fixture(scope="module")
def masks(tmp_path_factory) -> Path:
    model, _ = load_bundled_model()
    path = tmp_path_factory.mktemp("masks") / "masks.pt"
    torch.save(magnitude_masks(model, sparsity=0.75, scope="qkv_out_mlp"), path)
    return path


@pytest.fixture
def offline(monkeypatch) -> list[str]:
    """No name resolves: what a machine without a network sees (urllib, the hub and the probe alike). Returns
    the host names looked up, in order (a retry shows as a repeat)."""
    lookups = []

    def no_dns(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    return lookups


def _fails(argv, flag, capsys, where: Path) -> str:
    """Run ``argv``: exit 2, one line a mistake, one naming ``flag`` (returned), and ``where`` holding what it
    held before."""
    before = sorted(p.name for p in where.iterdir())
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()            # one line a mistake (every mistake found is reported)
    assert "Traceback" not in err and all(line.startswith("starfish-fast ") for line in lines), err
    assert sorted(p.name for p in where.iterdir()) == before
    return next(line for line in lines if flag in line)


def _recover(masks, output, *extra):
    return ["recover", "--model-name", "fashion_vit", "--mask-path", str(masks), "--calib-source", "train",
            "--calib-samples", "16", "--epochs", "1", "--output-path", str(output), "--no-progress", *extra]


# ----------------------------------------------------------------------------- item 2: --pretrained offline
@pytest.mark.parametrize("model,network,cause", [
    ("resnet18", "no_dns", "huggingface.co cannot be reached (Name or service not known)"),
    ("resnet18", "hub_offline", "the hub's offline mode is on (HF_HUB_OFFLINE=1)"),
    ("torchvision/resnet18", "no_dns", "download.pytorch.org cannot be reached (Name or service not known)"),
])
def test_pretrained_offline_is_one_line_without_retries_and_leaves_nothing(tmp_path, capsys, monkeypatch, request,
                                                                           private_caches, model, network, cause):
    import huggingface_hub.constants as hub

    lookups = request.getfixturevalue("offline")
    if network == "hub_offline":
        monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    line = _fails(["prune", "--model-name", model, "--pretrained", "--sparsity", "0.5", "--output",
                   str(tmp_path / "m.pt")], "--pretrained", capsys, tmp_path)
    host = cause.split()[0] if network == "no_dns" else None
    assert lookups == ([host] if host else [])                           # no retry (timm's retries took 53 s)
    assert f"{model}'s weights" in line and cause in line and "--dense-path FILE" in line
    assert ("--pretrained-file FILE" in line) == (not model.startswith("torchvision/"))
    assert not private_caches.exists()                                  # no empty hub folder left behind


def test_pretrained_weights_in_the_cache_load_offline(tmp_path, capsys, private_caches, offline):
    """timm weights already in the Hugging Face cache load without the network (random ones stand in)."""
    import timm
    from safetensors.torch import save_file

    snapshot = private_caches / "hf" / "models--timm--resnet18.a1_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(1)
    weights = timm.create_model("resnet18").state_dict()
    save_file(weights, str(snapshot / "model.safetensors"))
    assert cli.main(["prune", "--model-name", "resnet18", "--pretrained", "--sparsity", "0.5", "--output",
                     str(tmp_path / "m.pt")]) == 0
    assert offline == []                                                 # the cache alone, not even one lookup
    report = json.loads(capsys.readouterr().out)
    assert report["dense_weights"] == "pretrained (the library's)" and report["prune_scope"] == "conv"
    model = timm.create_model("resnet18")
    model.load_state_dict(weights)
    expected = magnitude_masks(model, 0.5, "conv")                     # the masks of exactly those weights
    written = torch.load(tmp_path / "m.pt", weights_only=True)
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)


# ----------------------------------------------------------------------------- items 3 and 4: files and kwargs
def test_pretrained_file_that_is_text_is_one_line(tmp_path, capsys, no_work):
    text = tmp_path / "weights.pth"
    text.write_text("no weights here\n")
    line = _fails(["prune", "--model-name", "resnet18", "--pretrained-file", str(text), "--sparsity", "0.5",
                   "--output", str(tmp_path / "m.pt")], "--pretrained-file", capsys, tmp_path)
    assert "is not a torch.save or safetensors file (it starts with b'no weigh': text)" in line


@pytest.mark.parametrize("kwargs,message", [
    (["num_classes=ten"], "--model-kwargs num_classes=ten: resnet18's num_classes takes an int like its default "
                          "1000, not the text 'ten'"),
    (["foo=1"], "--model-kwargs foo=1: resnet18 (ResNet) takes no argument 'foo'; it takes block, layers, "
                "num_classes"),
    (["num_clases=10"], "did you mean num_classes"),
    (["num_classes"], "expected KEY=VALUE"),
])
def test_model_kwargs_are_checked_against_the_signature_before_anything_is_built(tmp_path, capsys, no_work, kwargs,
                                                                                 message):
    for command in (["prune", "--random-init", "--sparsity", "0.5", "--output", str(tmp_path / "m.pt")],
                    ["recover", "--random-init", "--mask-path", str(tmp_path), "--fashion-mnist", "--output-path",
                     str(tmp_path / "out" / "r.pt")]):
        line = _fails([command[0], "--model-name", "resnet18", "--model-kwargs", *kwargs, *command[1:]],
                      "--model-kwargs", capsys, tmp_path)
        assert message in line


def test_model_kwargs_for_a_bundled_model(tmp_path, capsys, masks, no_work):
    line = _fails(_recover(masks, tmp_path / "out" / "r.pt", "--model-kwargs", "num_classes=3"), "--model-kwargs",
                  capsys, tmp_path)
    assert "fashion_vit has a fixed architecture" in line


# ----------------------------------------------------------------------------- item 5: outputs, before the work
@pytest.mark.parametrize("case", ["parent_is_a_file", "is_a_directory", "not_writable", "sidecar_is_a_directory",
                                  "export_is_a_directory", "export_under_a_file"])
def test_recover_outputs_are_checked_before_any_work(tmp_path, capsys, masks, no_work, case):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir.safetensors").mkdir()
    (tmp_path / "r.pt.metrics.jsonl").mkdir()
    output, extra, flag = {
        "parent_is_a_file": (tmp_path / "afile" / "r.pt", [], "--output-path"),
        "is_a_directory": (tmp_path / "adir", [], "--output-path"),
        "not_writable": (Path("/sys/starfish_fast_test/r.pt"), [], "--output-path"),
        "sidecar_is_a_directory": (tmp_path / "r.pt", [], "--output-path"),
        "export_is_a_directory": (tmp_path / "out" / "r.pt", ["--export", str(tmp_path / "adir.safetensors")],
                                  "--export"),
        "export_under_a_file": (tmp_path / "out" / "r.pt", ["--export", str(tmp_path / "afile" / "e.safetensors")],
                                "--export"),
    }[case]
    line = _fails(_recover(masks, output, *extra), flag, capsys, tmp_path)
    assert {"parent_is_a_file": "afile is a file, not a directory", "is_a_directory": "adir: is a directory",
            "not_writable": "cannot write in /sys", "sidecar_is_a_directory": "r.pt.metrics.jsonl: is a directory",
            "export_is_a_directory": "adir.safetensors: is a directory",
            "export_under_a_file": "afile is a file, not a directory"}[case] in line


@pytest.mark.parametrize("argv,flag", [
    (["prune", "--model-name", "fashion_vit", "--sparsity", "0.5", "--output", "{tmp}/afile/m.pt"], "--output"),
    (["prune", "--model-name", "fashion_vit", "--sparsity", "0.5", "--output", "{tmp}/adir.pt"], "--output"),
    (["demo", "--output-dir", "{tmp}/afile"], "--output-dir"),
    (["eval", "--model-name", "fashion_vit", "--checkpoint", "{tmp}/healed.pt", "--diagnostics"], "--diagnostics"),
])
def test_other_commands_check_their_outputs_first(tmp_path, capsys, monkeypatch, argv, flag):
    import starfish_fast.bundled as bundled
    import starfish_fast.commands_images as images

    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.pt").mkdir()
    model, _ = load_bundled_model()
    torch.save(model.state_dict(), tmp_path / "healed.pt")
    (tmp_path / "healed.pt.block_cosine.png").mkdir()                   # where eval --diagnostics would write
    monkeypatch.setattr(images, "load_dense", lambda *a, **k: pytest.fail("a model was built before the check"))
    monkeypatch.setattr(bundled, "load_bundled_model", lambda *a, **k: pytest.fail("demo built its model"))
    _fails([a.format(tmp=tmp_path) for a in argv], flag, capsys, tmp_path)


# ----------------------------------------------------------------------------- item 6: a refused resume
def test_resume_refusal_names_each_changed_setting_and_runs_no_step(tmp_path, capsys, masks):
    import starfish_fast.steps as steps

    output = tmp_path / "out" / "r.pt"
    run = _recover(masks, output, "--mode", "exact", "--checkpoint-every", "1", "--batch-size", "8")
    ran = []
    with interrupted_at(steps.ExactStep, 1, ran):
        assert cli.main(run) == 130
        capsys.readouterr()
        ran.clear()
        line = _fails([*run, "--resume", "--lr", "1e-3"], "--resume", capsys, output.parent)
    assert f"refusing to resume from {output}.resume: settings differ: --lr 0.001 here, 0.0006 in the checkpoint" in line
    resume = line.split("to resume it: ")[1]
    assert resume.startswith("starfish-fast recover ") and "--lr 0.0006" in resume and "--resume" in resume
    assert ran == [] and sorted(p.name for p in output.parent.iterdir()) == ["r.pt.resume"]


# ----------------------------------------------------------------------------- item 7: Fashion-MNIST, 3 channels
def test_fashion_mnist_for_a_3_channel_timm_model_is_adapted_to_it(tmp_path, capsys):
    """Fashion-MNIST through the model's own transform (gray -> 3 channels, 224x224, ImageNet mean/std)."""
    common = ["--model-name", "regnetx_002", "--random-init", "--model-kwargs", "num_classes=10"]
    assert cli.main(["prune", *common, "--sparsity", "0.5", "--output", str(tmp_path / "m.pt")]) == 0
    capsys.readouterr()
    output = tmp_path / "out" / "r.pt"
    assert cli.main(["recover", *common, "--mask-path", str(tmp_path / "m.pt"), "--fashion-mnist", "--calib-source",
                     "train", "--calib-samples", "8", "--batch-size", "4", "--epochs", "1", "--eval-samples", "20",
                     "--output-path", str(output), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["dense_weights"].startswith("random (--random-init") and summary["steps"] == 2
    assert cli.main(["eval", *common[:2], *common[3:], "--checkpoint", str(output), "--fashion-mnist",
                     "--eval-samples", "20", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == summary["top1_after"]


def test_images_that_cannot_fit_the_model_are_refused_before_any_work(tmp_path, capsys, masks, no_work):
    line = _fails(["recover", "--model-name", "resnet18", "--random-init", "--model-kwargs", "in_chans=2",
                   "--mask-path", str(masks), "--fashion-mnist", "--output-path", str(tmp_path / "out" / "r.pt")],
                  "--fashion-mnist", capsys, tmp_path)
    assert "its images (3x224x224 as the model's transform makes them) do not fit resnet18 (RuntimeError" in line


# ----------------------------------------------------------------------------- item 8 and the rest
def test_a_checkpoint_of_another_model_is_summarised(tmp_path, capsys, no_work):
    model, _ = load_bundled_model()
    torch.save(model.state_dict(), tmp_path / "vit.pt")
    line = _fails(["eval", "--model-name", "fashion_resnet", "--checkpoint", str(tmp_path / "vit.pt"),
                   "--eval-samples", "10"], "--checkpoint", capsys, tmp_path)
    assert "does not fit fashion_resnet: 128 missing keys (bn1.bias, bn1.num_batches_tracked, bn1.running_mean, ... " \
           "(128 in all)), 80 unexpected keys (blocks.0.attn.proj.bias" in line and len(line) < 500


@pytest.mark.parametrize("argv,flag,message", [
    (["blocks", "--model-name", "fashion_rsnet"], "--model-name", "close matches: fashion_resnet"),
    (["blocks", "--model-name", "no_such_model_at_all"], "--model-name",
     "or the bundled fashion_vit, fashion_cnn, fashion_resnet"),
    (["recover", "--model-name", "regnetx_002", "--random-init", "--mask-path", "{masks}", "--output-path",
      "{tmp}/o/r.pt"], "--hf-dataset", "ILSVRC/imagenet-1k"),
    (["recover", "--model-name", "fashion_vit", "--mask-path", "{masks}", "--epochs", "0"], "--epochs",
     "--epochs must be a positive integer, got 0"),
    (["recover", "--model-name", "fashion_vit", "--mask-path", "{masks}", "--device", "cuda:7"], "--device", ""),
    (["recover", "--model-name", "fashion_vit", "--mask-path", "{masks}", "--fashion-mnist", "{tmp}"],
     "--fashion-mnist", "t10k-images-idx3-ubyte[.gz] is missing (the Fashion-MNIST test split's IDX files"),
    (["recover", "--model-name", "fashion_vit", "--mask-path", "{masks}", "--eval-dir", "{tmp}", "--eval-samples", "4"],
     "--eval-dir", "holds no images in class folders"),
    (["eval", "--model-name", "fashion_vit", "--mask-path", "{masks}"], "--mask-path", "only with --diagnostics"),
    (["eval", "--model-name", "fashion_vit", "--eval-samples", "10001"], "--eval-samples",
     "the Fashion-MNIST test split has 10000 images"),
    (["prune", "--model-name", "fashion_vit", "--random-init", "--pretrained", "--sparsity", "0.5", "--output",
      "{tmp}/m.pt"], "--random-init", "give one of --dense-path, --pretrained, --pretrained-file and --random-init"),
])
def test_more_mistakes_are_one_line_before_any_work(tmp_path, capsys, masks, monkeypatch, no_work, argv, flag,
                                                    message):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)          # streaming refused, `datasets` installed or not
    if "--device" in argv and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    line = _fails([a.format(tmp=tmp_path, masks=masks) for a in argv], flag, capsys, tmp_path)
    assert message in line


def test_eval_diagnostics_shows_progress(tmp_path, capsys, masks):
    output = tmp_path / "stem"
    model, _ = load_bundled_model()
    torch.save(model.state_dict(), output)
    assert cli.main(["eval", "--model-name", "fashion_vit", "--checkpoint", str(output), "--diagnostics",
                     "--mask-path", str(masks), "--eval-samples", "300", "--batch-size", "100"]) == 0
    err = capsys.readouterr().err
    for bar in ("top-1", "diagnostics: pruned", "diagnostics: model"):
        assert f"{bar}: 100%" in err and "3/3" in err


def test_kl_bound_plot_title_names_both_models():
    import inspect

    from starfish_fast.diagnostics import plot_kl_bound

    assert inspect.signature(plot_kl_bound).parameters["title"].default == \
        "KL(dense || model) and its representation bounds"
