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
