"""The healing benchmarks run end to end (tiny settings; their numbers are not checked here,
only that the reports are complete and the compacted run's loss equals the masked dense one's)."""
import argparse
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module", autouse=True)
def bench_on_path():
    sys.path.insert(0, str(BENCH))
    yield
    sys.path.remove(str(BENCH))


def test_bench_compaction_reports_every_case():
    import bench_compaction

    args = argparse.Namespace(model="deit_tiny_patch16_224", batch_size=2, steps=4, warmup=1, kinds=["mlp", "qk"],
                              sparsities=[0.5], precision="fp32", device="cpu")
    report = bench_compaction.run(args)
    assert [(case["kind"], case["sparsity"]) for case in report["cases"]] == [("mlp", 0.5), ("qk", 0.5)]
    for case in report["cases"]:
        assert case["speedup"] > 0 and case["compact_on"]["median_step_s"] > 0
        assert case["loss_rel_diff"] < 1e-4          # fp32: compaction is exact up to rounding


@pytest.mark.parametrize("model", ["fashion_vit", "fashion_cnn"])
def test_bench_heal_reports_reference_and_fast_runs(model):
    import bench_heal

    args = argparse.Namespace(model=model, batch_size=4, steps=4, warmup=1, sparsity=0.5, device="cpu",
                              stores=["memory"], compile="off", precisions=["fp32", "bf16"], kernels=["torch"],
                              skip_reference=False, ceiling_tflops=1.0)
    report = bench_heal.run(args)
    assert set(report["runs"]) == {"reference", "fast[memory,fp32,torch]", "fast[memory,bf16,torch]"}
    fast = report["runs"]["fast[memory,fp32,torch]"]
    assert fast["images_per_s"] > 0 and fast["teacher_store"] == "memory" and fast["plan"]["precision"] == "fp32"
    assert fast["fp32_teacher_loss_rel_diff_vs_reference"] < 0.05      # fp32 both: the same healing
    assert 0 < fast["fraction_of_measured_matmul"] and report["runs"]["fast[memory,bf16,torch]"]["ran"]
