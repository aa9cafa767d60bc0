"""Train the small MobileNetV1-style CNN on Fashion-MNIST: the CNN path of bench/accuracy.py.

    python bench/train_fashion_cnn.py                      # writes starfish_fast/assets/fashion_cnn.safetensors (82.94%)
    python bench/train_fashion_cnn.py --epochs 1 --output /tmp/cnn.safetensors

The recipe and the script are the bundled ViT's (bench/train_fashion_mnist.py: AdamW, warm-up
then cosine, seeded, test top-1 and recipe in the safetensors metadata) with 10 epochs at lr 2e-3
(the committed weights' recipe); only the model differs:
timm's MobileNetV1 (stages 1, 2, 2, 6, 2 of depthwise-separable blocks) at a quarter of the
width on 1-channel 28x28 images, 0.22M parameters, 13 blocks down to 1x1 at the last stage.
"""
from __future__ import annotations

import json
from pathlib import Path

import train_fashion_mnist
from torch import nn

CNN_ARCH = dict(variant="mobilenetv1_100", channel_multiplier=0.25, num_classes=10, in_chans=1)
CNN_WEIGHTS = Path(train_fashion_mnist.BUNDLED_WEIGHTS).with_name("fashion_cnn.safetensors")


def build_fashion_cnn() -> nn.Module:
    from timm.models.efficientnet import _gen_mobilenet_v1

    return _gen_mobilenet_v1(**CNN_ARCH)


def load_fashion_cnn(path: str | Path = CNN_WEIGHTS) -> tuple[nn.Module, dict]:
    """The trained CNN in eval mode and its metadata (recipe, test top-1)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CNN weights {path} are missing; train them with `python bench/train_fashion_cnn.py`")
    with safe_open(str(path), framework="pt") as f:
        metadata = {key: json.loads(value) for key, value in (f.metadata() or {}).items()}
    model = build_fashion_cnn()
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval(), metadata


def main() -> None:
    train_fashion_mnist.main(build_model=build_fashion_cnn, architecture=CNN_ARCH, default_output=CNN_WEIGHTS,
                             description=__doc__.split("\n")[0], recipe_defaults={"epochs": 10, "lr": 2e-3})


if __name__ == "__main__":
    main()
