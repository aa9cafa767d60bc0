"""The wheel holds what an installed user imports: every subpackage (models, prune, kernels from the
top-level kernels/), the bundled weights and the console script; built from a copy of the checkout so
that the build leaves nothing behind in it."""
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                                reason="needs the git checkout")


def test_wheel_holds_every_package_and_the_weights(tmp_path):
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    source = tmp_path / "src"
    for name in tracked.splitlines():
        if (ROOT / name).is_file() and not name.startswith(("bench/results/", "tests/")):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("starfish_fast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {f"starfish_fast/{p.relative_to(ROOT / 'starfish_fast')}" for p in (ROOT / "starfish_fast").rglob("*.py")}
    modules |= {f"starfish_fast/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    assert not modules - names, sorted(modules - names)
    assert {f"starfish_fast/assets/{p.name}" for p in (ROOT / "starfish_fast" / "assets").glob("*.safetensors")} <= names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert re.search(r"starfish-fast\s*=\s*starfish_fast\.cli:main", entry_points)


def test_checkout_never_shadows_pypi_kernels():
    """transformers depends on PyPI's `kernels`; with the checkout's root on sys.path (a plain checkout,
    PYTHONPATH=., pytest's rootdir) the top-level kernels/ folder must not be what `import kernels` finds."""
    pytest.importorskip("transformers")
    code = ("import kernels, transformers; from transformers import LlamaForCausalLM, GPT2LMHeadModel\n"
            "import starfish_fast.kernels as k\n"
            "assert 'site-packages' in (kernels.__file__ or ''), kernels\n"
            "assert callable(k.masked_linear) and callable(k.multi_block_cosine_loss)\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
