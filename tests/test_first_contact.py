"""What the first GPU contact depends on, checked on the CPU: the package imports from a plain checkout,
bench/gpu_check.sh runs end to end (its rehearsal), the compiled region's numbers match eager under
inductor, a failing compile falls back to eager with a warning, and an explicitly chosen Triton kernel
that fails raises a clear error instead of silently running torch."""
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._inductor.metrics

import starfish_fast.kernels.cosine_loss as cosine_loss
from helpers import images, random_masks, tiny_vit
from starfish_fast import HealConfig, heal
from starfish_fast.kernels import KernelError

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK_FILES = {"gpu_check.jsonl", "gpu_check.log", "pytest.log", "pytest.xml", "stacks.txt", "summary.md"}


def _config(**overrides):
    return HealConfig(**{**dict(epochs=2, batch_size=4, lr=2e-3, min_lr=1e-5, progress=False, precision="fp32",
                                log_every=1), **overrides})


def test_plain_checkout_imports_the_checkouts_own_kernels(tmp_path):
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    env = {**os.environ, "PYTHONPATH": str(clone)}
    env.pop("TRITON_INTERPRET", None)
    code = ("import starfish_fast.kernels as k, starfish_fast.kernels.cosine_loss as c, starfish_fast as sf\n"
            "print(k.__file__); print(c.__file__); print(sf.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    package_init, kernel_file, package_file = proc.stdout.split()
    assert Path(package_init) == clone / "starfish_fast" / "kernels" / "__init__.py"
    assert Path(kernel_file) == clone / "kernels" / "cosine_loss.py"          # the top-level folder's modules
    assert Path(package_file) == clone / "starfish_fast" / "__init__.py"
    assert not (clone / "kernels" / "__init__.py").exists()                   # never a top-level package


@pytest.mark.slow
def test_gpu_check_rehearsal_writes_every_file_and_every_line_parses(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), "--rehearse"], env=env, capture_output=True,
                          text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = {p.name for p in out.iterdir()}
    assert files <= GPU_CHECK_FILES and len(files) <= 8 and all(p.is_file() for p in out.iterdir())
    records = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    assert all({"part", "name", "ok"} <= set(r) for r in records)
    failed = [r for r in records if r["ok"] is False]
    assert not failed, failed
    exits = {r["part"] for r in records if r["name"] == "part_exit" and r["ok"]}
    assert exits == {"env", "e2e", "compile", "profile", "kernels", "sparse24", "tests"}
    names = {r["name"] for r in records}
    assert {"ceiling_copy", "ceiling_matmul_bf16", "kernel:masked_linear:rows50:float16",
            "heal:tiny_vit:fast_triton_pinned_store", "headline:fashion_vit:triton", "e2e:fashion_vit:fast",
            "e2e:fashion_vit:reference_loop", "compile:fashion_vit:eager", "profile:fashion_vit:step",
            "bandwidth:cosine_loss:eager", "sparse24:library"} <= names
    assert "## Targets" in (out / "summary.md").read_text()


def test_compiled_blocks_run_inductor_on_the_cpu_and_match_eager():
    torch._dynamo.reset()
    torch._inductor.metrics.reset()
    dense = tiny_vit()
    masks = random_masks(dense, density=0.5)
    runs = {}
    for setting in ("off", "on"):
        model = copy.deepcopy(dense)
        runs[setting] = heal(model, dense, masks, images(8), _config(compile=setting))
    assert torch._inductor.metrics.generated_kernel_count > 0          # inductor generated the block's code
    assert runs["on"].plan.compile and runs["on"].ran["compile"] == {"blocks.0": "compiled", "blocks.1": "compiled"}
    for eager, compiled in zip(runs["off"].step_losses, runs["on"].step_losses):
        assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-7)


def test_a_block_whose_compile_fails_runs_eager_with_one_warning(monkeypatch):
    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("no compiler for this GPU")

    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: original(self, backend=failing_backend, **kw))
    torch._dynamo.reset()
    dense = tiny_vit()
    masks = random_masks(dense, density=0.5)
    with pytest.warns(RuntimeWarning, match=r"torch.compile failed for 2 of 2 blocks \(blocks.0, blocks.1\); they "
                                            r"run eager: eager \(BackendCompilerFailed <- RuntimeError: no compiler") \
            as caught:
        result = heal(copy.deepcopy(dense), dense, masks, images(8), _config(compile="on"))
    assert len([w for w in caught if "torch.compile failed" in str(w.message)]) == 1
    assert all(value.startswith("eager (") and "no compiler for this GPU" in value
               for value in result.ran["compile"].values())
    eager = heal(copy.deepcopy(dense), dense, masks, images(8), _config(compile="off"))
    assert result.step_losses == eager.step_losses


def test_an_explicit_triton_kernel_that_fails_raises_naming_kernel_and_shapes(monkeypatch):
    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("PTX assembly failed")
            return launch

    monkeypatch.setattr(cosine_loss, "_cos_stats_kernel", Broken())
    dense = tiny_vit()
    with pytest.raises(KernelError, match=r"cosine_loss forward failed to compile or launch \(blocks=2, rows=.*"
                                          r"PTX assembly failed.*kernels='torch'"):
        heal(copy.deepcopy(dense), dense, random_masks(dense), images(8), _config(kernels="triton"))


def test_the_result_records_what_ran(monkeypatch):
    dense = tiny_vit()
    result = heal(copy.deepcopy(dense), dense, random_masks(dense), images(8), _config(kernels="torch"))
    assert result.ran["teacher_store"] == "device" and result.ran["precision"] == "fp32"
    assert result.ran["kernels"] == {"masked_linear": "torch", "cosine_loss": "torch", "masked_adam": "torch"}
    decided = [value for key, value in result.plan.as_dict().items() if key != "reasons"]
    assert "auto" not in json.dumps(decided)
    monkeypatch.setattr("starfish_fast.kernels._dispatch.runnable", lambda device: False)
    with pytest.raises(ValueError, match="kernels='triton' cannot run on cpu"):
        heal(copy.deepcopy(dense), dense, random_masks(dense), images(8), _config(kernels="triton"))
