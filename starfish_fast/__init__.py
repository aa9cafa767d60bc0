"""starfish_fast: heal pruned networks with STARFISH (per-block cosine alignment), fast.

    import starfish_fast as sf
    dense, _ = sf.load_bundled_model()
    pruned, _ = sf.load_bundled_model()
    masks = sf.prune.magnitude_masks(pruned, sparsity=0.75, scope="qkv_out_mlp")
    result = sf.heal(pruned, dense, masks, calib_images, sf.HealConfig(epochs=10))

The reference library's API lives in ``starfish_fast.compat`` (same names and semantics).
"""
from starfish_fast.bundled import load_bundled_model
from starfish_fast.config import HealConfig
from starfish_fast.engine import HealResult, heal
from starfish_fast.masks import apply_masks, load_masks, mask_density
from starfish_fast.models import adapter_for, build_empty_model, load_model

__version__ = "0.1.0"
__all__ = ["HealConfig", "HealResult", "heal", "load_bundled_model", "apply_masks", "load_masks", "mask_density",
           "adapter_for", "build_empty_model", "load_model", "__version__"]
