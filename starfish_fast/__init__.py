"""starfish_fast: heal pruned networks with STARFISH (per-block cosine alignment), fast.

    import starfish_fast as sf
    from starfish_fast.data import load_fashion_mnist, select_calibration
    from starfish_fast.prune import magnitude_masks
    dense, _ = sf.load_bundled_model()
    pruned, _ = sf.load_bundled_model()
    masks = magnitude_masks(pruned, sparsity=0.75, scope="qkv_out_mlp")
    calib = select_calibration(load_fashion_mnist(split="train")[0], num_samples=256)
    result = sf.heal(pruned, dense, masks, calib, sf.HealConfig(epochs=2))

The reference library's API lives in ``starfish_fast.compat`` (same names and semantics).
Names are imported on first use, so ``import starfish_fast`` (and ``starfish-fast --help``) stays light.
"""
import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.2.0"

_LAZY = {"HealConfig": "config", "HealResult": "engine", "heal": "engine", "Plan": "plan", "resolve_plan": "plan",
         "load_bundled_model": "bundled", "apply_masks": "masks", "load_masks": "masks", "mask_density": "masks",
         "adapter_for": "models", "build_empty_model": "models", "load_model": "models"}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"starfish_fast.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'starfish_fast' has no attribute {name!r}")


class _CheckoutKernels(importlib.abc.MetaPathFinder):
    """``starfish_fast.kernels`` from a plain checkout: the top-level ``kernels/`` beside this package.
    ``pip install`` maps that folder to ``starfish_fast/kernels`` (setup.py); without an install (the
    GPU machines run the tree with ``PYTHONPATH=.``) this finder does the same mapping."""

    def __init__(self, folder: Path):
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "starfish_fast.kernels":
            return None
        return importlib.util.spec_from_file_location(fullname, self.folder / "__init__.py",
                                                      submodule_search_locations=[str(self.folder)])


def _map_checkout_kernels() -> None:
    package = Path(__file__).resolve().parent
    kernels = package.parent / "kernels"
    # only in a checkout: an installed package has its own kernels/ inside, and site-packages/kernels
    # would be someone else's package
    if not (package / "kernels").is_dir() and (kernels / "_dispatch.py").is_file() \
            and (package.parent / "setup.py").is_file():
        sys.meta_path.insert(0, _CheckoutKernels(kernels))


_map_checkout_kernels()
