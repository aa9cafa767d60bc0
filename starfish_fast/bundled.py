"""The bundled Fashion-MNIST ViT: the embedded default model of the demo and tests.

    from starfish_fast.bundled import load_bundled_model
    model, metadata = load_bundled_model()     # eval mode, weights from the committed safetensors
    logits = model(images)                     # images (B, 1, 28, 28), normalised as data.load_fashion_mnist

The weights are trained by ``bench/train_fashion_mnist.py`` (seeded) and committed
as ``starfish_fast/assets/fashion_vit.safetensors`` with the recipe and test top-1
in the safetensors metadata.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

BUNDLED_MODEL_NAME = "fashion_vit"
BUNDLED_WEIGHTS = Path(__file__).with_name("assets") / "fashion_vit.safetensors"
# 28x28 with patch 4 gives 49 tokens + cls. Width 64 (0.31M parameters) trains at 55 s per epoch
# on the 2-core CPU against 120 s for width 96, so the recipe fits in a CI-sized machine.
BUNDLED_ARCH = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=6, num_heads=2,
                    mlp_ratio=4.0)


def build_bundled_model() -> nn.Module:
    """The bundled architecture with random weights (a timm ``VisionTransformer``)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**BUNDLED_ARCH)


def load_bundled_model(path: str | Path = BUNDLED_WEIGHTS) -> tuple[nn.Module, dict]:
    """The trained bundled model in eval mode, and its metadata (recipe, test top-1)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"bundled weights {path} are missing; train them with "
                                f"`python bench/train_fashion_mnist.py`")
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    metadata = {key: json.loads(value) for key, value in raw.items()}
    model = build_bundled_model()
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval(), metadata
