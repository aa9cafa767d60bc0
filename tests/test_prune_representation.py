"""Calibration-based mask makers: Wanda scores against the formula, exact per-row and N:M counts, conv and
attention input norms, modes restored; representation masks: exact sparsity, allocation from the measured
damage, uniform allocation for identical damage, gradual steps that never regrow."""
import copy

import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

import starfish_fast.engine
import starfish_fast.prune.representation as representation
from helpers import images, tiny_mobilenet, tiny_vit
from starfish_fast.config import HealConfig
from starfish_fast.masks import validate_masks
from starfish_fast.models import adapter_for, prunable_weights
from starfish_fast.prune import (allocate_sparsities, magnitude_masks, representation_masks, wanda_input_norms,
                                 wanda_masks, wanda_score)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + torch.relu(self.fc(x))


class TokenNet(nn.Module):
    """Two residual linear blocks over (B, T, 8) tokens and a head: the generic adapter's repeated units."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.blocks(x).mean(1))


def scope_weights(model, scope="auto"):
    return prunable_weights(model, adapter_for(model).scope_predicate(scope))


def zeros(masks):
    return sum(int((~mask).sum()) for mask in masks.values())


# ----------------------------------------------------------------------------- Wanda
def test_wanda_scores_and_masks_match_the_formula():
    model, calib = TokenNet(), torch.randn(12, 5, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x0 = calib                                                          # (N, T, 8): blocks.0.fc's input
        x1 = model.blocks[0](x0)                                            # blocks.1.fc's input
    inputs = {"blocks.0.fc.weight": x0, "blocks.1.fc.weight": x1}
    norms = wanda_input_norms(model, inputs, calib, batch_size=5)           # three batches, summed
    masks = wanda_masks(model, 0.375, calib, scope="linear", batch_size=5)
    assert list(masks) == list(inputs)
    for key, x in inputs.items():
        expected_norm = x.reshape(-1, 8).pow(2).sum(0).sqrt()              # ||X_j|| over every token
        torch.testing.assert_close(norms[key], expected_norm)
        weight = model.get_parameter(key).detach()
        scores = weight.abs() * expected_norm[None, :]                      # (out, in)
        torch.testing.assert_close(wanda_score(norms)(key, weight), scores)
        pruned = torch.topk(scores, 3, dim=1, largest=False).indices        # round(0.375 * 8) per row
        expected = torch.ones_like(weight, dtype=torch.bool).scatter_(1, pruned, False)
        assert torch.equal(masks[key], expected)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_wanda_prunes_exactly_per_row_and_validates(sparsity):
    model = tiny_vit()
    masks = wanda_masks(model, sparsity, images(8), batch_size=4)
    validate_masks(masks, model, adapter_for(model).scope_predicate("auto"))
    for key, weight in scope_weights(model).items():
        assert masks[key].dtype == torch.bool and masks[key].device.type == "cpu"
        assert torch.all((~masks[key]).sum(1) == round(sparsity * weight.shape[1]))


def test_wanda_nm_keeps_n_of_every_m_with_the_wanda_order():
    model, calib = tiny_vit(), images(8)
    masks = wanda_masks(model, None, calib, n=2, m=4)
    norms = wanda_input_norms(model, masks, calib)
    for key, weight in scope_weights(model).items():
        groups = masks[key].reshape(weight.shape[0], -1, 4)
        assert torch.all(groups.sum(-1) == 2)
        scores = wanda_score(norms)(key, weight).reshape(weight.shape[0], -1, 4)
        kept, pruned = scores.masked_fill(~groups, float("inf")), scores.masked_fill(groups, -float("inf"))
        assert torch.all(kept.min(-1).values >= pruned.max(-1).values)
    assert wanda_masks(model, 0.5, calib, n=2, m=4).keys() == masks.keys()


def test_wanda_refuses_bad_forms_before_the_calibration_pass():
    model = tiny_mobilenet()
    with pytest.raises(ValueError, match="multiple of m=4"):              # conv_stem: 3*3*3 = 27
        wanda_masks(model, None, None, n=2, m=4)                           # calib never read
    with pytest.raises(ValueError, match="does not match 2:4"):
        wanda_masks(tiny_vit(), 0.3, images(4), n=2, m=4)
    with pytest.raises(ValueError, match="both n and m"):
        wanda_masks(tiny_vit(), None, images(4), n=2)
    with pytest.raises(ValueError, match="sparsity must be"):
        wanda_masks(tiny_vit(), 1.5, images(4))


def test_wanda_conv_norms_are_per_input_channel():
    model, calib = tiny_mobilenet(), images(6, size=32)
    keys = ["blocks.1.0.conv_dw.weight", "blocks.1.0.conv_pw.weight"]
    captured = {}
    handles = [model.get_submodule(key[:-7]).register_forward_pre_hook(
        lambda _m, args, key=key: captured.__setitem__(key, args[0].clone())) for key in keys]
    with torch.no_grad():
        model(calib)
    for handle in handles:
        handle.remove()
    norms = wanda_input_norms(model, keys, calib, batch_size=4)
    for key in keys:
        torch.testing.assert_close(norms[key], captured[key].pow(2).sum((0, 2, 3)).sqrt())   # (C,)
        weight = model.get_parameter(key).detach()
        scores = wanda_score(norms)(key, weight)
        per_channel = norms[key][:, None, None, None] if weight.shape[1] == 1 else norms[key][None, :, None, None]
        torch.testing.assert_close(scores, weight.abs() * per_channel)    # depthwise: filter o sees channel o


def test_wanda_grouped_conv_uses_the_channel_of_the_filters_group():
    weight = torch.randn(4, 3, 2, 2)                                        # groups=2 over 6 input channels
    norms = torch.arange(1.0, 7.0)
    scores = wanda_score({"conv.weight": norms})("conv.weight", weight)
    for out in range(4):
        group = out // 2
        expected = weight[out].abs() * norms[group * 3:(group + 1) * 3][:, None, None]
        torch.testing.assert_close(scores[out], expected)


def test_wanda_multihead_attention_in_proj_and_out_proj_norms():
    torch.manual_seed(0)
    model = TorchvisionViT(image_size=16, patch_size=4, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                           num_classes=10).eval()
    path = "encoder.layers.encoder_layer_0.self_attention"
    captured = {}
    attention = model.get_submodule(path)
    handles = [attention.register_forward_pre_hook(lambda _m, args: captured.__setitem__("query", args[0])),
               attention.register_forward_hook(lambda _m, _args, out: captured.__setitem__("out", out[0]))]
    with torch.no_grad():
        model(images(4))
    for handle in handles:
        handle.remove()
    # MultiheadAttention never calls out_proj as a module: its input is recovered from the output here
    out_proj = attention.out_proj
    attended = torch.linalg.solve(out_proj.weight.detach().double().T,
                                  (captured["out"] - out_proj.bias.detach()).double().reshape(-1, 16), left=False)
    keys = [f"{path}.in_proj_weight", f"{path}.out_proj.weight"]
    norms = wanda_input_norms(model, keys, images(4))
    torch.testing.assert_close(norms[keys[0]], captured["query"].reshape(-1, 16).pow(2).sum(0).sqrt())
    torch.testing.assert_close(norms[keys[1]], attended.pow(2).sum(0).sqrt().float(), rtol=1e-4, atol=1e-5)
    assert type(model.get_submodule(path)) is nn.MultiheadAttention                 # the stand-in is gone
    masks = wanda_masks(model, 0.5, images(4))                                       # the default scope
    assert sum(int((~mask).sum()) for mask in masks.values()) == sum(m.numel() for m in masks.values()) // 2


def test_wanda_restores_each_modules_mode():
    model = tiny_vit().train()
    model.blocks[1].eval()                                                  # a mixed state survives
    wanda_masks(model, 0.5, images(4))
    assert model.training and model.blocks[0].training and not model.blocks[1].training
    assert not model.blocks[1].mlp.fc1.training


# ----------------------------------------------------------------------------- representation
@pytest.mark.parametrize("make,size", [(lambda: tiny_vit(depth=3), 16), (tiny_mobilenet, 32)])
@pytest.mark.parametrize("sparsity", [0.3, 0.55, 0.8])
def test_representation_masks_reach_the_sparsity_exactly(make, size, sparsity):
    model = make()
    weights = scope_weights(model)
    before = {key: weight.detach().clone() for key, weight in weights.items()}
    masks = representation_masks(model, sparsity, images(8, size=size), batch_size=4)
    validate_masks(masks, model, adapter_for(model).scope_predicate("auto"))
    assert zeros(masks) == round(sparsity * sum(w.numel() for w in weights.values()))
    assert all(torch.equal(before[key], weight) for key, weight in weights.items())    # the model untouched


def test_representation_masks_on_a_generic_model():
    model, calib = TokenNet(), torch.randn(12, 5, 8, generator=torch.Generator().manual_seed(3))
    masks = representation_masks(model, 0.4, calib, scope="linear", batch_size=5)
    assert list(masks) == ["blocks.0.fc.weight", "blocks.1.fc.weight"]
    assert zeros(masks) == round(0.4 * 128)


def test_representation_gives_the_less_damaged_block_more_sparsity(monkeypatch):
    model = tiny_vit(depth=2)
    with torch.no_grad():                        # block 1's branches 20x smaller: pruning them barely shows
        for name in ("attn.proj", "mlp.fc2"):
            model.blocks[1].get_submodule(name).weight.mul_(0.05)
    seen = {}

    def recording(curves, sizes, budget):
        seen.update(curves=curves, allocated=allocate_sparsities(curves, sizes, budget))
        return seen["allocated"]

    monkeypatch.setattr(representation, "allocate_sparsities", recording)
    masks = representation_masks(model, 0.5, images(8), batch_size=4, score="magnitude")
    (xs0, damage0), (xs1, damage1) = seen["curves"]["blocks.0"], seen["curves"]["blocks.1"]
    assert xs0 == xs1 == [0.0, 0.25, 0.5, 0.75, 0.9]
    assert all(d1 < d0 for d0, d1 in zip(damage0[1:], damage1[1:]))
    fraction = {block: zeros({k: v for k, v in masks.items() if k.startswith(block + ".")})
                / sum(v.numel() for k, v in masks.items() if k.startswith(block + "."))
                for block in ("blocks.0", "blocks.1")}
    assert fraction["blocks.1"] > fraction["blocks.0"]
    for block, value in seen["allocated"].items():
        assert fraction[block] == pytest.approx(value, abs=1e-3)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_identical_damage_gives_magnitude_per_layer(monkeypatch, sparsity):
    model = tiny_vit(depth=3)
    monkeypatch.setattr(representation, "_block_damage",
                        lambda model, adapter, block, level_masks, batches: [0.1, 0.3, 0.8, 1.5][:len(level_masks)])
    masks = representation_masks(model, sparsity, images(4), score="magnitude")
    expected = magnitude_masks(model, sparsity, per="layer")
    assert all(torch.equal(masks[key], expected[key]) for key in expected)


def test_allocation_follows_the_convex_hull_and_splits_ties():
    sizes = {"a": 100, "b": 100}
    cheap, dear = ([0.0, 0.5, 0.9], [0.0, 0.1, 0.2]), ([0.0, 0.5, 0.9], [0.0, 1.0, 2.0])
    assert allocate_sparsities({"a": cheap, "b": dear}, sizes, 100) == pytest.approx({"a": 0.9, "b": 0.1})
    # b's middle point lies above the chord: its hull is the straight line 0 -> 0.9
    bumpy = ([0.0, 0.5, 0.9], [0.0, 0.9, 0.9])
    assert allocate_sparsities({"a": dear, "b": bumpy}, sizes, 90) == pytest.approx({"a": 0.0, "b": 0.9})
    assert allocate_sparsities({"a": cheap, "b": cheap}, sizes, 60) == pytest.approx({"a": 0.3, "b": 0.3})
    assert allocate_sparsities({"a": ([0.2, 0.9], [0.0, 1.0])}, {"a": 10}, 5) == pytest.approx({"a": 0.5})


def test_gradual_steps_heal_and_never_regrow(monkeypatch):
    model, calib = tiny_vit(depth=2), images(8)
    dense = copy.deepcopy(model)
    healed = []
    original_heal = starfish_fast.engine.heal

    def recording_heal(pruned, teacher, masks, batches, config):
        healed.append({key: mask.detach().cpu().bool().clone() for key, mask in masks.items()})
        return original_heal(pruned, teacher, masks, batches, config)

    monkeypatch.setattr(starfish_fast.engine, "heal", recording_heal)
    config = HealConfig(epochs=1, batch_size=4, mode="exact", progress=False)
    masks = representation_masks(model, 0.6, calib, batch_size=4, gradual_steps=2, heal_config=config, dense=dense)
    assert len(healed) == 2
    total = sum(mask.numel() for mask in masks.values())
    assert zeros(healed[0]) == round(0.3 * total) and zeros(masks) == round(0.6 * total)
    for key, mask in masks.items():
        assert not (mask & ~healed[0][key]).any()                         # pruned at step 1 stays pruned
        assert torch.equal(mask, healed[1][key])
        assert torch.all(model.get_parameter(key).detach()[~mask] == 0)
    assert not torch.equal(model.blocks[0].mlp.fc1.weight, dense.blocks[0].mlp.fc1.weight)


@pytest.mark.parametrize("kwargs,message", [
    ({"sparsity": 0.95}, "exceeds the largest level 0.9"),
    ({"levels": (0.5, 0.5)}, "distinct numbers in \\(0, 1\\)"),
    ({"levels": (0.5, 1.0)}, "distinct numbers in \\(0, 1\\)"),
    ({"score": "taylor"}, "unknown score 'taylor'"),
    ({"gradual_steps": 2}, "needs dense="),
    ({"gradual_steps": -1}, "gradual_steps must be"),
])
def test_representation_refuses_bad_arguments(kwargs, message):
    arguments = {"sparsity": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        representation_masks(tiny_vit(), calib=images(4), **arguments)
