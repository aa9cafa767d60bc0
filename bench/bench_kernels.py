"""Kernel microbenchmarks (pytest-benchmark): each Triton kernel against eager torch and torch.compile.

    python -m pytest bench/bench_kernels.py            # JSON -> bench/results/kernels_<device>.json
                                                       # (and one line per case as it is measured:
                                                       #  bench/results/kernels_<device>.rows.jsonl)
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
The cases themselves live in ``kernel_cases.py`` (shared with ``gpu_check.py``).
The summary (targets met or missed, by how much, and the recommended kernels="auto" table)
is printed at the end and stored under "starfish" in the JSON.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from kernel_cases import MODELS, adam_case, cosine_case, linear_case  # bench/ is on sys.path
from starfish_fast.kernels import runnable

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
TRITON_OK = runnable(DEVICE) and ON_GPU   # the interpreter is not benchmarked
COMPILE_OK = os.environ.get("STARFISH_BENCH_COMPILE", "1") == "1"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
ROUNDS, WARMUP = (20, 3) if ON_GPU else (7, 2)   # CPU: shared, noisy cores; more rounds for the median
# model -> batch on GPU; on CPU batch 2 / 1 and one or two blocks only (see the docstring)
BATCH = {"deit_b": 64, "deit3_h": 32} if ON_GPU else {"deit_b": 2, "deit3_h": 1}
CPU_BLOCKS = {"deit_b": 2, "deit3_h": 1}
if not ON_GPU:
    # One intra-op thread by default: with another process busy on the cores (as in CI and
    # on the 2-core dev box), two threads are descheduled at every parallel region: a
    # foreach multiply of 14M floats took 111 ms with 2 threads against 2 ms with 1.
    torch.set_num_threads(int(os.environ.get("STARFISH_BENCH_THREADS", "1")))
    # compile in-process: a background pool of compile workers would steal the cores
    # from the eager rounds measured next
    import torch._inductor.config as inductor_config
    inductor_config.compile_threads = 1


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


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


def _skip_unavailable(variant: str) -> None:
    if variant == "triton" and not TRITON_OK:
        pytest.skip("Triton kernels need a CUDA GPU (the CPU interpreter is not benchmarked)")
    if variant == "compile" and not COMPILE_OK:
        pytest.skip("torch.compile variants switched off (STARFISH_BENCH_COMPILE=0)")
    if variant == "torch_fused" and not ON_GPU:
        pytest.skip("fused torch Adam is benchmarked on CUDA only")
    torch.manual_seed(0)


def _run(benchmark, record, case, *, op, model, variant, mask=None):
    """Warm up (compiles/autotunes), measure peak memory once, time, and record the row."""
    def timed():
        case.step()
        _sync()
    try:
        for _ in range(WARMUP):
            timed()
    except Exception as exc:
        if variant == "compile":
            pytest.skip(f"torch.compile failed here: {type(exc).__name__}: {exc}")
        raise
    peak = _peak_memory(case.step, case.output_bytes)
    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    record(benchmark, op=op, model=model, variant=variant, mask=mask, shape=case.shape,
           dtype=str(DTYPE).replace("torch.", ""), median_s=benchmark.stats.stats.median, work=case.work,
           unit=case.unit, peak_mem_bytes=peak)


@pytest.mark.parametrize("variant", ["triton", "eager", "compile"])
@pytest.mark.parametrize("mask_kind", ["random50", "rows50"])
@pytest.mark.parametrize("model", list(MODELS))
def test_masked_linear(benchmark, record, model, mask_kind, variant):
    _skip_unavailable(variant)
    case = linear_case(MODELS[model], mask_kind, variant, DEVICE, DTYPE, BATCH[model])
    _run(benchmark, record, case, op="masked_linear", model=model, variant=variant, mask=mask_kind)


@pytest.mark.parametrize("variant", ["triton", "eager", "compile"])
@pytest.mark.parametrize("model", list(MODELS))
def test_cosine_loss(benchmark, record, model, variant):
    _skip_unavailable(variant)
    case = cosine_case(MODELS[model], variant, DEVICE, DTYPE, BATCH[model], None if ON_GPU else CPU_BLOCKS[model])
    _run(benchmark, record, case, op="cosine_loss", model=model, variant=variant)


@pytest.mark.parametrize("variant", ["triton", "eager", "compile", "torch_fused"])
@pytest.mark.parametrize("model", list(MODELS))
def test_masked_adam(benchmark, record, model, variant):
    _skip_unavailable(variant)
    case = adam_case(MODELS[model], variant, DEVICE, None if ON_GPU else CPU_BLOCKS[model])
    _run(benchmark, record, case, op="masked_adam", model=model, variant=variant)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider", *sys.argv[1:]]))
