"""Parts A, B and C of ``bench/gpu_check.sh`` (see ``gpu_check.py``): each check records itself.

A ``env``: versions, device, the copy bandwidth and bf16 matmul rate measured on the spot (the
ceilings of every "fraction of peak"), each Triton kernel against its reference on poisoned outputs.
B ``engine``: a tiny ViT healed by exact fp32 and by fast mode with either kernels and teacher store
and fp16 with the grad scaler; the pinned store's targets against the GPU store's; then the headline,
DeiT-B (random weights) fast mode against the reference-equivalent loop (``bench_heal.run``).
C ``bandwidth``: the fused loss and masked Adam as fractions of the measured bandwidth, the masked
linear against cuBLAS, 2:4 linears and a 2:4 DeiT-B against dense (with the SDPA kernels that ran).
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
        from starfish_fast.sparse24 import cuda_median_ms
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
            yield (f"kernel:cosine_loss:{shape_name}:{tag}",
                   lambda s=shapes, d=dtype: kernel_cases.check_cosine_loss(s, d, device))
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


# ----------------------------------------------------------------------------- B: engine
def tiny_vit(rehearse: bool):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    size, width, depth = (16, 32, 2) if rehearse else (32, 64, 4)
    return VisionTransformer(img_size=size, patch_size=4, embed_dim=width, depth=depth, num_heads=2,
                             num_classes=10).eval()


def part_engine(rec, out, rehearse: bool) -> None:
    if not _gpu_only(rec, rehearse):
        return
    from starfish_fast import HealConfig, heal
    from starfish_fast.prune import magnitude_masks

    on_gpu = torch.cuda.is_available()
    dense = tiny_vit(rehearse)
    masks = magnitude_masks(dense, 0.5, scope="qkv_out_mlp")
    size = dense.patch_embed.img_size[0]
    calib = torch.randn(16 if rehearse else 64, 3, size, size, generator=torch.Generator().manual_seed(1))
    base = dict(epochs=3, batch_size=8 if rehearse else 16, lr=2e-3, min_lr=1e-5, progress=False, log_every=2)
    # the interpreter is wrong in bf16, and slow under dynamo: the rehearsal runs the kernels in fp32, eager
    triton = dict(precision="fp32", compile="off") if rehearse else dict(precision="bf16", compile="on")
    runs = {"exact_fp32": dict(mode="exact"),
            "fast_torch_gpu_store": dict(kernels="torch", teacher_store="gpu" if on_gpu else "memory", compile="on"),
            "fast_triton_pinned_store": dict(kernels="triton", teacher_store="pinned" if on_gpu else "memory",
                                             **triton),
            "fast_fp16_grad_scaler": dict(precision="fp16", compile="on")}
    reference = None
    for name, settings in runs.items():
        with rec.check(f"heal:tiny_vit:{name}") as numbers:
            model = copy.deepcopy(dense)
            result = heal(model, dense, masks, calib, HealConfig(**base, **settings))
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
    with rec.check("teacher:pinned_equals_gpu" if on_gpu else "teacher:disk_equals_memory") as numbers:
        numbers.update(compare_stores(dense, calib, ("gpu", "pinned") if on_gpu else ("memory", "disk")))
    headline(rec, out, rehearse)


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


def headline(rec, out, rehearse: bool) -> None:
    """DeiT-B, batch 128, 20 steps measured after 5 of warm-up: fast mode against the reference loop,
    gpu and pinned stores, then the Triton kernels; every run recorded as soon as it is measured."""
    import bench_heal
    from gpu_check_log import measured

    args = Namespace(model="fashion_vit" if rehearse else "deit_base_patch16_224",
                     batch_size=2 if rehearse else 128, steps=2 if rehearse else 25, warmup=1 if rehearse else 5,
                     sparsity=0.5, device=None, compile="auto", skip_reference=False,
                     ceiling_tflops=measured(out, "ceiling_matmul_bf16", "tflops"),
                     stores=["memory"] if rehearse else ["gpu", "pinned"], precisions=["fp32" if rehearse else "auto"],
                     kernels=["torch"])
    done: set[str] = set()

    def save(report):
        for label, entry in report["runs"].items():
            if label not in done:
                done.add(label)
                rec.record(f"heal:{args.model}:{label}", True, batch_size=args.batch_size, **entry)

    triton = {"kernels": ["triton"], "stores": ["memory" if rehearse else "gpu"], "skip_reference": True}
    if rehearse:
        triton["compile"] = "off"            # the interpreter under dynamo is slow
    for variant in ({}, triton):
        with rec.check(f"headline:{args.model}:{'+'.join(variant.get('kernels', ['torch']))}") as numbers:
            report = bench_heal.run(Namespace(**{**vars(args), **variant}), save=save)
            numbers.update({label: {key: entry.get(key) for key in (
                "images_per_s", "speedup_vs_reference", "tflops", "fraction_of_measured_matmul",
                "fp32_teacher_loss_rel_diff_vs_reference", "peak_memory_gib", "dynamo")}
                for label, entry in report["runs"].items()})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- C: bandwidth and 2:4
def part_bandwidth(rec, out, rehearse: bool) -> None:
    if not _gpu_only(rec, rehearse):
        return
    from gpu_check_log import measured

    device = _device()
    on_gpu = device.type == "cuda"
    spec = kernel_cases.MODELS["deit_b"]
    copy_gbs = measured(out, "ceiling_copy", "gbs")
    matmul_tflops = measured(out, "ceiling_matmul_bf16", "tflops")
    dtype = BF16 if on_gpu else F32
    cases = [("cosine_loss", variant, lambda v: kernel_cases.cosine_case(spec, v, device, dtype, 64 if on_gpu else 1,
                                                                         None if on_gpu else 2))
             for variant in ("triton", "eager")]
    cases += [("masked_adam", variant, lambda v: kernel_cases.adam_case(spec, v, device, None if on_gpu else 1))
              for variant in ("triton", "torch_fused", "eager")]
    cases += [(f"masked_linear:{mask}", variant, lambda v, m=mask: kernel_cases.linear_case(
        spec, m, v, device, dtype, 128 if on_gpu else 1)) for mask in ("random50", "rows50") for variant in
        ("triton", "eager")]
    for op, variant, build in cases:
        name = f"bandwidth:{op}:{variant}"
        if not on_gpu and variant in ("triton", "torch_fused"):
            rec.skip(name, "timed on CUDA only (the interpreter is not benchmarked)")
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
    sparse24(rec, on_gpu)


def sparse24(rec, on_gpu: bool) -> None:
    """2:4 forward of the four DeiT-B linears at 25,216 tokens and a whole 2:4 DeiT-B against dense."""
    if not on_gpu:
        rec.skip("sparse24", "2:4 semi-structured sparsity needs a CUDA GPU")
        return
    import bench_sparse24

    spec = bench_sparse24.MODELS["deit_base_patch16_224"]
    tokens = 128 * spec["tokens"]
    for layer, (out_features, in_features) in bench_sparse24.linear_shapes(spec).items():
        with rec.check(f"sparse24:linear:{layer}", tokens=tokens, shape=[out_features, in_features]) as numbers:
            numbers.update(bench_sparse24.time_inference(out_features, in_features, tokens, iters=20))
    with rec.check("sparse24:model:deit_base_patch16_224") as numbers:
        numbers.update(bench_sparse24.time_model("deit_base_patch16_224", 128, iters=10))
