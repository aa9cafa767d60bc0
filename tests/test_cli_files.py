"""The checks the command line runs on its paths before any work (checkpoint.py): what kind of file an input
holds, whether an output can be written, whether a download host answers, how a refused resume and a
checkpoint of another model are reported, and the progress bar's one write per update."""
import json
import socket
import time

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from starfish_fast.checkpoint import (EXPORT_FORMAT_V1, MASK_PREFIX, check_input_file, check_output_dir,
                                      check_output_path, export_dense, file_kind, load_resume, no_new_empty_dirs,
                                      read_state_dict, save_recovered_checkpoint, save_resume, state_dict_mismatch,
                                      unreachable)
from starfish_fast.prune import magnitude_masks


def tiny_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3).eval()


@pytest.fixture
def files(tmp_path):
    """One file of every kind the command line writes or reads, keyed by kind."""
    model = tiny_vit()
    masks = magnitude_masks(model, 0.5, scope="qkv_out_mlp")
    paths = {"masks": tmp_path / "masks.pt", "masks_st": tmp_path / "masks.safetensors",
             "weights": tmp_path / "dense.pt", "weights_st": tmp_path / "dense.safetensors",
             "recovered": tmp_path / "recovered.pt", "export": tmp_path / "healed.safetensors",
             "resume": tmp_path / "recovered.pt.resume", "text": tmp_path / "notes.pt"}
    torch.save(masks, paths["masks"])
    save_file(masks, str(paths["masks_st"]))
    torch.save(model.state_dict(), paths["weights"])
    save_file(model.state_dict(), str(paths["weights_st"]))
    save_recovered_checkpoint(path=paths["recovered"], model=model, args={"model_name": "tiny"}, blocks=["blocks.0"],
                              history=[], before=float("nan"), after=float("nan"), mask_density_value=0.5)
    export_dense(model, masks, paths["export"], {"model_name": "tiny"})
    save_resume(paths["resume"], {"step": 1, "model": model.state_dict(), "fingerprints": {}})
    paths["text"].write_text("not a checkpoint\n")
    return model, masks, paths


def test_every_kind_is_told_apart(files):
    _, _, paths = files
    kinds = {name: file_kind(path) for name, path in paths.items() if name != "text"}
    assert kinds == {"masks": "masks", "masks_st": "masks", "weights": "weights", "weights_st": "weights",
                     "recovered": "recovered", "export": "export", "resume": "resume"}


@pytest.mark.parametrize("name,wanted,message", [
    ("masks", "weights", "is a mask file (every tensor bool), not model weights"),
    ("resume", "weights", "is a resume checkpoint, not model weights"),
    ("recovered", "masks", "is a healed checkpoint (recover's output), not a mask file"),
    ("export", "masks", "is a weights export (recover's `export`), not a mask file"),
    ("masks", "resume", "is a mask file (every tensor bool), not a starfish_fast resume checkpoint"),
    ("text", "weights", "is not a torch.save or safetensors file"),
])
def test_a_file_of_another_kind_is_one_line_naming_the_flag(files, name, wanted, message):
    _, _, paths = files
    with pytest.raises(ValueError) as error:
        check_input_file(paths[name], "--some-flag", wanted)
    assert str(error.value).startswith(f"--some-flag {paths[name]}") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_every_weights_file_reads_as_the_same_state_dict(files, tmp_path):
    model, masks, paths = files
    expected = model.state_dict()
    for name in ("weights", "weights_st", "recovered"):
        state = read_state_dict(paths[name])
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    exported = read_state_dict(paths["export"])               # exactly the model's keys, masked weights zero
    assert exported.keys() == expected.keys()
    assert all((exported[k][~masks[k]] == 0).all() and torch.equal(exported[k][masks[k]], expected[k][masks[k]])
               for k in masks)
    v1 = tmp_path / "v1.safetensors"                          # an export of the format before: masks inside
    save_file({**exported, **{MASK_PREFIX + k: v for k, v in masks.items()}}, str(v1),
              metadata={"format": json.dumps(EXPORT_FORMAT_V1)})
    assert read_state_dict(v1).keys() == expected.keys()


def test_state_dict_mismatch_is_summarised():
    expected = {f"layer{i}.weight": torch.zeros(4, 4) for i in range(40)}
    found = {f"other{i}.weight": torch.zeros(4, 4) for i in range(30)} | {"layer0.weight": torch.zeros(2, 4)}
    text = state_dict_mismatch(expected, found)
    assert text.startswith("39 missing keys (layer1.weight, layer10.weight, layer11.weight, ... (39 in all)), "
                           "30 unexpected keys (other0.weight, other1.weight, other10.weight, ... (30 in all)), "
                           "size mismatch for layer0.weight: (2, 4) in the file, (4, 4) in the model")
    assert len(text) < 400 and state_dict_mismatch(expected, dict(expected)) is None


def test_output_checks(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    check_output_path(tmp_path / "new" / "deeper" / "out.pt", "--output-path")        # missing parents: fine
    check_output_dir(tmp_path / "new" / "dir", "--output-dir")
    cases = [(check_output_path, tmp_path / "afile" / "out.pt", NotADirectoryError, "afile is a file, not a directory"),
             (check_output_path, tmp_path / "adir", IsADirectoryError, "adir: is a directory"),
             (check_output_path, "/sys/starfish_fast_test/out.pt", PermissionError, "cannot write in /sys"),
             (check_output_dir, tmp_path / "afile", NotADirectoryError, "afile: is a file, not a directory")]
    for check, path, error, message in cases:
        with pytest.raises(error, match=message):
            check(path, "--flag")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]            # nothing written, no probe left


def test_resume_refusal_names_the_changed_settings(tmp_path):
    path = tmp_path / "run.resume"
    saved = {"masks": "aa", "config": json.dumps({"epochs": 10, "lr": 0.0006, "batch_size": 32}, sort_keys=True)}
    save_resume(path, {"step": 3, "fingerprints": saved})
    now = dict(saved, config=json.dumps({"epochs": 10, "lr": 0.001, "batch_size": 64}, sort_keys=True))
    with pytest.raises(ValueError) as error:
        load_resume(path, now)
    assert str(error.value) == (f"refusing to resume from {path}: settings differ: batch_size 64 here, 32 in the "
                                f"checkpoint, lr 0.001 here, 0.0006 in the checkpoint; rerun with the checkpoint's, "
                                f"or without `resume` to start afresh")
    with pytest.raises(ValueError, match="the masks differ from the checkpoint's"):
        load_resume(path, dict(saved, masks="bb"))
    assert load_resume(path, saved)["step"] == 3


def test_unreachable_hosts_answer_within_the_timeout(monkeypatch):
    started = time.perf_counter()
    assert "cannot be reached" in unreachable("https://starfish-fast-probe.invalid/weights.pt", timeout=3)
    with socket.socket() as listener:                          # a port nobody listens on: refused at once
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
    assert unreachable(f"http://127.0.0.1:{port}/x", timeout=3).startswith("127.0.0.1 cannot be reached")
    with socket.socket() as listener:                          # a listening port: reachable
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert unreachable(f"http://127.0.0.1:{listener.getsockname()[1]}/x", timeout=3) is None
    assert time.perf_counter() - started < 10


def test_no_new_empty_dirs_removes_what_a_failed_body_created(tmp_path):
    target = tmp_path / "home" / "hub" / "checkpoints"
    with pytest.raises(OSError):
        with no_new_empty_dirs(target):
            target.mkdir(parents=True)
            raise OSError("download failed")
    assert list(tmp_path.iterdir()) == []
    with no_new_empty_dirs(target):                            # success keeps them
        target.mkdir(parents=True)
    assert target.is_dir()


def test_the_progress_bar_writes_each_update_once(capsys):
    from types import SimpleNamespace

    from starfish_fast.progress import RunLog

    run_log = RunLog(SimpleNamespace(progress=True, metrics_path=None, plot_path=None), total_steps=30, start_step=0)
    for step, loss in ((10, 0.5), (20, 0.25), (30, 0.125)):
        time.sleep(0.15)                                        # log points further apart than tqdm's mininterval
        run_log.logged(step=step, loss=loss, lr=1e-3, images=320, steps=10)
    run_log.finish([1.0] * 30, [{"epoch": 1.0, "loss": 0.3}])
    err = capsys.readouterr().err                               # not a terminal: as a log file gets it
    assert err.count("loss=0.5000") == 1 and err.count("loss=0.2500") == 1
    assert err.count("loss=0.1250") == 2                        # the last update, then the closing summary
