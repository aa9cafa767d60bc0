"""Benchmark 2:4 semi-structured linears against dense ones on DeiT-B and DeiT3-H shapes, per backend.

    python bench/bench_sparse24.py                  # everything; JSON + PNG to bench/results/sparse24_<device>.*
    python bench/bench_sparse24.py --quick          # one batch per model, bf16 only, smaller model batches
    python bench/bench_sparse24.py --models deit_base_patch16_224 --skip-models --dtypes bfloat16

Per model linear (qkv, proj, fc1, fc2), token count (batch x tokens per image) and dtype (bf16, fp16), for
dense and each 2:4 backend this GPU has (``starfish_fast.sparse24_backends.BACKENDS``):
- ``inference``: the forward with the weight packed once. ``<backend>_ms`` is the kernel time (CUDA-event
  median of one call), ``<backend>_host_ms`` the host time of the Python call alone (perf_counter around
  single calls with a short GPU queue, no sync inside), so a backend that loses to dense shows whether the
  kernel or the per-call host work (descriptor and plan set-up) is why;
- ``heal``: the healing step (bf16/fp16 autocast over fp32 weights, packing every call, dense backward)
  against the dense masked linear, via ``starfish_fast.probe_sparse24.measure_layer``.
Then each whole model (random weights, 2:4 masks on qkv/proj/fc1/fc2) dense against
``export_semi_structured`` with each backend forced and with ``auto``, the largest logit difference beside.
A plot of the inference speedup per layer and backend is written beside the JSON.

Without a CUDA GPU nothing can be measured: the script says so, writes a JSON recording it, exits 0.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from devices import device_peaks, device_tag, environment, save_report  # bench/ is on sys.path
from starfish_fast import cusparselt
from starfish_fast.checkpoint import atomic_path, error_line
from starfish_fast.probe_sparse24 import layer_step, measure_layer
from starfish_fast.sparse24_backends import BACKENDS, backend_reason
from starfish_fast.timing import cuda_median_ms

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODELS = {  # tokens per image, width, MLP hidden width, (quick, full) batch sizes for the linears and the model
    "deit_base_patch16_224": dict(tokens=197, dim=768, hidden=3072, batches=(32, 128), model_batch=(16, 128)),
    "deit3_huge_patch14_224": dict(tokens=257, dim=1280, hidden=5120, batches=(8, 32), model_batch=(4, 16)),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def linear_shapes(spec: dict) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each linear of one block."""
    dim, hidden = spec["dim"], spec["hidden"]
    return {"qkv": (3 * dim, dim), "proj": (dim, dim), "fc1": (hidden, dim), "fc2": (dim, hidden)}


def backends_on_this_gpu(dtype: torch.dtype = torch.bfloat16) -> dict[str, str]:
    """Every 2:4 backend with '' if it runs here, else why not."""
    return {name: backend_reason(name, torch.device("cuda"), dtype) for name in BACKENDS}


def host_ms(fn, calls: int = 20) -> float:
    """Median host time of one ``fn()`` call (no sync inside; the queue is drained first, so it stays short)."""
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def time_inference(out_features: int, in_features: int, tokens: int, iters: int,
                   dtype: torch.dtype = torch.bfloat16) -> dict:
    """Kernel and host ms of the inference forward, dense and per backend, with speedups over dense."""
    shape = (out_features, in_features)
    result = {"dtype": str(dtype).replace("torch.", "")}
    for name, why in {"dense": "", **backends_on_this_gpu(dtype)}.items():
        try:
            if why:
                raise RuntimeError(why)
            step = layer_step(name, shape, tokens=tokens, dtype=dtype, device="cuda", purpose="inference")
            result[f"{name}_ms"] = cuda_median_ms(step, iters)
            result[f"{name}_host_ms"] = host_ms(step)
            result[f"{name}_speedup"] = result["dense_ms"] / result[f"{name}_ms"]
        except Exception as error:  # record what the backend refused; never a number it did not produce
            result[f"{name}_error"] = error_line(error)
    return result


def time_heal(out_features: int, in_features: int, tokens: int, iters: int, dtype: torch.dtype) -> dict:
    """Median ms of the healing step (forward with packing + dense backward) per backend, against dense."""
    result = {}
    for name, why in {"dense": "", **backends_on_this_gpu(dtype)}.items():
        try:
            if why:
                raise RuntimeError(why)
            result[f"{name}_ms"] = measure_layer(name, (out_features, in_features), tokens=tokens, dtype=dtype,
                                                 device="cuda", purpose="heal",
                                                 timer=lambda fn: cuda_median_ms(fn, iters))
            result[f"{name}_speedup"] = result["dense_ms"] / result[f"{name}_ms"]
        except Exception as error:  # as above: the refusal is the result
            result[f"{name}_error"] = error_line(error)
    return result


def time_model(model_name: str, batch: int, iters: int, dtype: torch.dtype = torch.bfloat16,
               variants: tuple[str, ...] | None = None) -> dict:
    """A whole random-weight model, dense against its 2:4 exports (each backend forced, and ``auto``)."""
    import timm

    from starfish_fast.masks import apply_masks
    from starfish_fast.prune import nm_masks
    from starfish_fast.sparse24_export import export_semi_structured

    with torch.device("cuda"):
        dense = timm.create_model(model_name, pretrained=False).eval()
    masks = nm_masks(dense, scope="qkv_out_mlp")
    apply_masks(dense, masks)
    dense.to(dtype)
    size = dense.default_cfg["input_size"][-1]
    images = torch.randn(batch, 3, size, size, device="cuda", dtype=dtype)
    tokens = batch * MODELS.get(model_name, {"tokens": 197})["tokens"]
    report = {"model": model_name, "batch": batch, "dtype": str(dtype).replace("torch.", ""), "tokens": tokens}
    with torch.inference_mode():
        reference = dense(images).float()
        report["max_abs_logit_dense"] = float(reference.abs().max())
        report["dense_ms"] = cuda_median_ms(lambda: dense(images), iters)
        report["sdpa_dense"] = sdpa_kernels(dense, images)
        available = [name for name, why in backends_on_this_gpu(dtype).items() if not why]
        for label in variants or ("auto", *available):
            kwargs = dict(mode="auto") if label == "auto" else dict(mode="on", candidates=[label])
            try:
                sparse = export_semi_structured(dense, masks, tokens=tokens, **kwargs)
                ms = cuda_median_ms(lambda: sparse(images), iters)
                report[label] = {"ms": ms, "speedup": report["dense_ms"] / ms,
                                 "images_per_s": batch * 1e3 / ms, "reason": sparse.sparse24_decision["reason"],
                                 "max_abs_logit_difference": float((sparse(images).float() - reference).abs().max()),
                                 "sdpa": sdpa_kernels(sparse, images)}
            except Exception as error:  # a backend that cannot export this model: its refusal is the result
                report[label] = {"error": error_line(error)}
    return report


def sdpa_kernels(model: torch.nn.Module, images: torch.Tensor) -> list[str]:
    """The attention ops one forward ran (flash, efficient, cudnn or the math fallback), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(images)
    return sorted({event.name for event in prof.events() if "attention" in event.name.lower()
                   and event.name.startswith("aten::")})


def plot_speedups(report: dict, path: Path) -> Path:
    """Bars of the inference kernel speedup over dense per layer and backend, one panel per model, dtype
    and token count; a dashed line at 1 (above it 2:4 wins)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, list[dict]] = {}
    for entry in report["linears"]:
        panels.setdefault((entry["model"], entry["inference"]["dtype"], entry["tokens"]), []).append(entry)
    backends = [name for name in BACKENDS if any(f"{name}_speedup" in e["inference"] for e in report["linears"])]
    columns = min(4, max(len(panels), 1))
    rows = -(-max(len(panels), 1) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    width = 0.8 / max(len(backends), 1)
    for ax, ((model, dtype, tokens), entries) in zip(axes.flat, panels.items()):
        for i, name in enumerate(backends):
            values = [e["inference"].get(f"{name}_speedup", 0.0) for e in entries]
            ax.bar([j + (i - (len(backends) - 1) / 2) * width for j in range(len(entries))], values, width, label=name)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(entries)), [e["layer"] for e in entries])
        ax.set_title(f"{'_'.join(model.split('_')[:2])} {dtype}, {tokens} tokens", fontsize=9)
        ax.set_ylabel("speedup over dense (kernel)", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"2:4 linears against dense, {report.get('device', 'unknown device')}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


def run(args) -> dict:
    report = {"benchmark": "sparse24", **environment(), "library": cusparselt.library_info(), "linears": [],
              "models": []}
    output = Path(args.output) if args.output else RESULTS_DIR / f"sparse24_{device_tag()}.json"
    if not torch.cuda.is_available():
        report.update(status="skipped", reason="2:4 semi-structured sparsity needs a CUDA GPU (sm80+); "
                                               "nothing was measured on this CPU-only machine")
        print(report["reason"])
        save_report(report, output)
        return report
    report.update(status="measured", dense_bf16_peak_tflops=(device_peaks() or {}).get("bf16_tflops"))
    for model_name in args.models:
        spec = MODELS[model_name]
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            for batch in spec["batches"][-1:] if args.quick else spec["batches"]:
                tokens = batch * spec["tokens"]
                for layer, (out_features, in_features) in linear_shapes(spec).items():
                    entry = {"model": model_name, "layer": layer, "shape": [out_features, in_features],
                             "batch": batch, "tokens": tokens,
                             "inference": time_inference(out_features, in_features, tokens, args.iters, dtype),
                             "heal": time_heal(out_features, in_features, tokens, args.iters, dtype)}
                    report["linears"].append(entry)
                    save_report(report, output)                 # a run cut short keeps what it measured
                    print(json.dumps(entry))
            if not args.skip_models:
                batch = spec["model_batch"][0 if args.quick else 1]
                report["models"].append(time_model(model_name, batch, args.iters, dtype))
                torch.cuda.empty_cache()
                save_report(report, output)
                print(json.dumps(report["models"][-1]))
    report["plot"] = str(plot_speedups(report, output.with_suffix(".png")))
    save_report(report, output)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--quick", action="store_true", help="the largest batch per model only, small model batches")
    parser.add_argument("--skip-models", action="store_true", help="linears only, no whole-model latency")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--output", default=None, help="JSON path (default bench/results/sparse24_<device>.json)")
    report = run(parser.parse_args())
    print(f"wrote {report.get('plot') or 'the JSON'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
