"""Healing under torchrun (gloo on the CPU, two processes, one thread each) gives the results of one
process; a killed run resumes; mismatched world sizes and uneven batches are refused before any work."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_worker import diagnostics_case, run_case

HERE = Path(__file__).resolve().parent
CASES = {"vit_fast": {"model": "fashion_vit", "mode": "fast"}, "vit_exact": {"model": "fashion_vit", "mode": "exact"},
         "deit_fast": {"model": "deit", "mode": "fast"}, "deit_exact": {"model": "deit", "mode": "exact"},
         "vit_sequential": {"model": "fashion_vit", "mode": "exact", "order": "sequential"},
         "deit_sequential": {"model": "deit", "mode": "fast", "order": "sequential"}}
pytestmark = pytest.mark.slow


def torchrun(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)


def launch(tmp_path, cases: dict, **spec) -> subprocess.CompletedProcess:
    path = tmp_path / f"spec{len(list(tmp_path.glob('spec*')))}.json"
    path.write_text(json.dumps({"out": str(tmp_path), "cases": cases, **spec}))
    return torchrun(HERE / "dist_worker.py", path)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    proc = launch(out, {**CASES, "uneven": {"model": "deit", "mode": "fast", "batch_size": 7},
                        "resumable": {"model": "deit", "mode": "fast", "checkpoint": str(out / "full.resume")}},
                  diagnostics=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_heal_as_one(two_processes, name):
    torch.set_num_threads(1)
    single_model, single, masks = run_case(CASES[name])
    double = torch.load(two_processes / f"{name}.pt", weights_only=True)
    for one, two in zip(single.history, double["history"]):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    for key, value in single_model.state_dict().items():
        torch.testing.assert_close(double["state"][key], value, rtol=1e-4, atol=1e-4, msg=key)
    for rank in (0, 1):
        report = json.loads((two_processes / f"{name}.rank{rank}.json").read_text())
        assert report["masked_zero"] and report["world_size"] == 2 and report["history"] == double["history"]


def test_diagnostics_split_across_processes_sum_to_the_single_process_result(two_processes):
    torch.set_num_threads(1)
    single = diagnostics_case()
    split = json.loads((two_processes / "diagnostics.json").read_text())
    assert split["examples"] == single["examples"] == 64 and split["top1_model"] == single["top1_model"]
    for key in ("kl", "bound", "bound_certified", "zeta", "zeta_max"):
        assert split[key] == pytest.approx(single[key], rel=1e-6), key
    for block, value in single["block_cosine"].items():
        assert split["block_cosine"][block] == pytest.approx(value, rel=1e-6)


def test_an_uneven_batch_is_refused_naming_both_numbers(two_processes):
    for rank in (0, 1):
        error = json.loads((two_processes / f"uneven.rank{rank}.json").read_text())["error"]
        assert "the batch size is 7 images, not divisible by the 2 processes" in error


def test_a_killed_run_resumes_to_the_uninterrupted_result(two_processes, tmp_path):
    case = {"model": "deit", "mode": "fast", "checkpoint": str(tmp_path / "run.resume")}
    crashed = launch(tmp_path, {"resumed": case}, crash_after=5)
    assert crashed.returncode != 0 and (tmp_path / "run.resume").exists()
    resumed = launch(tmp_path, {"resumed": case})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full, again = (torch.load(path, weights_only=True) for path in (two_processes / "resumable.pt",
                                                                        tmp_path / "resumed.pt"))
    assert again["history"] == full["history"]
    for key, value in full["state"].items():
        assert torch.equal(again["state"][key], value), key


def test_resuming_with_another_world_size_is_refused(two_processes):
    with pytest.raises(ValueError, match="written by 2 process\\(es\\), this run has 1"):
        run_case({"model": "deit", "mode": "fast"}, str(two_processes / "full.resume"))


def test_the_command_line_under_torchrun_writes_one_set_of_outputs(tmp_path):
    from starfish_fast.bundled import load_bundled_model
    from starfish_fast.prune import magnitude_masks

    torch.save(magnitude_masks(load_bundled_model()[0], 0.5), tmp_path / "masks.pt")
    output = tmp_path / "out" / "recovered.pt"
    proc = torchrun("-m", "starfish_fast", "recover", "--model-name", "fashion_vit", "--mask-path",
                    tmp_path / "masks.pt", "--calib-source", "train", "--calib-samples", "32", "--batch-size", "8",
                    "--epochs", "1", "--eval-samples", "200", "--output-path", output, "--device", "cpu",
                    "--mode", "fast", "--precision", "fp32", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)                                  # one JSON summary: rank 0's
    assert "2 processes" in summary["plan"]                              # top-1 compared below
    assert sorted(p.name for p in output.parent.iterdir()) == sorted(
        ["recovered.pt", "recovered.pt.json", "recovered.pt.metrics.jsonl", "recovered.pt.loss.png"])
    assert proc.stderr.count("plan: cpu fast") == 1                     # one INFO line for the whole job
    from starfish_fast.data import FASHION_MNIST_DIR, fashion_mnist_split
    from starfish_fast.evaluate import evaluate_top1_tensors
    from starfish_fast.models import load_dense

    _, images, labels = fashion_mnist_split(FASHION_MNIST_DIR, "train", 32, 200)
    healed = load_dense("fashion_vit", output)
    assert evaluate_top1_tensors(healed, images, labels, batch_size=256) == pytest.approx(summary["top1_after"])
