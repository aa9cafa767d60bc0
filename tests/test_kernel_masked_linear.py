"""masked_linear: Triton kernel (CPU interpreter here, GPU with -m cuda) against the plain reference.

Outputs are poisoned (NaN) before every kernel run; gradients are compared for x, weight
and bias against an fp64 reference on the same inputs.
"""
import pytest
import torch
import torch.nn as nn

import starfish_fast.kernels._dispatch as dispatch
from helpers import TOL, poison, rel_err  # noqa: F401  (poison: autouse below)
from starfish_fast.kernels import MaskedLinear, mask_layout, masked_linear, masked_linear_reference
from starfish_fast.kernels.masked_linear import OCC_TILE

def make_mask(kind: str, n: int, k: int, device="cpu", dtype=torch.bool, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        m = torch.rand(n, k, generator=g) > 0.5
    elif kind == "zeros":
        m = torch.zeros(n, k, dtype=torch.bool)
    elif kind == "ones":
        m = torch.ones(n, k, dtype=torch.bool)
    elif kind == "rows":      # half the output neurons pruned: whole tiles vanish
        m = torch.ones(n, k, dtype=torch.bool)
        m[::2] = False
        m[: n // 2] = False
    elif kind == "blocks":    # 32x32 block sparsity plus a random pattern inside live blocks
        blocks = torch.rand(-(-n // OCC_TILE), -(-k // OCC_TILE), generator=g) > 0.5
        m = blocks.repeat_interleave(OCC_TILE, 0).repeat_interleave(OCC_TILE, 1)[:n, :k]
        m = m & (torch.rand(n, k, generator=g) > 0.3)
    else:
        raise ValueError(kind)
    return m.to(device=device, dtype=dtype)


def check(x_shape, n_out, mask_kind, dtype, bias=True, device="cpu", mask_dtype=torch.bool, seed=0):
    torch.manual_seed(seed)
    k = x_shape[-1]
    x = torch.randn(*x_shape, device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(n_out, k, device=device) / k ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(n_out, device=device, dtype=dtype).requires_grad_() if bias else None
    mask = make_mask(mask_kind, n_out, k, device, mask_dtype, seed)

    y = masked_linear(x, w, mask, b, kernel=True)
    dy = torch.randn_like(y)
    y.backward(dy)

    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    y64 = masked_linear_reference(x64, w64, mask, b64)
    y64.backward(dy.double())

    tol = TOL[dtype]
    assert y.shape == y64.shape and y.dtype == dtype
    assert rel_err(y, y64) <= tol, "forward"
    assert rel_err(x.grad, x64.grad) <= tol, "dx"
    assert rel_err(w.grad, w64.grad) <= tol, "dweight"
    assert w.grad.dtype == dtype and x.grad.dtype == dtype
    assert (w.grad[mask == 0] == 0).all(), "dweight must be exactly zero where the mask is"
    if bias:
        assert rel_err(b.grad, b64.grad) <= tol, "dbias"
    return y, mask


SHAPES = [
    ((1, 33), 17),          # one row, nothing a multiple of a tile
    ((23, 70), 50),         # odd everything, several tiles each way
    ((3, 7, 64), 96),       # 3-D input (batch, tokens, features)
    ((2, 5, 40), 1),        # a single output feature
    ((40, 1), 33),          # a single input feature
    ((150, 100), 90),       # 5 x 3 output tiles: the grouped program order wraps unevenly
]
MASKS = ["random", "zeros", "ones", "rows", "blocks"]


@pytest.mark.parametrize("x_shape,n_out", SHAPES)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_fp32_matches_reference(x_shape, n_out, mask_kind):
    check(x_shape, n_out, mask_kind, torch.float32)


@pytest.mark.parametrize("x_shape,n_out", [((23, 70), 50), ((3, 7, 64), 96), ((1, 33), 17)])
@pytest.mark.parametrize("mask_kind", ["random", "rows", "zeros"])
def test_fp16_matches_reference(x_shape, n_out, mask_kind):
    check(x_shape, n_out, mask_kind, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_no_bias_and_float_mask(dtype):
    check((2, 9, 48), 40, "random", dtype, bias=False, mask_dtype=dtype)
    check((2, 9, 48), 40, "blocks", dtype, bias=True, mask_dtype=torch.float32)


def test_grad_for_input_only():
    torch.manual_seed(2)
    x = torch.randn(2, 7, 40, requires_grad=True)
    w, b = torch.randn(33, 40), torch.randn(33)
    mask = make_mask("blocks", 33, 40)
    masked_linear(x, w, mask, b, kernel=True).square().sum().backward()
    x64 = x.detach().double().requires_grad_()
    masked_linear_reference(x64, w.double(), mask, b.double()).square().sum().backward()
    assert rel_err(x.grad, x64.grad) <= 1e-5


def test_zero_mask_gives_bias_and_zero_grads():
    y, _ = check((5, 40), 36, "zeros", torch.float32)
    assert torch.isfinite(y).all()


def test_noncontiguous_input_and_grad_flags():
    torch.manual_seed(1)
    x = torch.randn(40, 24).t()                                   # (24, 40), strides (1, 24)
    w = torch.randn(30, 40, requires_grad=True)
    mask = make_mask("blocks", 40, 30).t()                        # (30, 40), a transposed view
    y = masked_linear(x, w, mask, kernel=True)                    # x needs no grad: dx is skipped
    y.sum().backward()
    w64 = w.detach().double().requires_grad_()
    masked_linear_reference(x.double(), w64, mask).sum().backward()
    assert rel_err(y, masked_linear_reference(x.double(), w.detach().double(), mask)) <= 1e-5
    assert rel_err(w.grad, w64.grad) <= 1e-5


def test_layout_skips_zero_tiles():
    n, k = 96, 70
    mask = make_mask("rows", n, k)
    plan = mask_layout(mask, torch.float32)
    tiles = plan.tiles
    live_rows = (mask.view(-1, tiles.fwd_n, k).any(dim=(1, 2)) if n % tiles.fwd_n == 0 else None)
    if live_rows is not None:
        assert plan.fwd_count.tolist() == [int(r) * -(-k // tiles.fwd_k) for r in live_rows]
    assert int(plan.fwd_count.sum()) < plan.fwd_index.numel()     # some forward tiles are skipped
    assert int(plan.occ.sum()) < plan.occ.numel()
    # the listed blocks are exactly the live ones, ascending
    for c, idx in zip(plan.fwd_count.tolist(), plan.fwd_index.tolist()):
        assert idx[:c] == sorted(idx[:c])


def test_masked_linear_module_swap():
    torch.manual_seed(0)
    lin = nn.Linear(48, 40)
    mask = make_mask("random", 40, 48)
    layer = MaskedLinear.from_linear(lin, mask)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert set(layer.state_dict()) == set(lin.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 5, 48)
    ref = masked_linear_reference(x.double(), lin.weight.detach().double(), mask, lin.bias.detach().double())
    assert rel_err(layer(x), ref) <= 1e-5                          # kernel=None on the CPU: plain torch
    layer.kernel = True                                            # the engine's kernels="triton"
    layer.prepare(torch.float32)
    assert rel_err(layer(x), ref) <= 1e-5
    layer.mask.zero_()                                             # an edited mask needs its layout again
    out = layer.prepare(torch.float32)(x)
    assert rel_err(out, lin.bias.detach().expand_as(out)) <= 1e-6
    layer.kernel = False                                           # the engine's kernels="torch"
    assert torch.equal(layer(x), masked_linear_reference(x, lin.weight, layer.mask, lin.bias))
    fresh = MaskedLinear(48, 40, bias=False)
    assert fresh.mask.all() and fresh.bias is None and isinstance(fresh, nn.Linear)
    with pytest.raises(ValueError):
        MaskedLinear(48, 40, mask=torch.ones(3, 3))


def test_dispatch_paths():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    mask = torch.rand(3, 8) > 0.5
    assert dispatch.runnable(x.device) == (dispatch.HAVE_TRITON and (dispatch.INTERPRET or x.is_cuda))
    assert rel_err(masked_linear(x, w, mask, kernel=False), masked_linear_reference(x, w, mask)) == 0.0
    assert dispatch.choose("masked_linear", x.device, "torch") is False
    assert dispatch.choose("masked_linear", x.device, "auto") is False            # CPU: plain torch
    assert dispatch.choose("masked_linear", x.device, True) is dispatch.runnable(x.device)
    with pytest.raises(ValueError):
        dispatch.choose("masked_linear", x.device, "fast")


# ------------------------------------------------------------------------ GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("x_shape,n_out",
                         SHAPES + [((4, 197, 768), 3072), ((2, 257, 1280), 1280), ((3, 131, 200), 333)])
def test_cuda_matches_reference(x_shape, n_out, mask_kind, dtype):
    check(x_shape, n_out, mask_kind, dtype, device="cuda")


@pytest.mark.cuda
def test_cuda_autocast_bf16():
    torch.manual_seed(0)
    layer = MaskedLinear.from_linear(nn.Linear(256, 192).cuda(), make_mask("rows", 192, 256, "cuda"))
    x = torch.randn(3, 50, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and (layer.weight.grad[layer.mask == 0] == 0).all()
    ref = masked_linear_reference(x.double(), layer.weight.detach().double(), layer.mask,
                                  layer.bias.detach().double())
    assert rel_err(y, ref) <= 2e-2


# ------------------------------------------------------------------------ portability (no GPU needed)
pytestmark = pytest.mark.usefixtures("poison")
