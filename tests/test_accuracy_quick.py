"""A reduced reproduction of the accuracy benchmark (bench/accuracy.py) on the bundled model and
real Fashion-MNIST: one sparsity (0.7), one seed, 2 epochs on 256 unlabeled train images,
2,000 test images. STARFISH must improve top-1 over the pruned model. About 20 s on 2 CPU cores."""
import sys
from pathlib import Path

import pytest

from starfish_fast.bundled import BUNDLED_WEIGHTS
from starfish_fast.data import FASHION_MNIST_DIR

BENCH = Path(__file__).resolve().parents[1] / "bench"
pytestmark = [
    pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(),
                       reason="needs `apt-get install dataset-fashion-mnist` (setup.sh installs it)"),
    pytest.mark.skipif(not BUNDLED_WEIGHTS.exists(), reason="bundled weights not trained yet"),
]


@pytest.fixture(scope="module")
def accuracy():
    sys.path.insert(0, str(BENCH))
    try:
        import accuracy
        yield accuracy
    finally:
        sys.path.remove(str(BENCH))


def test_starfish_improves_over_pruned(accuracy, tmp_path):
    prefix = tmp_path / "accuracy"
    args = accuracy.resolve_args(["--quick", "--sparsities", "0.7", "--extras", "--objectives", "starfish",
                                  "--seeds", "0", "--epochs", "2", "--calib-samples", "256", "--eval-samples", "2000",
                                  "--diagnostics-sparsity", "0.7", "--threads", "2", "--prefix", str(prefix)])
    out = accuracy.run(args)
    (row,) = out["rows"]
    pruned = out["pruned"][("magnitude", 0.7)]
    assert row["eval_examples"] == 2000 and row["sparsity"] == pytest.approx(0.7, abs=1e-3)
    assert row["top1"] > pruned["top1"] + 1.0, (row["top1"], pruned["top1"])
    assert row["kl"] < pruned["kl"]                            # closer to the dense model's predictions
    diagnostics = out["diagnostics"]
    assert diagnostics["starfish"]["kl"] <= diagnostics["starfish"]["bound_certified"]
    for suffix in (".csv", ".md", ".json", ".png", "_block_cosine.png", "_kl_bound.png"):
        assert Path(f"{prefix}{suffix}").stat().st_size > 0, suffix


def test_beyond_the_paper_reduced(accuracy, tmp_path):
    """bench/accuracy.py's issue-14 grid, reduced: Wanda and representation-aware masks healed with
    adaptive block weights; structured MLP masks compensated in closed form, alone and before STARFISH."""
    prefix = tmp_path / "beyond"
    common = ["--seeds", "0", "--epochs", "1", "--calib-samples", "256", "--eval-samples", "1000", "--threads", "2"]
    args = accuracy.resolve_args(["--sparsities", "0.8", "--methods", "wanda", "representation", "--extras",
                                  "structured", "--objectives", "starfish", "starfish_adaptive", "compensate",
                                  "compensate+starfish", *common, "--prefix", str(prefix)])
    out = accuracy.run(args)
    cells = {(r["setting"], r["objective"]): r for r in out["rows"]}
    assert len(cells) == 12
    for method in ("wanda", "representation"):
        healed = cells[(method, "starfish_adaptive")]
        assert healed["sparsity"] == pytest.approx(0.8, abs=0.01)
        assert healed["top1"] > out["pruned"][(method, healed["sparsity"])]["top1"] + 1.0
    structured = out["pruned"][("structured", 0.5)]
    assert cells[("structured", "compensate")]["kl"] < structured["kl"]          # the refit alone helps
    assert cells[("structured", "compensate")]["epochs"] == 0
    # the same epoch of STARFISH ends closer to the dense model from the refit than from the pruned weights
    assert cells[("structured", "compensate+starfish")]["kl"] < cells[("structured", "starfish")]["kl"]
    assert "STARFISH adaptive" in Path(f"{prefix}.md").read_text()
