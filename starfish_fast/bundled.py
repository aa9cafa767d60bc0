"""The bundled Fashion-MNIST models: trained here, committed as safetensors, the embedded defaults of
the demo, the tests and the accuracy grids.

    from starfish_fast.bundled import load_bundled_model
    model, metadata = load_bundled_model()                  # the ViT, eval mode, its recipe and test top-1
    cnn, _ = load_bundled_model("fashion_cnn")              # the MobileNetV1-style CNN
    logits = model(images)                                  # images (B, 1, 28, 28), normalised as data.load_fashion_mnist

| name | architecture | recipe |
|---|---|---|
| ``fashion_vit`` | timm ``VisionTransformer``: 28x28, patch 4, width 64, depth 6, 2 heads (0.31M) | bench/train_fashion_mnist.py |
| ``fashion_cnn`` | timm MobileNetV1 at a quarter width, 1 channel (0.22M) | bench/train_fashion_cnn.py |
| ``fashion_resnet`` | timm ResNet-18 layout at a quarter width (16-128 channels), 1 channel (0.71M) | bench/train_fashion_resnet.py |

Each file's safetensors metadata holds its recipe and test top-1.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

ASSETS = Path(__file__).with_name("assets")
BUNDLED_MODEL_NAME = "fashion_vit"          # the default bundled model
BUNDLED_WEIGHTS = ASSETS / "fashion_vit.safetensors"
# 28x28 with patch 4 gives 49 tokens + cls. Width 64 (0.31M parameters) trains at 55 s per epoch
# on the 2-core CPU against 120 s for width 96, so the recipe fits in a CI-sized machine.
BUNDLED_ARCH = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=6, num_heads=2,
                    mlp_ratio=4.0)
CNN_ARCH = dict(variant="mobilenetv1_100", channel_multiplier=0.25, num_classes=10, in_chans=1)
# a residual CNN with BatchNorm, healed through the generic adapter (timm's group_matcher finds its blocks)
RESNET_ARCH = dict(model_name="resnet18", channels=(16, 32, 64, 128), stem_width=16, num_classes=10, in_chans=1)
BUNDLED_NAMES = ("fashion_vit", "fashion_cnn", "fashion_resnet")


def build_bundled_model(name: str = BUNDLED_MODEL_NAME) -> nn.Module:
    """The bundled architecture ``name`` with random weights."""
    if name == "fashion_vit":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(**BUNDLED_ARCH)
    if name == "fashion_cnn":
        from timm.models.efficientnet import _gen_mobilenet_v1

        return _gen_mobilenet_v1(**CNN_ARCH)
    if name == "fashion_resnet":
        import timm

        return timm.create_model(pretrained=False, **RESNET_ARCH)
    raise ValueError(f"unknown bundled model {name!r}; bundled: {', '.join(BUNDLED_NAMES)}")



def bundled_weights(name: str) -> Path:
    return ASSETS / f"{name}.safetensors"


def load_bundled_model(name: str = BUNDLED_MODEL_NAME, path: str | Path | None = None) -> tuple[nn.Module, dict]:
    """The trained bundled model in eval mode, and its metadata (recipe, test top-1)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else bundled_weights(name)
    if not path.exists():
        raise FileNotFoundError(f"bundled weights {path} are missing; train them with the recipe in bench/")
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    metadata = {key: json.loads(value) for key, value in raw.items()}
    model = build_bundled_model(name)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval(), metadata
