"""Closed-form compensation: each refitted layer equals the least-squares / ridge solution computed here from
the same activations, its output error against the dense model drops, masked weights stay zero; MLP
neurons, QK dims (timm and torchvision) and conv channels."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

from helpers import images, tiny_mobilenet, tiny_vit
from starfish_fast.compensation import compensate
from starfish_fast.masks import apply_masks
from starfish_fast.prune import structured_masks


def tiny_torchvision_vit():
    torch.manual_seed(0)
    return TorchvisionViT(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                          num_classes=10).eval()


def activations(pruned, dense, name, calib):
    """The pruned model's input rows of layer ``name`` (unfolded for a conv) and the dense model's output rows."""
    if name.endswith("out_proj"):          # torchvision's attention never calls out_proj as a module
        return _out_proj_activations(pruned, dense, name, calib)
    seen = {}
    layer, dense_layer = pruned.get_submodule(name), dense.get_submodule(name)
    handles = [layer.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0])),
               dense_layer.register_forward_hook(lambda _m, _args, out: seen.__setitem__("t", out))]
    with torch.no_grad():
        pruned(calib)
        dense(calib)
    for handle in handles:
        handle.remove()
    x, t = seen["x"].double(), seen["t"].double()
    if x.dim() == 4:
        x = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride).transpose(1, 2)
        t = t.flatten(2).transpose(1, 2)
    return x.reshape(-1, x.shape[-1]), t.reshape(-1, t.shape[-1])


@torch.no_grad()
def _out_proj_activations(pruned, dense, name, calib):
    """out_proj's input = softmax(q k^T * scale) v of the (pruned) attention, computed from its query."""
    path = name[:-len(".out_proj")]
    seen = {}

    def attention_input(model, key):
        module = model.get_submodule(path)
        return module.register_forward_pre_hook(lambda _m, args: seen.__setitem__(key, (module, args[0])))

    handles = [attention_input(pruned, "pruned"), attention_input(dense, "dense")]
    pruned(calib)
    dense(calib)
    for handle in handles:
        handle.remove()
    rows = {}
    for key, (module, x) in seen.items():
        q, k, v = F.linear(x, module.in_proj_weight, module.in_proj_bias).double().chunk(3, -1)     # (B, T, E)
        heads = module.num_heads
        split = lambda y: y.unflatten(-1, (heads, -1)).transpose(1, 2)                             # noqa: E731
        attended = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)
        rows[key] = attended.reshape(-1, attended.shape[-1])
    out_proj = dense.get_submodule(name)
    target = F.linear(rows["dense"], out_proj.weight.double(), out_proj.bias.double())
    return rows["pruned"], target


def expected_fit(x, t, keep, anchor, bias, ridge):
    """One output row: the ridge solution over inputs ``keep`` (and a bias), pulled towards ``anchor``."""
    a = x[:, keep]
    if bias:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    if ridge == 0:
        return torch.linalg.lstsq(a, t[:, None]).solution.flatten()
    gram = a.T @ a
    k = int(keep.sum())
    strength = ridge * gram.diagonal()[:k].sum() / k
    penalty = torch.zeros_like(gram)
    penalty.diagonal()[:k] = strength
    rhs = a.T @ t
    rhs[:k] += strength * anchor[keep]
    return torch.linalg.solve(gram + penalty, rhs)


def check_refits(dense, pruned, before, masks, calib, report, ridge, drop_pruned_neurons):
    assert report["layers"]
    for entry in report["layers"]:
        name = entry["name"]
        layer = pruned.get_submodule(name)
        x, t = activations(pruned, dense, name, calib)
        weight = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
        old = before.get_submodule(name).weight.detach().reshape(weight.shape).double()
        mask = masks.get(f"{name}.weight", torch.ones_like(layer.weight, dtype=torch.bool)).reshape(weight.shape)
        allowed = mask.clone()
        if drop_pruned_neurons:                                            # fc1 rows masked -> column left out
            fc1 = masks[name.replace("fc2", "fc1") + ".weight"] if "fc2" in name else \
                masks[name.rpartition(".")[0] + ".0.weight"]
            allowed &= fc1.any(1)[None, :]
        for row in range(weight.shape[0]):
            fit = expected_fit(x, t[:, row], allowed[row], old[row], layer.bias is not None, ridge)
            torch.testing.assert_close(weight[row, allowed[row]], fit[:int(allowed[row].sum())], rtol=1e-4, atol=1e-5)
            if layer.bias is not None:
                torch.testing.assert_close(layer.bias[row].double(), fit[-1], rtol=1e-4, atol=1e-5)
        assert torch.all(weight[~allowed] == 0)                            # masked (and left-out) weights zero
        pred = x @ weight.T + (layer.bias.detach().double() if layer.bias is not None else 0)
        assert entry["error_after"] == pytest.approx(float((pred - t).norm() / t.norm()), rel=1e-4)
        assert entry["error_after"] < entry["error_before"]


def setup(make, sparsity, scope, kind):
    dense = make()
    pruned = copy.deepcopy(dense)
    masks = structured_masks(pruned, sparsity, scope, kind=kind)
    apply_masks(pruned, masks)
    return dense, pruned, copy.deepcopy(pruned), masks


@pytest.mark.parametrize("ridge", [0.0, 1e-2])
def test_mlp_refit_is_the_ridge_solution(ridge):
    dense, pruned, before, masks = setup(tiny_vit, 0.5, "mlp", "mlp")
    calib = images(12)
    report = compensate(pruned, dense, masks, calib, ridge=ridge, batch_size=5)
    assert [(e["name"], e["kind"], e["units"]) for e in report["layers"]] == \
        [("blocks.0.mlp.fc2", "mlp", 64), ("blocks.1.mlp.fc2", "mlp", 64)]
    check_refits(dense, pruned, before, masks, calib, report, ridge, drop_pruned_neurons=True)
    assert all(torch.equal(p, q) for (k, p), q in zip(pruned.state_dict().items(), before.state_dict().values())
               if ".mlp.fc2." not in k)                                    # nothing else changed


@pytest.mark.parametrize("ridge", [0.0, 1e-2])
def test_qk_refit_of_proj_respects_a_mask_on_proj(ridge):
    dense, pruned, before, masks = setup(tiny_vit, 0.5, "qkv_out", "qk")
    generator = torch.Generator().manual_seed(0)
    for key in ("blocks.0.attn.proj.weight", "blocks.1.attn.proj.weight"):
        masks[key] = torch.rand(masks[key].shape, generator=generator) < 0.6      # a pattern per row
    apply_masks(pruned, masks)
    apply_masks(before, masks)
    calib = images(12)
    report = compensate(pruned, dense, masks, calib, ridge=ridge, batch_size=5)
    assert [(e["name"], e["kind"], e["units"]) for e in report["layers"]] == \
        [("blocks.0.attn.proj", "qk", 16), ("blocks.1.attn.proj", "qk", 16)]
    check_refits(dense, pruned, before, masks, calib, report, ridge, drop_pruned_neurons=False)


def test_torchvision_qk_and_mlp_refits():
    dense, pruned, before, masks = setup(tiny_torchvision_vit, 0.5, "qk_mlp", "qk_mlp")
    calib = images(8)
    report = compensate(pruned, dense, masks, calib, ridge=0.0, batch_size=4)
    assert [e["kind"] for e in report["layers"]] == ["qk", "mlp", "qk", "mlp"]
    qk = {**report, "layers": [e for e in report["layers"] if e["kind"] == "qk"]}
    mlp = {**report, "layers": [e for e in report["layers"] if e["kind"] == "mlp"]}
    check_refits(dense, pruned, before, masks, calib, qk, 0.0, drop_pruned_neurons=False)
    check_refits(dense, pruned, before, masks, calib, mlp, 0.0, drop_pruned_neurons=True)


@pytest.mark.parametrize("ridge", [0.0, 1e-2])
def test_channel_refit_of_the_next_pointwise_conv(ridge):
    dense, pruned, before, masks = setup(tiny_mobilenet, 0.5, "conv_only", "channel")
    calib = images(6, size=32)
    report = compensate(pruned, dense, masks, calib, ridge=ridge, batch_size=4)
    names = [e["name"] for e in report["layers"]]
    assert names[:2] == ["blocks.0.0.conv_pw", "blocks.1.0.conv_pw"]     # conv_stem -> past the depthwise conv
    assert report["layers"][0]["units"] == 4 and report["layers"][0]["kind"] == "channel"
    assert report["skipped"] == [{"name": "blocks.4.1.conv_pw",
                                  "reason": "no later non-depthwise conv takes its 256 channels"}]
    check_refits(dense, pruned, before, masks, calib, {**report, "layers": report["layers"][:3]}, ridge,
                 drop_pruned_neurons=False)
    for key, mask in masks.items():
        assert torch.all(pruned.get_parameter(key).detach()[~mask] == 0)


def test_compensation_restores_modes_and_refuses_bad_ridge():
    dense, pruned, _, masks = setup(tiny_vit, 0.5, "mlp", "mlp")
    pruned.train()
    compensate(pruned, dense, masks, images(4))
    assert pruned.training and not dense.training
    with pytest.raises(ValueError, match="ridge must be"):
        compensate(pruned, dense, masks, images(4), ridge=-1.0)


def test_heal_warm_start_compensates_before_the_first_step():
    """warm_start="compensate" refits fc2 before healing: the first logged loss is lower than a cold
    start's, the report lands in ran["warm_start"], and masked weights stay exactly zero."""
    from starfish_fast import HealConfig, heal

    dense, cold, _, masks = setup(tiny_vit, 0.75, "mlp", "mlp")
    warm = copy.deepcopy(cold)
    calib = images(16)
    config = dict(mode="fast", epochs=1, batch_size=8, lr=1e-9, scope="mlp", progress=False)
    cold_result = heal(cold, dense, masks, calib, HealConfig(**config))
    warm_result = heal(warm, dense, masks, calib, HealConfig(**config, warm_start="compensate"))
    assert cold_result.ran["warm_start"] is None
    assert [e["name"] for e in warm_result.ran["warm_start"]["layers"]] == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    assert warm_result.step_losses[0] < cold_result.step_losses[0]
    for key, mask in masks.items():
        assert torch.all(warm.get_parameter(key).detach()[~mask] == 0)
