"""Kernel microbenchmarks (pytest-benchmark): each Triton kernel against eager torch and torch.compile.

    python -m pytest bench/bench_kernels.py            # JSON -> bench/results/kernels_<device>.json
    python bench/bench_kernels.py                      # the same
    STARFISH_BENCH_COMPILE=0 python bench/bench_kernels.py   # skip the torch.compile variants
    STARFISH_BENCH_THREADS=2 python bench/bench_kernels.py   # CPU intra-op threads (default 1, see below)

What is timed (median of several rounds, CUDA synchronised inside each round):
- ``masked_linear``: forward + backward (dx, dW, dbias) at the DeiT-B fc1 (768->3072) and DeiT3-H
  fc1 (1280->5120) shapes, tokens = batch x 197 / 257; masks ``random50`` (unstructured 50%)
  and ``rows50`` (half the output rows zero). Baseline ``eager`` = ``F.linear(x, w * mask, b)``,
  i.e. F.linear plus a separate mask multiply. TFLOP/s counts the dense work (3 GEMMs).
- ``cosine_loss``: forward + backward over L=12 DeiT-B / L=32 DeiT3-H block outputs, bf16
  students and teachers on a GPU (fp32 on CPU). GB/s counts the fused design's traffic:
  read S and T in the forward, read S and T and write dS in the backward.
- ``masked_adam``: one step over all linear weights of the model (fp32 params, grads and moments,
  bool masks; 29 bytes per element).
Variants: ``triton`` (CUDA only), ``eager`` (the reference), ``compile`` (torch.compile of the
reference, compiled in the warm-up rounds: about 20 s per case on a 2-core CPU), and for the optimizer
``torch_fused`` (torch.optim.AdamW(fused=True) + mask multiply) as the strongest stock baseline.
Peak memory is the CUDA allocator's peak above the inputs during one call, less the outputs every
variant must produce (the cosine loss's student gradients), i.e. the op's working memory (None on CPU).
On CPU only small shapes (batch 1-2, fewer blocks) of the reference paths run: the numbers
check that the script works, they say nothing about GPU speed.
The summary (targets met or missed, by how much, and the recommended kernels="auto" table)
is printed at the end and stored under "starfish" in the JSON.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from starfish_fast.kernels import (mask_plan, masked_adam_step, masked_adam_step_reference, masked_linear,
                                   masked_linear_reference, multi_block_cosine_loss,
                                   multi_block_cosine_loss_reference, triton_available_for)

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
TRITON_OK = triton_available_for(torch.empty(0, device=DEVICE)) and ON_GPU   # the interpreter is not benchmarked
COMPILE_OK = os.environ.get("STARFISH_BENCH_COMPILE", "1") == "1"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
ROUNDS, WARMUP = (20, 3) if ON_GPU else (7, 2)   # CPU: shared, noisy cores; more rounds for the median
if not ON_GPU:
    # One intra-op thread by default: with another process busy on the cores (as in CI and
    # on the 2-core dev box), two threads are descheduled at every parallel region: a
    # foreach multiply of 14M floats took 111 ms with 2 threads against 2 ms with 1.
    torch.set_num_threads(int(os.environ.get("STARFISH_BENCH_THREADS", "1")))
    # compile in-process: a background pool of compile workers would steal the cores
    # from the eager rounds measured next
    import torch._inductor.config as inductor_config
    inductor_config.compile_threads = 1

# model -> (tokens per image, width, MLP width, blocks, batch on GPU, batch on CPU, blocks on CPU)
MODELS = {
    "deit_b": dict(tokens=197, dim=768, hidden=3072, blocks=12, batch=64, cpu_batch=2, cpu_blocks=2),
    "deit3_h": dict(tokens=257, dim=1280, hidden=5120, blocks=32, batch=32, cpu_batch=1, cpu_blocks=1),
}


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


def _batch(spec):
    return spec["batch"] if ON_GPU else spec["cpu_batch"]


def _blocks(spec):
    return spec["blocks"] if ON_GPU else spec["cpu_blocks"]


def _compiled(fn):
    try:
        return torch.compile(fn)
    except Exception as exc:  # pragma: no cover - depends on the install
        pytest.skip(f"torch.compile unavailable: {exc}")


def _peak_memory(step, output_bytes: int) -> int | None:
    """The allocator's peak above the inputs during one call, less ``output_bytes`` (what every
    variant must produce, e.g. the students' gradients): the op's own working memory."""
    if not ON_GPU:
        return None
    _sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    _sync()
    return torch.cuda.max_memory_allocated() - base - output_bytes


def _run(benchmark, record, step, *, op, model, variant, shape, work, unit, mask=None, output_bytes=0):
    """Warm up (compiles/autotunes), measure peak memory once, time, and record the row."""
    if variant == "triton" and not TRITON_OK:
        pytest.skip("Triton kernels need a CUDA GPU (the CPU interpreter is not benchmarked)")
    if variant in ("compile",) and not COMPILE_OK:
        pytest.skip("torch.compile variants switched off (STARFISH_BENCH_COMPILE=0)")
    if variant == "torch_fused" and not ON_GPU:
        pytest.skip("fused torch Adam is benchmarked on CUDA only")

    def timed():
        step()
        _sync()
    try:
        for _ in range(WARMUP):
            timed()
    except Exception as exc:
        if variant == "compile":
            pytest.skip(f"torch.compile failed here: {type(exc).__name__}: {exc}")
        raise
    peak = _peak_memory(step, output_bytes)
    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    record(benchmark, op=op, model=model, variant=variant, mask=mask, shape=shape, dtype=str(DTYPE).replace(
        "torch.", ""), median_s=median, work=work, unit=unit, peak_mem_bytes=peak)


# ------------------------------------------------------------------------ masked linear
def _linear_mask(kind, n, k, device):
    if kind == "random50":
        return torch.rand(n, k, device=device) > 0.5
    if kind == "rows50":
        mask = torch.ones(n, k, dtype=torch.bool, device=device)
        mask[n // 2:] = False                    # the second half of the output neurons pruned
        return mask
    raise ValueError(kind)


@pytest.mark.parametrize("variant", ["triton", "eager", "compile"])
@pytest.mark.parametrize("mask_kind", ["random50", "rows50"])
@pytest.mark.parametrize("model", list(MODELS))
def test_masked_linear(benchmark, record, model, mask_kind, variant):
    spec = MODELS[model]
    torch.manual_seed(0)
    m, k, n = _batch(spec) * spec["tokens"], spec["dim"], spec["hidden"]        # fc1: (M, K) -> (M, N)
    x = torch.randn(m, k, device=DEVICE, dtype=DTYPE, requires_grad=True)      # (M, K)
    w = (torch.randn(n, k, device=DEVICE) / k ** 0.5).to(DTYPE).requires_grad_()   # (N, K)
    b = torch.zeros(n, device=DEVICE, dtype=DTYPE, requires_grad=True)
    mask = _linear_mask(mask_kind, n, k, DEVICE)
    dy = torch.randn(m, n, device=DEVICE, dtype=DTYPE)
    if variant == "triton":
        plan = mask_plan(mask, DTYPE) if TRITON_OK else None                    # built once, as MaskedLinear caches it
        fn = lambda: masked_linear(x, w, mask, b, plan=plan, kernel=True)        # noqa: E731
    elif variant == "eager":
        fn = lambda: masked_linear_reference(x, w, mask, b)                      # noqa: E731
    else:
        compiled = _compiled(masked_linear_reference)
        fn = lambda: compiled(x, w, mask, b)                                    # noqa: E731

    def step():
        x.grad = w.grad = b.grad = None
        fn().backward(dy)
    _run(benchmark, record, step, op="masked_linear", model=model, variant=variant, mask=mask_kind,
         shape=[m, k, n], work=3 * 2 * m * n * k, unit="flop")


# ------------------------------------------------------------------------ cosine loss
@pytest.mark.parametrize("variant", ["triton", "eager", "compile"])
@pytest.mark.parametrize("model", list(MODELS))
def test_cosine_loss(benchmark, record, model, variant):
    spec = MODELS[model]
    torch.manual_seed(0)
    shape = (_batch(spec), spec["tokens"], spec["dim"])                          # (B, T, D) per block
    blocks = _blocks(spec)
    students = [torch.randn(*shape, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(blocks)]
    teachers = [torch.randn(*shape, device=DEVICE, dtype=DTYPE) for _ in range(blocks)]
    if variant == "triton":
        fn = lambda: multi_block_cosine_loss(students, teachers, "token", kernel=True)   # noqa: E731
    elif variant == "eager":
        fn = lambda: multi_block_cosine_loss_reference(students, teachers, "token")      # noqa: E731
    else:
        compiled = _compiled(multi_block_cosine_loss_reference)
        fn = lambda: compiled(students, teachers, "token")                            # noqa: E731

    def step():
        for s in students:
            s.grad = None
        fn().backward()
    elems = blocks * shape[0] * shape[1] * shape[2]
    esize = torch.finfo(DTYPE).bits // 8
    _run(benchmark, record, step, op="cosine_loss", model=model, variant=variant, shape=[blocks, *shape],
         work=5 * elems * esize, unit="byte", output_bytes=elems * esize)        # the students' gradients


# ------------------------------------------------------------------------ masked Adam
def _model_weights(spec):
    d, h = spec["dim"], spec["hidden"]
    per_block = [(3 * d, d), (d, d), (h, d), (d, h)]                              # qkv, proj, fc1, fc2
    return per_block * _blocks(spec)


@pytest.mark.parametrize("variant", ["triton", "eager", "compile", "torch_fused"])
@pytest.mark.parametrize("model", list(MODELS))
def test_masked_adam(benchmark, record, model, variant):
    spec = MODELS[model]
    torch.manual_seed(0)
    shapes = _model_weights(spec)
    params = [torch.randn(*s, device=DEVICE) for s in shapes]
    grads = [torch.randn(*s, device=DEVICE) for s in shapes]
    masks = [torch.rand(*s, device=DEVICE) > 0.5 for s in shapes]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    kw = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05, decoupled=True)
    if variant == "torch_fused":
        leaves = [torch.nn.Parameter(p) for p in params]
        for leaf, g in zip(leaves, grads):
            leaf.grad = g
        opt = torch.optim.AdamW(leaves, lr=1e-4, weight_decay=0.05, fused=True)
        fmasks = [m.to(torch.float32) for m in masks]

        def step():
            opt.step()
            with torch.no_grad():
                torch._foreach_mul_(leaves, fmasks)
    else:
        fn = {"triton": lambda *a, **k: masked_adam_step(*a, kernel=True, **k),
              "eager": masked_adam_step_reference}.get(variant)
        if variant == "compile":
            fn = _compiled(masked_adam_step_reference)

        def step():
            # a fixed step count: a new Python int every call would recompile the compiled variant
            # each time (dynamo specialises on it) and time eager code after its recompile limit
            fn(params, grads, exp_avgs, exp_avg_sqs, masks, step=10, **kw)
    numel = sum(p.numel() for p in params)
    _run(benchmark, record, step, op="masked_adam", model=model, variant=variant, shape=[len(shapes), numel],
         work=29 * numel, unit="byte")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider", *sys.argv[1:]]))
