"""Structured compaction: healing on narrowed MLPs and QK dims equals the masked dense path."""
import copy

import pytest
import torch

from helpers import images, random_masks, rel_err, tiny_vit
from starfish_fast import HealConfig, heal
from starfish_fast.compaction import (QkCompaction, compact_model, expand_into, find_compactions, mlp_compactions,
                                      qk_compactions)
from starfish_fast.models import adapter_for
from starfish_fast.masks import apply_masks
from starfish_fast.prune import structured_masks


def _structured(model, sparsity=0.5):
    masks = structured_masks(model, sparsity, scope="qkv_out_mlp", kind="mlp")
    # unstructured sparsity elsewhere too: compaction must leave those masks alone
    extra = random_masks(model, "qkv_out", density=0.6, seed=3)
    return {k: (v & extra[k]) if k in extra else v for k, v in masks.items()}


def _assert_compaction_matches_masked_dense(dense, masks, **config):
    """Heal copies of ``dense`` with compaction off and on (fp32): same losses, weights, masks, trainables."""
    results, models = [], []
    for compact in ("off", "on"):
        student = copy.deepcopy(dense)
        settings = dict(epochs=2, batch_size=8, lr=2e-3, compact=compact, progress=False, precision="fp32") | config
        results.append(heal(student, dense, masks, images(16), HealConfig(**settings)))
        models.append(student)
    for a, b in zip(*(r.step_losses for r in results)):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    for key, value in models[0].state_dict().items():
        torch.testing.assert_close(models[1].state_dict()[key], value, rtol=1e-5, atol=1e-5, msg=key)
    for key, mask in masks.items():
        assert (models[1].state_dict()[key][~mask] == 0).all()
    assert {k for k, p in models[1].named_parameters() if p.requires_grad} == \
        {k for k, p in models[0].named_parameters() if p.requires_grad}


def test_finds_only_neurons_pruned_on_both_sides():
    model = tiny_vit()
    masks = _structured(model)
    found = mlp_compactions(model, masks, adapter_for(model))
    assert len(found) == 2 and all(item.kept.numel() == 64 and item.hidden == 128 for item in found)
    masks["blocks.0.mlp.fc2.weight"] = torch.ones_like(masks["blocks.0.mlp.fc2.weight"])   # fc2 kept: no drop
    assert [item.fc1 for item in mlp_compactions(model, masks, adapter_for(model))] == ["blocks.1.mlp.fc1"]
    assert mlp_compactions(model, random_masks(model, density=0.5), adapter_for(model)) == []  # unstructured


def test_compact_forward_equals_masked_forward():
    model = tiny_vit()
    masks = _structured(model)
    full = copy.deepcopy(model)
    apply_masks(full, masks)
    compact, _ = compact_model(full, masks, mlp_compactions(full, masks, adapter_for(full)))
    x = images(3)
    torch.testing.assert_close(compact(x), full(x), rtol=1e-5, atol=1e-6)
    assert compact.blocks[0].mlp.fc1.weight.shape == (64, 32) and compact.blocks[0].mlp.fc2.weight.shape == (32, 64)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_compacted_healing_matches_masked_dense(weight_decay):
    dense = tiny_vit()
    masks = _structured(dense)
    _assert_compaction_matches_masked_dense(dense, masks, weight_decay=weight_decay)


def tiny_torchvision_vit(seed: int = 0):
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=3, hidden_dim=48, mlp_dim=96,
                             num_classes=10).eval()


def _with_random_biases(model):
    """Non-zero frozen q/k biases: a dropped QK pair then shifts every logit of its head by b_q * b_k."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model


MODELS = {"timm": lambda: _with_random_biases(tiny_vit(embed_dim=48, num_heads=3)),
          "torchvision": lambda: _with_random_biases(tiny_torchvision_vit())}


@pytest.mark.parametrize("family", MODELS)
def test_qk_compaction_keeps_the_same_count_in_every_head(family):
    model = MODELS[family]()                                                  # 3 heads of 16 dims
    masks = structured_masks(model, 0.5, scope="qk", kind="qk")
    found = qk_compactions(model, masks, adapter_for(model))
    assert len(found) == 2 and all(isinstance(item, QkCompaction) and item.qk_dim == 8 for item in found)
    item = found[0]
    assert item.kept_rows.numel() == 2 * 3 * 8 + 48 and (item.kept_rows[-48:] == torch.arange(96, 144)).all()
    assert qk_compactions(model, random_masks(model, "qkv", density=0.5), adapter_for(model)) == []  # unstructured


def test_qk_dim_is_padded_with_dead_dims_to_a_multiple_of_8():
    model = tiny_vit(embed_dim=96, num_heads=3)                               # 3 heads of 32 dims
    masks = structured_masks(model, 0.75, scope="qk", kind="qk")             # 8 live dims per head
    (item, _) = qk_compactions(model, masks, adapter_for(model))
    assert item.qk_dim == 8
    mask = masks[item.weight].clone()
    dead_k_row = 96 + int((~mask[96:128].any(1)).nonzero()[0])               # a dead k row of head 0
    mask[dead_k_row, 0] = True                                                # head 0: 9 live dims
    (item,) = qk_compactions(model, {item.weight: mask}, adapter_for(model))
    assert item.qk_dim == 16 and dead_k_row in item.kept_rows.tolist()
    per_head = item.kept_rows[:3 * 16].view(3, 16) // 32
    assert (per_head == torch.arange(3)[:, None]).all()                       # each head keeps its own dims
    apply_masks(model, {item.weight: mask})
    compact, _ = compact_model(model, {item.weight: mask}, [item])
    torch.testing.assert_close(compact(images(2)), model(images(2)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", MODELS)
def test_qk_compact_forward_and_expand_round_trip(family):
    model = MODELS[family]()
    masks = structured_masks(model, 0.5, scope="qk_mlp", kind="qk_mlp")
    apply_masks(model, masks)
    found = find_compactions(model, masks, adapter_for(model))
    assert sorted(type(item).__name__ for item in found) == ["MlpCompaction"] * 2 + ["QkCompaction"] * 2
    compact, compact_masks = compact_model(model, masks, found)
    x = images(3)
    torch.testing.assert_close(compact(x), model(x), rtol=1e-5, atol=1e-5)
    assert sorted(compact.state_dict()) == sorted(model.state_dict())
    for key, mask in compact_masks.items():
        assert mask.shape == compact.get_parameter(key).shape
    restored = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in restored.parameters():
            parameter.add_(1.0)
    expand_into(restored, compact, found)
    apply_masks(restored, masks)           # the dropped rows/columns are masked ones: zero again
    for name, parameter in restored.named_parameters():
        if name.endswith("weight"):        # biases of dropped neurons/dims keep whatever they held
            torch.testing.assert_close(parameter, model.get_parameter(name), rtol=0, atol=0, msg=name)


def test_qk_norm_attention_is_not_compacted():
    model = tiny_vit(qk_norm=True)
    masks = structured_masks(model, 0.5, scope="qk", kind="qk")
    assert qk_compactions(model, masks, adapter_for(model)) == []


def test_torchvision_compact_attention_refuses_what_it_cannot_compute():
    model = tiny_torchvision_vit()
    masks = structured_masks(model, 0.5, scope="qk", kind="qk")
    compact, _ = compact_model(model, masks, find_compactions(model, masks, adapter_for(model)))
    attention = compact.encoder.layers[0].self_attention
    x = torch.randn(2, 17, 48)
    with pytest.raises(ValueError, match="need_weights=False"):
        attention(x, x, x)


@pytest.mark.parametrize("family", MODELS)
def test_qk_compacted_healing_matches_masked_dense(family):
    dense = MODELS[family]()
    masks = structured_masks(dense, 0.5, scope="qk_mlp", kind="qk_mlp")
    extra = random_masks(dense, "qk_mlp", density=0.7, seed=3)                # unstructured on top
    masks = {key: mask & extra[key] for key, mask in masks.items()}
    _assert_compaction_matches_masked_dense(dense, masks, scope="qk_mlp")


@pytest.mark.cuda
def test_qk_compacted_attention_on_gpu_matches_masked_dense():
    # q/k narrower than v: SDPA must pick a backend that takes Ev != E on this GPU, in bf16
    dense = tiny_vit(embed_dim=192, num_heads=3, img_size=32).cuda()
    masks = structured_masks(dense, 0.5, scope="qk_mlp", kind="qk_mlp")
    full = copy.deepcopy(dense)
    apply_masks(full, masks)
    compact, _ = compact_model(full, masks, find_compactions(full, masks, adapter_for(full)))
    x = images(4, size=32).cuda()
    with torch.autocast("cuda", torch.bfloat16):
        out, expected = compact(x), full(x)
    assert rel_err(out.float(), expected.float()) < 2e-2
    calib = images(16, size=32)
    losses = []
    for compact_setting in ("off", "on"):
        config = HealConfig(epochs=1, batch_size=8, compact=compact_setting, scope="qk_mlp", progress=False,
                            device="cuda", log_every=1)
        losses.append(heal(copy.deepcopy(dense), dense, masks, calib, config).step_losses)
    for a, b in zip(*losses):
        assert a == pytest.approx(b, rel=2e-2)


def test_cpu_fast_mode_swaps_attention_only_inside_the_heal():
    from timm.layers import Attention

    dense = tiny_vit()
    masks = random_masks(dense, density=0.5)
    student = copy.deepcopy(dense)
    found = find_compactions(dense, masks, adapter_for(dense), mlp=False, qk=False, every_attention=True)
    assert len(found) == 2 and all(item.qk_dim == item.head_dim for item in found)          # swapped, nothing removed
    heal(student, dense, masks, images(8), HealConfig(epochs=1, batch_size=4, progress=False))
    assert type(student.blocks[0].attn) is Attention                                      # the caller's modules stay


def test_bf16_autocast_attention_core_runs_in_fp32_on_cpu(monkeypatch):
    import torch.nn.functional as F

    model = tiny_vit(embed_dim=48, num_heads=3)
    item = find_compactions(model, {}, adapter_for(model), mlp=False, qk=False, every_attention=True)[0]
    compact, _ = compact_model(model, {}, [item])
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: seen.append(q.dtype) or sdpa(q, k, v, **kw))
    x = torch.randn(2, 17, 48)
    expected = model.blocks[0].attn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compact.blocks[0].attn(x)
        core = compact.blocks[0].attn.attend(compact.blocks[0].attn.qkv(x))
    assert seen[-2:] == [torch.float32, torch.float32]
    assert core.dtype == torch.bfloat16                          # cast back to the projections' dtype
    assert rel_err(out.float(), expected) < 2e-2
