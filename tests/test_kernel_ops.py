"""The kernels (and the 2:4 linear) as torch custom ops: torch.library.opcheck (schema, fake implementation, autograd
registration), torch.compile(fullgraph=True) through every public kernel (no graph break), and the ops'
plain-torch CPU implementation against the references."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from helpers import rel_err
from starfish_fast.kernels import (mask_layout, masked_adam_step, masked_adam_step_reference, masked_linear,
                                   masked_linear_reference, multi_block_cosine_loss,
                                   multi_block_cosine_loss_reference, sparse24_linear, sparse24_linear_reference)

OPS = torch.ops.starfish_fast
# by module path: the package's function masked_linear shadows its module of the same name as an attribute
cosine_loss, masked_adam, masked_linear_module = (importlib.import_module(f"starfish_fast.kernels.{name}")
                                                  for name in ("cosine_loss", "masked_adam", "masked_linear"))


def _cosine_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    students = [torch.randn(2, 3, 8, generator=g, requires_grad=True), torch.randn(2, 5, 16, generator=g,
                                                                                    requires_grad=True)]
    teachers = [torch.randn(2, 3, 8, generator=g), torch.randn(2, 5, 16, generator=g)]
    return students, teachers, torch.tensor([0.25, 0.75])


def _linear_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 40, generator=g, requires_grad=True)                     # (M, K)
    w = torch.randn(24, 40, generator=g, requires_grad=True)                    # (N, K)
    b = torch.randn(24, generator=g, requires_grad=True)
    mask = torch.rand(24, 40, generator=g) > 0.5
    return x, w, mask, b, mask_layout(mask, torch.float32)


def _adam_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 7), (33,)]
    params = [torch.randn(*s, generator=g) for s in shapes]
    grads = [torch.randn(*s, generator=g) for s in shapes]
    masks = [torch.rand(*shapes[0], generator=g) > 0.5, None]
    return params, grads, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params], masks


def test_opcheck_every_op():
    students, teachers, weights = _cosine_inputs()
    torch.library.opcheck(OPS.cosine_loss.default, (students, teachers, weights / weights.sum(), "token"))
    _, _, coef = OPS.cosine_loss(students, teachers, weights / weights.sum(), "token")
    torch.library.opcheck(OPS.cosine_loss_backward.default,
                          (coef.detach(), [s.detach() for s in students], teachers, torch.tensor(1.0), "token"))
    x, w, mask, b, layout = _linear_inputs()
    parts = (layout.occ, layout.fwd_count, layout.fwd_index, layout.dx_count, layout.dx_index, layout.occupancy)
    torch.library.opcheck(OPS.masked_linear.default, (x, w, mask, b, *parts))
    dy = torch.randn(7, 24)
    torch.library.opcheck(OPS.masked_linear_backward.default,
                          (dy, x.detach(), w.detach(), mask, layout.occ, layout.dx_count, layout.dx_index,
                           layout.occupancy, True, True))
    torch.library.opcheck(OPS.sparse24_linear.default, (x, w, mask, b, 0))      # layer 0: the plain-torch product
    torch.library.opcheck(OPS.sparse24_linear.default, (x, w, mask, None, 0))
    params, grads, exp_avgs, exp_avg_sqs, masks = _adam_inputs()
    torch.library.opcheck(OPS.masked_adam_step.default, (params, grads, exp_avgs, exp_avg_sqs, masks, 1e-3, None,
                                                         0.9, 0.999, 1e-8, 0.05, 1, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_through_every_public_kernel():
    """One graph, no break, with the kernels as opaque ops; the results equal eager."""
    students, teachers, weights = _cosine_inputs()
    x, w, mask, b, layout = _linear_inputs()

    def forward(students, teachers, x, w, b):
        loss = multi_block_cosine_loss(students, teachers, "token", block_weights=weights, kernel=True)
        return loss + masked_linear(x, w, mask, b, layout=layout, kernel=True).square().mean()

    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    expected = forward(students, teachers, x, w, b)
    expected.backward()
    grads = [t.grad.clone() for t in (*students, x, w, b)]
    for t in (*students, x, w, b):
        t.grad = None
    got = compiled(students, teachers, x, w, b)
    got.backward()
    assert rel_err(got, expected) <= 1e-6
    for ours, theirs in zip((t.grad for t in (*students, x, w, b)), grads):
        assert rel_err(ours, theirs) <= 1e-6

    params, grads_, exp_avgs, exp_avg_sqs, masks = _adam_inputs()
    twins = [p.clone() for p in params]
    step = torch.compile(lambda p, g, m, v: masked_adam_step(p, g, m, v, masks, lr=1e-2, beta1=0.9, beta2=0.99,
                                                             eps=1e-8, weight_decay=0.1, step=1, decoupled=True,
                                                             kernel=True), fullgraph=True, backend="aot_eager")
    step(params, grads_, exp_avgs, exp_avg_sqs)
    masked_adam_step_reference(twins, grads_, [torch.zeros_like(p) for p in twins],
                               [torch.zeros_like(p) for p in twins], masks, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                               weight_decay=0.1, step=1, decoupled=True)
    for ours, theirs in zip(params, twins):
        assert rel_err(ours, theirs) <= 1e-6


def test_the_ops_plain_torch_implementation_matches_the_references(monkeypatch):
    """What the ops run on CPU tensors without Triton's interpreter."""
    for module in (cosine_loss, masked_linear_module, masked_adam):
        monkeypatch.setattr(module, "INTERPRET", False)
    students, teachers, weights = _cosine_inputs()
    s64 = [s.detach().double().requires_grad_() for s in students]
    loss, blocks, _ = OPS.cosine_loss(students, teachers, weights / weights.sum(), "token")
    (3.0 * loss).backward()
    ref, ref_blocks = multi_block_cosine_loss_reference(s64, [t.double() for t in teachers], "token",
                                                        block_weights=weights.double(), per_block=True)
    (3.0 * ref).backward()
    assert rel_err(loss, ref) <= 1e-5 and rel_err(blocks, ref_blocks) <= 1e-5
    for s, r in zip(students, s64):
        assert rel_err(s.grad, r.grad) <= 1e-5
    x, w, mask, b, layout = _linear_inputs()
    y = OPS.masked_linear(x, w, mask, b, layout.occ, layout.fwd_count, layout.fwd_index, layout.dx_count,
                          layout.dx_index, layout.occupancy)
    y.square().sum().backward()
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    masked_linear_reference(x64, w64, mask, b64).square().sum().backward()
    assert rel_err(y, F.linear(x64, w64 * mask, b64)) <= 1e-5
    for ours, theirs in ((x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert rel_err(ours, theirs) <= 1e-5
    assert (w.grad[~mask] == 0).all()
    x, w, mask, b, _ = _linear_inputs(seed=1)
    sparse24_linear(x.view(7, 1, 40), w, mask, b).square().sum().backward()      # (..., K) in, (..., N) out
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    sparse24_linear_reference(x64, w64, mask, b64).square().sum().backward()
    for ours, theirs in ((x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert rel_err(ours, theirs) <= 1e-5
    assert (w.grad[~mask] == 0).all()


@pytest.mark.parametrize("decoupled", [False, True])
def test_the_fused_torch_adam_path_matches_the_reference(decoupled):
    """The torch path on CUDA (torch's fused Adam/AdamW, then the mask), run here on the CPU's fused kernel."""
    params, grads, exp_avgs, exp_avg_sqs, masks = _adam_inputs()
    twins = [p.clone() for p in params], [m.clone() for m in exp_avgs], [v.clone() for v in exp_avg_sqs]
    float_masks = [m.float() if m is not None else None for m in masks]
    for step in (1, 2, 3):
        masked_adam._fused_torch_step(params, grads, exp_avgs, exp_avg_sqs, float_masks, lr=torch.tensor(1e-2),
                                      beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=step,
                                      decoupled=decoupled)
        masked_adam_step_reference(*twins[:1], grads, twins[1], twins[2], masks, lr=1e-2, beta1=0.9, beta2=0.99,
                                   eps=1e-8, weight_decay=0.1, step=step, decoupled=decoupled)
    for ours, theirs in zip(params + exp_avgs + exp_avg_sqs, twins[0] + twins[1] + twins[2]):
        assert rel_err(ours, theirs) <= 1e-5
    assert (params[0][~masks[0]] == 0).all()
