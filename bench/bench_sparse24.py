"""Benchmark 2:4 semi-structured linears against dense ones on DeiT-B and DeiT3-H shapes.

    python bench/bench_sparse24.py                  # everything; JSON to bench/results/sparse24_<device>.json
    python bench/bench_sparse24.py --quick          # one token count per model, smaller model batches
    python bench/bench_sparse24.py --models deit_base_patch16_224 --skip-models

Per model linear (qkv, proj, fc1, fc2) and token count (batch x tokens per image), in bf16:
- ``inference``: forward with pre-packed weights, dense ``F.linear`` against each 2:4 backend
  this GPU has (CUTLASS on sm8x, cuSPARSELt where torch ships it);
- ``heal_forward`` / ``heal_forward_backward``: a healing step of the dense masked linear against
  ``SemiStructuredLinear`` (bf16 autocast over fp32 weights, packing the weights every call,
  dense backward), via ``starfish_fast.sparse24.benchmark_layer``.
Then the latency of each whole model (random weights, 2:4 masks on qkv/proj/fc1/fc2) dense against
``export_semi_structured``, with the largest output difference as a sanity check.

Without a CUDA GPU nothing can be measured: the script says so, writes a JSON recording it, exits 0.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from devices import device_peaks, device_tag, environment, save_report  # bench/ is on sys.path
from starfish_fast.sparse24 import benchmark_layer, cuda_median_ms

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODELS = {  # tokens per image, width, MLP hidden width, (quick, full) batch sizes for the linears and the model
    "deit_base_patch16_224": dict(tokens=197, dim=768, hidden=3072, batches=(32, 128), model_batch=(16, 64)),
    "deit3_huge_patch14_224": dict(tokens=257, dim=1280, hidden=5120, batches=(8, 32), model_batch=(4, 16)),
}


def linear_shapes(spec: dict) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each linear of one block."""
    dim, hidden = spec["dim"], spec["hidden"]
    return {"qkv": (3 * dim, dim), "proj": (dim, dim), "fc1": (hidden, dim), "fc2": (dim, hidden)}


def backends_on_this_gpu() -> dict[str, type]:
    major, _ = torch.cuda.get_device_capability()
    backends = {}
    if major == 8:
        backends["cutlass"] = torch.sparse.SparseSemiStructuredTensorCUTLASS
    if major >= 8 and torch.backends.cusparselt.is_available():
        backends["cusparselt"] = torch.sparse.SparseSemiStructuredTensorCUSPARSELT
    return backends


def time_inference(out_features: int, in_features: int, tokens: int, iters: int) -> dict:
    weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16)  # (out, in)
    weight *= torch.tensor([1, 1, 0, 0], device="cuda", dtype=torch.bfloat16).repeat(in_features // 4)  # 2:4
    x = torch.randn(tokens, in_features, device="cuda", dtype=torch.bfloat16)              # (tokens, in)
    result = {"dense_ms": cuda_median_ms(lambda: F.linear(x, weight), iters)}
    for name, backend in backends_on_this_gpu().items():
        try:
            packed = backend.from_dense(weight)
            result[f"{name}_ms"] = cuda_median_ms(lambda: F.linear(x, packed), iters)
            result[f"{name}_speedup"] = result["dense_ms"] / result[f"{name}_ms"]
        except Exception as error:  # record what the backend refused; never a number it did not produce
            result[f"{name}_error"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return result


def time_model(model_name: str, batch: int, iters: int) -> dict:
    import timm

    from starfish_fast.sparse24 import export_semi_structured
    from starfish_fast.masks import apply_masks
    from starfish_fast.prune import nm_masks

    with torch.device("cuda"):
        dense = timm.create_model(model_name, pretrained=False).eval()
    masks = nm_masks(dense, scope="qkv_out_mlp")
    apply_masks(dense, masks)
    dense.to(torch.bfloat16)
    sparse = export_semi_structured(dense, masks)
    size = dense.default_cfg["input_size"][-1]
    images = torch.randn(batch, 3, size, size, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        difference = float((sparse(images).float() - dense(images).float()).abs().max())
        dense_ms = cuda_median_ms(lambda: dense(images), iters)
        sparse_ms = cuda_median_ms(lambda: sparse(images), iters)
        backends = {"sdpa_dense": sdpa_kernels(dense, images), "sdpa_sparse": sdpa_kernels(sparse, images)}
    return {"model": model_name, "batch": batch, "dtype": "bfloat16", "dense_ms": dense_ms, "sparse_ms": sparse_ms,
            **backends,
            "speedup": dense_ms / sparse_ms, "images_per_s_dense": batch * 1e3 / dense_ms,
            "images_per_s_sparse": batch * 1e3 / sparse_ms, "max_abs_logit_difference": difference}


def sdpa_kernels(model: torch.nn.Module, images: torch.Tensor) -> list[str]:
    """The attention ops one forward ran (flash, efficient, cudnn or the math fallback), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(images)
    return sorted({event.name for event in prof.events() if "attention" in event.name.lower()
                   and event.name.startswith("aten::")})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="one token count per model, small model batches")
    parser.add_argument("--skip-models", action="store_true", help="linears only, no whole-model latency")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--output", default=None, help="JSON path (default bench/results/sparse24_<device>.json)")
    args = parser.parse_args()
    report = {"benchmark": "sparse24", **environment()}
    output = Path(args.output) if args.output else \
        RESULTS_DIR / f"sparse24_{device_tag()}.json"

    if not torch.cuda.is_available():
        report.update(status="skipped", reason="2:4 semi-structured sparsity needs a CUDA GPU (sm80+); "
                                                 "nothing was measured on this CPU-only machine")
        print(report["reason"])
    else:
        peak = (device_peaks() or {}).get("bf16_tflops")
        report.update(status="measured", dtype="bfloat16", dense_bf16_peak_tflops=peak, linears=[], models=[])
        for model_name in args.models:
            spec = MODELS[model_name]
            batches = spec["batches"][:1] if args.quick else spec["batches"]
            for batch in batches:
                tokens = batch * spec["tokens"]
                for layer, (out_features, in_features) in linear_shapes(spec).items():
                    flops = 2 * tokens * out_features * in_features
                    entry = {"model": model_name, "layer": layer, "shape": [out_features, in_features],
                             "batch": batch, "tokens": tokens, "forward_gflop": flops / 1e9}
                    entry["inference"] = time_inference(out_features, in_features, tokens, args.iters)
                    dense_tflops = flops / entry["inference"]["dense_ms"] / 1e9
                    entry["inference"]["dense_tflops"] = dense_tflops
                    entry["inference"]["dense_fraction_of_peak"] = dense_tflops / peak if peak else None
                    for phase, backward in (("heal_forward", False), ("heal_forward_backward", True)):
                        try:
                            entry[phase] = benchmark_layer(out_features, in_features, tokens, backward=backward,
                                                           iters=args.iters)
                        except RuntimeError as error:
                            entry[phase] = {"error": str(error)}
                    report["linears"].append(entry)
                    save_report(report, output)                 # a run cut short keeps what it measured
                    print(json.dumps(entry))
            if not args.skip_models:
                batch = spec["model_batch"][0 if args.quick else 1]
                try:
                    report["models"].append(time_model(model_name, batch, args.iters))
                except RuntimeError as error:
                    report["models"].append({"model": model_name, "batch": batch, "error": str(error)})
                torch.cuda.empty_cache()          # the last model's weights are gone with time_model's frame
                save_report(report, output)
                print(json.dumps(report["models"][-1]))
    save_report(report, output)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
