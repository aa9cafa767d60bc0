"""README.md stays true: its two commands are what CI runs, every HealConfig key is in its table, and
every ```python block runs as written (on the CPU; blocks that need a GPU or the Fashion-MNIST files are
skipped where those are missing)."""
import os
import re
from pathlib import Path

import pytest

from starfish_fast.config import HealConfig
from starfish_fast.data import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_the_two_commands_are_what_ci_runs():
    bash = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    assert bash[0].strip() == "./setup.sh && .venv/bin/starfish-fast demo"
    assert bash[1].strip() == "./setup.sh && .venv/bin/python -m pytest -q"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./setup.sh" in ci and ".venv/bin/python -m pytest -q" in ci
    assert "starfish-fast=starfish_fast.cli:main" in (ROOT / "setup.py").read_text().replace(" ", "")


def test_every_heal_config_key_is_documented():
    table = "\n".join(line for line in README.splitlines() if line.startswith("| `"))
    documented = set(re.findall(r"`([a-z_0-9]+)`", table))
    missing = [name for name in HealConfig.__dataclass_fields__ if name not in documented]
    assert not missing, f"HealConfig keys missing from README's table: {missing}"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_block_runs(index, tmp_path, monkeypatch):
    code = BLOCKS[index]
    if "cuda" in code:
        pytest.skip("needs a CUDA GPU")
    if "load_fashion_mnist" in code and not Path(FASHION_MNIST_DIR).is_dir():
        pytest.skip("needs `apt-get install dataset-fashion-mnist` (setup.sh installs it)")
    monkeypatch.chdir(tmp_path)
    code = code.replace("/tmp/", f"{tmp_path}{os.sep}")      # examples that write files write here
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": f"readme_{index}"})
