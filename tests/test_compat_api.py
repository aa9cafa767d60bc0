"""The reference API surface: every name, keyword-only signatures, defaults, simple semantics."""
import ast
import dataclasses
import inspect
import math

import pytest
import torch

from helpers import images, tiny_mobilenet, tiny_vit
from starfish_fast import compat

# Every public callable of the reference with its signature (names, kinds: `*` starts the keyword-only ones,
# defaults). Ours may add parameters after these, each with a default (or **kwargs), never change them.
SIGNATURES = {
    "RecoveryConfig": "(epochs, lr, min_lr, lr_schedule, weight_decay, grad_clip, store_dense_float16, "
                      "no_dense_cache=False)",
    "starfish_recovery": "(*, pruned_model, dense_model, kind, block_names, masks, calib_batches, device, "
                         "is_prunable_weight, config)",
    "extract_representations": "(model, *, kind, block_names, images)",
    "build_dense_targets": "(dense_model, *, kind, block_names, calib_batches, device, store_float16=True)",
    "LazyDenseTargets": "(dense_model, *, kind, block_names, calib_batches, device)",
    "cosine_alignment_loss": "(pruned_reps, dense_reps, block_names)",
    "load_masks": "(path, model, is_trainable_weight)",
    "apply_masks": "(model, masks)",
    "register_zero_freeze_hooks": "(model, masks)",
    "freeze_all": "(model)",
    "get_weight_key_and_tensor": "(name, module)",
    "mask_density": "(masks)",
    "model_nonzero_fraction": "(model)",
    "infer_model_kind": "(model_name)",
    "build_empty_model": "(model_name)",
    "load_model": "(model_name, checkpoint_path, device)",
    "force_mobilenet_str_runtime": "(model)",
    "all_block_names": "(model_name, model)",
    "is_prunable_weight": "(model_name, prune_scope)",
    "default_prune_scope": "(model_name)",
    "enable_grad_checkpointing": "(model)",
    "build_transform": "()",
    "make_calibration_loader": "(*, dataset_name, source, batch_size, transform, calib_samples, seed, shuffle_buffer)",
    "make_eval_loader": "(*, dataset_name, batch_size, transform, eval_samples, skip=0)",
    "make_hf_loader": "(*, dataset_name, split, batch_size, transform, shuffle_buffer=0, seed=0, take=None, skip=0)",
    "HFImageStream": "(stream, transform)",
    "cache_calibration_data": "(loader, num_samples)",
    "evaluate_top1": "(model, loader, device)",
    "save_recovered_checkpoint": "(*, path, model, args, blocks, history, before, after, mask_density_value)",
    "forward_vit_with_tokens": "(model, block_names, images)",
    "forward_cnn_with_activations": "(model, block_names, images)",
    "normalize_vit_block_output": "(output, *, batch_size)",
    "flatten_activation": "(activation)",
    "flatten_for_cosine": "(tensor)",
    "is_prunable_vit": "(name, module, prune_scope)",
    "is_prunable_mobilenet": "(name, module, prune_scope)",
    "torch_load": "(path, map_location='cpu')",
    "extract_state_dict": "(checkpoint)",
    "load_checkpoint_into_model": "(model, path, *, strict=True)",
}
CONSTANTS = {
    "SUPPORTED_VIT_MODELS": ("vit_b_16", "vit_l_16", "deit_tiny_patch16_224", "deit_small_patch16_224",
                             "deit_base_patch16_224", "deit3_base_patch16_224", "deit3_large_patch16_224",
                             "deit3_huge_patch14_224"),
    "MOBILENET_MODEL": "mobilenetv1_100",
    "VIT_PRUNE_SCOPES": ("qkv", "qkv_out", "qkv_out_mlp", "mlp", "qk", "qk_mlp"),
    "MOBILENET_PRUNE_SCOPES": ("conv_only", "fc_only", "conv_fc", "conv_dw", "all"),
    "STATE_DICT_KEY": "state_dict",
}
POSITIONAL, KEYWORD_ONLY, EMPTY = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY, \
    inspect.Parameter.empty


def _expected(text: str) -> list[tuple]:
    """'(a, b=1, *, c)' -> [(name, kind, default)]."""
    params, kind = [], POSITIONAL
    for part in filter(None, (part.strip() for part in text.strip("()").split(","))):
        if part == "*":
            kind = KEYWORD_ONLY
            continue
        name, equals, default = part.partition("=")
        params.append((name, kind, ast.literal_eval(default) if equals else EMPTY))
    return params


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature(name):
    params = list(inspect.signature(getattr(compat, name)).parameters.values())
    expected = _expected(SIGNATURES[name])
    assert [(p.name, p.kind, p.default) for p in params[:len(expected)]] == expected
    for extra in params[len(expected):]:      # ours may add parameters a reference call never binds
        assert extra.kind is extra.VAR_KEYWORD or (
            extra.kind in (POSITIONAL, KEYWORD_ONLY) and extra.default is not EMPTY), extra


def test_every_reference_name_is_exported_with_its_value():
    assert set(compat.__all__) == set(SIGNATURES) | set(CONSTANTS)
    for name in compat.__all__:
        assert hasattr(compat, name), name
    for name, value in CONSTANTS.items():
        assert getattr(compat, name) == value, name
    assert dataclasses.is_dataclass(compat.RecoveryConfig)
    for name in ("make_calibration_loader", "make_eval_loader", "make_hf_loader"):   # the reference's: no extras
        assert len(inspect.signature(getattr(compat, name)).parameters) == len(_expected(SIGNATURES[name]))
    for name in ("torch_load", "load_checkpoint_into_model"):                        # safe unless opted in
        assert inspect.signature(getattr(compat, name)).parameters["allow_unsafe_pickle"].default is False


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


def test_normalize_vit_block_output():
    x = torch.randn(2, 5, 4)
    assert compat.normalize_vit_block_output(x, batch_size=2) is x
    assert compat.normalize_vit_block_output((x, None), batch_size=2) is x            # a tuple's first element
    assert torch.equal(compat.normalize_vit_block_output(x.transpose(0, 1), batch_size=2), x)   # (T, B, D)
    with pytest.raises(TypeError, match="is a NoneType, expected a tensor"):
        compat.normalize_vit_block_output((None, x), batch_size=2)
    with pytest.raises(ValueError, match=r"must be 3-D \(B, T, D\), got shape \(2, 20\)"):
        compat.normalize_vit_block_output(x.flatten(1), batch_size=2)
    with pytest.raises(ValueError, match=r"no dimension of ViT block output \(2, 5, 4\) matches the batch size 3"):
        compat.normalize_vit_block_output(x, batch_size=3)


def test_flatten_activation_and_for_cosine():
    x = torch.randn(2, 3, 4, 5)
    assert compat.flatten_activation(x).shape == (2, 60)
    with pytest.raises(ValueError, match=r"must be 4-D \(B, C, H, W\), got shape \(2, 3, 4\)"):
        compat.flatten_activation(x[..., 0])
    assert compat.flatten_for_cosine(x[:, :, 0, 0]).shape == (2, 3)                 # 2-D as is
    assert compat.flatten_for_cosine(x[..., 0]).shape == (6, 4)                     # (B*T, D): per token
    assert compat.flatten_for_cosine(x).shape == (2, 60)                            # per image
    for bad in (x[0, 0, 0], x[None]):
        with pytest.raises(ValueError, match="cannot flatten a"):
            compat.flatten_for_cosine(bad)


def test_hooked_forwards_and_their_errors():
    model = tiny_vit()
    x = images(3)
    with torch.no_grad():
        logits, reps = compat.forward_vit_with_tokens(model, ["blocks.1", "blocks.0"], x)
    assert logits.shape == (3, 10) and list(reps) == ["blocks.1", "blocks.0"] and reps["blocks.0"].shape == (3, 17, 32)
    with pytest.raises(ValueError, match="block names not found in the model: \\['blocks.9'\\]"):
        compat.forward_vit_with_tokens(model, ["blocks.9"], x)
    model.unused = torch.nn.Linear(2, 2)                  # in named_modules() but never called by forward
    with pytest.raises(RuntimeError, match="block 'unused' produced no output"):
        compat.forward_vit_with_tokens(model, ["blocks.0", "unused"], x)
    cnn = tiny_mobilenet()
    with torch.no_grad():
        _, acts = compat.forward_cnn_with_activations(cnn, ["blocks.0.0", "blocks.4.1"], images(2, size=32))
    assert acts["blocks.0.0"].dim() == 2 and acts["blocks.0.0"].shape[0] == 2
    with pytest.raises(ValueError, match="must be 4-D"):
        compat.forward_cnn_with_activations(model, ["blocks.0"], x)              # a ViT block is not a CNN map


def test_prunable_predicates():
    import torchvision

    vit, torchvision_vit, cnn = tiny_vit(), torchvision.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16), tiny_mobilenet()
    for model, model_name, check, scopes in [(vit, "deit_tiny_patch16_224", compat.is_prunable_vit,
                                              compat.VIT_PRUNE_SCOPES),
                                             (torchvision_vit, "vit_b_16", compat.is_prunable_vit,
                                              compat.VIT_PRUNE_SCOPES),
                                             (cnn, "mobilenetv1_100", compat.is_prunable_mobilenet,
                                              compat.MOBILENET_PRUNE_SCOPES)]:
        for scope in scopes:
            predicate = compat.is_prunable_weight(model_name, scope)
            selected = [name for name, module in model.named_modules() if check(name, module, scope)]
            assert selected and selected == [name for name, module in model.named_modules() if predicate(name, module)]
    assert compat.is_prunable_vit("encoder.layers.encoder_layer_0.self_attention",
                                  torchvision_vit.encoder.layers[0].self_attention, "qkv")
    with pytest.raises(ValueError, match="unknown prune scope 'conv_fc'; allowed: qkv, qkv_out"):
        compat.is_prunable_vit("blocks.0.attn.qkv", vit.blocks[0].attn.qkv, "conv_fc")
    with pytest.raises(ValueError, match="unknown prune scope 'qkv'; allowed: conv_only"):
        compat.is_prunable_mobilenet("conv_stem", cnn.conv_stem, "qkv")


def test_extract_state_dict():
    model = tiny_vit()
    state = model.state_dict()
    assert compat.extract_state_dict(model) is None
    assert compat.extract_state_dict(state).keys() == state.keys()
    assert compat.extract_state_dict({"state_dict": state, "metadata": {}}).keys() == state.keys()
    for bad in ({}, {"a": 1}, {"state_dict": {}}, [1]):
        with pytest.raises(ValueError, match="expected a state dict"):
            compat.extract_state_dict(bad)


def test_torch_load_is_safe_unless_opted_in(tmp_path):
    import os

    state = tiny_vit().state_dict()
    torch.save(state, tmp_path / "state.pt")
    loaded = compat.torch_load(tmp_path / "state.pt")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    moved = compat.torch_load(str(tmp_path / "state.pt"), map_location="meta")
    assert moved["head.weight"].device.type == "meta" and moved._metadata == loaded._metadata
    torch.save({"weight": torch.ones(2), "note": os.stat_result(range(10))}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="weights_only=True refuses"):
        compat.torch_load(tmp_path / "pickled.pt")
    assert compat.torch_load(tmp_path / "pickled.pt", allow_unsafe_pickle=True)["note"].st_mode == 0
    with pytest.raises(ValueError, match="map_location must be a device"):
        compat.torch_load(tmp_path / "state.pt", map_location=lambda storage, location: storage)


def test_load_checkpoint_into_model(tmp_path):
    source, target = tiny_vit(seed=1), tiny_vit(seed=0)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "wrapped.pt")
    assert compat.load_checkpoint_into_model(target, tmp_path / "wrapped.pt") is target
    assert torch.equal(target.head.weight, source.head.weight)
    partial = {k: v for k, v in tiny_vit(seed=2).state_dict().items() if k.startswith("head.")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(RuntimeError, match="Missing key"):
        compat.load_checkpoint_into_model(target, tmp_path / "partial.pt")
    compat.load_checkpoint_into_model(target, tmp_path / "partial.pt", strict=False)
    assert torch.equal(target.head.weight, partial["head.weight"])
    torch.save(source, tmp_path / "module.pt")                          # a pickled module: returned as is
    with pytest.raises(ValueError, match="weights_only=True refuses"):
        compat.load_checkpoint_into_model(target, tmp_path / "module.pt")
    loaded = compat.load_checkpoint_into_model(target, tmp_path / "module.pt", allow_unsafe_pickle=True)
    assert isinstance(loaded, type(source)) and loaded is not target
