"""compat.starfish_recovery against a plain implementation of the reference semantics
(starfish_fast.baseline: written from the reference's documented semantics for clarity, sharing no engine code)."""
import copy
import math

import pytest
import torch

from helpers import images, random_masks, tiny_mobilenet, tiny_vit
from starfish_fast import compat
from starfish_fast.baseline import reference_recovery


CASES = [
    ("vit", tiny_vit, "qkv_out_mlp", 16, 0.0, 0.0),
    ("vit", tiny_vit, "qk_mlp", 16, 0.05, 0.5),
    ("mobilenet", tiny_mobilenet, "conv_fc", 32, 0.0, 0.0),
]


@pytest.mark.parametrize("kind,make,scope,size,weight_decay,grad_clip", CASES)
def test_starfish_recovery_matches_reference(kind, make, scope, size, weight_decay, grad_clip):
    dense = make()
    masks = random_masks(dense, scope, density=0.4)
    predicate = compat.is_prunable_weight("deit_tiny_patch16_224" if kind == "vit" else "mobilenetv1_100", scope)
    block_names = [f"blocks.{i}" for i in range(len(dense.blocks))] if kind == "vit" else \
        [f"blocks.{s}.{i}" for s, stage in enumerate(dense.blocks) for i in range(len(stage))]
    batches = list(images(12, size=size).split(4))
    config = compat.RecoveryConfig(epochs=2, lr=1e-3, min_lr=1e-5, lr_schedule="cosine", weight_decay=weight_decay,
                                   grad_clip=grad_clip, store_dense_float16=True)
    ours, theirs = copy.deepcopy(dense), copy.deepcopy(dense)
    history = compat.starfish_recovery(pruned_model=ours, dense_model=dense, kind=kind, block_names=block_names,
                                       masks=masks, calib_batches=batches, device="cpu", is_prunable_weight=predicate,
                                       config=config)
    expected, _ = reference_recovery(theirs, copy.deepcopy(dense), kind, block_names, masks, batches, predicate,
                                     config)
    assert [h["epoch"] for h in history] == [1.0, 2.0]
    for got, want in zip(history, expected):
        assert math.isclose(got["loss"], want["loss"], rel_tol=1e-5, abs_tol=1e-7)
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    for key in theirs_state:
        torch.testing.assert_close(ours_state[key], theirs_state[key], rtol=1e-5, atol=1e-6, msg=key)
    assert not ours.training
    for key, mask in masks.items():
        assert (ours_state[key][~mask] == 0).all(), key


def test_frozen_parameters_unchanged_and_masked_zero():
    dense = tiny_vit()
    pruned = copy.deepcopy(dense)
    masks = random_masks(dense, "qkv_out_mlp", density=0.3)
    predicate = compat.is_prunable_weight("deit_tiny_patch16_224", "qkv_out_mlp")
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    config = compat.RecoveryConfig(epochs=2, lr=1e-2, min_lr=1e-4, lr_schedule="constant", weight_decay=0.1,
                                   grad_clip=0.0, store_dense_float16=False)
    compat.starfish_recovery(pruned_model=pruned, dense_model=dense, kind="vit", block_names=["blocks.0", "blocks.1"],
                             masks=masks, calib_batches=list(images(8).split(4)), device="cpu",
                             is_prunable_weight=predicate, config=config)
    after = pruned.state_dict()
    for key in before:
        if key in masks:
            assert (after[key][~masks[key]] == 0).all()
            assert not torch.equal(after[key], before[key] * masks[key])   # trained
        else:
            assert torch.equal(after[key], before[key]), f"{key} is frozen but changed"


def test_no_dense_cache_equals_cached_fp32():
    dense = tiny_vit()
    masks = random_masks(dense)
    predicate = compat.is_prunable_weight("deit_tiny_patch16_224", "qkv_out_mlp")
    batches = list(images(8).split(4))
    results = []
    for no_cache in (False, True):
        config = compat.RecoveryConfig(epochs=1, lr=1e-3, min_lr=1e-5, lr_schedule="cosine", weight_decay=0.0,
                                       grad_clip=0.0, store_dense_float16=False, no_dense_cache=no_cache)
        results.append(compat.starfish_recovery(
            pruned_model=copy.deepcopy(dense), dense_model=dense, kind="vit", block_names=["blocks.0", "blocks.1"],
            masks=masks, calib_batches=batches, device="cpu", is_prunable_weight=predicate, config=config))
    assert math.isclose(results[0][0]["loss"], results[1][0]["loss"], rel_tol=1e-6)


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(calib=[])])
def test_starfish_recovery_rejects_bad_arguments(bad):
    dense = tiny_vit()
    config = compat.RecoveryConfig(epochs=bad.get("epochs", 1), lr=1e-3, min_lr=0.0, lr_schedule="cosine",
                                   weight_decay=0.0, grad_clip=0.0, store_dense_float16=True)
    with pytest.raises(ValueError):
        compat.starfish_recovery(pruned_model=copy.deepcopy(dense), dense_model=dense, kind="vit",
                                 block_names=["blocks.0"], masks=random_masks(dense),
                                 calib_batches=bad.get("calib", [images(4)]), device="cpu",
                                 is_prunable_weight=compat.is_prunable_weight("deit_tiny_patch16_224", "auto"),
                                 config=config)


def test_hooked_forwards_match_the_block_loop():
    """forward_vit_with_tokens / forward_cnn_with_activations (hooks) against extract_representations (the
    adapters' explicit block loop): same logits, same block outputs (CNN ones flattened per image)."""
    for model, names, x, hooked in [
            (tiny_vit(), ["blocks.0", "blocks.1"], images(3), compat.forward_vit_with_tokens),
            (tiny_mobilenet(), ["blocks.0.0", "blocks.3.5", "blocks.4.1"], images(2, size=32),
             compat.forward_cnn_with_activations)]:
        kind = "vit" if hooked is compat.forward_vit_with_tokens else "mobilenet"
        with torch.no_grad():
            logits, reps = hooked(model, names, x)
            want_logits, want = compat.extract_representations(model, kind=kind, block_names=names, images=x)
        torch.testing.assert_close(logits, want_logits)
        for name in names:
            torch.testing.assert_close(compat.flatten_for_cosine(reps[name]),
                                       compat.flatten_for_cosine(want[name]), msg=name)
        assert float(compat.cosine_alignment_loss(reps, want, names)) == pytest.approx(0.0, abs=1e-6)
