"""The parts of ``bench/gpu_check.sh`` (see ``gpu_check.py``): each check records itself.

A ``env``: versions, device, the copy bandwidth and bf16 matmul rate measured on the spot (the
ceilings of every "fraction of peak"), each Triton kernel against its reference on poisoned outputs
(fp16 with a scaled loss, as fp16 training runs).
B ``e2e``: a tiny ViT healed exact and fast (torch and Triton kernels, GPU and pinned stores, fp16 with
the grad scaler); then the whole call of the paper's jobs scaled to the part's time (bench_e2e.py:
fast mode against the reference-equivalent loop, fast auto / eager / compiled) and the DeiT-B batch-128
steady state (bench_heal.py) with torch and with Triton kernels (dynamo's graphs and breaks).
C ``compile``: two processes with empty inductor caches sharing one starfish_fast compile cache: cold, then warm.
D ``profile``: a torch.profiler breakdown of fast DeiT-B steps at batch 128: the top kernels and their share.
E ``kernels``: the fused loss and masked Adam as fractions of the measured bandwidth against the torch
paths they replace, the masked linear against cuBLAS.
F ``sparse24`` lives in ``gpu_check_sparse24.py``.
"""
from __future__ import annotations

import copy
import statistics
import time
from argparse import Namespace

import torch

import kernel_cases
from devices import PEAKS, device_peaks, environment

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def time_ms(step, device: torch.device, iters: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``step()`` (CUDA events on a GPU, the wall clock on a CPU)."""
    if device.type == "cuda":
        from starfish_fast.timing import cuda_median_ms
        return cuda_median_ms(step, iters=iters, warmup=warmup)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(max(3, iters // 4)):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _gpu_only(rec, rehearse: bool) -> bool:
    """False (and the checks recorded as skipped by the caller) on a CPU run that is not a rehearsal."""
    if torch.cuda.is_available() or rehearse:
        return True
    rec.skip("all", "no CUDA GPU here: run bench/gpu_check.sh on a GPU, or with --rehearse on a CPU")
    return False


# ----------------------------------------------------------------------------- A: environment and kernels
def part_env(rec, out, rehearse: bool) -> None:
    device = _device()
    with rec.check("environment") as numbers:
        numbers.update(environment())
        import timm
        import torchvision
        numbers.update(torchvision=torchvision.__version__, timm=timm.__version__)
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            numbers.update(sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
                           datasheet=device_peaks(), known_devices=sorted(PEAKS))
    if not _gpu_only(rec, rehearse):
        return
    with rec.check("ceiling_copy") as numbers:
        numbers.update(copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 25)))
    with rec.check("ceiling_matmul_bf16") as numbers:
        numbers.update(matmul_rate(device, 8192 if device.type == "cuda" else 384))
    for name, run in kernel_checks(device, rehearse):
        if isinstance(run, str):
            rec.skip(name, run)
            continue
        with rec.check(name) as numbers:
            numbers.update(run())


def copy_bandwidth(device, nbytes: int) -> dict:
    """Device copy: bytes read plus bytes written per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return {"bytes": nbytes, "ms": ms, "gbs": 2 * nbytes / ms / 1e6}


def matmul_rate(device, n: int) -> dict:
    a = torch.randn(n, n, device=device, dtype=BF16)
    b = torch.randn(n, n, device=device, dtype=BF16)
    ms = time_ms(lambda: a @ b, device, iters=10)
    return {"n": n, "ms": ms, "tflops": 2 * n ** 3 / ms / 1e9}


def kernel_checks(device, rehearse: bool):
    """(name, check or the reason it is skipped) for each kernel, dtype and shape."""
    dtypes = (F32, F16) if rehearse else (BF16, F16, F32)
    if rehearse:
        cos_shapes = {"blocks2": [(2, 5, 40)] * 2, "odd": [(3, 7, 10), (1, 1, 33)]}
        linear_shapes = {"random50": (37, 64, 48), "rows50": (37, 64, 48), "odd": (9, 20, 13)}
        adam_shapes = {"weights": [(48, 32), (64,)], "odd": [(37, 11), (5,)]}
    else:
        cos_shapes = {"deit_b": [(8, 197, 768)] * 12, "odd": [(3, 37, 100), (2, 5, 33), (1, 1, 7)]}
        linear_shapes = {"random50": (8 * 197, 768, 3072), "rows50": (8 * 197, 768, 3072), "odd": (37, 100, 70)}
        adam_shapes = {"deit_b": kernel_cases.model_weight_shapes(kernel_cases.MODELS["deit_b"], 1),
                       "odd": [(37, 101), (5,)]}
    for dtype in dtypes:
        tag = str(dtype).replace("torch.", "")
        for shape_name, shapes in cos_shapes.items():
            # fp16 as it trains: a scaled loss (GradScaler's 2**16), else DeiT-B's gradients are fp16 subnormals
            scale = 2.0 ** 16 if dtype == F16 else 1.0
            yield (f"kernel:cosine_loss:{shape_name}:{tag}",
                   lambda s=shapes, d=dtype, g=scale: kernel_cases.check_cosine_loss(s, d, device, grad_scale=g))
        yield (f"kernel:cosine_loss:per_sample:{tag}",
               lambda d=dtype: kernel_cases.check_cosine_loss([(2, 4, 5, 5)] * 3, d, device, per="sample"))
        yield (f"kernel:cosine_loss:teacher_fp32:{tag}",
               lambda d=dtype: kernel_cases.check_cosine_loss([(2, 9, 40)] * 2, d, device, teacher_dtype=F32))
        for mask_kind, (m, k, n) in linear_shapes.items():
            yield (f"kernel:masked_linear:{mask_kind}:{tag}",
                   lambda a=(m, k, n, mask_kind), d=dtype: kernel_cases.check_masked_linear(*a, d, device))
        for shape_name, shapes in adam_shapes.items():
            yield (f"kernel:masked_adam:{shape_name}:{tag}",
                   lambda s=shapes, d=dtype: kernel_cases.check_masked_adam(s, d, device))
    yield ("kernel:masked_adam:bf16_moments", lambda: kernel_cases.check_masked_adam(
        [(48, 32), (37, 11)], F32, device, moments_dtype=BF16))
    if rehearse:
        for name in ("cosine_loss", "masked_linear", "masked_adam"):
            yield f"kernel:{name}:bfloat16", "bf16 is wrong in Triton's CPU interpreter"


# ----------------------------------------------------------------------------- B: end to end
def tiny_vit(rehearse: bool):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    size, width, depth = (16, 32, 2) if rehearse else (32, 64, 4)
    return VisionTransformer(img_size=size, patch_size=4, embed_dim=width, depth=depth, num_heads=2,
                             num_classes=10).eval()


def part_e2e(rec, out, rehearse: bool) -> None:
    if not _gpu_only(rec, rehearse):
        return
    tiny_heals(rec, rehearse)
    whole_calls(rec, out, rehearse)
    headline(rec, out, rehearse)


def tiny_heals(rec, rehearse: bool) -> None:
    """Correctness on this GPU: exact fp32, fast with either kernels and teacher store, fp16 with the
    grad scaler; losses agree, masked weights stay exactly zero; pinned targets equal device targets."""
    from starfish_fast import HealConfig, heal
    from starfish_fast.prune import magnitude_masks

    on_gpu = torch.cuda.is_available()
    dense = tiny_vit(rehearse)
    masks = magnitude_masks(dense, 0.5, scope="qkv_out_mlp")
    size = dense.patch_embed.img_size[0]
    calib = torch.randn(16 if rehearse else 64, 3, size, size, generator=torch.Generator().manual_seed(1))
    base = dict(epochs=3, batch_size=8 if rehearse else 16, lr=2e-3, min_lr=1e-5, progress=False, log_every=2,
                compile="off")
    # the interpreter is wrong in bf16: the rehearsal runs the kernels in fp32
    runs = {"exact_fp32": dict(mode="exact"),
            "fast_torch_device_store": dict(kernels="torch", teacher_store="device"),
            "fast_triton_pinned_store": dict(kernels="triton", teacher_store="pinned" if on_gpu else "device",
                                             precision="fp32" if rehearse else "bf16"),
            "fast_fp16_grad_scaler": dict(precision="fp32" if rehearse else "fp16")}
    reference = None
    for name, settings in runs.items():
        with rec.check(f"heal:tiny_vit:{name}") as numbers:
            model = copy.deepcopy(dense)
            result = heal(model, dense, masks, calib, HealConfig(**{**base, **settings}))
            state = model.state_dict()
            zero = all(bool((state[k][~m.to(state[k].device)] == 0).all()) for k, m in masks.items())
            losses = [h["loss"] for h in result.history]
            reference = reference or losses
            numbers.update(epoch_losses=losses, plan=result.plan.summary(), ran=result.ran, masked_zero=zero,
                           last_epoch_rel_diff_vs_exact=abs(losses[-1] - reference[-1]) / reference[-1])
            if not zero:
                raise AssertionError("masked weights are not exactly zero")
            if abs(losses[-1] - reference[-1]) > 0.05 * reference[-1] + 1e-3:
                raise AssertionError(f"last epoch loss {losses[-1]:.5f} vs exact fp32 {reference[-1]:.5f}")
    with rec.check("teacher:pinned_equals_device" if on_gpu else "teacher:disk_equals_device") as numbers:
        numbers.update(compare_stores(dense, calib, ("device", "pinned") if on_gpu else ("device", "disk")))


def compare_stores(dense, calib, kinds) -> dict:
    from starfish_fast.models import adapter_for
    from starfish_fast.teacher import make_teacher_store

    device, adapter = _device(), adapter_for(dense)
    model = copy.deepcopy(dense).to(device)
    batches = list(calib.split(8))
    stores = [make_teacher_store(kind, model, adapter, adapter.block_names(model), batches, device, dtype=BF16,
                                 compute_dtype=BF16 if device.type == "cuda" else F32) for kind in kinds]
    compared = 0
    for index in range(len(batches)):
        for store in stores:
            store.prefetch(index)
        for a, b in zip(*(store.get(index) for store in stores)):
            if not torch.equal(a.to(device), b.to(device)):
                raise AssertionError(f"batch {index}: {kinds[0]} and {kinds[1]} targets differ")
            compared += 1
    return {"stores": list(kinds), "tensors_compared": compared}


# the paper's jobs scaled to the part (the full ones are bench_e2e.py's defaults), most valuable first:
# (job, images or sequences, epochs, batch, implementations)
E2E_JOBS = (("deit_b", 1000, 3, 32, ("reference_loop", "fast", "fast_eager", "fast_compiled")),
            ("llama_1b", 32, 1, 8, ("reference_loop", "fast")),
            ("deit3_h", 160, 2, 32, ("reference_loop", "fast", "fast_eager")))


def whole_calls(rec, out, rehearse: bool) -> None:
    """The whole call of each job: the reference-equivalent loop, fast mode as planned, eager and compiled
    (bench_e2e.py); each implementation recorded the moment it is measured."""
    import bench_e2e

    jobs = (("fashion_vit", 64, 2, 32, ("reference_loop", "fast", "fast_eager")),) if rehearse else E2E_JOBS
    report = {"environment": {}, "jobs": {}}
    recorded: set[tuple[str, str]] = set()

    def save(report):
        for job, data in report["jobs"].items():
            for impl, run in data["runs"].items():
                if (job, impl) not in recorded:
                    recorded.add((job, impl))
                    rec.record(f"e2e:{job}:{impl}", None if "skipped" in run else True, images=data["images"],
                               epochs=data["epochs"], batch=data["batch"], **run)

    for job, images, epochs, batch, implementations in jobs:
        catalogue = bench_e2e.REHEARSAL if rehearse else bench_e2e.JOBS
        args = Namespace(images=images, epochs=epochs, batch=batch, implementations=list(implementations),
                         reference_repo=None, rehearse=rehearse, device=str(_device()))
        with rec.check(f"e2e:{job}") as numbers:
            bench_e2e.run_job(job, catalogue[job], args, report, save)
            runs = report["jobs"][job]["runs"]
            numbers.update({impl: run.get("speedup_whole_call") for impl, run in runs.items()})
            if "fast" in runs and "fast_eager" in runs:
                numbers["fast_over_eager"] = runs["fast_eager"]["seconds"] / runs["fast"]["seconds"]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def headline(rec, out, rehearse: bool) -> None:
    """DeiT-B, batch 128, steady state after warm-up: fast mode (torch kernels, then the Triton kernels as
    custom ops inside the compiled blocks: dynamo's graphs and breaks); the reference loop's 322 img/s at this
    setting is in bench/results/gpu_check_h200_2026-12-04 and not re-measured."""
    import bench_heal
    from gpu_check_log import measured

    args = Namespace(model="fashion_vit" if rehearse else "deit_base_patch16_224",
                     batch_size=2 if rehearse else 128, steps=2 if rehearse else 20, warmup=1 if rehearse else 5,
                     sparsity=0.5, device=None, compile="off" if rehearse else "on", skip_reference=True,
                     ceiling_tflops=measured(out, "ceiling_matmul_bf16", "tflops"), stores=["device"],
                     precisions=["fp32" if rehearse else "auto"], kernels=["torch"])
    done: set[str] = set()

    def save(report):
        for label, entry in report["runs"].items():
            if label not in done:
                done.add(label)
                rec.record(f"heal:{args.model}:{label}", True, batch_size=args.batch_size, **entry)

    for kernels in ("torch", "triton"):
        with rec.check(f"headline:{args.model}:{kernels}") as numbers:
            report = bench_heal.run(Namespace(**{**vars(args), "kernels": [kernels]}), save=save)
            numbers.update({label: {key: entry.get(key) for key in (
                "images_per_s", "tflops", "fraction_of_measured_matmul", "peak_memory_gib", "dynamo")}
                for label, entry in report["runs"].items()})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- C: compile cold and warm
def part_compile(rec, out, rehearse: bool) -> None:
    """bench_compile.py's three processes (eager, compiled cold, compiled warm from the saved cache), each
    with its own empty inductor cache; the rehearsal runs eager only (a CPU compile takes minutes)."""
    import bench_compile

    if not _gpu_only(rec, rehearse):
        return
    model, images, epochs, batch = ("fashion_vit", 32, 1, 16) if rehearse else ("deit_base_patch16_224", 512, 2, 64)
    runs = ("eager",) if rehearse else ("eager", "cold", "warm")
    with rec.check(f"compile:{model}", images=images, epochs=epochs, batch=batch) as numbers:
        results = bench_compile.measure(model, images, epochs, batch, runs, record=lambda label, numbers: rec.record(
            f"compile:{model}:{label}", True, **numbers))
        numbers.update(results.get("compile_cost") or {})


# ----------------------------------------------------------------------------- D: profile
def part_profile(rec, out, rehearse: bool) -> None:
    """Where a fast DeiT-B step's GPU time goes (batch 128, eager: what compile="auto" picks for jobs too
    short to repay a compile; the planned kernels): steps 6 to 8 of a 10-step heal under torch.profiler,
    kernels ranked by time and shares by kind."""
    if not _gpu_only(rec, rehearse):
        return
    from bench_e2e import make_job
    from starfish_fast import HealConfig, heal, steps

    model, images, batch = ("fashion_vit", 20, 2) if rehearse else ("deit_base_patch16_224", 1280, 128)
    dense, pruned, masks, calib = make_job(model, images)
    activities = [torch.profiler.ProfilerActivity.CPU] + \
        ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = torch.profiler.profile(activities=activities)
    original = steps.FastStep.__call__
    window = (5, 8)                                     # steps profiled: after warm-up, before the end

    def profiled(self, step, index):
        if step == window[0]:
            _synchronize()
            profiler.start()
        loss = original(self, step, index)
        if step == window[1] - 1:
            _synchronize()
            profiler.stop()
        return loss

    with rec.check(f"profile:{model}:step", batch=batch, steps=window[1] - window[0]) as numbers:
        steps.FastStep.__call__ = profiled
        try:
            heal(pruned, dense, masks, calib, HealConfig(epochs=1, batch_size=batch, progress=False, log_every=100,
                                                          compile="off", device=str(_device())))
        finally:
            steps.FastStep.__call__ = original
        numbers.update(kernel_breakdown(profiler, window[1] - window[0]))


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


CATEGORIES = (("gemm", ("gemm", "cutlass", "sm90_xmma", "sm80_xmma", "ampere", "hopper", "cublas", "matmul", "mm_")),
              ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
              ("optimizer", ("adam", "foreach", "fused_adam")), ("loss", ("_cos_",)),
              ("norm", ("layer_norm", "layernorm")), ("triton (fused elementwise)", ("triton_",)))


def kernel_breakdown(profiler, steps: int) -> dict:
    """The top kernels by device time (per step, ms, and share of all device time), and shares by kind."""
    def device_time(event) -> float:                    # the name changed across torch versions
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0) or 0

    averages = profiler.key_averages()
    timed = [(e.key, device_time(e)) for e in averages if str(getattr(e, "device_type", "")).endswith("CUDA")
             and device_time(e) > 0]
    if not timed:                                        # a CPU rehearsal: the host ops instead
        timed = [(e.key, e.self_cpu_time_total) for e in averages if e.self_cpu_time_total > 0]
    total = sum(t for _, t in timed) or 1.0
    top = sorted(timed, key=lambda item: -item[1])[:15]
    shares: dict[str, float] = {}
    for name, t in timed:
        kind = next((label for label, words in CATEGORIES if any(w in name.lower() for w in words)), "other")
        shares[kind] = shares.get(kind, 0.0) + t / total
    return {"ms_per_step": total / 1e3 / steps, "top": [{"kernel": name[:120], "ms_per_step": t / 1e3 / steps,
                                                          "share": t / total} for name, t in top],
            "shares": dict(sorted(shares.items(), key=lambda item: -item[1]))}


# ----------------------------------------------------------------------------- E: kernels against torch
def part_kernels(rec, out, rehearse: bool) -> None:
    """Each kernel against the torch path it would replace, at DeiT-B shapes: the loss against eager and
    compiled torch, masked Adam against torch's fused AdamW plus a mask multiply (the engine's torch path
    on CUDA) and the eager foreach step, the masked linear against cuBLAS on masked weights."""
    if not _gpu_only(rec, rehearse):
        return
    from gpu_check_log import measured

    device = _device()
    on_gpu = device.type == "cuda"
    spec = kernel_cases.MODELS["deit_b"]
    copy_gbs = measured(out, "ceiling_copy", "gbs")
    matmul_tflops = measured(out, "ceiling_matmul_bf16", "tflops")
    dtype = BF16 if on_gpu else F32
    cases = [("cosine_loss", variant, lambda v: kernel_cases.cosine_case(spec, v, device, dtype, 128 if on_gpu else 1,
                                                                         None if on_gpu else 2))
             for variant in ("triton", "eager", "compile")]
    cases += [("masked_adam", variant, lambda v: kernel_cases.adam_case(spec, v, device, None if on_gpu else 1))
              for variant in ("triton", "torch_fused", "eager")]
    cases += [(f"masked_linear:{mask}", variant, lambda v, m=mask: kernel_cases.linear_case(
        spec, m, v, device, dtype, 128 if on_gpu else 1)) for mask in ("random50", "rows50") for variant in
        ("triton", "eager")]
    for op, variant, build in cases:
        name = f"bandwidth:{op}:{variant}"
        if not on_gpu and variant in ("triton", "torch_fused", "compile"):
            rec.skip(name, "timed on CUDA only (the interpreter is not benchmarked; CPU compile is minutes)")
            continue
        with rec.check(name) as numbers:
            torch.manual_seed(0)
            case = build(variant)
            ms = time_ms(case.step, device)
            numbers.update(shape=case.shape, ms=ms, dtype=str(dtype))
            if case.unit == "byte":
                gbs = case.work / ms / 1e6
                numbers.update(gbs=gbs, fraction_of_measured_bandwidth=gbs / copy_gbs if copy_gbs else None)
            else:
                tflops = case.work / ms / 1e9
                numbers.update(tflops=tflops, fraction_of_measured_matmul=tflops / matmul_tflops
                               if matmul_tflops else None)
            del case
