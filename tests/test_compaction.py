"""Structured compaction: healing on narrowed MLPs equals the masked dense path."""
import copy

import pytest
import torch

from helpers import images, random_masks, tiny_vit
from starfish_fast import HealConfig, heal
from starfish_fast.compaction import compact_model, mlp_compaction_plan
from starfish_fast.prune import structured_masks


def _structured(model, sparsity=0.5):
    masks = structured_masks(model, sparsity, scope="qkv_out_mlp", kind="mlp")
    # unstructured sparsity elsewhere too: compaction must leave those masks alone
    extra = random_masks(model, "qkv_out", density=0.6, seed=3)
    return {k: (v & extra[k]) if k in extra else v for k, v in masks.items()}


def test_plan_finds_only_neurons_pruned_on_both_sides():
    model = tiny_vit()
    masks = _structured(model)
    plan = mlp_compaction_plan(model, masks)
    assert len(plan) == 2 and all(item.kept.numel() == 64 and item.hidden == 128 for item in plan)
    masks["blocks.0.mlp.fc2.weight"] = torch.ones_like(masks["blocks.0.mlp.fc2.weight"])   # fc2 kept: no drop
    assert [item.fc1 for item in mlp_compaction_plan(model, masks)] == ["blocks.1.mlp.fc1"]
    assert mlp_compaction_plan(model, random_masks(model, density=0.5)) == []           # unstructured: nothing


def test_compact_forward_equals_masked_forward():
    model = tiny_vit()
    masks = _structured(model)
    full = copy.deepcopy(model)
    from starfish_fast.masks import apply_masks
    apply_masks(full, masks)
    compact, _ = compact_model(full, masks, mlp_compaction_plan(full, masks))
    x = images(3)
    torch.testing.assert_close(compact(x), full(x), rtol=1e-5, atol=1e-6)
    assert compact.blocks[0].mlp.fc1.weight.shape == (64, 32) and compact.blocks[0].mlp.fc2.weight.shape == (32, 64)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_compacted_healing_matches_masked_dense(weight_decay):
    dense = tiny_vit()
    masks = _structured(dense)
    calib = images(16)
    results, models = [], []
    for compact in ("off", "on"):
        student = copy.deepcopy(dense)
        config = HealConfig(epochs=2, batch_size=8, lr=2e-3, weight_decay=weight_decay, compact=compact,
                            progress=False, precision="fp32")
        results.append(heal(student, dense, masks, calib, config))
        models.append(student)
    for a, b in zip(*(r.step_losses for r in results)):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    for key, value in models[0].state_dict().items():
        torch.testing.assert_close(models[1].state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    for key, mask in masks.items():
        assert (models[1].state_dict()[key][~mask] == 0).all()
    assert {k for k, p in models[1].named_parameters() if p.requires_grad} == \
        {k for k, p in models[0].named_parameters() if p.requires_grad}
