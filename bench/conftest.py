"""pytest-benchmark set-up for bench/bench_kernels.py: JSON path, machine info, peaks, targets summary.

    python -m pytest bench/bench_kernels.py      # writes bench/results/kernels_<device>.json

Only acts when bench_kernels.py is being run (other scripts in bench/ are plain scripts).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from devices import device_peaks, device_tag, environment  # bench/ is on sys.path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


TARGETS = {  # (op, mask) -> list of (name, metric, threshold)
    ("cosine_loss", None): [("fraction of memory bandwidth", "fraction", 0.70),
                            ("speed-up over eager", "speedup_vs_eager", 3.0),
                            ("working memory (peak less gradients): eager / triton", "memory_ratio_vs_eager", 2.0)],
    ("masked_linear", "random50"): [("speed-up over F.linear + mask multiply", "speedup_vs_eager", 1.0)],
    ("masked_linear", "rows50"): [("speed-up over F.linear + mask multiply", "speedup_vs_eager", 1.6)],
    ("masked_adam", None): [("fraction of memory bandwidth", "fraction", 0.70)],
}


def _running_kernels_bench(config) -> bool:
    return any("bench_kernels" in str(a) for a in config.args)


def pytest_configure(config):
    # runs before pytest-benchmark's own (trylast) configure, which reads this option
    if _running_kernels_bench(config) and getattr(config.option, "benchmark_json", None) is None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        config.option.benchmark_json = open(RESULTS_DIR / f"kernels_{device_tag()}.json", "wb")
    config._starfish_rows = []
    # pytest-benchmark writes its JSON when the session ends: a killed run would lose every number,
    # so each row also goes to a JSON-lines file the moment it is measured
    config._starfish_rows_path = Path(os.environ.get("STARFISH_BENCH_ROWS",
                                                     RESULTS_DIR / f"kernels_{device_tag()}.rows.jsonl"))


def pytest_collection_modifyitems(session, config, items):
    # torch.compile cases last: compiling leaves the CPU busy (and caches warm) for a while,
    # which would pollute the eager and Triton rounds measured after it
    items.sort(key=lambda item: "compile" in item.name)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["starfish"] = environment()


@pytest.fixture
def record(request):
    """Store one benchmark row: rate and fraction of peak from the work done and the median time."""
    rows = request.config._starfish_rows

    def _record(benchmark, *, median_s, work, unit, **row):
        peaks = device_peaks()
        if unit == "flop":
            rate = work / median_s / 1e12
            peak = None if peaks is None else (peaks["fp32_tflops"] if row["dtype"] == "float32"
                                               else peaks["bf16_tflops"])
            row.update(tflops=rate, fraction=None if peak is None else rate / peak)
        else:
            rate = work / median_s / 1e9
            peak = None if peaks is None else peaks["memory_gbs"]
            row.update(gbs=rate, fraction=None if peak is None else rate / peak)
        row.update(median_ms=median_s * 1e3, work=work, unit=unit)
        benchmark.extra_info.update(row)
        rows.append(row)
        path = request.config._starfish_rows_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({**row, "device": environment()["device"]}, default=str) + "\n")
    return _record


def summarize(rows: list[dict]) -> dict:
    """Compare variants per (op, model, mask); check the issue's targets; recommend kernels='auto'."""
    cases: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        cases.setdefault((r["op"], r["model"], r["mask"]), {})[r["variant"]] = r
    checks, wins = [], {}
    for (op, model, mask), variants in sorted(cases.items(), key=lambda kv: str(kv[0])):
        tri, eager = variants.get("triton"), variants.get("eager")
        derived = {}
        if tri and eager:
            derived["speedup_vs_eager"] = eager["median_ms"] / tri["median_ms"]
            if tri.get("peak_mem_bytes") and eager.get("peak_mem_bytes"):
                derived["memory_ratio_vs_eager"] = eager["peak_mem_bytes"] / tri["peak_mem_bytes"]
            wins.setdefault(op, []).append(derived["speedup_vs_eager"] > 1.0)
        if tri and "compile" in variants:
            derived["speedup_vs_compile"] = variants["compile"]["median_ms"] / tri["median_ms"]
        if tri:
            derived["fraction"] = tri.get("fraction")
        for name, metric, threshold in TARGETS.get((op, mask), []):
            value = derived.get(metric)
            entry = {"op": op, "model": model, "mask": mask, "target": f"{name} >= {threshold:g}",
                     "value": value}
            if value is None:
                entry["status"] = "unmeasured" + ("" if tri else " (no Triton run: needs a CUDA GPU)")
            else:
                entry["status"] = "met" if value >= threshold else f"missed by {100 * (1 - value / threshold):.0f}%"
            checks.append(entry)
    recommend = {op: all(w) for op, w in wins.items()}
    return {**environment(), "targets": checks, "recommended_auto_triton_on_cuda": recommend or None}


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = getattr(config, "_starfish_rows", [])
    if not rows:
        return
    tr = terminalreporter
    s = summarize(rows)
    tr.section("starfish kernel benchmarks")
    tr.write_line(f"device: {s['device']}  torch {s['torch']}  triton {s['triton']}  peaks: {s['peaks']}")
    tr.write_line(f"{'op':<14}{'model':<9}{'mask':<10}{'variant':<12}{'shape':<28}{'median ms':>11}"
                  f"{'TFLOP/s':>9}{'GB/s':>9}{'of peak':>9}{'peak MiB':>10}")
    for r in rows:
        mem = None if r.get("peak_mem_bytes") is None else r["peak_mem_bytes"] / 2 ** 20
        tr.write_line(f"{r['op']:<14}{r['model']:<9}{str(r['mask'] or '-'):<10}{r['variant']:<12}"
                      f"{str(r['shape']):<28}{r['median_ms']:>11.3f}{_fmt(r.get('tflops'), '.3g'):>9}"
                      f"{_fmt(r.get('gbs'), '.4g'):>9}{_fmt(r.get('fraction'), '.0%'):>9}{_fmt(mem, '.0f'):>10}")
    for c in s["targets"]:
        tr.write_line(f"target {c['op']}/{c['model']}/{c['mask'] or '-'}: {c['target']}: "
                      f"{_fmt(c['value'], '.2f')} -> {c['status']}")
    tr.write_line(f"recommended AUTO_TRITON_ON_CUDA: {s['recommended_auto_triton_on_cuda']}")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    rows = getattr(config, "_starfish_rows", [])
    if rows:
        output_json["starfish"] = summarize(rows)
