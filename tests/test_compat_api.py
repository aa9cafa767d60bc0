"""The reference API surface: every name, keyword-only signatures, defaults, simple semantics."""
import dataclasses
import inspect
import math

import pytest
import torch

from helpers import images, tiny_mobilenet, tiny_vit
from starfish_fast import compat

SIGNATURES = {
    "starfish_recovery": "(*, pruned_model, dense_model, kind, block_names, masks, calib_batches, device, "
                         "is_prunable_weight, config)",
    "extract_representations": "(model, *, kind, block_names, images)",
    "build_dense_targets": "(dense_model, *, kind, block_names, calib_batches, device, store_float16=True)",
    "cosine_alignment_loss": "(pruned_reps, dense_reps, block_names)",
    "apply_masks": "(model, masks)",
    "register_zero_freeze_hooks": "(model, masks)",
    "freeze_all": "(model)",
    "get_weight_key_and_tensor": "(name, module)",
    "mask_density": "(masks)",
    "model_nonzero_fraction": "(model)",
    "infer_model_kind": "(model_name)",
    "build_empty_model": "(model_name)",
    "force_mobilenet_str_runtime": "(model)",
    "all_block_names": "(model_name, model)",
    "is_prunable_weight": "(model_name, prune_scope)",
    "default_prune_scope": "(model_name)",
    "enable_grad_checkpointing": "(model)",
    "build_transform": "()",
    "cache_calibration_data": "(loader, num_samples)",
    "evaluate_top1": "(model, loader, device)",
    "save_recovered_checkpoint": "(*, path, model, args, blocks, history, before, after, mask_density_value)",
}


def _params(fn) -> str:
    """The signature without annotations, for comparison with the reference's."""
    parts, star = [], False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    return "(" + ", ".join(parts) + ")"


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature(name):
    assert _params(getattr(compat, name)) == SIGNATURES[name]


def test_every_reference_name_is_exported():
    for name in compat.__all__:
        assert hasattr(compat, name), name
    assert set(SIGNATURES) | {"RecoveryConfig", "LazyDenseTargets", "load_masks", "load_model",
                              "make_calibration_loader", "make_eval_loader"} <= set(compat.__all__)
    fields = [(f.name, f.default) for f in dataclasses.fields(compat.RecoveryConfig)]
    assert [n for n, _ in fields] == ["epochs", "lr", "min_lr", "lr_schedule", "weight_decay", "grad_clip",
                                      "store_dense_float16", "no_dense_cache"]
    assert fields[-1][1] is False
    assert _params(compat.load_masks).startswith("(path, model, is_trainable_weight")
    assert _params(compat.load_model).startswith("(model_name, checkpoint_path, device")


def test_representations_targets_and_loss():
    model = tiny_vit()
    names = ["blocks.0", "blocks.1"]
    x = images(3)
    with torch.no_grad():
        logits, reps = compat.extract_representations(model, kind="vit", block_names=names, images=x)
    assert logits.shape == (3, 10) and list(reps) == names and reps["blocks.0"].shape == (3, 17, 32)
    targets = compat.build_dense_targets(model, kind="vit", block_names=names, calib_batches=[x, x[:2]], device="cpu")
    assert len(targets) == 2 and targets[0]["blocks.1"].dtype == torch.float16
    assert targets[1]["blocks.0"].device.type == "cpu"
    lazy = compat.LazyDenseTargets(model, kind="vit", block_names=names, calib_batches=[x], device="cpu")
    assert len(lazy) == 1 and lazy[0]["blocks.0"].dtype == torch.float32
    assert float(compat.cosine_alignment_loss(reps, reps, names)) == pytest.approx(0.0, abs=1e-6)
    flipped = {k: -v for k, v in reps.items()}
    assert float(compat.cosine_alignment_loss(reps, flipped, names)) == pytest.approx(2.0, abs=1e-5)


def test_cnn_loss_is_per_image():
    model = tiny_mobilenet()
    names = compat.all_block_names("mobilenetv1_100", model)[:2]
    with torch.no_grad():
        _, reps = compat.extract_representations(model, kind="mobilenet", block_names=names, images=images(2, size=32))
    assert reps[names[0]].dim() == 4
    a = {k: v for k, v in reps.items()}
    b = {k: v.clone() for k, v in reps.items()}
    b[names[0]][0] *= 3.0                     # rescaling one image leaves its per-image cosine unchanged
    assert float(compat.cosine_alignment_loss(a, b, names)) == pytest.approx(0.0, abs=1e-6)


def test_cache_calibration_data_takes_exactly():
    loader = [(images(4), torch.zeros(4)), (images(4), torch.zeros(4))]
    batches = compat.cache_calibration_data(loader, 6)
    assert [b.shape[0] for b in batches] == [4, 2]
    with pytest.raises(ValueError, match="calibration set too small: 9 samples requested but the loader gave 8"):
        compat.cache_calibration_data(loader, 9)


def test_evaluate_top1_ignores_missing_labels():
    model = tiny_vit()
    x = images(4)
    predictions = model(x).argmax(1)
    labels = torch.tensor([predictions[0], -100, (predictions[2] + 1) % 10, -100])
    assert compat.evaluate_top1(model, [(x, labels)], "cpu") == pytest.approx(50.0)
    assert math.isnan(compat.evaluate_top1(model, [(x, torch.full((4,), -100))], "cpu"))


def test_build_transform_is_the_reference_pipeline():
    from PIL import Image
    out = compat.build_transform()(Image.new("RGB", (300, 260), color=(128, 64, 32)))
    assert out.shape == (3, 224, 224)
    assert out[0, 0, 0] == pytest.approx((128 / 255 - 0.485) / 0.229, abs=1e-4)
