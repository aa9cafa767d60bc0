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

from functools import partial

import train_fashion_mnist

from starfish_fast.bundled import CNN_ARCH, build_bundled_model, bundled_weights


def main() -> None:
    train_fashion_mnist.main(build_model=partial(build_bundled_model, "fashion_cnn"), architecture=CNN_ARCH,
                             default_output=bundled_weights("fashion_cnn"),
                             description=__doc__.split("\n")[0], recipe_defaults={"epochs": 10, "lr": 2e-3})


if __name__ == "__main__":
    main()
