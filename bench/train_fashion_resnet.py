"""Train the small residual CNN on Fashion-MNIST: a timm ResNet-18 layout at a quarter width.

    python bench/train_fashion_resnet.py                   # writes starfish_fast/assets/fashion_resnet.safetensors
    python bench/train_fashion_resnet.py --epochs 1 --output /tmp/resnet.safetensors

The recipe and the script are the bundled ViT's (bench/train_fashion_mnist.py: AdamW, warm-up then
cosine, seeded, test top-1 and recipe in the safetensors metadata) at 10 epochs and lr 2e-3, as the
MobileNet-style CNN's; only the model differs: timm ``resnet18`` with channels 16, 32, 64, 128 and a
16-wide stem on 1-channel 28x28 images, 0.71M parameters, eight BasicBlocks with BatchNorm.
"""
from __future__ import annotations

from functools import partial

import train_fashion_mnist

from starfish_fast.bundled import RESNET_ARCH, build_bundled_model, bundled_weights


def main() -> None:
    train_fashion_mnist.main(build_model=partial(build_bundled_model, "fashion_resnet"), architecture=RESNET_ARCH,
                             default_output=bundled_weights("fashion_resnet"),
                             description=__doc__.split("\n")[0], recipe_defaults={"epochs": 10, "lr": 2e-3})


if __name__ == "__main__":
    main()
