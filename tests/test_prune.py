"""Mask makers: exact sparsity, largest-score weights kept, N:M groups, structured pairs, errors, CLI."""
import math

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

from starfish_fast.masks import validate_masks
from starfish_fast.models import adapter_for, prunable_weights
from starfish_fast.prune import format_summary, magnitude_masks, nm_masks, sparsity_summary, structured_masks


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def tiny_torchvision_vit(seed=0):
    torch.manual_seed(seed)
    return TorchvisionViT(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                          num_classes=10)


def mobilenet(stem_in_channels=3, seed=0):
    """timm mobilenetv1_100; a 4-channel stem makes every non-depthwise reduction a multiple of 4."""
    torch.manual_seed(seed)
    return timm.create_model("mobilenetv1_100", pretrained=False, num_classes=10, in_chans=stem_in_channels)


def scope_weights(model, scope):
    return prunable_weights(model, adapter_for(model).scope_predicate(scope))


def assert_keeps_highest(scores, mask):
    kept, pruned = scores[mask], scores[~mask]
    if kept.numel() and pruned.numel():
        assert kept.min() >= pruned.max()


# ----------------------------------------------------------------------------- magnitude
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 0.99])
def test_magnitude_per_layer_is_exact_and_keeps_largest(sparsity):
    model = tiny_vit()
    masks = magnitude_masks(model, sparsity, scope="qkv_out_mlp", per="layer")
    weights = scope_weights(model, "qkv_out_mlp")
    assert list(masks) == list(weights)
    for key, weight in weights.items():
        mask = masks[key]
        assert mask.dtype == torch.bool and mask.shape == weight.shape and mask.device.type == "cpu"
        assert int((~mask).sum()) == round(sparsity * weight.numel())
        assert_keeps_highest(weight.detach().abs(), mask)


@pytest.mark.parametrize("sparsity", [0.25, 0.6, 0.9])
def test_magnitude_global_is_exact_over_the_scope(sparsity):
    model = tiny_vit(seed=1)
    masks = magnitude_masks(model, sparsity, scope="qkv_out_mlp", per="global")
    weights = scope_weights(model, "qkv_out_mlp")
    total = sum(w.numel() for w in weights.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * total)
    everything = torch.cat([w.detach().flatten() for w in weights.values()])
    kept = torch.cat([masks[k].flatten() for k in weights])
    assert_keeps_highest(everything.abs(), kept)
    per_layer = [sparsity_summary({k: m})["sparsity"] for k, m in masks.items()]
    assert max(per_layer) - min(per_layer) > 0.01     # one threshold, not the same fraction everywhere


def test_magnitude_ties_still_give_exact_counts():
    model = tiny_vit()
    with torch.no_grad():
        for weight in scope_weights(model, "qkv").values():
            weight.fill_(0.5)
    for per in ("layer", "global"):
        masks = magnitude_masks(model, 0.5, scope="qkv", per=per)
        assert sparsity_summary(masks)["pruned"] == sparsity_summary(masks)["total"] // 2


def test_magnitude_mobilenet_and_torchvision_scopes():
    model = mobilenet()
    masks = magnitude_masks(model, 0.5, scope="all")
    assert set(masks) == set(scope_weights(model, "all"))
    assert any(".conv_dw." in key for key in masks) and "classifier.weight" in masks
    tv = tiny_torchvision_vit()
    masks = magnitude_masks(tv, 0.5, scope="auto")
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in masks
    validate_masks(masks, tv, adapter_for(tv).scope_predicate("auto"))


def test_pluggable_score():
    model = tiny_vit()
    masks = magnitude_masks(model, 0.5, scope="mlp", score=lambda key, weight: -weight.detach().abs())
    for key, weight in scope_weights(model, "mlp").items():
        assert_keeps_highest(-weight.detach().abs(), masks[key])      # the smallest magnitudes are kept
    with pytest.raises(ValueError, match="shape"):
        magnitude_masks(model, 0.5, scope="mlp", score=lambda key, weight: weight.flatten())
    with pytest.raises(ValueError, match="non-finite"):
        magnitude_masks(model, 0.5, scope="mlp", score=lambda key, weight: weight * float("nan"))


# ----------------------------------------------------------------------------- N:M
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (4, 8)])
def test_nm_linear_groups_along_reduction(n, m):
    model = tiny_vit()
    masks = nm_masks(model, n=n, m=m, scope="qkv_out_mlp")
    for key, weight in scope_weights(model, "qkv_out_mlp").items():
        groups = masks[key].view(weight.shape[0], -1, m)                     # (out, in/m, m)
        assert (groups.sum(-1) == n).all()
        scores = weight.detach().abs().view(weight.shape[0], -1, m)
        kept_min = torch.where(groups, scores, torch.inf).min(-1).values
        pruned_max = torch.where(groups, -torch.inf, scores).max(-1).values
        assert (kept_min >= pruned_max).all()
    assert sparsity_summary(masks)["sparsity"] == pytest.approx(1 - n / m)


def test_nm_conv_per_output_channel_over_in_channels_and_kernel():
    model = mobilenet(stem_in_channels=4)         # stem reduction 4*3*3 = 36
    masks = nm_masks(model, scope="conv_fc")
    for key, weight in scope_weights(model, "conv_fc").items():
        flat = masks[key].view(weight.shape[0], -1)                          # (out, in*kh*kw)
        assert (flat.view(weight.shape[0], -1, 4).sum(-1) == 2).all()


def test_nm_refuses_groups_that_would_straddle_filters():
    with pytest.raises(ValueError, match=r"conv_stem\.weight \(32, 3, 3, 3\).*27"):
        nm_masks(mobilenet(), scope="conv_only")
    with pytest.raises(ValueError, match="multiple of m=3"):
        nm_masks(tiny_vit(), n=1, m=3)


@pytest.mark.parametrize("n,m", [(0, 4), (4, 4), (5, 4), (2.0, 4), (True, 4)])
def test_nm_bad_arguments(n, m):
    with pytest.raises(ValueError, match="1 <= n < m"):
        nm_masks(tiny_vit(), n=n, m=m)


# ----------------------------------------------------------------------------- structured
@pytest.mark.parametrize("make_model,fc1,fc2", [
    (tiny_vit, "blocks.{}.mlp.fc1.weight", "blocks.{}.mlp.fc2.weight"),
    (tiny_torchvision_vit, "encoder.layers.encoder_layer_{}.mlp.0.weight",
     "encoder.layers.encoder_layer_{}.mlp.3.weight")])
def test_structured_mlp_prunes_neurons_in_both_weights(make_model, fc1, fc2):
    model = make_model()
    masks = structured_masks(model, 0.5, scope="qkv_out_mlp", kind="mlp")
    weights = scope_weights(model, "qkv_out_mlp")
    assert set(masks) == set(weights)
    for block in range(2):
        w1, w2 = weights[fc1.format(block)].detach(), weights[fc2.format(block)].detach()
        rows, cols = masks[fc1.format(block)], masks[fc2.format(block)]
        neurons = rows.all(1)
        assert (rows == neurons[:, None]).all() and (cols == neurons[None, :]).all()   # whole rows / columns
        assert int((~neurons).sum()) == round(0.5 * w1.shape[0])
        importance = w1.abs().sum(1) + w2.abs().sum(0)
        assert importance[neurons].min() >= importance[~neurons].max()
    for key in weights:
        if ".mlp." not in key:
            assert masks[key].all()


@pytest.mark.parametrize("make_model,key,attention", [
    (tiny_vit, "blocks.{}.attn.qkv.weight", "blocks.{}.attn"),
    (tiny_torchvision_vit, "encoder.layers.encoder_layer_{}.self_attention.in_proj_weight",
     "encoder.layers.encoder_layer_{}.self_attention")])
def test_structured_qk_prunes_matching_q_and_k_rows_per_head(make_model, key, attention):
    model = make_model()
    masks = structured_masks(model, 0.25, scope="qk", kind="qk")
    for block in range(2):
        weight, mask = scope_weights(model, "qk")[key.format(block)].detach(), masks[key.format(block)]
        heads = model.get_submodule(attention.format(block)).num_heads
        inner = weight.shape[0] // 3
        rows = mask.all(1)
        assert (mask == rows[:, None]).all()
        q, k, v = rows[:inner], rows[inner:2 * inner], rows[2 * inner:]
        assert torch.equal(q, k) and v.all()
        head_dim = inner // heads
        assert ((~q).view(heads, head_dim).sum(1) == round(0.25 * head_dim)).all()   # same count in every head
        scores = (weight.abs().sum(1)[:inner] + weight.abs().sum(1)[inner:2 * inner]).view(heads, head_dim)
        kept = q.view(heads, head_dim)
        for h in range(heads):
            assert scores[h][kept[h]].min() >= scores[h][~kept[h]].max()
        assert sparsity_summary({"qkv": mask})["sparsity"] == pytest.approx(2 / 3 * 0.25)


def test_structured_qk_mlp_and_default_kinds():
    model = tiny_vit()
    both = structured_masks(model, 0.5, scope="qk_mlp")            # kind from the scope
    assert set(both) == set(scope_weights(model, "qk_mlp"))
    assert not both["blocks.0.attn.qkv.weight"].all() and not both["blocks.0.mlp.fc1.weight"].all()
    qk_only = structured_masks(model, 0.5, scope="qk")
    assert torch.equal(qk_only["blocks.1.attn.qkv.weight"], both["blocks.1.attn.qkv.weight"])


def test_structured_channel_prunes_whole_filters():
    model = mobilenet()
    masks = structured_masks(model, 0.5, scope="conv_fc", kind="channel")
    convs = {name + ".weight" for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}
    for key, weight in scope_weights(model, "conv_fc").items():
        mask = masks[key]
        if key not in convs:
            assert mask.all()                     # the classifier keeps every class
            continue
        filters = mask.flatten(1).all(1)
        assert (mask.flatten(1) == filters[:, None]).all()
        assert int((~filters).sum()) == round(0.5 * weight.shape[0])
        norms = weight.detach().abs().flatten(1).sum(1)
        assert norms[filters].min() >= norms[~filters].max()


def test_structured_bad_arguments():
    with pytest.raises(ValueError, match="does not apply to timm_vit"):
        structured_masks(tiny_vit(), 0.5, kind="channel")
    with pytest.raises(ValueError, match="does not apply to mobilenetv1"):
        structured_masks(mobilenet(), 0.5, kind="mlp")
    with pytest.raises(ValueError, match="needs the MLP weights"):
        structured_masks(tiny_vit(), 0.5, scope="qkv", kind="mlp")
    with pytest.raises(ValueError, match="needs the fused qkv"):
        structured_masks(tiny_vit(), 0.5, scope="mlp", kind="qk")
    with pytest.raises(ValueError, match="needs convs"):
        structured_masks(mobilenet(), 0.5, scope="fc_only")
    with pytest.raises(ValueError, match="unknown structured kind"):
        structured_masks(tiny_vit(), 0.5, kind="heads")


# ----------------------------------------------------------------------------- shared errors and summary
@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, math.nan, "0.5", True])
@pytest.mark.parametrize("maker", [magnitude_masks, structured_masks])
def test_sparsity_outside_range_is_refused(maker, sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        maker(tiny_vit(), sparsity)


def test_unknown_scope_and_per_are_refused():
    with pytest.raises(ValueError, match="unknown prune scope 'conv_fc'"):
        magnitude_masks(tiny_vit(), 0.5, scope="conv_fc")
    with pytest.raises(ValueError, match="unknown prune scope 'qkv'"):
        nm_masks(mobilenet(), scope="qkv")
    with pytest.raises(ValueError, match="per must be"):
        magnitude_masks(tiny_vit(), 0.5, per="block")


def test_summary_counts_and_text():
    masks = {"a.weight": torch.tensor([[True, False], [False, False]]), "b.weight": torch.ones(2, 2, dtype=torch.bool)}
    summary = sparsity_summary(masks)
    assert summary["layers"]["a.weight"] == {"shape": [2, 2], "total": 4, "pruned": 3, "sparsity": 0.75}
    assert (summary["total"], summary["pruned"], summary["sparsity"]) == (8, 3, 0.375)
    text = format_summary(summary)
    assert "a.weight" in text and "0.7500" in text and "total" in text.splitlines()[-1]
