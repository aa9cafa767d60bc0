"""Mask files: formats, validation errors, application, density."""
import pytest
import torch

from helpers import random_masks, tiny_vit
from starfish_fast import compat
from starfish_fast.checkpoint import save_safetensors_atomic

PREDICATE = compat.is_prunable_weight("deit_tiny_patch16_224", "qkv_out_mlp")


def test_load_masks_pt_and_safetensors(tmp_path):
    model = tiny_vit()
    masks = random_masks(model)
    masks["pos_embed"] = torch.ones(1)           # outside the scope: ignored
    torch.save(masks, tmp_path / "m.pt")
    save_safetensors_atomic({k: v.to(torch.uint8) for k, v in masks.items()}, tmp_path / "m.safetensors")
    for name in ("m.pt", "m.safetensors"):
        loaded = compat.load_masks(tmp_path / name, model, PREDICATE)
        assert set(loaded) == set(masks) - {"pos_embed"}
        for key, value in loaded.items():
            assert value.dtype == torch.float32 and value.device.type == "cpu"
            assert torch.equal(value.bool(), masks[key])


def _corrupt(masks, how):
    key = "blocks.0.attn.qkv.weight"
    if how == "shape":
        masks[key] = masks[key][:-1]
    elif how == "non_binary":
        masks[key] = masks[key].float() * 2
    elif how == "nan":
        masks[key] = masks[key].float()
        masks[key][0, 0] = float("nan")
    elif how == "missing":
        del masks["blocks.1.mlp.fc2.weight"]
    elif how == "unknown_only":
        masks = {"nothing.weight": torch.ones(3)}
    elif how == "empty":
        masks = {}
    elif how == "not_tensor":
        masks[key] = [1, 0]
    return masks


@pytest.mark.parametrize("how,message", [
    ("shape", r"'blocks.0.attn.qkv.weight' has shape \(95, 32\) but the weight has shape \(96, 32\)"),
    ("non_binary", "not binary"),
    ("nan", "non-finite"),
    ("missing", r"have no mask: blocks.1.mlp.fc2.weight"),
    ("unknown_only", "no mask key matches the prune scope; expected keys like blocks.0.attn.proj.weight"),
    ("empty", "non-empty dict"),
    ("not_tensor", "str -> tensor"),
])
def test_bad_masks_raise_clear_errors(tmp_path, how, message):
    model = tiny_vit()
    masks = _corrupt(random_masks(model), how)
    path = tmp_path / "bad.pt"
    torch.save(masks, path)
    with pytest.raises(ValueError, match=message):
        compat.load_masks(path, model, PREDICATE)


def test_apply_masks_hooks_and_fractions():
    model = tiny_vit()
    masks = {k: v.float() for k, v in random_masks(model, density=0.25).items()}
    compat.apply_masks(model, masks)
    state = model.state_dict()
    assert all((state[k][v == 0] == 0).all() for k, v in masks.items())
    density = compat.mask_density(masks)
    assert density == pytest.approx(sum(float(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()))
    assert 0 < compat.model_nonzero_fraction(model) < 1
    compat.freeze_all(model)
    assert not any(p.requires_grad for p in model.parameters())
    weight = model.blocks[0].attn.qkv.weight
    weight.requires_grad_(True)
    handles = compat.register_zero_freeze_hooks(model, {"blocks.0.attn.qkv.weight": masks["blocks.0.attn.qkv.weight"]})
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert (weight.grad[masks["blocks.0.attn.qkv.weight"] == 0] == 0).all()
    assert len(handles) == 1
