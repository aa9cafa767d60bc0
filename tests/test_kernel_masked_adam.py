"""masked_adam_step (Triton in the CPU interpreter here, GPU with -m cuda) against torch.optim.Adam/AdamW + masking.

The kernel updates in place, so "poisoning" here means the moments start from the
values torch would hold and every updated element is compared over several steps;
masked parameter entries are additionally checked to be exactly zero.
"""
import pytest
import torch

from helpers import TOL, rel_err
from starfish_fast.kernels import masked_adam_step, masked_adam_step_reference

SHAPES = [(37, 5), (300,), (1, 1), (64, 48), (3, 5, 7)]   # odd sizes, a single element, chunk-crossing sizes
def make(shapes, mask_kind, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(*s, generator=g).to(device) for s in shapes]
    masks = []
    for i, p in enumerate(params):
        m = (torch.rand(*p.shape, generator=g) > 0.4).to(device)
        if mask_kind == "float":
            m = m.float()
        elif mask_kind == "mixed":      # some tensors unmasked (None), some all-zero, some bool
            m = None if i % 3 == 0 else (torch.zeros_like(m) if i % 3 == 1 else m)
        masks.append(m)
    with torch.no_grad():
        for p, m in zip(params, masks):
            if m is not None:
                p.mul_(m)
    return params, masks


def run_vs_torch(decoupled, weight_decay, mask_kind, lr_tensor, steps=4, device="cpu", kernel=True,
                 step_fn=masked_adam_step):
    params, masks = make(SHAPES, mask_kind, device)
    ref = [p.clone().requires_grad_() for p in params]
    opt_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = opt_cls(ref, lr=3e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        grads = [torch.randn(*p.shape, generator=gen).to(device) for p in params]
        for r, gr in zip(ref, grads):
            r.grad = gr.clone()
        opt.step()
        with torch.no_grad():
            for r, m in zip(ref, masks):
                if m is not None:
                    r.mul_(m)
        lr = torch.tensor(3e-2, device=device) if lr_tensor else 3e-2
        kw = dict(kernel=kernel) if step_fn is masked_adam_step else {}
        step_fn(params, grads, exp_avgs, exp_avg_sqs, masks, lr=lr, beta1=0.9, beta2=0.99, eps=1e-8,
                weight_decay=weight_decay, step=step, decoupled=decoupled, **kw)
        for i, (p, r, m) in enumerate(zip(params, ref, masks)):
            state = opt.state[r]
            assert rel_err(p, r.detach()) <= 1e-5, f"param {i} step {step}"
            assert rel_err(exp_avgs[i], state["exp_avg"]) <= 1e-5, f"exp_avg {i} step {step}"
            assert rel_err(exp_avg_sqs[i], state["exp_avg_sq"]) <= 1e-5, f"exp_avg_sq {i} step {step}"
            if m is not None:
                assert (p[m == 0] == 0).all(), "masked entries must stay exactly zero"


@pytest.mark.parametrize("decoupled,weight_decay", [(False, 0.0), (False, 0.1), (True, 0.0), (True, 0.05)])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "mixed"])
def test_matches_torch_adam(decoupled, weight_decay, mask_kind):
    run_vs_torch(decoupled, weight_decay, mask_kind, lr_tensor=False)


@pytest.mark.parametrize("decoupled", [False, True])
def test_lr_tensor(decoupled):
    run_vs_torch(decoupled, 0.05, "bool", lr_tensor=True)


@pytest.mark.parametrize("decoupled,weight_decay", [(False, 0.1), (True, 0.05)])
def test_reference_matches_torch_adam(decoupled, weight_decay):
    run_vs_torch(decoupled, weight_decay, "mixed", lr_tensor=False, step_fn=masked_adam_step_reference)


@pytest.mark.parametrize("lr_tensor", [False, True])
def test_reference_in_chunks_equals_one_call(monkeypatch, lr_tensor):
    """Bounded temporaries (``CHUNK_ELEMENTS``): tensors taken a few at a time give exactly the one-call step."""
    import starfish_fast.kernels.masked_adam as masked_adam

    results = []
    for chunk in (1 << 25, 300):                  # one call; then runs of at most 300 elements (a larger one alone)
        monkeypatch.setattr(masked_adam, "CHUNK_ELEMENTS", chunk)
        params, masks = make(SHAPES, "mixed")
        runs = list(masked_adam._chunked({"all": list(range(len(params)))}, params))
        assert len(runs) == (1 if chunk > 300 else len(params)), runs
        moments = [[torch.zeros_like(p) for p in params] for _ in range(2)]
        gen = torch.Generator().manual_seed(1)
        for step in range(1, 4):
            grads = [torch.randn(*p.shape, generator=gen) for p in params]
            masked_adam_step_reference(params, grads, *moments, masks, lr=torch.tensor(3e-2) if lr_tensor else 3e-2,
                                       beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05, step=step, decoupled=True)
        results.append([*params, *moments[0], *moments[1]])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_many_tensors_one_launch():
    """17 tensors of assorted sizes: every program must find its tensor (binary search)."""
    shapes = [(n,) for n in (1, 255, 256, 257, 3, 1000, 2, 511, 64, 1, 700, 5, 9, 300, 31, 2049, 17)]
    params, masks = make(shapes, "bool", seed=3)
    grads = [torch.randn_like(p) for p in params]
    ms = [torch.randn_like(p).abs() for p in params]
    vs = [torch.rand_like(p) for p in params]
    ref = [[t.clone() for t in ts] for ts in (params, ms, vs)]
    kw = dict(lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.01, step=7, decoupled=True)
    masked_adam_step(params, grads, ms, vs, masks, kernel=True, **kw)
    masked_adam_step_reference(ref[0], grads, ref[1], ref[2], masks, **kw)
    for got, want in zip(params + ms + vs, ref[0] + ref[1] + ref[2]):
        assert rel_err(got, want) <= 1e-5


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # numpy (the interpreter) warns about inf - inf
def test_masked_entries_exactly_zero_even_with_bad_grads():
    params, masks = make([(40, 9)], "bool")
    grads = [torch.randn_like(params[0])]
    grads[0][masks[0] == 0] = float("inf")                     # garbage where the mask is zero
    ms, vs = [torch.zeros_like(params[0])], [torch.zeros_like(params[0])]
    masked_adam_step(params, grads, ms, vs, masks, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                     weight_decay=0.0, step=1, decoupled=False, kernel=True)
    assert (params[0][masks[0] == 0] == 0).all()
    assert torch.isfinite(params[0][masks[0]]).all()


def test_none_grads_are_skipped():
    p, m, v = torch.ones(5), torch.zeros(5), torch.zeros(5)
    masked_adam_step([p], [None], [m], [v], [None], lr=1.0, beta1=0.9, beta2=0.999, eps=1e-8,
                     weight_decay=0.0, step=1, decoupled=False, kernel=True)
    assert torch.equal(p, torch.ones(5))
    with pytest.raises(ValueError):
        masked_adam_step([p], [p], [m], [v], [], lr=1.0, beta1=0.9, beta2=0.999, eps=1e-8,
                         weight_decay=0.0, step=1, decoupled=False)


@pytest.mark.parametrize("moments", [torch.float32, torch.float16])
def test_fp16_params(moments):
    """fp16 params with fp32 or fp16 moments: compared with the same step done in fp64 (then rounded)."""
    params, masks = make(SHAPES, "bool", seed=5)
    p16 = [p.half() for p in params]
    p64 = [p.double() for p in params]
    m16 = [torch.zeros_like(p, dtype=moments) for p in params]
    v16 = [torch.zeros_like(p, dtype=moments) for p in params]
    m64 = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    v64 = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    gen = torch.Generator().manual_seed(2)
    for step in range(1, 4):
        grads = [torch.randn(*p.shape, generator=gen).half() for p in params]
        kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.1, step=step, decoupled=True)
        masked_adam_step(p16, grads, m16, v16, masks, kernel=True, **kw)
        masked_adam_step_reference(p64, [g.double() for g in grads], m64, v64, masks, **kw)
        for a, b in zip(p16 + m16, p64 + m64):
            assert a.dtype in (torch.float16, moments)
            assert rel_err(a, b) <= 2e-3
        for p, m in zip(p16, masks):
            assert (p[m == 0] == 0).all()


def test_reference_mixed_dtypes():
    """fp32 params with bf16 moments (MaskedAdam's moments_dtype) on the torch path: computed in fp32."""
    params, masks = make(SHAPES, "float", seed=4)
    p64 = [p.double() for p in params]
    m_lo = [torch.zeros_like(p, dtype=torch.bfloat16) for p in params]
    v_lo = [torch.zeros_like(p, dtype=torch.bfloat16) for p in params]
    m64 = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    v64 = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    generator = torch.Generator().manual_seed(5)          # fixed gradients: the bound below is for these
    for step in range(1, 4):
        grads = [torch.randn(p.shape, generator=generator) for p in params]
        kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.1, step=step, decoupled=False)
        masked_adam_step(params, grads, m_lo, v_lo, masks, kernel=False, **kw)
        masked_adam_step_reference(p64, [g.double() for g in grads], m64, v64, masks, **kw)
    for a, b in zip(params + m_lo, p64 + m64):
        assert rel_err(a, b) <= 1e-2
    assert m_lo[0].dtype == torch.bfloat16 and params[0].dtype == torch.float32


# ------------------------------------------------------------------------ GPU
@pytest.mark.cuda
@pytest.mark.parametrize("decoupled,weight_decay", [(False, 0.0), (False, 0.1), (True, 0.05)])
@pytest.mark.parametrize("mask_kind,lr_tensor", [("bool", False), ("float", True), ("mixed", False)])
def test_cuda_matches_torch_adam(decoupled, weight_decay, mask_kind, lr_tensor):
    run_vs_torch(decoupled, weight_decay, mask_kind, lr_tensor, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,moments", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.float16, torch.float32)])
def test_cuda_low_precision_params(dtype, moments):
    torch.manual_seed(0)
    shapes = [(768, 768), (3072, 768), (1001,), (1, 1)]
    params = [torch.randn(*s, device="cuda") for s in shapes]
    masks = [torch.rand(*s, device="cuda") > 0.5 for s in shapes]
    for p, m in zip(params, masks):
        p.mul_(m)
    lo = [p.to(dtype) for p in params]
    hi = [p.to(dtype).double() for p in params]
    m_lo = [torch.zeros_like(p, dtype=moments) for p in params]
    v_lo = [torch.zeros_like(p, dtype=moments) for p in params]
    m_hi = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    v_hi = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for step in range(1, 4):
        grads = [torch.randn_like(p).to(dtype) for p in params]
        kw = dict(lr=torch.tensor(1e-3, device="cuda"), beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.05,
                  step=step, decoupled=True)
        masked_adam_step(lo, grads, m_lo, v_lo, masks, kernel=True, **kw)
        masked_adam_step_reference(hi, [g.double() for g in grads], m_hi, v_hi, masks, **kw)
    for a, b, m in zip(lo, hi, masks):
        assert rel_err(a, b) <= TOL[dtype]
        assert (a[m == 0] == 0).all()
