"""Adapters: explicit block loops equal hook capture; scopes; names; loading."""
import copy

import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

from helpers import images, tiny_mobilenet, tiny_vit
from starfish_fast import compat
from starfish_fast.checkpoint import save_safetensors_atomic
from starfish_fast.models import adapter_for, forward_with_hooks, load_model, prunable_weights


def tiny_torchvision_vit():
    torch.manual_seed(0)
    return TorchvisionViT(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                          num_classes=10).eval()


@pytest.mark.parametrize("make,size,kind", [
    (tiny_vit, 16, "vit"),
    (lambda: tiny_vit(class_token=False, reg_tokens=2, no_embed_class=True, global_pool="avg"), 16, "vit"),
    (tiny_torchvision_vit, 16, "vit"),
    (tiny_mobilenet, 32, "mobilenet"),
])
def test_block_loop_matches_hooks(make, size, kind):
    model = make()
    adapter = adapter_for(model)
    x = images(3, size=size)
    names = adapter.block_names(model)
    with torch.no_grad():
        logits, reps = adapter.forward_blocks(model, x, names)
        hook_logits, hook_reps = forward_with_hooks(model, x, names, adapter.sequence_first)
        torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
    torch.testing.assert_close(logits, hook_logits, rtol=0, atol=0)
    for ours, theirs in zip(reps, hook_reps):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    if kind == "vit":
        assert reps[0].dim() == 3 and reps[0].shape[0] == 3     # (B, T, D), prefix tokens included


def test_block_subset_and_early_exit():
    model = tiny_vit(depth=3)
    adapter = adapter_for(model)
    x = images(2)
    _, all_reps = adapter.forward_blocks(model, x, adapter.block_names(model))
    logits, reps = adapter.forward_blocks(model, x, ["blocks.1"], need_logits=False)
    assert logits is None
    torch.testing.assert_close(reps[0], all_reps[1], rtol=0, atol=0)


def test_unknown_block_names_fall_back_to_hooks():
    model = tiny_vit()
    _, reps = compat.extract_representations(model, kind="vit", block_names=["blocks.0.mlp"], images=images(2))
    assert reps["blocks.0.mlp"].shape == (2, 17, 32)


VIT_SCOPE_KEYS = {
    "qkv": ["attn.qkv"], "qk": ["attn.qkv"], "qkv_out": ["attn.qkv", "attn.proj"],
    "qkv_out_mlp": ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"], "mlp": ["mlp.fc1", "mlp.fc2"],
    "qk_mlp": ["attn.qkv", "mlp.fc1", "mlp.fc2"],
}


@pytest.mark.parametrize("scope", sorted(VIT_SCOPE_KEYS))
def test_vit_scopes(scope):
    model = tiny_vit()
    keys = list(prunable_weights(model, compat.is_prunable_weight("deit_tiny_patch16_224", scope)))
    expected = [f"blocks.{b}.{part}.weight" for b in range(2) for part in VIT_SCOPE_KEYS[scope]]
    assert sorted(keys) == sorted(expected)


def test_torchvision_scopes_use_reference_keys():
    model = tiny_torchvision_vit()
    keys = list(prunable_weights(model, compat.is_prunable_weight("vit_b_16", "qkv_out_mlp")))
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in keys
    assert "encoder.layers.encoder_layer_0.self_attention.out_proj.weight" in keys
    assert "encoder.layers.encoder_layer_1.mlp.3.weight" in keys
    assert len(keys) == 8
    assert compat.all_block_names("vit_b_16", model) == [f"encoder.layers.encoder_layer_{i}" for i in range(2)]


def test_mobilenet_scopes_and_blocks():
    model = tiny_mobilenet()
    count = {scope: len(prunable_weights(model, compat.is_prunable_weight("mobilenetv1_100", scope)))
             for scope in ("conv_only", "fc_only", "conv_fc", "conv_dw", "all")}
    assert count == {"conv_only": 14, "fc_only": 1, "conv_fc": 15, "conv_dw": 27, "all": 28}
    names = compat.all_block_names("mobilenetv1_100", model)
    assert len(names) == 13 and names[0] == "blocks.0.0" and names[-1] == "blocks.4.1"


def test_names_and_defaults():
    assert compat.infer_model_kind("deit3_huge_patch14_224") == "vit"
    assert compat.infer_model_kind("vit_l_16") == "vit"
    assert compat.infer_model_kind("mobilenetv1_100") == "mobilenet"
    assert compat.default_prune_scope("deit_base_patch16_224") == "qkv_out_mlp"
    assert compat.default_prune_scope("mobilenetv1_100") == "conv_fc"
    with pytest.raises(ValueError, match="unsupported model name 'resnet50'"):
        compat.infer_model_kind("resnet50")
    with pytest.raises(ValueError, match="unknown prune scope 'conv_only'.*allowed"):
        compat.is_prunable_weight("deit_tiny_patch16_224", "conv_only")


def test_get_weight_key_and_tensor():
    assert compat.get_weight_key_and_tensor("a", nn.Linear(2, 3))[0] == "a.weight"
    mha = nn.MultiheadAttention(4, 2)
    key, tensor = compat.get_weight_key_and_tensor("m", mha)
    assert key == "m.in_proj_weight" and tensor is mha.in_proj_weight
    assert compat.get_weight_key_and_tensor("n", nn.LayerNorm(3)) == (None, None)


def _to_str_format(model) -> dict:
    """Write a timm MobileNetV1 state dict in the STR layout (the inverse of the loader's mapping)."""
    state, out = model.state_dict(), {}
    layout = [(s, i) for s, n in enumerate((1, 2, 2, 6, 2)) for i in range(n)]
    for key, value in state.items():
        if key.startswith("conv_stem."):
            out["model.0.0." + key[len("conv_stem."):]] = value
        elif key.startswith("bn1."):
            out["model.0.1." + key[len("bn1."):]] = value
        elif key.startswith("blocks."):
            _, s, i, part, rest = key.split(".", 4)
            k = layout.index((int(s), int(i))) + 1
            out[f"model.{k}.{ {'conv_dw': 0, 'bn1': 1, 'conv_pw': 3, 'bn2': 4}[part] }.{rest}"] = value
        elif key == "classifier.weight":
            out["fc.weight"] = value[:, :, None, None]     # STR stores the classifier as a 1x1 conv
    return out


def test_load_model_accepts_str_mobilenet(tmp_path):
    reference = compat.build_empty_model("mobilenetv1_100").eval()
    with torch.no_grad():
        reference.classifier.bias.zero_()
    path = tmp_path / "str.pt"
    torch.save({"state_dict": _to_str_format(reference)}, path)
    model = load_model("mobilenetv1_100", path, "cpu")
    torch.testing.assert_close(model.state_dict()["classifier.weight"], reference.classifier.weight)
    acts = [m for n, m in model.named_modules() if n.endswith(".act") or n == "act"]
    assert acts and all(isinstance(a, nn.ReLU) for a in acts)
    assert not any(isinstance(m, nn.ReLU6) for m in model.modules())


def test_load_model_formats_and_safety(tmp_path):
    model = compat.build_empty_model("fashion_vit")
    plain, wrapped, safe = tmp_path / "plain.pt", tmp_path / "wrapped.pth", tmp_path / "model.safetensors"
    torch.save(model.state_dict(), plain)
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, wrapped)
    save_safetensors_atomic(model.state_dict(), safe)
    for path in (plain, wrapped, safe):
        loaded = load_model("fashion_vit", path, "cpu")
        assert not loaded.training
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value)
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": model.state_dict(), "args": copy.copy(_Opaque())}, pickled)
    with pytest.raises(ValueError, match="weights_only=True.*allow_unsafe_pickle"):
        load_model("fashion_vit", pickled, "cpu")
    unpickled = load_model("fashion_vit", pickled, "cpu", allow_unsafe_pickle=True).state_dict()
    assert unpickled.keys() == model.state_dict().keys()
    assert all(torch.equal(unpickled[key], value) for key, value in model.state_dict().items())
    with pytest.raises(RuntimeError, match="missing keys \\(head.bias\\)"):
        bad = dict(model.state_dict())
        bad.pop("head.bias")
        torch.save(bad, plain)
        load_model("fashion_vit", plain, "cpu")


class _Opaque:
    """An arbitrary class: unpickling it needs weights_only=False."""
