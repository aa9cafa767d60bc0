"""SparseGPT: the lazy blocked sweep equals a plain column-by-column OBS elimination written here (fresh
random weights and Gram matrices, odd shapes, groups); masks exact in count and form; prune and update
agree; the update lowers every layer's output error; linears, transformers Conv1D, MultiheadAttention,
grouped convs; the heal warm start; one-line mistakes."""
import copy

import pytest
import torch

from helpers import images, tiny_mobilenet, tiny_vit
from starfish_fast import HealConfig, heal
from starfish_fast.masks import apply_masks
from starfish_fast.prune import magnitude_masks, sparsegpt_prune, wanda_masks
from starfish_fast.sparsegpt import _inverse_factor, _sweep, sparsegpt_update
from test_compensation import tiny_torchvision_vit


def plain_obs(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damp: float) -> torch.Tensor:
    """Row by row, column by column in float64: prune each entry the mask drops with the OBS update
    w -= w_j / Hinv_jj * Hinv_j,:, then eliminate column j from Hinv (no Cholesky, no blocks)."""
    h = gram.clone()
    h.diagonal()[h.diagonal() == 0] = 1.0
    h.diagonal().add_(damp * h.diagonal().mean())
    out = weight.double().clone()
    for r in range(out.shape[0]):
        hinv = torch.linalg.inv(h)
        for j in range(out.shape[1]):
            if not keep[r, j]:
                out[r, j:] -= out[r, j] / hinv[j, j] * hinv[j, j:]
                out[r, j] = 0.0
            hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return out


@pytest.mark.parametrize("groups,rows,columns,block_size", [(1, 5, 11, 1), (1, 7, 13, 4), (2, 3, 9, 128)])
def test_sweep_equals_plain_obs_elimination(groups, rows, columns, block_size):
    torch.manual_seed(groups * 100 + columns)
    weight = torch.randn(groups, rows, columns)
    x = torch.randn(groups, 3 * columns, columns)
    x[:, :, 2] = 0                                                      # an input that is always zero
    gram = (x.transpose(1, 2) @ x).double()
    keep = torch.rand(groups, rows, columns) > 0.4
    new, kept = _sweep(weight, _inverse_factor(gram, 0.01, "w"), keep, None, block_size)
    assert torch.equal(kept, keep) and torch.all(new[~keep] == 0)
    for g in range(groups):
        expected = plain_obs(weight[g], gram[g], keep[g], 0.01)
        assert torch.allclose(new[g].double(), expected, rtol=1e-4, atol=1e-4), (new[g] - expected).abs().max()


def test_unstructured_and_nm_masks_are_exact():
    calib = images(32)
    model = tiny_vit()
    masks = sparsegpt_prune(model, 0.6, calib, batch_size=16)
    for key, mask in masks.items():
        assert int((~mask).sum()) == round(0.6 * mask.numel()), key
        assert torch.all(model.get_parameter(key).detach()[~mask] == 0)
    model = tiny_vit()
    masks = sparsegpt_prune(model, None, calib, n=2, m=4, block_size=6)        # block size rounded to 4
    for key, mask in masks.items():
        assert torch.all(mask.view(mask.shape[0], -1, 4).sum(-1) == 2), key


def test_prune_then_update_gives_back_the_weights_and_lowers_the_error():
    """sparsegpt_update on sparsegpt_prune's own masks rebuilds its weights from the dense model; on
    Wanda's masks it lowers every layer's output error and brings the features closer to the dense ones."""
    dense, calib, test = tiny_vit(), images(48), images(32, seed=5)
    pruned = copy.deepcopy(dense)
    masks = sparsegpt_prune(pruned, 0.5, calib, batch_size=16)
    rebuilt = copy.deepcopy(dense)
    apply_masks(rebuilt, masks)
    sparsegpt_update(rebuilt, dense, masks, calib, batch_size=16)
    for key in masks:
        assert torch.allclose(rebuilt.get_parameter(key), pruned.get_parameter(key), atol=1e-6), key
    wanda = wanda_masks(dense, 0.5, calib)
    plain, updated = copy.deepcopy(dense), copy.deepcopy(dense)
    apply_masks(plain, wanda)
    apply_masks(updated, wanda)
    report = sparsegpt_update(updated, dense, wanda, calib, batch_size=16)
    assert [layer["name"] for layer in report["layers"]] == list(wanda)
    assert all(layer["error_after"] < layer["error_before"] for layer in report["layers"])
    with torch.no_grad():
        reference = dense.forward_features(test).flatten(1)
        cos = [float(torch.cosine_similarity(model.forward_features(test).flatten(1), reference).mean())
               for model in (updated, plain)]
        assert cos[0] > cos[1]
    for key, mask in wanda.items():
        assert torch.all(updated.get_parameter(key).detach()[~mask] == 0)


def test_torchvision_attention_and_grouped_convs():
    """MultiheadAttention's in-projection (over its query) and out_proj; a MobileNet's depthwise convs (each
    group its own problem) and pointwise convs."""
    for make, scope in ((tiny_torchvision_vit, "qkv_out_mlp"), (tiny_mobilenet, "conv_dw")):
        dense = make()
        size = 16 if make is tiny_torchvision_vit else 32
        calib = images(16, size=size)
        masks = magnitude_masks(dense, 0.5, scope)
        pruned = copy.deepcopy(dense)
        apply_masks(pruned, masks)
        report = sparsegpt_update(pruned, dense, masks, calib, batch_size=8)
        assert len(report["layers"]) == len(masks)
        assert all(layer["error_after"] <= layer["error_before"] + 1e-9 for layer in report["layers"])
        for key, mask in masks.items():
            assert torch.all(pruned.get_parameter(key).detach()[~mask] == 0), key
        assert pruned.training == dense.training


def test_gpt2_conv1d_and_llama_layers():
    from test_hf_models import tiny_gpt2, tiny_llama, tokens

    for make in (tiny_gpt2, tiny_llama):
        dense = make()
        calib = tokens(batch=8, length=16)
        pruned = copy.deepcopy(dense)
        masks = sparsegpt_prune(pruned, 0.5, calib, batch_size=4)
        for key, mask in masks.items():
            assert mask.shape == dense.get_parameter(key).shape
            assert torch.all(pruned.get_parameter(key).detach()[~mask] == 0), key
        rebuilt = copy.deepcopy(dense)
        apply_masks(rebuilt, masks)
        sparsegpt_update(rebuilt, dense, masks, calib, batch_size=4)
        for key in masks:
            assert torch.allclose(rebuilt.get_parameter(key), pruned.get_parameter(key), atol=1e-5), key


def test_heal_warm_start_sparsegpt():
    dense, calib = tiny_vit(), images(16)
    masks = magnitude_masks(dense, 0.7, "auto")
    cold, warm = copy.deepcopy(dense), copy.deepcopy(dense)
    apply_masks(cold, masks)
    apply_masks(warm, masks)
    config = dict(mode="fast", epochs=1, batch_size=8, lr=1e-9, progress=False)
    cold_result = heal(cold, dense, masks, calib, HealConfig(**config))
    warm_result = heal(warm, dense, masks, calib, HealConfig(**config, warm_start="sparsegpt"))
    assert len(warm_result.ran["warm_start"]["layers"]) == len(masks)
    assert warm_result.step_losses[0] < cold_result.step_losses[0]
    for key, mask in masks.items():
        assert torch.all(warm.get_parameter(key).detach()[~mask] == 0)


def test_mistakes_are_one_line():
    model, calib = tiny_vit(), images(8)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        sparsegpt_prune(model, 0.5, calib, block_size=0)
    with pytest.raises(ValueError, match=r"damp must be a number in \(0, 1\)"):
        sparsegpt_prune(model, 0.5, calib, damp=0)
    with pytest.raises(ValueError, match="N:M pruning needs both n and m"):
        sparsegpt_prune(model, None, calib, n=2)
    with pytest.raises(ValueError, match="belongs to a LayerNorm"):
        sparsegpt_update(model, tiny_vit(), {"blocks.0.norm1.weight": torch.ones(32, dtype=torch.bool)}, calib)
    with pytest.raises(ValueError, match=r"mask blocks.0.mlp.fc1.weight has shape \(3,\)"):
        sparsegpt_update(model, tiny_vit(), {"blocks.0.mlp.fc1.weight": torch.ones(3, dtype=torch.bool)}, calib)
