"""STR-format MobileNetV1 checkpoints (the reference accepts them for ``mobilenetv1_100``): keys
``model.0.0.*`` for the stem conv, ``model.0.1.*`` its BN, ``model.{k}.{0,1,3,4}.*`` for block k's
depthwise conv, BN, pointwise conv, BN in stage order 1,2,2,6,2, ``fc.weight`` possibly 4-D; the
bias is zero if absent. They run with ReLU instead of ReLU6.

    state = str_to_timm_mobilenet(state, model)      # timm mobilenetv1_100 keys
    force_mobilenet_str_runtime(model)
"""
from __future__ import annotations

import re

import torch
from torch import nn

MOBILENET_STAGE_LAYOUT = (1, 2, 2, 6, 2)     # blocks per stage of mobilenetv1_100, in STR key order


def is_str_checkpoint(state: dict) -> bool:
    return any(key.startswith("model.") for key in state)


def force_mobilenet_str_runtime(model: nn.Module) -> None:
    """Replace every activation module named ``act`` that is ReLU6 with ReLU, in place (STR checkpoints use ReLU)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name == "act" and isinstance(child, nn.ReLU6):
                setattr(module, child_name, nn.ReLU(inplace=child.inplace))


def str_to_timm_mobilenet(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an STR-format MobileNetV1 state dict onto timm ``mobilenetv1_100`` keys."""
    converted = {}
    stage_of = [(s, i) for s, count in enumerate(MOBILENET_STAGE_LAYOUT) for i in range(count)]
    parts = {"0": "conv_dw", "1": "bn1", "3": "conv_pw", "4": "bn2"}
    for key, value in state.items():
        match = re.fullmatch(r"model\.(\d+)\.(\d+)\.(.+)", key)
        if key.startswith("fc."):
            name = key[len("fc."):]
            converted[f"classifier.{name}"] = value.flatten(1) if name == "weight" and value.dim() == 4 else value
        elif match and match.group(1) == "0":
            part = {"0": "conv_stem", "1": "bn1"}.get(match.group(2))
            if part is None:
                raise ValueError(f"STR checkpoint: unexpected stem key {key!r}")
            converted[f"{part}.{match.group(3)}"] = value
        elif match:
            block = int(match.group(1))
            if not 1 <= block <= len(stage_of) or match.group(2) not in parts:
                raise ValueError(f"STR checkpoint: unexpected key {key!r}")
            stage, index = stage_of[block - 1]
            converted[f"blocks.{stage}.{index}.{parts[match.group(2)]}.{match.group(3)}"] = value
        else:
            raise ValueError(f"STR checkpoint: unexpected key {key!r}")
    if "classifier.bias" not in converted:
        converted["classifier.bias"] = torch.zeros_like(model.classifier.bias)
    return converted
