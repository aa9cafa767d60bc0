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

__version__ = "0.3.0"

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
