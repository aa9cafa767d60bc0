"""2:4 layer: mask check, CPU fallback with one warning, the sparse autograd path (through a
stand-in backend on CPU, the real one under -m cuda), module swapping."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

from starfish_fast import sparse24
from starfish_fast.masks import apply_masks
from starfish_fast.prune import nm_masks
from starfish_fast.sparse24 import (SemiStructuredLinear, benchmark_layer, convert_linears, is_two_four,
                                    restore_linears, semi_structured_supported)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def fresh_warnings():
    sparse24._WARNED_REASONS.clear()
    yield
    sparse24._WARNED_REASONS.clear()


def two_four_mask(rows, cols, seed=0):
    """A random mask keeping exactly 2 of every 4 along each row."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(rows, cols // 4, 4, generator=generator)              # (rows, cols/4, 4)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(2, dim=-1).indices, True)
    return keep.view(rows, cols)


def dense_reference(x, weight, bias, mask):
    """The plain masked linear, on its own leaf copies of the parameters."""
    weight = weight.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    x = x.detach().clone().requires_grad_()
    y = F.linear(x, weight * mask, bias)
    return x, weight, bias, y


def test_is_two_four():
    assert is_two_four(two_four_mask(8, 16))
    assert is_two_four(torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0]]))              # fewer kept fits the format
    assert not is_two_four(torch.tensor([[1, 1, 1, 0, 1, 1, 0, 0]]))           # 3 of 4 kept
    assert not is_two_four(torch.ones(4, 6, dtype=torch.bool)[:, ::3].repeat(1, 3))   # 6 columns: no whole groups
    assert not is_two_four(two_four_mask(8, 16).view(2, 4, 16))                # not 2-D


def test_supported_reasons_on_cpu():
    weight, mask = torch.randn(64, 64), two_four_mask(64, 64)
    ok, reason = semi_structured_supported(weight, mask, torch.bfloat16)
    assert not ok and "needs a CUDA GPU" in reason
    ok, reason = semi_structured_supported(weight, torch.ones(64, 64, dtype=torch.bool))
    assert not ok and "not 2:4" in reason
    ok, reason = semi_structured_supported(weight, mask[:32])
    assert not ok and "differs from weight shape" in reason


def test_cpu_fallback_warns_once_and_matches_dense_masked():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    mask = two_four_mask(48, 64)
    layer = SemiStructuredLinear.from_linear(linear, mask)
    assert layer.weight is linear.weight and (layer.weight[~mask] == 0).all()   # shared, zeroed on construction
    x = torch.randn(3, 5, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = layer(x.requires_grad_())
        layer(x)
        SemiStructuredLinear.from_linear(nn.Linear(64, 48), mask)(x)            # same reason: still one warning
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "dense masked path" in messages[0] and "CUDA" in messages[0]
    x_ref, w_ref, b_ref, y_ref = dense_reference(x, linear.weight, linear.bias, mask)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight.grad, w_ref.grad)
    assert (layer.weight.grad[~mask] == 0).all()


class DenseStandIn:
    """Plays the 2:4 backend on CPU (packing = identity) to test the autograd function's logic."""
    calls = 0

    @classmethod
    def from_dense(cls, weight):
        cls.calls += 1
        assert is_two_four(weight != 0) and weight.is_contiguous()
        return weight


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, True)])
def test_sparse_function_outputs_and_gradients(monkeypatch, dtype, autocast):
    monkeypatch.setattr(sparse24, "choose_backend", lambda weight, mask, dtype=None: (DenseStandIn, ""))
    torch.manual_seed(1)
    linear = nn.Linear(32, 16)
    mask = two_four_mask(16, 32, seed=1)
    layer = SemiStructuredLinear.from_linear(linear, mask)
    x = torch.randn(2, 7, 32, requires_grad=True)
    DenseStandIn.calls = 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
        x_ref, w_ref, b_ref, y_ref = dense_reference(x, linear.weight, linear.bias, mask)
    assert DenseStandIn.calls == 1 and y.dtype == y_ref.dtype == dtype
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    for ours, reference in [(x.grad, x_ref.grad), (linear.weight.grad, w_ref.grad), (linear.bias.grad, b_ref.grad)]:
        assert ours.dtype == reference.dtype == torch.float32
        torch.testing.assert_close(ours, reference, rtol=tol, atol=tol)
    assert (linear.weight.grad[~mask] == 0).all()


def test_convert_and_restore_timm_vit():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()
    masks = nm_masks(model, scope="qkv_out_mlp")
    apply_masks(model, masks)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
    keys = list(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        replaced = convert_linears(model, masks)
        assert len(replaced) == 8 and isinstance(model.blocks[0].mlp.fc1, SemiStructuredLinear)
        assert list(model.state_dict()) == keys
        with torch.no_grad():
            torch.testing.assert_close(model(images), expected)
    assert sorted(restore_linears(model)) == sorted(replaced)
    assert type(model.blocks[1].attn.qkv) is nn.Linear and list(model.state_dict()) == keys


def test_convert_skips_multihead_attention_out_proj():
    torch.manual_seed(0)
    model = TorchvisionViT(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64,
                           num_classes=10).eval()
    masks = nm_masks(model, scope="qkv_out_mlp")
    replaced = convert_linears(model, masks)
    assert replaced == ["encoder.layers.encoder_layer_0.mlp.0", "encoder.layers.encoder_layer_0.mlp.3"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_benchmark_names_the_reason_it_cannot_run():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        benchmark_layer(64, 64, tokens=16, device="cpu")


# ----------------------------------------------------------------------------- GPU
def cuda_backend_or_skip(weight, mask, dtype):
    ok, reason = semi_structured_supported(weight, mask, dtype)
    if not ok:
        pytest.skip(f"this GPU cannot run 2:4: {reason}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,autocast", [(torch.bfloat16, True), (torch.float16, False)])
@pytest.mark.parametrize("tokens", [128, 197 * 2 + 3])
def test_cuda_sparse_layer_matches_dense(dtype, autocast, tokens):
    torch.manual_seed(0)
    linear = nn.Linear(256, 192, device="cuda", dtype=torch.float32 if autocast else dtype)
    mask = two_four_mask(192, 256).cuda()
    cuda_backend_or_skip(linear.weight, mask, dtype)
    layer = SemiStructuredLinear.from_linear(linear, mask)
    x = torch.randn(tokens, 256, device="cuda", dtype=linear.weight.dtype, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)                       # no fallback allowed here
        with torch.autocast("cuda", dtype=dtype, enabled=autocast):
            y = layer(x)
            x_ref, w_ref, b_ref, y_ref = dense_reference(x, linear.weight, linear.bias, mask)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(linear.weight.grad, w_ref.grad, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(linear.bias.grad, b_ref.grad, rtol=tol, atol=tol * 10)
    assert (linear.weight.grad[~mask] == 0).all()


@pytest.mark.cuda
def test_cuda_weights_change_between_steps():
    """The mask is fixed but the weights move: every forward must pack the current weights."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 128, device="cuda", dtype=torch.float16)
    mask = two_four_mask(128, 128).cuda()
    cuda_backend_or_skip(linear.weight, mask, torch.float16)
    layer = SemiStructuredLinear.from_linear(linear, mask)
    x = torch.randn(64, 128, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        layer(x)
        linear.weight.mul_(2)
        torch.testing.assert_close(layer(x), F.linear(x, linear.weight * mask, linear.bias), rtol=2e-3, atol=2e-3)


@pytest.mark.cuda
def test_cuda_unsupported_shape_falls_back():
    linear = nn.Linear(36, 40, device="cuda", dtype=torch.float16)
    mask = two_four_mask(40, 36).cuda()
    ok, reason = semi_structured_supported(linear.weight, mask)
    assert not ok
    x = torch.randn(5, 36, device="cuda", dtype=torch.float16)
    with pytest.warns(RuntimeWarning, match="dense masked path"):
        y = SemiStructuredLinear.from_linear(linear, mask)(x)
    torch.testing.assert_close(y, F.linear(x, linear.weight * mask, linear.bias), rtol=0, atol=0)
