"""The healing benchmarks run end to end. Smoke tests: tiny settings, and what they check is only that the
reports are complete and their numbers present and positive (speed is measured by the benchmarks, never
here), plus that the compacted run's loss equals the masked dense one's."""
import argparse
import json
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
                              stores=["device"], compile="off", precisions=["fp32", "bf16"], kernels=["torch"],
                              skip_reference=False, ceiling_tflops=1.0)
    report = bench_heal.run(args)
    assert set(report["runs"]) == {"reference", "fast[device,fp32,torch]", "fast[device,bf16,torch]"}
    fast = report["runs"]["fast[device,fp32,torch]"]
    assert fast["images_per_s"] > 0 and fast["teacher_store"] == "device" and fast["plan"]["precision"] == "fp32"
    assert fast["fp32_teacher_loss_rel_diff_vs_reference"] < 0.05      # fp32 both: the same healing
    assert 0 < fast["fraction_of_measured_matmul"] and report["runs"]["fast[device,bf16,torch]"]["ran"]


def test_bench_e2e_rehearsal_reports_both_implementations_and_a_plot(tmp_path):
    """bench_e2e.py --rehearse as CI runs it: the JSON parses, the reference loop and fast mode both ran
    (same epochs, losses recorded), and the plot was written."""
    import bench_e2e

    output = tmp_path / "e2e.json"
    bench_e2e.main(["--rehearse", "--output", str(output), "--implementations", "reference_loop", "fast",
                    "fast_eager", "reference_library"])
    report = json.loads(output.read_text())
    runs = report["jobs"]["fashion_vit"]["runs"]
    for impl in ("reference_loop", "fast", "fast_eager"):
        assert runs[impl]["seconds"] > 0 and runs[impl]["images_per_second"] > 0
        assert len(runs[impl]["losses"]) == report["jobs"]["fashion_vit"]["epochs"]
        assert runs[impl]["speedup_whole_call"] > 0
    assert runs["reference_library"] == {"skipped": "no --reference-repo given"}
    assert "compile" in runs["fast"]["compile_reason"] or runs["fast"]["compile_reason"].startswith("auto")
    assert output.with_suffix(".png").stat().st_size > 1000


def test_bench_e2e_language_model_job_reports_tokens(tmp_path, monkeypatch):
    """The 1B-class LM job's code on a tiny Llama of the same make: tokens per second and both loops."""
    pytest.importorskip("transformers")
    import bench_e2e

    monkeypatch.setattr(bench_e2e, "LLAMA_1B", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                                    max_position_embeddings=64, tie_word_embeddings=True))
    monkeypatch.setattr(bench_e2e, "SEQUENCE", 16)
    output = tmp_path / "lm.json"
    bench_e2e.main(["--jobs", "llama_1b", "--images", "8", "--epochs", "1", "--batch", "4", "--device", "cpu",
                    "--implementations", "reference_loop", "fast", "--output", str(output)])
    runs = json.loads(output.read_text())["jobs"]["llama_1b"]["runs"]
    for impl in ("reference_loop", "fast"):
        assert runs[impl]["tokens_per_second"] == pytest.approx(16 * runs[impl]["images_per_second"])
